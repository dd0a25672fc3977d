"""The `llmarch run` placement that fits one GPU and the host: where the routed experts live
(--experts gpu|cpu|disk) and in what format (--expert-bits), where the per-layer embedding table
lives (--ple gpu|cpu|disk), for the largest context it allows.

llmarch run holds weights in the model dtype (bf16 on a GPU; an f32 checkpoint stays f32),
routed experts in their --expert-bits format, and a static KV cache of prompt + --max-tokens
tokens in the model dtype (sliding layers a ring of their window, MLA layers the latent).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from llmarch.arch.spec import ArchSpec
from llmarch.plan import memory as mem

DISK_CACHE = 2 * mem.GiB  # --expert-cache-gib default: expert bytes kept mapped with --experts disk
# dense weights with --keep-quantized --quant-bits 8: int8 plus an f32 scale per 32 inputs
KEEP_QUANTIZED_8 = 1 + 4 / 32


@dataclass(frozen=True)
class Option:
    experts: str | None  # None: a dense model
    bits: int | str | None  # 16 | 8 | 4 | "mxfp4" (as shipped) | None: dense at the model dtype
    keep_quantized: bool = False
    ple: str | None = None  # gpu | cpu | disk: where the per-layer embedding table lives (None: no table)

    def args(self) -> list[str]:
        out = []
        if self.experts:
            out += ["--experts", self.experts]
        if isinstance(self.bits, int) and self.experts:
            out += ["--expert-bits", str(self.bits)]
        if self.keep_quantized:
            out += ["--keep-quantized", "--quant-bits", "8"]
        if self.ple:
            out += ["--ple", self.ple]
        return out


def unsupported(spec: ArchSpec) -> str | None:
    """Why llmarch run cannot run this model (the recipe's supports and the facts it has no layers for)."""
    if "run" not in spec.supports:
        return f"llmarch run does not support the family {spec.family!r} yet"
    return gguf_refusal(spec) if spec.format == "gguf" else None


def gguf_refusal(spec: ArchSpec) -> str | None:
    """Why llmarch run does not read this model from GGUF: per-layer-embedding and linear-attention
    models are read through their GGUF -> HF view only where the family's from_gguf tests prove
    that view (Gemma 3n / 4, the hybrids llama.cpp has arches for)."""
    if "from_gguf" in spec.supports:
        return None
    if spec.per_layer_embeddings:
        return f"{spec.family} models from GGUF are not supported by llmarch run yet; use the safetensors checkpoint"
    if spec.linear_attention:
        return "linear-attention models from GGUF are not supported by llmarch run yet; use the safetensors checkpoint"
    return None


def _options(spec: ArchSpec, mxfp4: bool) -> list[Option]:
    """Placements, fastest first: experts nearer the GPU first, then the per-layer embedding table
    (--ple gpu, then cpu, then disk: rows read per step)."""
    if not spec.moe:
        base = [Option(None, None), Option(None, None, keep_quantized=True)]
    else:
        host_float = "mxfp4" if mxfp4 else 16  # gpt-oss's experts stay MXFP4 on the CPU without --expert-bits
        base = [
            Option("gpu", 16),
            Option("gpu", 8),
            Option("gpu", 4),
            Option("cpu", host_float),
            Option("cpu", 8),
            Option("cpu", 4),
            Option("disk", 4),
        ]
    if not spec.per_layer_embeddings:
        return base
    return [replace(o, ple=p) for o in base for p in ("gpu", "cpu", "disk")]


def _expert_bytes(routed_params: int, bits, dtype_bytes: int) -> int:
    per = dtype_bytes if bits == 16 else mem.EXPERT_BYTES_PER_WEIGHT[bits]
    return int(routed_params * per)


def run_dtype_bytes(spec: ArchSpec) -> int:
    """llmarch run's weight dtype on a GPU: the checkpoint's float width (bf16 for a GGUF)."""
    return mem.float_bytes(spec) if spec.format == "safetensors" else 2


def footprint(spec: ArchSpec, opt: Option, dtype_bytes: int) -> tuple[int, int]:
    """(weight bytes on the GPU, bytes in host RAM) of one placement."""
    parts = mem.text_parts(mem.param_parts(spec))
    routed = parts.pop("routed_experts")
    ple = parts.pop("ple") * dtype_bytes  # the table, in the compute dtype wherever it is resident
    per = KEEP_QUANTIZED_8 if opt.keep_quantized else dtype_bytes
    dense = int(sum(v * (dtype_bytes if k == "embeddings" else per) for k, v in parts.items()))
    experts = _expert_bytes(routed, opt.bits, dtype_bytes) if opt.experts else 0
    on_host = {"cpu": experts, "disk": min(experts, DISK_CACHE)}.get(opt.experts or "", 0)
    on_gpu = dense + (experts if opt.experts == "gpu" else 0)
    if opt.ple == "cpu":
        on_host += ple
    elif opt.ple != "disk":
        on_gpu += ple
    return on_gpu, on_host


def plan_run(spec: ArchSpec, source: str | None, gpu: int, host: int | None, context: int, limit: int) -> dict:
    """`source`: as the user named it (None: run's embedded model). The first placement (fastest first) that fits `gpu` bytes of one GPU and `host` bytes of
    RAM at `context`, else the one that allows the largest context."""
    why = unsupported(spec)
    if why:
        return {"supported": False, "reason": why}
    dtype_bytes = run_dtype_bytes(spec)
    kv_dtype = "f32" if dtype_bytes == 4 else "bf16"
    mxfp4 = bool(spec.moe) and any(d in ("U8", "MXFP4") for d in spec.dtypes)
    state = mem.state_bytes(spec, kv_dtype)  # recurrent layers' fixed state, in the model dtype as run keeps it
    rows = []
    for opt in _options(spec, mxfp4):
        on_gpu, on_host = footprint(spec, opt, dtype_bytes)
        quantized_on_gpu = opt.experts == "gpu" and opt.bits != 16
        fixed = mem.CUDA_CONTEXT + mem.run_overhead(spec, dtype_bytes, quantized_on_gpu)

        def need(c: int, base: int = on_gpu + fixed) -> int:
            return base + mem.kv_bytes(spec, c, kv_dtype) + state

        host_ok = host is None or on_host <= host
        best = mem.largest_context(need, gpu, limit) if host_ok else 0
        rows.append((opt, on_gpu, on_host, best, need))
    chosen = next((r for r in rows if r[3] >= context), None) or max(rows, key=lambda r: r[3])
    opt, on_gpu, on_host, best, need = chosen
    if best == 0:
        return {
            "supported": True,
            "fits": False,
            "reason": "no placement fits: even the smallest leaves no room for one token of cache",
        }
    ctx = min(context, best)
    return {
        "supported": True,
        "fits": True,
        "experts": opt.experts,
        "expert_bits": opt.bits,
        "keep_quantized": opt.keep_quantized,
        "ple": opt.ple,
        "dtype_bytes": dtype_bytes,
        "gpu_bytes": need(ctx),
        "gpu_weights": on_gpu,
        "kv_cache": mem.kv_bytes(spec, ctx, kv_dtype),
        "recurrent_state": state,
        "host_bytes": on_host,
        # a long prompt's host experts dequantized on the GPU, in memory left free (not in gpu_bytes)
        "gpu_prompt_upload": mem.upload_chunk_bytes(spec) if opt.experts in ("cpu", "disk") else 0,
        "context": ctx,
        "largest_context": best,
        "command": " ".join(
            [
                "llmarch",
                "run",
                *([source] if source else []),
                *opt.args(),
                "--max-tokens",
                str(ctx),
                "--prompt",
                "'...'",
            ]
        ),
        "note": "the cache holds prompt + --max-tokens tokens: keep the two within the context",
    }

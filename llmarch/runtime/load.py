"""source -> (spec, ready model): fingerprint, pick device/dtype, build on meta, assign weights."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmarch.arch.recipe_book import families_supporting
from llmarch.arch.spec import ArchSpec
from llmarch.errors import LlmarchError
from llmarch.runtime.weights import ST_DTYPES

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


@dataclass
class Runtime:
    spec: ArchSpec
    model: torch.nn.Module
    ckpt: object
    device: torch.device
    dtype: torch.dtype
    notes: list[str] = field(default_factory=list)


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LlmarchError("--device cuda asked for, but no CUDA GPU is available (torch sees none); use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise LlmarchError(f"unknown --device {device!r}; use cpu or cuda")
    return torch.device(device)


def _has_fast_bf16_cpu() -> bool:
    cap = torch.backends.cpu.get_cpu_capability()
    return cap in ("AVX512_BF16", "AMX") or "AMX" in cap


def pick_dtype(dtype: str | None, ckpt, device: torch.device, notes: list[str]) -> torch.dtype:
    if dtype is not None:
        if dtype not in DTYPES:
            raise LlmarchError(f"unknown --dtype {dtype!r}; one of float32, bfloat16, float16")
        return DTYPES[dtype]
    floats = [t.dtype for t in ckpt.tensors.values() if t.dtype in ("F32", "BF16", "F16")]
    stored = max(set(floats), key=floats.count) if floats else None
    if ckpt.format == "gguf" or stored is None:
        chosen = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        chosen = ST_DTYPES[stored]
    if device.type == "cpu" and chosen != torch.float32 and not _has_fast_bf16_cpu():
        notes.append(f"dtype float32 (this CPU has no native bf16/fp16 matmul; {chosen} would be slower)")
        chosen = torch.float32
    return chosen


def supported_note() -> str:
    return f"llmarch run supports {', '.join(families_supporting('run'))}"


def check_supported(spec: ArchSpec, path, gguf: bool = False) -> None:
    """The family's recipe says whether run is proven for it; the facts below refuse what no
    runtime path exists for whatever the family."""
    if not spec.layers or not spec.hidden_size:
        raise LlmarchError(
            f"unknown model family (no usable config: no layer count or hidden size); {supported_note()}", path
        )
    if "run" not in spec.supports:
        raise LlmarchError(f"family {spec.family!r} is not supported by llmarch run yet; {supported_note()}", path)
    if gguf and spec.attention.mla:
        raise LlmarchError(
            "MLA models from GGUF are not supported by llmarch run yet (llama.cpp splits kv_b into "
            "k_b/v_b); use the safetensors checkpoint",
            path,
        )
    if spec.per_layer_embeddings:
        raise LlmarchError(
            f"llmarch run has no per-layer-embedding layers yet (family {spec.family!r}); {supported_note()}", path
        )
    if gguf and spec.linear_attention:
        raise LlmarchError(
            "linear-attention models from GGUF are not supported by llmarch run yet; use the safetensors checkpoint",
            path,
        )


def load_runtime(
    source: str | None,
    device: str | None = None,
    dtype: str | None = None,
    quant_bits: int | None = None,
    experts: str | None = None,
    expert_bits: int | None = None,
    gpu_experts: int = 0,
    expert_cache_gib: float = 2.0,
    expert_dir: str | None = None,
) -> Runtime:
    from llmarch.api import load_checkpoint_spec
    from llmarch.runtime.model import build_model, load_weights
    from llmarch.runtime.weights import open_weights

    dev = pick_device(device)
    ckpt, spec = load_checkpoint_spec(source)
    check_supported(spec, ckpt.path, getattr(ckpt, "format", None) == "gguf")
    notes: list[str] = []
    dt = pick_dtype(dtype, ckpt, dev, notes)
    if spec.mtp_layers:
        notes.append(f"{spec.mtp_layers} MTP layer(s) skipped: llmarch run predicts one token per step")
    if quant_bits and dev.type == "cuda" and quant_bits == 4:
        raise LlmarchError("--keep-quantized 4-bit runs on the CPU only; use 8 on cuda")
    model = build_model(spec)
    if spec.moe is not None:  # where the routed experts live
        from llmarch.runtime.experts.placement import attach, plan
        from llmarch.runtime.moe_names import has_mxfp4_experts

        attach(
            model,
            plan(
                spec, dev, dt, experts, expert_bits, gpu_experts, expert_cache_gib, expert_dir, has_mxfp4_experts(ckpt)
            ),
            dt,
            dev,
        )
    load_weights(model, open_weights(ckpt, spec), dt, dev, quant_bits)
    model.eval()
    return Runtime(spec, model, ckpt, dev, dt, notes)

"""The llama.cpp flags that fit: -ngl (layers on the GPUs), --n-cpu-moe (the first N layers'
experts left in host RAM) and -c (context), from the GGUF's bytes by part.

llama.cpp keeps the input embedding table (and Gemma 3n's per-layer embedding table) on the CPU
whatever -ngl says (lookups, not matmuls); the output head goes to the GPU with the last of -ngl (n_layers + 1); a layer's KV cache
lives where the layer does. Its GPUs share layers in proportion (split-mode layer), so N GPUs are
budgeted as one of N times the memory less a CUDA context each.
"""

from __future__ import annotations

from llmarch.arch.spec import ArchSpec
from llmarch.plan import memory as mem

LLAMACPP_KV = ("f32", "f16", "bf16", "q8_0", "q4_0")  # -ctk/-ctv types we can size


def weights(spec: ArchSpec) -> dict[str, int]:
    """Bytes llama.cpp loads by part: the GGUF's tensors (a safetensors source: converted at its
    stored dtypes, vision tower to its own mmproj file, MTP layers dropped as convert does)."""
    parts = mem.stored_parts(spec)
    return parts if spec.format == "gguf" else mem.text_parts(parts)


def kv_flags(kv_dtype: str) -> list[str]:
    return [] if kv_dtype == "f16" else ["-ctk", kv_dtype, "-ctv", kv_dtype, "-fa", "on"]


def plan_llamacpp(spec: ArchSpec, source: str, gpu: int, gpus: int, context: int, limit: int, kv_dtype: str) -> dict:
    if kv_dtype not in LLAMACPP_KV:
        return {"supported": False, "reason": f"llama.cpp has no {kv_dtype} KV cache type"}
    if not spec.gguf_arch:
        return {"supported": False, "reason": f"llama.cpp has no GGUF architecture for the family {spec.family!r}"}
    w = weights(spec)
    layers = max(spec.layers, 1)
    n_moe = sum(1 for l in spec.schedule if l.ffn == "moe")
    experts = w.get("routed_experts", 0)
    per_layer_experts = experts / n_moe if n_moe else 0.0
    per_layer = (sum(w.values()) - w["embeddings"] - w["output_head"] - w["ple"] - experts) / layers
    # a tied head is the embedding table copied to where the output layer runs
    head = w["output_head"] or w["embeddings"]
    budget = gpus * (gpu - mem.CUDA_CONTEXT) - mem.batch_overhead(spec)
    state = mem.llamacpp_state_bytes(spec)

    def on_gpu(ngl: int, cpu_moe: int, c: int) -> int:
        """GPU bytes with the last `ngl` blocks (+ the head at n_layers + 1) offloaded and the
        first `cpu_moe` MoE layers' experts kept on the host."""
        blocks = min(ngl, layers)
        moe_on_gpu = max(0, min(blocks, n_moe) - max(0, cpu_moe - (layers - blocks)))
        share = blocks / layers
        return int(
            blocks * per_layer
            + moe_on_gpu * per_layer_experts
            + (head if ngl > layers else 0)
            + share * (mem.llamacpp_kv_bytes(spec, c, kv_dtype) + state)
        )

    all_layers = layers + 1

    def best_context(ngl: int, cpu_moe: int) -> int:
        return mem.largest_context(lambda c: on_gpu(ngl, cpu_moe, c), budget, limit)

    ngl, cpu_moe = all_layers, 0
    if best_context(all_layers, 0) < context and n_moe:
        cpu_moe = next((n for n in range(n_moe + 1) if best_context(all_layers, n) >= context), n_moe)
    if best_context(ngl, cpu_moe) < context:
        ngl = next((n for n in range(all_layers, -1, -1) if best_context(n, cpu_moe) >= context), 0)
    best = best_context(ngl, cpu_moe) if ngl else limit
    ctx = min(context, best) if best else 0
    total = sum(w.values()) + mem.llamacpp_kv_bytes(spec, max(ctx, 1), kv_dtype) + state
    gpu_bytes = on_gpu(ngl, cpu_moe, max(ctx, 1)) if ngl else 0
    model, convert = source, None
    if spec.format != "gguf":  # llama.cpp reads GGUF: convert first, at the checkpoint's dtype
        model = (source.rstrip("/").rsplit("/", 1)[-1] or "model") + ".gguf"
        convert = (
            f"llmarch convert {source} --to gguf -o {model}"
            if "convert" in spec.supports
            else f"python convert_hf_to_gguf.py {source} --outfile {model}  # llama.cpp's converter"
        )
    args = ["llama-server", "-m", model, "-c", str(ctx), "-ngl", str(ngl if ngl < all_layers else 999)]
    if cpu_moe:
        args += ["--n-cpu-moe", str(cpu_moe)]
    return {
        "supported": True,
        "fits": ctx > 0,
        "weights": sum(w.values()),
        "kv_cache": mem.llamacpp_kv_bytes(spec, max(ctx, 1), kv_dtype),
        "state": state,
        "ngl": ngl,
        "all_layers": ngl >= all_layers,
        "n_cpu_moe": cpu_moe,
        "context": ctx,
        "largest_context": best,
        "gpu_bytes": gpu_bytes + (mem.CUDA_CONTEXT * gpus + mem.batch_overhead(spec) if ngl else 0),
        "host_bytes": total - gpu_bytes,
        "convert": convert,
        "command": " ".join(args + kv_flags(kv_dtype)),
    }

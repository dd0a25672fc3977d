"""What a model needs in memory, by part, for each way of running it: read from the ArchSpec.

Weights come from the fingerprint's parameter counts and stored bytes by part; KV cache and
recurrent state from the spec's per-layer cache figures (sliding windows, MLA latents, KV
sharing and recurrent layers included). Each runtime keeps the cache its own way, so each gets
its own figure: llmarch run a ring of the window per sliding layer, llama.cpp `window + ubatch`
cells rounded up to 256, vLLM/SGLang the spec's figure. No torch: `fit` reads headers only.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from llmarch.arch.fingerprint.params import PARTS
from llmarch.arch.spec import KV_DTYPE_BYTES, ArchSpec
from llmarch.errors import LlmarchError

GiB = 2**30
MiB = 2**20

# routed-expert formats of `llmarch run --expert-bits` (moe_cpu.c's layouts, groups of 64
# inputs): int8 with one fp16 scale per group; int4 with an fp16 scale and min per group;
# MXFP4 as gpt-oss ships it (one e8m0 scale per 32 fp4 codes). 16: the model's dtype.
EXPERT_GROUP = 64
EXPERT_BYTES_PER_WEIGHT = {8: 1 + 2 / EXPERT_GROUP, 4: 0.5 + 4 / EXPERT_GROUP, "mxfp4": 0.5 + 1 / 32}

# assumptions for what a runtime holds beside weights and cache (shown with the plan)
CUDA_CONTEXT = 512 * MiB  # CUDA context, cuBLAS workspace and allocator slack, per GPU
LLAMACPP_UBATCH = 512  # llama.cpp's default -ub: its compute buffers and SWA cache follow it
LLAMACPP_PAD = 256  # llama.cpp rounds cache cells up to a multiple of this
PREFILL = 512  # tokens of one prefill batch: llama.cpp's -ub, and the prompt llmarch run's figure allows for
# a prompt chunk of UPLOAD_TOKENS tokens or more computes host-held experts on the GPU (llama.cpp's
# batch threshold), dequantizing at most UPLOAD_CHUNK_BYTES of them (float32) there at once
UPLOAD_TOKENS = 32
UPLOAD_CHUNK_BYTES = 512 * MiB
OVERHEAD_NOTE = (
    "runtime overhead assumed: 512 MiB per GPU (CUDA context, workspaces) plus one batch of "
    f"{PREFILL} tokens: llama.cpp's compute buffer (f32 logits and activations for every token of "
    "the batch), llmarch run's prefill (8 activations of the widest layer per token, the last "
    "token's logits, one expert dequantized at a time for quantized experts on the GPU)"
)

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str, option: str = "--memory") -> int:
    """'24GiB', '24G', '80GB', '512MiB' -> bytes. A bare G/M/T means GiB/MiB/TiB (as tools print
    memory); 'GB' means 10^9."""
    m = _SIZE.match(text or "")
    if not m or not m.group(2):
        raise LlmarchError(f"{option} wants a size with a unit such as 24GiB, 80G or 512MiB, got {text!r}")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = "KMGT".index(unit) + 1
    decimal = text.strip().upper().endswith("B") and not binary
    size = int(value * (1000**power if decimal else 1024**power))
    if size <= 0:
        raise LlmarchError(f"{option} must be positive, got {text!r}")
    return size


def host_available() -> int | None:
    """This machine's available RAM (Linux), the default for --host-memory; None when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def param_parts(spec: ArchSpec) -> dict[str, int]:
    """Parameters by part (dense: everything not in another part), as the fingerprint counted them."""
    return {k: spec.part_params.get(k, 0) for k in PARTS}


def stored_parts(spec: ArchSpec) -> dict[str, int]:
    return {k: spec.part_bytes.get(k, 0) for k in PARTS}


def float_bytes(spec: ArchSpec) -> int:
    """The checkpoint's float width (2 for bf16/f16 checkpoints and quantized GGUFs)."""
    return 4 if spec.kv_dtype_default == "f32" else 2


def text_parts(parts: dict[str, int]) -> dict[str, int]:
    """What a text-only runtime loads: vision/audio towers and MTP layers left out."""
    return {k: v for k, v in parts.items() if k not in ("vision", "mtp")}


def kv_bytes(spec: ArchSpec, context: int, kv_dtype: str) -> int:
    """Cache at `context` tokens as the spec counts it (windows capped, MLA latent, KV sharing)."""
    return spec.kv_cache(context, kv_dtype)["bytes"]


def state_bytes(spec: ArchSpec, kv_dtype: str) -> int:
    return spec.recurrent_state_bytes(KV_DTYPE_BYTES[kv_dtype])


def llamacpp_cells(context: int) -> int:
    return math.ceil(context / LLAMACPP_PAD) * LLAMACPP_PAD


def llamacpp_kv_bytes(spec: ArchSpec, context: int, kv_dtype: str) -> int:
    """llama.cpp's KV buffers at -c context: full layers hold the context rounded up to 256 cells;
    sliding and chunked layers `window + ubatch` cells (rounded, at most the full size: its default
    swa_full=false); MLA layers the latent (K only, V a view of it)."""
    b = KV_DTYPE_BYTES[kv_dtype]
    full = llamacpp_cells(context)
    total = 0.0
    for layer in spec.schedule:
        cells = full
        if layer.mixer in ("sliding", "chunked") and layer.window:
            cells = min(full, llamacpp_cells(layer.window + LLAMACPP_UBATCH))
        total += spec.layer_kv_bytes_per_token(layer, b) * cells
    return int(round(total))


def llamacpp_state_bytes(spec: ArchSpec) -> int:
    """Recurrent layers' state: llama.cpp keeps conv and SSM state in f32 whatever -ctk says."""
    return spec.recurrent_state_bytes(4)


def _widest(spec: ArchSpec) -> int:
    return max(spec.hidden_size, spec.intermediate_size or 0, (spec.moe.expert_ffn or 0) if spec.moe else 0)


def batch_overhead(spec: ArchSpec) -> int:
    """llama.cpp's compute buffer for one ubatch: f32 logits of every token and the widest
    activations (514.5 MiB measured against this 528 MiB on Gemma 3 270M's 262k vocab)."""
    return int(4 * LLAMACPP_UBATCH * (spec.vocab_size + 4 * _widest(spec)))


def run_overhead(spec: ArchSpec, dtype_bytes: int, quantized_gpu_experts: bool) -> int:
    """llmarch run's prefill of one PREFILL-token prompt: a few [tokens x widest] activations in
    the model dtype, f32 logits of the last token only, and for quantized experts on the GPU the
    one expert dequantized at a time (gate, up and down)."""
    act = dtype_bytes * PREFILL * 8 * _widest(spec) + 4 * spec.vocab_size
    if quantized_gpu_experts and spec.moe:
        act += 3 * spec.hidden_size * (spec.moe.expert_ffn or spec.intermediate_size or 0) * dtype_bytes
    return int(act)


def upload_chunk_bytes(spec: ArchSpec) -> int:
    """GPU bytes a long prompt's host-held experts take there at once on a GPU with room: as many
    whole experts of a layer as fit UPLOAD_CHUNK_BYTES in float32 (gate, up and down; all of them
    where they fit), the bound llmarch run's upload keeps while it dequantizes one part after
    another. Not part of a plan's GPU bytes: the upload takes at most a quarter of the memory free
    at the time and leaves the prompt's experts to the CPU where not even one fits."""
    if not spec.moe:
        return 0
    one = upload_expert_bytes(spec.hidden_size, spec.moe.expert_ffn or spec.intermediate_size or 0)
    return min(UPLOAD_CHUNK_BYTES // one, spec.moe.experts) * one if one else 0


def upload_expert_bytes(d: int, inter: int) -> int:
    """One expert dequantized for the upload: gate, up and down in float32, what a chunk is counted in."""
    return 4 * 3 * d * inter


def largest_context(need, budget: int, limit: int) -> int:
    """The largest context in 1..limit with need(context) <= budget (need grows with context); 0: none."""
    if need(1) > budget:
        return 0
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if need(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo

"""Parameter counts (total, active, MTP, vision, PLE) and storage bytes and dtypes."""

from __future__ import annotations

from llmarch.arch.fingerprint.facts import expert_key
from llmarch.arch.spec import STORAGE_BYTES, ArchSpec
from llmarch.arch.tensor_roles import has_role, is_vision, layer_of
from llmarch.checkpoint.base import Checkpoint


def _param_kind(name: str, spec: ArchSpec, mtp_start: int) -> tuple[str | None, int | None]:
    if is_vision(name):
        return "vision", None
    i = layer_of(name)
    if (i is not None and spec.mtp_layers and i >= mtp_start) or "nextn" in name or name.startswith("mtp."):
        return "mtp", i
    if has_role(name, "ple") and i is None:
        return "ple", i
    if i is not None and has_role(name, "routed_expert") and not has_role(name, "shared_expert"):
        return "routed", i
    return None, i


def read_params(spec: ArchSpec, ckpt: Checkpoint) -> None:
    total = routed = mtp = vision = ple = 0
    mtp_start = spec.layers if spec.format == "safetensors" else spec.layers - spec.mtp_layers
    kinds: dict[str, tuple] = {}  # expert key -> (kind, layer): the same for every expert index
    for name, t in ckpt.tensors.items():
        if name == "rope_freqs.weight":  # llama.cpp's Llama 3 RoPE factors: derived from config, not weights
            continue
        n = t.numel
        total += n
        key = expert_key(name) if "experts." in name else name
        kind_i = kinds.get(key)
        if kind_i is None:
            kind_i = kinds[key] = _param_kind(name, spec, mtp_start)
        kind = kind_i[0]
        if kind == "vision":
            vision += n
        elif kind == "mtp":
            mtp += n
        elif kind == "ple":
            ple += n
        elif kind == "routed":
            routed += n
    active = total - vision - mtp
    if spec.moe and spec.moe.experts:
        frac = spec.moe.experts_per_token / spec.moe.experts
        active -= round(routed * (1 - frac))
    spec.params = {"total": total, "active": active, "routed_experts": routed, "mtp": mtp, "vision": vision}
    if spec.per_layer_embeddings is not None:
        spec.per_layer_embeddings["params"] = ple
        spec.per_layer_embeddings["share"] = ple / total if total else 0.0
    if spec.format == "gguf" and spec.mtp_layers:
        spec.layers -= spec.mtp_layers  # llama.cpp counts the MTP blocks in block_count
        spec.schedule = spec.schedule[: spec.layers]


def read_storage(spec: ArchSpec, ckpt: Checkpoint) -> None:
    spec.stored_bytes = ckpt.stored_bytes
    spec.dtypes = ckpt.dtype_counts()
    floats = [d for d in spec.dtypes if d in STORAGE_BYTES]
    spec.kv_dtype_default = (
        "f32" if floats and floats[0] == "F32" else ("f16" if floats and floats[0] == "F16" else "bf16")
    )
    if spec.format == "gguf":
        spec.kv_dtype_default = "f16"  # llama.cpp's default cache type

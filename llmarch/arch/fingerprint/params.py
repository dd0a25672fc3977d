"""Parameter counts (total, the active readings, embeddings, MTP, vision, PLE) and stored bytes by part and dtype."""

from __future__ import annotations

from llmarch.arch.fingerprint.facts import expert_key
from llmarch.arch.spec import STORAGE_BYTES, ArchSpec
from llmarch.arch.tensor_roles import has_role, is_vision, layer_of, output_head_name
from llmarch.checkpoint.base import Checkpoint


def _param_kind(name: str, spec: ArchSpec, mtp_start: int, head: str | None) -> tuple[str | None, int | None]:
    if is_vision(name):
        return "vision", None
    i = layer_of(name)
    if (i is not None and spec.mtp_layers and i >= mtp_start) or "nextn" in name or name.startswith("mtp."):
        return "mtp", i
    if has_role(name, "ple") and i is None:
        # the table itself (looked up by token, placed like an embedding) apart from its
        # projection and norm, which run with the blocks
        return ("ple" if has_role(name, "ple_table") else "ple_other"), i
    if i is None and has_role(name, "input_embedding"):
        return "embeddings", i
    if i is None and name == head:
        return "output_head", i
    if i is not None and has_role(name, "routed_expert") and not has_role(name, "shared_expert"):
        return "routed", i
    return None, i


def _weights_in(name: str, t, names) -> int:
    """Parameters a tensor holds. MXFP4 as the Hub ships it (gpt-oss): `*_blocks` are U8 bytes of
    two fp4 codes each, and their `*_scales` are quantization metadata, not parameters."""
    if t.dtype == "U8" and name.endswith("_blocks"):
        return 2 * t.numel
    if t.dtype == "U8" and name.endswith("_scales") and name[: -len("_scales")] + "_blocks" in names:
        return 0
    return t.numel


# the parts a model's parameters and stored bytes split into (fit places each part)
PARTS = ("dense", "routed_experts", "embeddings", "output_head", "ple", "vision", "mtp")
_PART_OF_KIND: dict[str | None, str] = {None: "dense", "routed": "routed_experts", "ple_other": "dense"}


def read_params(spec: ArchSpec, ckpt: Checkpoint) -> None:
    counts = dict.fromkeys(PARTS, 0)
    ple_other = 0  # the per-layer embeddings' projection and norm (counted in dense)
    stored = dict.fromkeys(PARTS, 0)
    mtp_start = spec.layers if spec.format == "safetensors" else spec.layers - spec.mtp_layers
    head_name = output_head_name(ckpt.tensors, spec.vocab_size, spec.hidden_size)
    # expert key -> (part, is the PLE projection/norm): the same for every expert index
    parts: dict[str, tuple[str, bool]] = {}
    tensors = ckpt.tensors
    for name, t in tensors.items():
        if name == "rope_freqs.weight":  # llama.cpp's Llama 3 RoPE factors: derived from config, not weights
            continue
        key = expert_key(name) if "experts." in name else name
        part_ple = parts.get(key)
        if part_ple is None:
            kind = _param_kind(name, spec, mtp_start, head_name)[0]
            part_ple = parts[key] = (_PART_OF_KIND.get(kind) or str(kind), kind == "ple_other")
        part, is_ple_other = part_ple
        weights = _weights_in(name, t, tensors) if t.dtype == "U8" else t.numel
        if is_ple_other:
            ple_other += weights
        counts[part] += weights
        stored[part] += t.nbytes
    total = sum(counts.values())
    routed = counts["routed_experts"]
    active = total - counts["vision"] - counts["mtp"]
    if spec.moe and spec.moe.experts:
        frac = spec.moe.experts_per_token / spec.moe.experts
        active -= round(routed * (1 - frac))
    embed, head = counts["embeddings"], counts["output_head"]
    spec.params = {
        "total": total,
        "active": active,
        # vendors' two other readings: the input table left out (a lookup, not a matmul; gpt-oss's
        # "3.6B active") unless tied, where it is also the LM head; and non-embedding (Qwen's
        # cards): both the table and the head left out
        "active_without_input_embedding": active - embed if head else active,
        "active_non_embedding": active - embed - head,
        "embeddings": embed,
        "output_head": head,
        "routed_experts": routed,
        "mtp": counts["mtp"],
        "vision": counts["vision"],
    }
    spec.part_params = counts
    spec.part_bytes = stored
    if spec.per_layer_embeddings is not None:
        ple = counts["ple"] + ple_other
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

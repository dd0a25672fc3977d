"""ArchSpec -> the stable JSON document of `llmarch inspect --json` (schema in README)."""

from __future__ import annotations

from dataclasses import asdict

from llmarch.arch.spec import ArchSpec
from llmarch.report.text import schedule_pattern

SCHEMA_VERSION = 1


def to_document(spec: ArchSpec, context: int | None = None, kv_dtype: str | None = None) -> dict:
    a = spec.attention
    ratios = spec.ratios()
    moe = None
    if spec.moe:
        moe = asdict(spec.moe)
    return {
        "schema": SCHEMA_VERSION,
        "source": spec.source,
        "family": spec.family,
        "model_type": spec.model_type,
        "text_family": spec.text_family,
        "architecture": spec.architecture,
        "gguf_arch": spec.gguf_arch,
        "supports": spec.supports,
        "format": spec.format,
        "layers": spec.layers,
        "hidden_size": spec.hidden_size,
        "vocab_size": spec.vocab_size,
        "context_length": spec.context_length,
        "params": spec.params,
        "attention": {
            "kind": a.kind,
            "heads": a.heads,
            "kv_heads": a.kv_heads,
            "head_dim": a.head_dim,
            "v_head_dim": a.v_head_dim,
            "qk_norm": a.qk_norm,
            "bias": a.bias,
            "out_bias": a.out_bias,
            "sinks": a.sinks,
            "gated": a.gated,
            "gate_layout": a.gate_layout,
            "gate_per_head": a.gate_per_head,
            "indexer": a.indexer,
            "softcap": a.softcap,
            "temperature_tuning": a.temperature_tuning,
            "out_proj": {"groups": a.out_groups, "rank": a.out_rank} if a.out_groups else None,
            "mla": {
                "q_lora_rank": a.q_lora_rank,
                "kv_lora_rank": a.kv_lora_rank,
                "qk_rope_head_dim": a.qk_rope_head_dim,
                "qk_nope_head_dim": a.qk_nope_head_dim,
                "rope_interleave": a.rope_interleave,
            }
            if a.mla
            else None,
            "index": {
                "heads": a.index_heads,
                "head_dim": a.index_head_dim,
                "topk": a.index_topk,
                "rope_interleave": a.index_rope_interleave,
                "shared_layers": [l.index for l in spec.schedule if l.index_from is not None],
            }
            if a.indexer
            else None,
        },
        "rope": {
            "theta": spec.rope.theta,
            "local_theta": spec.rope.local_theta,
            "scaling": spec.rope.scaling,
            "partial": spec.rope.partial,
            "nope_layers": spec.rope.nope_layers,
            "learned_positions": spec.rope.learned_positions,
            "chunked": next((l.window for l in spec.schedule if l.mixer == "chunked"), None),
            "compressed": _compressed_rope(spec),
        },
        "moe": moe,
        "norm": {
            "placement": spec.norm.placement,
            "kind": spec.norm.kind,
            "eps": spec.norm.eps,
            "unit_offset": spec.norm.unit_offset,
        },
        "ffn": {
            "activation": spec.activation,
            "intermediate_size": spec.intermediate_size,
            "ratio": round(spec.intermediate_size / spec.hidden_size, 3)
            if spec.intermediate_size and spec.hidden_size
            else None,
            "bias": spec.ffn_bias,
            "gated": spec.ffn_gated,
        },
        "sliding_window": ratios["sliding_window"],
        "linear_attention": ratios["linear_attention"]
        and dict(
            ratios["linear_attention"],
            **{k: v for k, v in (spec.linear_attention or {}).items() if k not in ("kind", "linear")},
        ),
        "mtp_layers": spec.mtp_layers,
        "tied_embeddings": spec.tied_embeddings,
        "embedding_scale": spec.embedding_scale,
        "final_softcap": spec.final_softcap,
        "per_layer_embeddings": spec.per_layer_embeddings,
        "hyper_connections": asdict(spec.hyper) if spec.hyper else None,
        "extras": spec.extras,
        "kv_cache": spec.kv_cache(context, kv_dtype),
        "storage": {"bytes": spec.stored_bytes, "dtypes": spec.dtypes, "by_part": spec.part_bytes},
        "schedule_pattern": schedule_pattern(spec),
        "layer_schedule": [l.public() for l in spec.schedule],
        "evidence": spec.evidence,
        "warnings": spec.warnings,
    }


def _compressed_rope(spec: ArchSpec) -> dict | None:
    """The RoPE of the layers that keep compressed KV (DeepSeek V4), where they have one of their own."""
    layer = next((l for l in spec.schedule if l.compress_ratio), None)
    if layer is None or (layer.rope_theta is None and layer.rope_scaling is None):
        return None
    scaling = layer.rope_scaling if layer.rope_scaling is not None else spec.rope.scaling
    return {
        "theta": layer.rope_theta or spec.rope.theta,
        "scaling": None if (scaling or {}).get("type") == "default" else scaling,
    }

"""Positions: RoPE base, scaling, partial rotation, learned positions; per-layer-type overrides."""

from __future__ import annotations

from llmarch.arch.fingerprint.facts import Facts
from llmarch.arch.recipe_schema import Recipe
from llmarch.arch.spec import ArchSpec, RopeSpec


def read_rope(spec: ArchSpec, f: Facts, recipe: Recipe) -> None:
    r = RopeSpec()
    params = f.get("rope_parameters")
    full = params.get("full_attention", params) if isinstance(params, dict) else {}
    local = params.get("sliding_attention") if isinstance(params, dict) else None
    r.theta = full.get("rope_theta") or f.get("rope_theta", "rotary_emb_base", "rope_base", fact="rope.theta")
    if full.get("rope_theta"):
        spec.evidence["rope.theta"] = "config.json:rope_parameters"
    scaling = f.get("rope_scaling") or {
        k: v for k, v in full.items() if k not in ("rope_theta", "partial_rotary_factor")
    }
    stype = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    r.scaling = dict(scaling, type=stype) if stype and stype != "default" else None
    proportional = stype == "proportional"
    if r.scaling is not None and proportional and "partial_rotary_factor" in full:
        # proportional RoPE (Gemma 4) spans the whole head; its factor says how many of the
        # frequencies are nonzero, so it belongs to the scaling, not to a partial rotation
        r.scaling = dict(r.scaling, partial_rotary_factor=full["partial_rotary_factor"])
    if isinstance(local, dict) and local.get("rope_theta") and local.get("rope_theta") != r.theta:
        r.local_theta = local["rope_theta"]
    elif f.get("rope_local_base_freq"):
        r.local_theta = f.get("rope_local_base_freq", fact="rope.local_theta")
    partial = (
        (None if proportional else full.get("partial_rotary_factor"))
        or f.get("partial_rotary_factor", fact="rope.partial")
        or recipe.partial_rotary_factor
    )
    rotary_dim = f.get("rotary_dim", "rope_dim", fact="rope.partial")
    head = spec.attention.qk_rope_head_dim if spec.attention.mla else spec.attention.head_dim
    if partial:
        r.partial = float(partial)
    elif rotary_dim and head:
        r.partial = rotary_dim / head
    if spec.attention.mla and spec.attention.head_dim:
        # MLA: only the decoupled rope part of each head rotates
        r.partial = (spec.attention.qk_rope_head_dim or 0) / spec.attention.head_dim
        spec.evidence["rope.partial"] = "qk_rope_head_dim / (qk_nope_head_dim + qk_rope_head_dim)"
    r.learned_positions = recipe.positions == "learned"
    spec.rope = r


def local_rope_scaling(spec: ArchSpec, f: Facts) -> dict | None:
    """Per-layer-type rope_parameters (Olmo 3, Gemma 3): the sliding layers' scaling when it differs
    from the global one (e.g. YaRN / linear only on full layers); {"type": "default"} = unscaled."""
    params = f.get("rope_parameters")
    local = params.get("sliding_attention") if isinstance(params, dict) else None
    if not isinstance(local, dict):
        return None
    kind = local.get("rope_type") or local.get("type") or "default"
    scaling = {k: v for k, v in local.items() if k not in ("rope_theta", "partial_rotary_factor")}
    scaling["type"] = kind
    global_kind = (spec.rope.scaling or {}).get("type") or "default"
    return None if kind == global_kind == "default" or scaling == spec.rope.scaling else scaling


def local_rope_partial(spec: ArchSpec, f: Facts) -> float | None:
    """The sliding layers' partial_rotary_factor where per-layer-type rope_parameters give them
    their own (transformers' MiMo-V2-Flash reads it per layer type)."""
    params = f.get("rope_parameters")
    local = params.get("sliding_attention") if isinstance(params, dict) else None
    p = local.get("partial_rotary_factor") if isinstance(local, dict) else None
    return float(p) if p is not None and float(p) != spec.rope.partial else None

"""Positions: RoPE base, scaling, partial rotation, learned positions; per-layer-type overrides."""

from __future__ import annotations

from llmarch.arch.fingerprint.facts import Facts
from llmarch.arch.recipe_schema import Recipe
from llmarch.arch.spec import ArchSpec, RopeSpec

# LeRoPE's learned frequency scale (transformers' name, Mistral's own)
LEARNED_FREQ_SCALE = ("rotary_emb.alpha", "lerope.alpha")


def read_rope(spec: ArchSpec, f: Facts, recipe: Recipe, tensor_names=()) -> None:
    r = RopeSpec()
    alpha = next((n for n in tensor_names if n.endswith(LEARNED_FREQ_SCALE)), None)
    if alpha:
        r.learned_freq_scale = True
        spec.evidence["rope.learned_freq_scale"] = alpha
    params = f.get("rope_parameters")
    full = _main_params(params)
    local = params.get("sliding_attention") if isinstance(params, dict) else None
    r.theta = full.get("rope_theta") or f.get("rope_theta", "rotary_emb_base", "rope_base", fact="rope.theta")
    if full.get("rope_theta"):
        spec.evidence["rope.theta"] = f.cite("rope_parameters")
    scaling = f.get("rope_scaling") or {
        k: v for k, v in full.items() if k not in ("rope_theta", "partial_rotary_factor")
    }
    r.scaling = _scaling(scaling)
    if recipe.rope_scaling_on == "compressed":  # the scaling is the compressed layers' alone (compressed_rope)
        r.scaling = None
    proportional = (r.scaling or {}).get("type") == "proportional"
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


def _main_params(params) -> dict:
    """The rope_parameters entry of the model's own (full-attention) layers: per layer type
    (full_attention), per rope kind (DeepSeek V4's main, beside its compress), or the flat dict."""
    if not isinstance(params, dict):
        return {}
    for key in ("full_attention", "main"):
        if isinstance(params.get(key), dict):
            return params[key]
    return params


def _scaling(params: dict | None) -> dict | None:
    """A rope_scaling dict as the spec's scaling: None when unscaled."""
    scaling = dict(params or {})
    kind = scaling.get("rope_type") or scaling.get("type")
    return dict(scaling, type=kind) if kind and kind != "default" else None


def compressed_rope(spec: ArchSpec, f: Facts, recipe: Recipe | None) -> tuple[float | None, dict | None]:
    """(base, scaling) of the layers that keep compressed KV, whose whole attention (window
    included) rotates by a RoPE of its own (DeepSeek V4): rope_parameters' "compress" entry as
    transformers saves it, else compress_rope_theta with the config's scaling where the recipe
    puts the scaling on those layers. transformers' DeepseekV4Config gives that YaRN an
    attention_factor of 1.0 where none is set (cos/sin are not scaled)."""
    params = f.get("rope_parameters")
    own = params.get("compress") if isinstance(params, dict) else None
    if isinstance(own, dict):
        spec.evidence["layer_schedule.compressed_rope"] = f.cite("rope_parameters", ".compress")
        own_scaling = {k: v for k, v in own.items() if k not in ("rope_theta", "partial_rotary_factor")}
        return own.get("rope_theta") or spec.rope.theta, _scaling(own_scaling)
    theta = f.get("compress_rope_theta", default=spec.rope.theta, fact="layer_schedule.compressed_rope")
    if recipe is None or recipe.rope_scaling_on != "compressed":
        return theta, spec.rope.scaling
    flat = f.get("rope_scaling") or params
    flat = flat if isinstance(flat, dict) else {}
    scaling = _scaling({k: v for k, v in flat.items() if k not in ("rope_theta", "partial_rotary_factor")})
    if scaling is not None and scaling["type"] == "yarn":
        scaling.setdefault("attention_factor", 1.0)
    return theta, scaling


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

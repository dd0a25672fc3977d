"""The layer schedule: one LayerSpec per layer (mixer, window, RoPE or NoPE, FFN kind, KV sharing)."""

from __future__ import annotations

from llmarch.arch.fingerprint.facts import Facts, layer_has
from llmarch.arch.fingerprint.moe import assign_ffn
from llmarch.arch.fingerprint.norms import layer_norm_placement
from llmarch.arch.fingerprint.rope import local_rope_partial, local_rope_scaling
from llmarch.arch.recipe_schema import Recipe
from llmarch.arch.spec import ArchSpec, LayerSpec
from llmarch.checkpoint.base import Checkpoint
from llmarch.errors import CheckpointError

# Nemotron-H block letters / names -> (mixer, ffn) of a single-op layer
SINGLE_OP_BLOCKS = {
    "M": ("mamba", "none"),
    "mamba": ("mamba", "none"),
    "linear_attention": ("mamba", "none"),
    "*": ("full", "none"),
    "attention": ("full", "none"),
    "full_attention": ("full", "none"),
    "-": ("none", "dense"),
    "mlp": ("none", "dense"),
    "E": ("none", "moe"),
    "moe": ("none", "moe"),
}


LINEAR_MIXERS = {
    "linear_attention": "linear",
    "mamba": "mamba",
    "mamba2": "mamba",
    "kda": "linear",
    "conv": "linear",
    "short_conv": "linear",
}
# layer types that name their linear kind themselves (else the recipe's linear_kind)
LINEAR_KINDS = {"conv": "short_conv", "short_conv": "short_conv"}


def read_schedule(spec: ArchSpec, f: Facts, recipe: Recipe, lt, ckpt: Checkpoint) -> None:
    n = spec.layers
    window = f.get("sliding_window", "attention_window_size", fact="sliding_window.window")
    layer_types = f.get("layer_types", fact="layer_schedule")
    pattern = f.get("sliding_window_pattern", fact="layer_schedule")
    interval = f.get("full_attention_interval", fact="layer_schedule")
    block_types = f.get("layers_block_type", fact="layer_schedule")
    if block_types is None and isinstance(f.get("hybrid_override_pattern"), str):
        block_types = list(f.get("hybrid_override_pattern", fact="layer_schedule"))
    chunk = f.get("attention_chunk_size", fact="layer_schedule")
    lin_cfg = f.get("linear_attn_config")
    kda_layers = lin_cfg.get("kda_layers") if isinstance(lin_cfg, dict) else None
    local_scaling = local_rope_scaling(spec, f)
    local_partial = local_rope_partial(spec, f)
    if local_scaling is None and spec.rope.scaling and recipe.rope_scaling_on == "global":
        local_scaling = {"type": "default"}  # GGUF / legacy configs: the recipe says sliding layers are unscaled
    nope = f.get("no_rope_layers", fact="rope.nope_layers")
    params = f.get("rope_parameters")
    null_theta = isinstance(params, dict) and "rope_theta" in params and params["rope_theta"] is None
    sched = []
    for i in range(n):
        layer = LayerSpec(index=i)
        t = None
        if isinstance(layer_types, list) and i < len(layer_types):
            t = str(layer_types[i])
            if t in LINEAR_MIXERS or "linear" in t or "mamba" in t:
                layer.mixer = LINEAR_MIXERS.get(t, "linear")
            elif "sliding" in t:
                layer.mixer = "sliding"
            elif "chunk" in t:
                layer.mixer, layer.window = "chunked", chunk
        elif isinstance(kda_layers, list):  # Kimi Linear's Hub config: 1-based KDA layer numbers
            layer.mixer = "linear" if i + 1 in kda_layers else "full"
        elif isinstance(block_types, list) and i < len(block_types):
            # Nemotron-H: each layer is ONE sub-block: a mixer (mamba / attention) or an FFN
            layer.mixer, layer.ffn = SINGLE_OP_BLOCKS.get(str(block_types[i]), ("full", "none"))
        elif pattern and window:
            layer.mixer = "full" if (i + 1) % int(pattern) == 0 else "sliding"
        elif interval:
            layer.mixer = "full" if (i + 1) % int(interval) == 0 else "linear"
        elif window and f.get("use_sliding_window", default=True):
            max_window_layers = f.get("max_window_layers")
            layer.mixer = "sliding" if max_window_layers is None or i < max_window_layers else "full"
        if layer.mixer == "sliding":
            layer.window = window
        if layer.mixer in ("linear", "mamba"):
            layer.linear_kind = LINEAR_KINDS.get(t or "") or recipe.linear_kind
        # positions
        if isinstance(nope, list) and i < len(nope):
            layer.rope = bool(nope[i])  # transformers: no_rope_layers[i] == 1 means the layer uses RoPE
        elif f.get("no_rope_layer_interval"):  # SmolLM3 / Llama 4 GGUF: every n-th layer is NoPE
            layer.rope = (i + 1) % int(f.get("no_rope_layer_interval", fact="rope.nope_layers")) != 0
        elif recipe.nope_on == "global" and layer.mixer == "full":
            layer.rope = False
        elif recipe.nope_on == "all" or (recipe.nope_on == "null_theta" and null_theta):
            layer.rope = False
        if spec.rope.learned_positions or layer.mixer in ("none", "mamba"):
            layer.rope = False
        if chunk and recipe.chunked_on == "rope_layers" and layer.rope and layer.mixer == "full":
            layer.mixer, layer.window = "chunked", chunk
        if spec.attention.mla and layer.mixer == "full":
            layer.mixer = "mla"
        if layer.mixer == "sliding" and spec.rope.local_theta:
            layer.rope_theta = spec.rope.local_theta
        if layer.mixer == "sliding" and local_scaling is not None:
            layer.rope_scaling = local_scaling
        if layer.mixer == "sliding" and local_partial is not None:
            layer.rope_partial = local_partial
        placement = layer_norm_placement(lt, i)
        if placement and placement != spec.norm.placement:
            layer.norm_placement = placement
            spec.evidence[f"layer {i} norm_placement"] = "its norm tensors"
        layer.head_dim = _layer_head_dim(spec, f, lt, layer, ckpt)
        layer.kv_heads = _layer_kv_heads(spec, f, lt, i, ckpt, layer.head_dim)
        layer.ffn_width = _layer_ffn_width(spec, lt, i, ckpt)
        if (
            spec.attention.sinks
            and lt
            and layer.mixer in ("full", "sliding", "chunked")
            and not layer_has(lt, i, "sinks")
        ):
            layer.sinks = False  # MiMo-V2-Flash: only its sliding layers carry sink logits
        sched.append(layer)
    assign_ffn(spec, f, recipe, lt, sched)
    _uniform_ffn_width(spec, sched)
    _kv_sharing(spec, f, sched)
    _kv_sources(spec, f, sched, ckpt)
    _values_from_keys(f, lt, sched)
    spec.schedule = sched
    spec.rope.nope_layers = [
        l.index
        for l in sched
        if not l.rope and l.mixer not in ("none", "mamba", "linear") and not spec.rope.learned_positions
    ]
    if spec.moe:
        spec.moe.dense_layers = [l.index for l in sched if l.ffn == "dense"]


def _layer_overrides(f: Facts, i: int) -> dict:
    """transformers' per_layer_config: {layer index: {config key: value}} (Gemma 4 writes its
    global layers' head_dim / num_key_value_heads there)."""
    per_layer = f.get("per_layer_config")
    found = per_layer.get(str(i), per_layer.get(i)) if isinstance(per_layer, dict) else None
    return found if isinstance(found, dict) else {}


def _layer_head_dim(spec: ArchSpec, f: Facts, lt, layer: LayerSpec, ckpt: Checkpoint) -> int | None:
    """A layer's head width where it differs from the model's (Gemma 4's global layers): from its
    q_proj rows / heads, else per_layer_config, else global_head_dim on full-attention layers."""
    a, i = spec.attention, layer.index
    if a.mla or not a.heads or not a.head_dim:
        return None
    q = next((n for n in lt.get(i, ()) if n.endswith(("q_proj.weight", "attn_q.weight"))), None)
    if q is not None:
        rows = ckpt.tensors[q].shape[0] if ckpt.tensors[q].shape else 0
        per_head = 2 if a.gate_layout == "in_q" else 1
        if rows and rows % (a.heads * per_head) == 0 and rows // (a.heads * per_head) != a.head_dim:
            spec.evidence[f"layer {i} head_dim"] = q
            return rows // (a.heads * per_head)
        return None
    own = _layer_overrides(f, i).get("head_dim") or (f.get("global_head_dim") if layer.mixer == "full" else None)
    return int(own) if own and int(own) != a.head_dim else None


def _layer_kv_heads(spec: ArchSpec, f: Facts, lt, i: int, ckpt: Checkpoint, head_dim: int | None) -> int | None:
    """A layer's KV head count where it differs from the model's (MiMo-V2-Flash doubles it on
    sliding layers; some GGUFs store head_count_kv per layer; Gemma 4's per_layer_config)."""
    per_layer = f.get("num_key_value_heads_per_layer")
    if isinstance(per_layer, list) and i < len(per_layer) and per_layer[i] != spec.attention.kv_heads:
        return per_layer[i]
    a = spec.attention
    head_dim = head_dim or a.head_dim
    if a.mla or not head_dim:
        return None
    k = next((n for n in lt.get(i, ()) if n.endswith(("k_proj.weight", "attn_k.weight"))), None)
    if k is None:
        own = _layer_overrides(f, i).get("num_key_value_heads")
        return int(own) if own and int(own) != a.kv_heads else None
    rows = ckpt.tensors[k].shape[0]
    if rows and rows % head_dim == 0 and rows // head_dim != a.kv_heads:
        spec.evidence[f"layer {i} kv_heads"] = k
        return rows // head_dim
    return None


def _layer_ffn_width(spec: ArchSpec, lt, i: int, ckpt: Checkpoint) -> int | None:
    """A dense FFN's width where its tensors show one other than the model's (per-layer widths,
    Gemma 4's double-wide MLP on KV-shared layers)."""
    # HF, LFM's w1 / w3 (block_auto_adjust_ff_dim makes LFM2's width other than intermediate_size), GGUF
    ends = (
        "mlp.up_proj.weight",
        "mlp.gate_proj.weight",
        "feed_forward.w1.weight",
        ".ffn_up.weight",
        ".ffn_gate.weight",
    )
    up = next((n for n in lt.get(i, ()) if n.endswith(ends)), None)
    if up is None or "expert" in up or not ckpt.tensors[up].shape:
        return None
    rows = ckpt.tensors[up].shape[0]
    return rows if spec.intermediate_size and rows != spec.intermediate_size else None


def _uniform_ffn_width(spec: ArchSpec, sched: list[LayerSpec]) -> None:
    """Every dense FFN's tensors show one width other than the config's (LFM2's is what
    block_auto_adjust_ff_dim makes of intermediate_size): that width is the model's."""
    dense = [l for l in sched if l.ffn == "dense"]
    widths = {l.ffn_width for l in dense}
    if dense and len(widths) == 1 and None not in widths:
        config_width, spec.intermediate_size = spec.intermediate_size, widths.pop()
        spec.evidence["intermediate_size.tensors"] = f"every dense FFN's tensors (config: {config_width})"
        for layer in dense:
            layer.ffn_width = None


def _values_from_keys(f: Facts, lt, sched: list[LayerSpec]) -> None:
    """Layers whose values are their key projection (Gemma 4's attention_k_eq_v, full layers): a
    k_proj without a v_proj, else the config key on full layers that compute their own KV."""
    for layer in sched:
        if layer.kv_shared_from is not None or layer.mixer != "full":
            continue
        names = lt.get(layer.index, ())
        if names:
            has_k = any(n.endswith(("k_proj.weight", "attn_k.weight")) for n in names)
            layer.v_from_k = has_k and not any(n.endswith(("v_proj.weight", "attn_v.weight")) for n in names)
        else:
            layer.v_from_k = bool(f.get("attention_k_eq_v", fact="attention.v_from_k"))


def _kv_sources(spec: ArchSpec, f: Facts, sched: list[LayerSpec], ckpt: Checkpoint) -> None:
    """kv_source_layers (Mistral Large 4): per layer, the layer whose latent KV it attends. A source
    is its own source and comes no later; transformers hands a sharing layer the latent its last
    sharing source of the same kind (RoPE or NoPE) stored, so the listed source must be that one."""
    sources = f.get("kv_source_layers", fact="extras.kv_source_layers")
    if sources is None:
        return
    where = ckpt.path / "config.json" if ckpt.config is not None and ckpt.path.is_dir() else ckpt.path
    n = len(sched)
    if not isinstance(sources, list) or len(sources) != n or any(type(s) is not int for s in sources):
        raise CheckpointError(f"kv_source_layers must list {n} layer indices, got {sources!r:.120}", where)
    stores = {s for i, s in enumerate(sources) if s != i}
    for i, s in enumerate(sources):
        if s == i:
            continue
        if not 0 <= s < i or sources[s] != s:
            raise CheckpointError(
                f"kv_source_layers: layer {i} reads layer {s}, which must be an earlier layer that keeps its own KV",
                where,
            )
        kind = sched[i].rope
        if sched[s].rope != kind:
            raise CheckpointError(
                f"kv_source_layers: layer {i} ({'RoPE' if kind else 'NoPE'}) reads layer {s}, which is "
                f"{'NoPE' if kind else 'RoPE'}: a layer shares only a latent of its own kind",
                where,
            )
        latest = max(j for j in stores if j < i and sched[j].rope == kind)
        if latest != s:
            raise CheckpointError(
                f"kv_source_layers: layer {i} reads layer {s}, but the last earlier sharing source of its kind "
                f"({'RoPE' if kind else 'NoPE'}) is {latest}",
                where,
            )
        sched[i].kv_shared_from = s
    spec.extras["kv_shared_layers"] = sum(1 for i, s in enumerate(sources) if s != i)


def _kv_sharing(spec: ArchSpec, f: Facts, sched: list[LayerSpec]) -> None:
    shared = f.get("num_kv_shared_layers", fact="extras.kv_shared_layers")
    if not shared:
        return
    first_shared = len(sched) - int(shared)
    for layer in sched[first_shared:]:
        # Gemma 3n: a shared layer reuses the KV of the last earlier layer of the same kind
        same = [l.index for l in sched[:first_shared] if l.mixer == layer.mixer]
        layer.kv_shared_from = same[-1] if same else None
    spec.extras["kv_shared_layers"] = int(shared)

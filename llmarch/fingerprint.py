"""Checkpoint -> ArchSpec. Config facts and tensor facts are read separately and cross-checked.

Generic rules cover the config keys transformers uses across families (layer_types,
first_k_dense_replace, no_rope_layers, ...); what a family's files do not say comes from its
recipe (recipes/*.toml). An unknown architecture gets every fact the generic rules can read.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from llmarch import recipe_book as recipes
from llmarch.checkpoint.base import Checkpoint
from llmarch.gguf_config import gguf_to_config
from llmarch.spec import STORAGE_BYTES, ArchSpec, AttentionSpec, LayerSpec, MoESpec, NormSpec, RopeSpec
from llmarch.report.text import index_ranges
from llmarch.tensor_roles import has_role, is_vision, layer_of

EXPERTS_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts", "n_experts")
TOPK_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k", "experts_per_token")
SHARED_KEYS = ("n_shared_experts", "num_shared_experts", "shared_experts")
# Nemotron-H block letters / names -> (mixer, ffn) of a single-op layer
SINGLE_OP_BLOCKS = {
    "M": ("mamba", "none"), "mamba": ("mamba", "none"), "linear_attention": ("mamba", "none"),
    "*": ("full", "none"), "attention": ("full", "none"), "full_attention": ("full", "none"),
    "-": ("none", "dense"), "mlp": ("none", "dense"), "E": ("none", "moe"), "moe": ("none", "moe"),
}
LINEAR_MIXERS = {"linear_attention": "linear", "mamba": "mamba", "mamba2": "mamba", "kda": "linear"}


class _Facts:
    """A config view that remembers which key each value came from."""

    def __init__(self, config: dict, evidence: dict[str, str], source: str):
        self.config, self.evidence, self.source, self.used = config, evidence, source, {}

    def get(self, *keys: str, default=None, fact: str | None = None):
        for key in keys:
            value = self.config.get(key)
            if value is not None:
                if fact:
                    self.used[fact] = self.evidence.get(key, f"{self.source}:{key}")
                return value
        return default


def fingerprint(ckpt: Checkpoint) -> ArchSpec:
    if ckpt.format == "gguf":
        arch = ckpt.metadata["general.architecture"]
        recipe = recipes.for_gguf_arch(arch, ckpt.metadata)
        config, ev = gguf_to_config(arch, ckpt.metadata, recipe)
        family = recipe.get("family", arch) if recipe else arch
        architecture = arch
        text_family = None
        source = "gguf"
        if "vocab_size" not in config:
            tokens = ckpt.skipped_arrays.get("tokenizer.ggml.tokens")
            if tokens:
                config["vocab_size"] = tokens[1]
                ev["vocab_size"] = "tokenizer.ggml.tokens (length)"
    else:
        raw = dict(ckpt.config or {})
        top_type = raw.get("model_type")
        config, text_family = _text_config(raw)
        recipe = recipes.for_model_type(text_family or top_type) or recipes.for_model_type(top_type)
        family = top_type or "unknown"
        archs = raw.get("architectures") or []
        architecture = archs[0] if archs else None
        ev = {}
        source = "config.json"
        if not raw:
            family = "unknown"
    facts = _Facts(config, ev, source)
    spec = ArchSpec(family=family, format=ckpt.format, architecture=architecture, text_family=text_family)
    spec.config = config
    layer_tensors = _tensors_by_layer(ckpt)

    _sizes(spec, facts, ckpt)
    _attention(spec, facts, recipe, layer_tensors, ckpt)
    _rope(spec, facts, recipe)
    _norms(spec, facts, recipe, layer_tensors)
    _moe(spec, facts, recipe, layer_tensors)
    _schedule(spec, facts, recipe, layer_tensors, ckpt)
    _extras(spec, facts, recipe, ckpt)
    _params(spec, ckpt)
    _storage(spec, ckpt)
    spec.evidence.update(facts.used)
    return spec


def _text_config(raw: dict) -> tuple[dict, str | None]:
    """Multimodal configs keep the language model under text_config: use it, keep top-level extras."""
    text = raw.get("text_config")
    if isinstance(text, dict):
        merged = {k: v for k, v in raw.items() if k not in ("text_config", "vision_config", "audio_config")}
        merged.update(text)
        return merged, text.get("model_type")
    return raw, None


def _expert_key(name: str) -> str:
    """The name with a per-expert index collapsed: `...mlp.experts.17.up_proj.weight` ->
    `...mlp.experts.*.up_proj.weight`. No role pattern looks at the expert index, so one name
    per key answers every role question for all of them (DeepSeek-V3: 91k tensors -> ~2k keys)."""
    head, sep, tail = name.partition("experts.")
    if sep:
        idx, dot, rest = tail.partition(".")
        if dot and idx.isdigit():
            return f"{head}experts.*.{rest}"
    return name


def _tensors_by_layer(ckpt: Checkpoint) -> dict[int, list[str]]:
    """Layer index -> tensor names, one name per expert key (see _expert_key)."""
    out: dict[int, list[str]] = defaultdict(list)
    seen: set[str] = set()
    for name in ckpt.tensors:
        if "experts." in name:
            key = _expert_key(name)
            if key in seen:
                continue
            seen.add(key)
        if is_vision(name):
            continue
        i = layer_of(name)
        if i is not None:
            out[i].append(name)
    return out


def _layer_has(layer_tensors: dict[int, list[str]], i: int, role: str) -> bool:
    return any(has_role(n, role) for n in layer_tensors.get(i, ()))


def _any_layer_has(layer_tensors, role: str) -> str | None:
    for names in layer_tensors.values():
        for n in names:
            if has_role(n, role):
                return n
    return None


def _sizes(spec: ArchSpec, f: _Facts, ckpt: Checkpoint) -> None:
    spec.layers = int(f.get("num_hidden_layers", "n_layer", "num_layers", "n_layers", default=0, fact="layers"))
    spec.hidden_size = int(f.get("hidden_size", "n_embd", "d_model", "dim", default=0, fact="hidden_size"))
    spec.vocab_size = int(f.get("vocab_size", "n_vocab", default=0, fact="vocab_size"))
    spec.context_length = f.get("max_position_embeddings", "n_positions", "max_sequence_length",
                                "seq_length", "model_max_length", fact="context_length")
    spec.intermediate_size = f.get("intermediate_size_mlp", "intermediate_size", "n_inner", "ffn_hidden_size",
                                   fact="intermediate_size")
    if spec.intermediate_size is None and spec.family == "gpt2" and spec.hidden_size:
        spec.intermediate_size = 4 * spec.hidden_size
        spec.evidence["intermediate_size"] = "gpt2 default: 4 x n_embd"
    if isinstance(spec.intermediate_size, list):  # per-layer widths (Gemma 3n): keep the list in extras
        spec.extras["intermediate_size_per_layer"] = spec.intermediate_size
        spec.intermediate_size = max(spec.intermediate_size)
    spec.activation = f.get("hidden_activation", "hidden_act", "activation_function", "activation", fact="activation")
    # fallbacks from tensors when the config is silent (bare .safetensors, GGUF without a key)
    embed = _find_tensor(ckpt, ("embed_tokens.weight", "wte.weight", "token_embd.weight", "embeddings.weight"))
    if embed is not None:
        vocab, hidden = embed.shape[0], embed.shape[-1]
        if not spec.vocab_size:
            spec.vocab_size = vocab
            spec.evidence["vocab_size"] = embed.name
        elif spec.vocab_size != vocab:
            spec.warnings.append(f"vocab_size {spec.vocab_size} in the config, but {embed.name} has {vocab} rows")
        if not spec.hidden_size:
            spec.hidden_size = hidden
            spec.evidence["hidden_size"] = embed.name
    if not spec.layers:
        idx = [layer_of(n) for n in ckpt.tensors if not is_vision(n)]
        idx = [i for i in idx if i is not None]
        if idx:
            spec.layers = max(idx) + 1
            spec.evidence["layers"] = "count of layer indices in tensor names"


def _find_tensor(ckpt: Checkpoint, suffixes: tuple[str, ...]):
    for name, t in ckpt.tensors.items():
        if not is_vision(name) and name.endswith(suffixes) and "per_layer" not in name:
            return t
    return None


def _attention(spec: ArchSpec, f: _Facts, recipe: dict, lt, ckpt: Checkpoint) -> None:
    a = AttentionSpec()
    a.heads = int(f.get("num_attention_heads", "n_head", "num_heads", "n_heads", default=0, fact="attention.heads"))
    a.kv_heads = int(f.get("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num",
                           default=a.heads, fact="attention.kv_heads") or a.heads)
    a.kv_lora_rank = f.get("kv_lora_rank", fact="attention.kv_lora_rank")
    a.q_lora_rank = f.get("q_lora_rank", fact="attention.q_lora_rank")
    a.mla = bool(a.kv_lora_rank) or recipe.get("attention") == "mla"
    if a.mla:
        a.qk_rope_head_dim = f.get("qk_rope_head_dim", fact="attention.qk_rope_head_dim")
        a.qk_nope_head_dim = f.get("qk_nope_head_dim", fact="attention.qk_nope_head_dim")
        a.v_head_dim = f.get("v_head_dim", fact="attention.v_head_dim")
        if a.qk_nope_head_dim is None and f.get("head_dim") and a.qk_rope_head_dim:
            a.qk_nope_head_dim = f.get("head_dim") - a.qk_rope_head_dim  # GGUF key_length = nope + rope
        a.head_dim = (a.qk_nope_head_dim or 0) + (a.qk_rope_head_dim or 0)
        a.kv_heads = a.heads  # MLA expands the latent to every head
        kv_a = _any_layer_has(lt, "mla_kv_a")
        if kv_a:
            spec.evidence["attention.kind"] = kv_a
    else:
        hd = f.get("head_dim", "attention_head_dim", "kv_channels", fact="attention.head_dim")
        if hd is None and a.heads:
            hd = spec.hidden_size // a.heads
            spec.evidence["attention.head_dim"] = "hidden_size / heads"
        a.head_dim = int(hd or 0)
        v = f.get("v_head_dim")
        a.v_head_dim = v if v and v != a.head_dim else None

    # QK-norm: the tensor's width tells per-head (head_dim) from whole-projection (heads*head_dim)
    qn = _any_layer_has(lt, "q_norm")
    qk_recipe = recipe.get("qk_norm")
    if qn:
        width = ckpt.tensors[qn].shape[-1] if ckpt.tensors[qn].shape else 0
        a.qk_norm = "per_head" if width < a.heads * max(a.head_dim, 1) or a.heads == 1 else "whole"
        spec.evidence["attention.qk_norm"] = qn
    elif qk_recipe == "l2" and f.get("use_qk_norm", fact="attention.qk_norm"):
        a.qk_norm = "l2"  # Llama 4: a weightless L2 norm, visible only in the config
    elif qk_recipe and not lt:
        a.qk_norm = qk_recipe
        spec.evidence["attention.qk_norm"] = f"recipe {recipe.get('family')}"
    elif f.get("use_qk_norm") and qk_recipe != "l2":
        spec.warnings.append("config sets use_qk_norm but no q_norm tensor exists")

    bias_t = _any_layer_has(lt, "qkv_bias")
    a.bias = bool(bias_t) if lt else bool(f.get("attention_bias", "qkv_bias", "bias", default=False))
    if bias_t:
        spec.evidence["attention.bias"] = bias_t
    elif f.get("attention_bias") and lt:
        spec.warnings.append("config sets attention_bias but no q/k/v bias tensor exists")
    a.out_bias = bool(_any_layer_has(lt, "out_bias"))
    sinks = _any_layer_has(lt, "sinks")
    a.sinks = bool(sinks) or bool(recipe.get("sinks") and not lt)
    if sinks:
        spec.evidence["attention.sinks"] = sinks
    gate = _any_layer_has(lt, "attn_gate")
    a.gated = bool(gate) or bool(f.get("attn_output_gate", "use_attn_gate", "gated_attention", default=recipe.get("gated_attention", False)))
    idx = _any_layer_has(lt, "indexer")
    a.indexer = bool(idx) or bool(f.get("index_topk", "index_n_heads"))
    if idx:
        spec.evidence["attention.indexer"] = idx
    # Gemma 3 configs carry attn_logit_softcapping but its attention never applies it (recipe says so)
    a.softcap = f.get("attn_logit_softcapping") if recipe.get("attn_softcap", True) else None
    scalar = f.get("query_pre_attn_scalar")
    if scalar:
        a.scale = float(scalar) ** -0.5
    # MiMo-V2-Flash scales V; transformers' default applies when the key is absent, an explicit null means 1
    key = "attention_value_scale"
    vs = f.config[key] if key in f.config else recipe.get(key)
    if vs is not None and float(vs) != 1.0:
        a.value_scale = float(vs)
        spec.evidence["attention.value_scale"] = f"config.json:{key}" if key in f.config else f"recipe {recipe.get('family')}"
    spec.attention = a


def _rope(spec: ArchSpec, f: _Facts, recipe: dict) -> None:
    r = RopeSpec()
    params = f.get("rope_parameters")
    full = params.get("full_attention", params) if isinstance(params, dict) else {}
    local = params.get("sliding_attention") if isinstance(params, dict) else None
    r.theta = full.get("rope_theta") or f.get("rope_theta", "rotary_emb_base", "rope_base", fact="rope.theta")
    if full.get("rope_theta"):
        spec.evidence["rope.theta"] = "config.json:rope_parameters"
    scaling = f.get("rope_scaling") or {k: v for k, v in full.items() if k not in ("rope_theta", "partial_rotary_factor")}
    stype = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    r.scaling = dict(scaling, type=stype) if stype and stype != "default" else None
    if isinstance(local, dict) and local.get("rope_theta") and local.get("rope_theta") != r.theta:
        r.local_theta = local["rope_theta"]
    elif f.get("rope_local_base_freq"):
        r.local_theta = f.get("rope_local_base_freq", fact="rope.local_theta")
    partial = (full.get("partial_rotary_factor") or f.get("partial_rotary_factor", fact="rope.partial")
               or recipe.get("partial_rotary_factor"))
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
    r.learned_positions = recipe.get("positions") == "learned"
    spec.rope = r


def _norms(spec: ArchSpec, f: _Facts, recipe: dict, lt) -> None:
    n = NormSpec()
    first = next(iter(sorted(lt)), None)
    if first is not None:
        has = {role: _layer_has(lt, first, role) for role in ("input_norm", "post_attn_norm", "pre_ffn_norm", "post_ffn_norm")}
        if has["post_ffn_norm"] and has["input_norm"]:
            n.placement = "sandwich"
        elif has["post_ffn_norm"] and not has["input_norm"]:
            n.placement = "post"
        else:
            n.placement = "pre"
        spec.evidence["norm.placement"] = f"norm tensors of layer {first}: " + ", ".join(k for k, v in has.items() if v)
    else:
        n.placement = recipe.get("norm_placement", "pre")
    if recipe.get("norm_placement") and first is not None and recipe["norm_placement"] != n.placement:
        spec.warnings.append(f"recipe expects {recipe['norm_placement']} norms, tensors show {n.placement}")
    eps_rms = f.get("rms_norm_eps", "norm_eps", fact="norm.eps")
    eps_ln = f.get("layer_norm_epsilon", "layer_norm_eps")
    n.kind = recipe.get("norm", "layer" if eps_ln is not None and eps_rms is None else "rms")
    n.eps = eps_rms if eps_rms is not None else eps_ln
    n.unit_offset = bool(recipe.get("norm_unit_offset", False))
    spec.norm = n


def _moe(spec: ArchSpec, f: _Facts, recipe: dict, lt) -> None:
    experts = f.get(*EXPERTS_KEYS, fact="moe.experts") or 0
    routed_layers = [i for i in sorted(lt) if _layer_has(lt, i, "routed_expert") or _layer_has(lt, i, "router")]
    if not experts and not routed_layers:
        return
    topk = f.get(*TOPK_KEYS, fact="moe.experts_per_token") or 0
    shared = f.get(*SHARED_KEYS, fact="moe.shared_experts")
    shared_ffn = f.get("shared_expert_intermediate_size", fact="moe.shared_ffn")
    has_shared_tensor = _any_layer_has(lt, "shared_expert")
    if shared is None:
        shared = 1 if (shared_ffn or has_shared_tensor or recipe.get("shared_experts")) else 0
    if lt and bool(shared) != bool(has_shared_tensor):
        spec.warnings.append(f"config says {shared} shared experts, tensors {'show' if has_shared_tensor else 'show none'}")
        shared = shared if has_shared_tensor else 0
    if has_shared_tensor:
        spec.evidence["moe.shared_experts"] = has_shared_tensor
    # the recipe names the HF key (Llama 4: intermediate_size); GGUF configs are already canonical
    key = "moe_intermediate_size" if spec.format == "gguf" else recipe.get("expert_ffn_key", "moe_intermediate_size")
    expert_ffn = f.get(key, "moe_intermediate_size", "expert_intermediate_size", fact="moe.expert_ffn")
    if shared and not shared_ffn:
        shared_ffn = (expert_ffn or 0) * int(shared)
    m = MoESpec(experts=int(experts), experts_per_token=int(topk), shared_experts=int(shared or 0),
                expert_ffn=expert_ffn, shared_ffn=shared_ffn)
    m.shared_gated = bool(_any_layer_has(lt, "shared_expert_gate"))
    m.router = f.get("scoring_func", default=recipe.get("router"))
    m.norm_topk_prob = f.get("norm_topk_prob")
    m.n_group = f.get("n_group")
    m.topk_group = f.get("topk_group")
    m.routed_scaling_factor = f.get("routed_scaling_factor")
    m.router_bias = bool(_any_layer_has(lt, "router_bias"))
    spec.moe = m


def _schedule(spec: ArchSpec, f: _Facts, recipe: dict, lt, ckpt: Checkpoint) -> None:
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
    local_scaling = _local_rope_scaling(spec, f)
    local_partial = _local_rope_partial(spec, f)
    if local_scaling is None and spec.rope.scaling and recipe.get("rope_scaling_on") == "global":
        local_scaling = {"type": "default"}  # GGUF / legacy configs: the recipe says sliding layers are unscaled
    nope = f.get("no_rope_layers", fact="rope.nope_layers")
    sched = []
    for i in range(n):
        layer = LayerSpec(index=i)
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
        elif window and f.get("use_sliding_window", default=True) and recipe.get("sliding") != "off":
            max_window_layers = f.get("max_window_layers")
            layer.mixer = "sliding" if max_window_layers is None or i < max_window_layers else "full"
        if layer.mixer == "sliding":
            layer.window = window
        if layer.mixer in ("linear", "mamba"):
            layer.linear_kind = recipe.get("linear_kind")
        # positions
        if isinstance(nope, list) and i < len(nope):
            layer.rope = bool(nope[i])  # transformers: no_rope_layers[i] == 1 means the layer uses RoPE
        elif f.get("no_rope_layer_interval"):  # SmolLM3 / Llama 4 GGUF: every n-th layer is NoPE
            layer.rope = (i + 1) % int(f.get("no_rope_layer_interval", fact="rope.nope_layers")) != 0
        elif recipe.get("nope_on") == "global" and layer.mixer == "full":
            layer.rope = False
        elif recipe.get("nope_on") == "all":
            layer.rope = False
        if spec.rope.learned_positions or layer.mixer in ("none", "mamba"):
            layer.rope = False
        if chunk and recipe.get("chunked_on") == "rope_layers" and layer.rope and layer.mixer == "full":
            layer.mixer, layer.window = "chunked", chunk
        if spec.attention.mla and layer.mixer == "full":
            layer.mixer = "mla"
        if layer.mixer == "sliding" and spec.rope.local_theta:
            layer.rope_theta = spec.rope.local_theta
        if layer.mixer == "sliding" and local_scaling is not None:
            layer.rope_scaling = local_scaling
        if layer.mixer == "sliding" and local_partial is not None:
            layer.rope_partial = local_partial
        layer.kv_heads = _layer_kv_heads(spec, f, lt, i, ckpt)
        if spec.attention.sinks and lt and layer.mixer in ("full", "sliding", "chunked") \
                and not _layer_has(lt, i, "sinks"):
            layer.sinks = False  # MiMo-V2-Flash: only its sliding layers carry sink logits
        sched.append(layer)
    _ffn_schedule(spec, f, recipe, lt, sched)
    _kv_sharing(spec, f, sched)
    spec.schedule = sched
    spec.rope.nope_layers = [l.index for l in sched if not l.rope and l.mixer not in ("none", "mamba", "linear")
                             and not spec.rope.learned_positions]
    if spec.moe:
        spec.moe.dense_layers = [l.index for l in sched if l.ffn == "dense"]


def _local_rope_scaling(spec: ArchSpec, f: _Facts) -> dict | None:
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


def _local_rope_partial(spec: ArchSpec, f: _Facts) -> float | None:
    """The sliding layers' partial_rotary_factor where per-layer-type rope_parameters give them
    their own (transformers' MiMo-V2-Flash reads it per layer type)."""
    params = f.get("rope_parameters")
    local = params.get("sliding_attention") if isinstance(params, dict) else None
    p = local.get("partial_rotary_factor") if isinstance(local, dict) else None
    return float(p) if p is not None and float(p) != spec.rope.partial else None


def _layer_kv_heads(spec: ArchSpec, f: _Facts, lt, i: int, ckpt: Checkpoint) -> int | None:
    """A layer's KV head count where it differs from the model's (MiMo-V2-Flash doubles it on
    sliding layers; some GGUFs store head_count_kv per layer)."""
    per_layer = f.get("num_key_value_heads_per_layer")
    if isinstance(per_layer, list) and i < len(per_layer) and per_layer[i] != spec.attention.kv_heads:
        return per_layer[i]
    a = spec.attention
    if a.mla or not a.head_dim:
        return None
    k = next((n for n in lt.get(i, ()) if n.endswith(("k_proj.weight", "attn_k.weight"))), None)
    if k is None:
        return None
    rows = ckpt.tensors[k].shape[0]
    if rows and rows % a.head_dim == 0 and rows // a.head_dim != a.kv_heads:
        spec.evidence[f"layer {i} kv_heads"] = k
        return rows // a.head_dim
    return None


def _ffn_schedule(spec: ArchSpec, f: _Facts, recipe: dict, lt, sched: list[LayerSpec]) -> None:
    if not spec.moe:
        return
    n = len(sched)
    from_config = _moe_layers_from_config(f, n)
    from_tensors = {i for i in range(n) if _layer_has(lt, i, "routed_expert") or _layer_has(lt, i, "router")}
    if lt:
        moe_layers = from_tensors
        if from_config is not None and from_config != from_tensors:
            spec.warnings.append(
                f"config puts MoE in layers {index_ranges(sorted(from_config))}, tensors in {index_ranges(sorted(from_tensors))}")
        spec.evidence["moe.dense_layers"] = "layers without expert/router tensors"
    else:
        moe_layers = from_config if from_config is not None else set(range(n))
    for layer in sched:
        if layer.ffn != "none":  # single-op mixer layers (Nemotron-H) have no FFN at all
            layer.ffn = "moe" if layer.index in moe_layers else "dense"


def _moe_layers_from_config(f: _Facts, n: int) -> set[int] | None:
    """Which layers are MoE according to the config keys each family uses."""
    explicit = f.get("moe_layers")
    if isinstance(explicit, list):
        return {i for i in explicit if isinstance(i, int)}
    k = f.get("first_k_dense_replace", "num_dense_layers", "first_k_dense")
    freq = f.get("moe_layer_freq")
    if k is not None:
        step = freq if isinstance(freq, int) and freq > 0 else 1
        return {i for i in range(n) if i >= k and i % step == 0}
    if isinstance(freq, list):
        return {i for i, v in enumerate(freq) if v}
    mlp_types = f.get("mlp_layer_types")  # MiMo-V2-Flash: "dense" | "sparse" per layer
    if isinstance(mlp_types, list):
        return {i for i, v in enumerate(mlp_types) if v in ("sparse", "moe")}
    step = f.get("interleave_moe_layer_step")
    if step:
        return set(range(step - 1, n, step))
    sparse_step = f.get("decoder_sparse_step")
    only = f.get("mlp_only_layers")
    if sparse_step is not None or only is not None:
        only = set(only or [])
        sparse_step = sparse_step or 1
        return {i for i in range(n) if i not in only and (i + 1) % sparse_step == 0}
    return None


def _kv_sharing(spec: ArchSpec, f: _Facts, sched: list[LayerSpec]) -> None:
    shared = f.get("num_kv_shared_layers", fact="extras.kv_shared_layers")
    if not shared:
        return
    first_shared = len(sched) - int(shared)
    for layer in sched[first_shared:]:
        # Gemma 3n: a shared layer reuses the KV of the last earlier layer of the same kind
        same = [l.index for l in sched[:first_shared] if l.mixer == layer.mixer]
        layer.kv_shared_from = same[-1] if same else None
    spec.extras["kv_shared_layers"] = int(shared)


def _extras(spec: ArchSpec, f: _Facts, recipe: dict, ckpt: Checkpoint) -> None:
    spec.mtp_layers = int(f.get("num_nextn_predict_layers", "mtp_num_layers", "num_mtp_layers", default=0,
                                fact="mtp_layers") or 0)
    tie = f.get("tie_word_embeddings", fact="tied_embeddings")
    has_head = any(n.endswith(("lm_head.weight", "output.weight")) and not is_vision(n) and layer_of(n) is None
                   for n in ckpt.tensors)
    spec.tied_embeddings = not has_head if ckpt.tensors else bool(tie if tie is not None else True)
    if tie is False and not has_head and ckpt.tensors:
        spec.warnings.append("config says tie_word_embeddings=false but there is no lm_head tensor")
    if recipe.get("embedding_scale") == "sqrt_hidden" and spec.hidden_size:
        spec.embedding_scale = math.sqrt(spec.hidden_size)
    spec.final_softcap = f.get("final_logit_softcapping")
    ple_dim = f.get("hidden_size_per_layer_input", fact="per_layer_embeddings")
    if ple_dim:
        spec.per_layer_embeddings = {"dim": ple_dim, "vocab": f.get("vocab_size_per_layer_input", default=spec.vocab_size)}
    for key, name in (("altup_num_inputs", "altup_streams"), ("laurel_rank", "laurel_rank"),
                      ("activation_sparsity_pattern", "activation_sparsity")):
        v = f.get(key)
        if v:
            spec.extras[name] = v
    if spec.ffn_bias is False:
        spec.ffn_bias = bool(f.get("mlp_bias")) or recipe.get("ffn_bias", False)
    la = spec.schedule and [l for l in spec.schedule if l.mixer in ("linear", "mamba")]
    if la:
        spec.linear_attention = _linear_state(spec, f, recipe)


def _linear_state(spec: ArchSpec, f: _Facts, recipe: dict) -> dict:
    kind = recipe.get("linear_kind", "linear")
    out = {"kind": kind, "linear": sum(l.mixer in ("linear", "mamba") for l in spec.schedule)}
    kh = f.get("linear_num_key_heads")
    vh = f.get("linear_num_value_heads")
    kd = f.get("linear_key_head_dim")
    vd = f.get("linear_value_head_dim")
    if vh and kd and vd:  # Gated DeltaNet: a kd x vd state per value head, plus the conv window
        conv = f.get("linear_conv_kernel_dim", default=4)
        conv_ch = (kh or vh) * kd * 2 + vh * vd
        out["state_elems_per_layer"] = vh * kd * vd + conv_ch * (conv - 1)
    elif isinstance(f.get("linear_attn_config"), dict) and f.get("linear_attn_config").get("num_heads"):
        # Kimi Delta Attention: a head_dim x head_dim state per head, plus q/k/v short convolutions
        c = f.get("linear_attn_config")
        h, d, conv = c["num_heads"], c.get("head_dim", 128), c.get("short_conv_kernel_size", 4)
        out["state_elems_per_layer"] = h * d * d + 3 * h * d * (conv - 1)
    elif f.get("mamba_num_heads") and f.get("mamba_head_dim") and f.get("ssm_state_size"):
        out["state_elems_per_layer"] = f.get("mamba_num_heads") * f.get("mamba_head_dim") * f.get("ssm_state_size")
    return out


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


def _params(spec: ArchSpec, ckpt: Checkpoint) -> None:
    total = routed = mtp = vision = ple = 0
    mtp_start = spec.layers if spec.format == "safetensors" else spec.layers - spec.mtp_layers
    kinds: dict[str, tuple] = {}  # expert key -> (kind, layer): the same for every expert index
    for name, t in ckpt.tensors.items():
        if name == "rope_freqs.weight":  # llama.cpp's Llama 3 RoPE factors: derived from config, not weights
            continue
        n = t.numel
        total += n
        key = _expert_key(name) if "experts." in name else name
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


def _storage(spec: ArchSpec, ckpt: Checkpoint) -> None:
    spec.stored_bytes = ckpt.stored_bytes
    spec.dtypes = ckpt.dtype_counts()
    floats = [d for d in spec.dtypes if d in STORAGE_BYTES]
    spec.kv_dtype_default = "f32" if floats and floats[0] == "F32" else ("f16" if floats and floats[0] == "F16" else "bf16")
    if spec.format == "gguf":
        spec.kv_dtype_default = "f16"  # llama.cpp's default cache type

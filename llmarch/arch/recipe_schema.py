"""The schema of a family recipe (recipes/*.toml): one frozen dataclass per section.

A recipe is built into these classes when it is loaded; a key no class declares, a value of the
wrong type or outside a key's choices is refused with the file and the key named, so a typo in a
recipe fails at load time instead of silently reading as "not set". Consumers read attributes.
"""

from __future__ import annotations

import collections.abc
import functools
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from types import MappingProxyType
from typing import Any

from llmarch.errors import LlmarchError


def _choice(*values: str, default=None):
    return field(default=default, metadata={"choices": values})


def _table():
    return field(default_factory=lambda: MappingProxyType({}))


COMMANDS = ("run", "convert", "from_gguf")  # llmarch run; convert HF -> GGUF; convert GGUF -> HF


@dataclass(frozen=True)
class MoERecipe:
    """[moe]: routing and expert facts a family's config does not carry (each from the family's
    transformers modeling file)."""

    router: str | None = _choice("softmax", "sigmoid")  # score function when the config has no scoring_func
    topk_before_score: bool = False  # top-k over the raw logits, then the score function over the k chosen
    norm_topk_prob: bool | None = None  # top-k renormalised when the config has no norm_topk_prob key
    # the epsilon of that renormalisation, w / (sum + eps), of sigmoid-then-top-k routers
    # (Lfm2MoeTopKRouter: 1e-6; DeepSeek V3 and AfMoE: 1e-20)
    norm_topk_eps: float = 1e-20
    # False: the modeling file never reads config.json's norm_topk_prob (DeepSeek-V2's router never
    # renormalises whatever the config says); norm_topk_prob above holds
    reads_norm_topk_prob: bool = True
    group_score: str = _choice("top2_sum", "max", default="top2_sum")  # how a group ranks for the group limit
    # groups limit the choice only where config.json's topk_method is this value (DeepSeek-V2:
    # "group_limited_greedy"; its "greedy" ignores n_group); None: n_group > 1 always limits
    grouped_topk_method: str | None = None
    weights_on_input: bool = False  # router weights scale each expert's input, not its output (Llama 4)
    swiglu_alpha: float | None = None  # clamped SwiGLU (gpt-oss): the config class's defaults, used when
    swiglu_limit: float | None = None  # config.json lacks swiglu_alpha / swiglu_limit
    fused_gate_up: str | None = _choice(
        "interleaved", "halves"
    )  # how the HF checkpoints' fused gate_up_proj holds gate and up
    fused_out_first: bool = False  # fused experts stored [E, 2I, d] / [E, d, I] even where d == 2I (Mistral 4)
    expert_ffn_key: str = "moe_intermediate_size"  # the config key of one routed expert's width
    shared_experts: int = 0  # shared experts when the config names none (Llama 4: one)


@dataclass(frozen=True)
class GgufDefaults:
    """[gguf_defaults]: config keys llama.cpp writes no GGUF key for (it hard-codes them for the
    arch), with the value it uses; each is a config key the fingerprint reads."""

    hidden_act: str | None = None
    hidden_activation: str | None = None
    activation_function: str | None = None
    mlp_hidden_act: str | None = None
    sliding_window_pattern: int | None = None
    rope_local_base_freq: float | None = None
    no_rope_layer_interval: int | None = None
    full_attention_interval: int | None = None

    def items(self) -> list[tuple[str, Any]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]


@dataclass(frozen=True)
class QkNormRule:
    """llama.cpp's rule for Llama 4: QK-norm exactly when the model does not have `experts` experts."""

    key: str  # the config key that switches QK-norm (use_qk_norm)
    experts: int


@dataclass(frozen=True)
class ConvertRecipe:
    """[convert]: what `llmarch convert` needs beyond the spec, in both directions (HF <-> GGUF)."""

    hf_class: str | Mapping[str, str] = ""  # transformers class for config.json (a table: per model_type)
    hf_model_type: str | None = None  # model_type written to config.json when it is not the source's
    gguf_arch: str | Mapping[str, str] | None = None  # llama.cpp's arch when not the paired gguf_archs entry
    gguf_marker: str | None = None  # a metadata key ({arch} filled) that tells this family's GGUF apart
    # gguf-py arch whose tensor tables serve this family's llama.cpp arch where gguf-py has none for it
    # (gguf-py 0.19 lacks deepseek32; llama.cpp's deepseek32 loads glm-dsa's tensor names)
    gguf_tables: str | None = None
    hf_layout: str = _choice("llama", "gpt2", default="llama")  # the HF name table (convert/layout.py)
    hf_names: Mapping[str, str] = _table()  # gguf-py MODEL_TENSOR name -> HF name template
    hf_bare: tuple[str, ...] = ()  # MODEL_TENSOR names whose HF parameter has no .weight suffix
    # MODEL_TENSOR name -> HF parameter llama.cpp reads as that tensor's `.scale` (Gemma 4's
    # router.scale: ffn_gate_inp.scale; router.per_expert_scale: ffn_down_exps.scale)
    hf_scales: Mapping[str, str] = _table()
    hf_keys: Mapping[str, str] = _table()  # canonical config key -> the family's own config key
    transpose: tuple[str, ...] = ()  # HF weights stored [in, out] (Conv1D)
    skip: tuple[str, ...] = ()  # HF tensors that are buffers, not weights
    norm_shift: float = 0.0  # added to norm weights on the way to GGUF (Gemma's (1 + w))
    split_kv_b: bool = False  # MLA: kv_b_proj -> llama.cpp's attn_k_b + attn_v_b
    fused_prefix: str = "model.layers.{bid}.mlp.experts"  # HF parent of the fused expert tensors ([moe] fused_gate_up)
    interleave_moe: bool = False  # write interleave_moe_layer_step (Llama 4)
    swa_pattern_array: bool = False  # write the sliding-window pattern as one bool per layer (Olmo 3)
    qk_norm_key: str | None = None  # config key that switches QK-norm on (GLM-4.5: use_qk_norm)
    moe_key: str | None = None  # config key that switches the routed experts on (Gemma 4: enable_moe_block)
    # config keys of per-layer facts (Gemma 4): values = keys on the full layers, those layers' own KV
    # heads (applied with values = keys), FFNs twice as wide on the layers that reuse another's KV
    v_from_k_key: str | None = None
    global_kv_heads_key: str | None = None
    double_wide_key: str | None = None
    qk_norm_off_at_experts: QkNormRule | None = None
    drops_mtp: bool = False  # MTP layers are not carried into GGUF
    # llama.cpp has no architecture for the family (checked against its arch list): convert says so
    no_gguf_arch: bool = False
    # config key of the query scale (scale = value ** -0.5) whose transformers default is not
    # head_dim; GGUF -> HF writes head_dim, the scale llama.cpp applies (Gemma 3's query_pre_attn_scalar)
    query_scalar_key: str | None = None
    hard_coded: Mapping[str, Mapping[str, Any]] = _table()  # GGUF arch -> {config key: value llama.cpp hard-codes}
    # MODEL_TENSOR names llama.cpp stores as one 3-D tensor stacked from HF's numbered list
    # (Gemma 3n's altup_projections.{0,1,2}); the HF template in hf_names carries {xid}
    stacked: tuple[str, ...] = ()
    # per-layer facts llama.cpp hard-codes by layer index: only the first kv_owner_layers layers
    # compute KV (the rest reuse it: num_kv_shared_layers = layers - this), and the first
    # sparse_ffn_layers layers' FFN gate keeps the top 1 - sparse_ffn_fraction (the rest none)
    kv_owner_layers: int | None = None
    sparse_ffn_layers: int | None = None
    sparse_ffn_fraction: float | None = None
    # llama.cpp loads k/v projections and the k-norm in every layer, also those that reuse another
    # layer's KV and never read them (Gemma 3n); write zeros of the owner's shape where the source
    # has none (transformers' save_pretrained leaves them out, the Hub files keep them)
    shared_kv_placeholders: bool = False
    # HF tensor-name endings respelled as gguf-py's table knows them (Qwen3-Next's dt_bias: dt_proj.bias)
    hf_aliases: Mapping[str, str] = _table()
    gguf_bare: tuple[str, ...] = ()  # MODEL_TENSOR names llama.cpp reads without a .weight suffix (ssm_a)
    neg_exp: tuple[str, ...] = ()  # MODEL_TENSOR names stored as -exp(HF value): HF keeps log(-A), llama.cpp A
    squeezed: tuple[str, ...] = ()  # MODEL_TENSOR names whose HF size-1 dims llama.cpp drops ([C, 1, K] conv)
    unshifted: tuple[str, ...] = ()  # MODEL_TENSOR names of norms that norm_shift leaves alone (plain-weight norms)
    # Gated DeltaNet value heads stored tiled across key heads, not grouped per key head (llama.cpp's qwen35)
    tile_v_heads: bool = False
    # llama.cpp's arch requires M-RoPE sections (rope.dimension_sections): the config's mrope_section,
    # else the interleaved split that rotates every pair by the text position
    rope_sections: bool = False
    # llama.cpp's arch when the model has routed experts (nemotron_h_moe); in it every FFN layer is an MoE
    gguf_arch_moe: str | None = None
    # llama.cpp tells layers apart by per-layer arrays: head_count_kv 0 where a layer has no attention
    # (a recurrent mixer, or none), feed_forward_length 0 where it has no FFN
    layer_kind_arrays: bool = False
    # config.json's layer_types name for a layer without KV heads in those arrays (LFM2: "conv")
    linear_layer_type: str = "linear_attention"
    # config.json keys written on the way back whatever the GGUF holds, because its values are what
    # they would compute (LFM2: feed_forward_length is already block_auto_adjust_ff_dim's width)
    hf_fixed: Mapping[str, Any] = _table()
    column: tuple[str, ...] = ()  # MODEL_TENSOR names llama.cpp reads as one column ([n] -> [n, 1]: Mamba-2's A, D)
    grouped: tuple[str, ...] = ()  # MODEL_TENSOR names stored one row per linear-attention group (Mamba-2's norm)


@dataclass(frozen=True)
class Recipe:
    """A family: what its files do not say. Top-level keys, then the [moe], [gguf_defaults] and
    [convert] sections. `family` is the file's name, not a key."""

    family: str
    model_types: tuple[str, ...] = ()  # config.json model_types of the family (the file name when absent)
    gguf_archs: tuple[str, ...] = ()  # GGUF general.architecture values of the family
    supports: tuple[str, ...] = field(default=(), metadata={"choices": COMMANDS})  # commands proven by tests
    # attention
    attention: str | None = _choice("mla")
    qk_norm: str | None = _choice("per_head", "whole", "l2")  # when no q_norm tensor can say
    sinks: bool = False  # when no tensor can say
    gated_attention: bool = False  # when the config has no gate key
    attn_softcap: bool = True  # False: the config's attn_logit_softcapping is never applied (Gemma 3)
    attention_value_scale: float | None = None  # the config class's default when config.json lacks the key
    # softmax scale when the config has no query_pre_attn_scalar (Gemma 3n / 4: 1.0, their q/k norms set the size)
    attention_scale: float | None = None
    v_norm: bool = False  # a weightless RMS norm over each value head (it has no tensor to show it)
    # the sparse-attention indexer's RoPE layout: "half" (rotate the two halves, DeepSeek V3.2) |
    # "interleaved" (adjacent pairs, GLM-5); no config key says, the modeling files differ
    indexer_rope: str | None = _choice("half", "interleaved")
    # a NoPE MLA layer's rope dims join its nope dims (Mistral Large 4's kv_a emits no k_rot there);
    # False: they stay, unrotated (Kimi Linear)
    nope_folds_rope: bool = False
    # the MLA latent norm (kv_a_layernorm) takes the config's rms_norm_eps, not its norm class's
    # default 1e-6 (Mistral Large 4)
    latent_norm_model_eps: bool = False
    # regex -> replacement, applied in order to the checkpoint's tensor names before run reads them,
    # where the family's Hub files keep its own names (Mistral Large 4's consolidated layout: the
    # renames of transformers' conversion_mapping for the model_type)
    tensor_renames: Mapping[str, str] = _table()
    # positions
    positions: str | None = _choice("learned")
    partial_rotary_factor: float | None = None  # the config class's default when config.json lacks the key
    # layers without RoPE when the config has no list; "null_theta": every layer when rope_parameters
    # sets rope_theta to null (Olmo hybrid: then no rotary embedding; a missing one is the default base)
    nope_on: str | None = _choice("global", "all", "null_theta")
    chunked_on: str | None = _choice("rope_layers")  # layers with chunked attention (Llama 4)
    # layers RoPE scaling applies to: "global" (full attention), "compressed" (those keeping
    # compressed KV, DeepSeek V4: the others rotate unscaled by the main base)
    rope_scaling_on: str | None = _choice("global", "compressed")
    # norms
    norm: str | None = _choice("rms", "layer")
    norm_placement: str | None = _choice("pre", "post", "sandwich")
    norm_unit_offset: bool = False  # weights applied as (1 + w)
    # FFN, embeddings, layers
    ffn_bias: bool = False
    ffn_gated: bool = True  # False: a plain up / activation / down MLP (GPT-2), not a gated GLU
    ffn_ratio: int | None = None  # FFN width as a multiple of hidden_size when the config leaves it unset
    embedding_scale: str | None = _choice("sqrt_hidden")
    linear_kind: str | None = _choice("gated_deltanet", "kda", "mamba2")
    # the linear layers' gated output norm epsilon when it is not the config's (Olmo hybrid: 1e-5,
    # FLA's FusedRMSNormGated default, whatever rms_norm_eps says)
    linear_norm_eps: float | None = None
    # Gated DeltaNet's beta = 2 sigmoid(b) when the config has no linear_allow_neg_eigval key (the
    # config class's default: Olmo hybrid's is true)
    linear_allow_neg_eigval: bool = False
    gguf_permute_qk: bool = False  # llama.cpp's converter permutes Q/K rows for its RoPE
    moe: MoERecipe = field(default_factory=MoERecipe)
    gguf_defaults: GgufDefaults = field(default_factory=GgufDefaults)
    convert: ConvertRecipe = field(default_factory=ConvertRecipe)

    def gguf_arch_for(self, model_type: str | None) -> str | None:
        """The GGUF arch llama.cpp converts this model_type to: [convert] gguf_arch, else the
        gguf_archs entry paired with the model_type (lists of equal length), else the first."""
        types_, archs = self.model_types, self.gguf_archs
        paired = archs[types_.index(model_type)] if len(types_) == len(archs) and model_type in types_ else None
        default = paired or (archs[0] if archs else None)
        rule = self.convert.gguf_arch
        if isinstance(rule, Mapping):
            return (rule.get(model_type) if model_type else None) or default
        return rule or default


def parse_recipe(text: str, family: str, where) -> Recipe:
    """TOML text -> Recipe; `where` (the file) is named in every error."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise LlmarchError(f"recipe is not valid TOML: {e}", where) from e
    if "family" in table:
        raise LlmarchError("recipe key 'family' is not allowed: the family is the file's name", where)
    table.setdefault("model_types", [family])
    return _build(Recipe, dict(table, family=family), where, "")


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """A section's field types, resolved once per class: resolving the annotations is most of the
    time loading every recipe takes, and inspect loads them all."""
    return typing.get_type_hints(cls)


def _build(cls, table: dict, where, section: str):
    hints = _field_types(cls)
    known = {f.name: f for f in fields(cls)}
    for key in table:
        if key not in known:
            place = f" in [{section}]" if section else ""
            names = ", ".join(sorted(k for k in known if k != "family"))
            raise LlmarchError(f"unknown recipe key {key!r}{place} (known: {names})", where)
    kwargs = {}
    for name, value in table.items():
        key = f"{section}.{name}" if section else name
        kwargs[name] = _value(hints[name], value, where, key)
        choices: tuple[str, ...] = known[name].metadata.get("choices", ())
        values = kwargs[name] if isinstance(kwargs[name], tuple) else (kwargs[name],)
        bad = [v for v in values if v is not None and choices and v not in choices]
        if bad:
            raise LlmarchError(f"recipe key {key!r} has {bad[0]!r}; one of {', '.join(choices)}", where)
    missing = [
        f.name for f in fields(cls) if f.name not in kwargs and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        raise LlmarchError(f"recipe section [{section}] lacks {', '.join(missing)}", where)
    return cls(**kwargs)


def _value(tp, value, where, key: str):
    """`value` checked against the annotation `tp` and frozen (lists -> tuples, tables -> read-only)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        for arm in arms:
            try:
                return _value(arm, value, where, key)
            except LlmarchError:
                continue
        names = " or ".join(
            "table"
            if typing.get_origin(a) is collections.abc.Mapping or is_dataclass(a)
            else getattr(a, "__name__", str(a))
            for a in arms
        )
        raise LlmarchError(f"recipe key {key!r} must be {names}, got {value!r}", where)
    if tp is Any:
        return value
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise LlmarchError(f"recipe key {key!r} must be a table", where)
        return _build(tp, value, where, key)
    if origin is tuple:
        inner = typing.get_args(tp)[0]  # tuple[str, ...] or tuple[int, ...]
        ok = isinstance(value, list) and all(isinstance(v, inner) and not isinstance(v, bool) for v in value)
        if not ok:
            raise LlmarchError(
                f"recipe key {key!r} must be a list of {'strings' if inner is str else 'integers'}", where
            )
        return tuple(value)
    if origin is collections.abc.Mapping:
        if not isinstance(value, dict):
            raise LlmarchError(f"recipe key {key!r} must be a table", where)
        _, inner = typing.get_args(tp) or (str, Any)
        return MappingProxyType({k: _value(inner, v, where, f"{key}.{k}") for k, v in value.items()})
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"recipe schema: no check for {tp!r} ({key})")
    if not ok:
        raise LlmarchError(f"recipe key {key!r} must be {tp.__name__}, got {value!r}", where)
    return value

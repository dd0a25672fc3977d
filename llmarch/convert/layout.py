"""Family rules for conversion and the Hugging Face names of each GGUF tensor kind.

HF -> GGUF names come from gguf-py's TensorNameMap. GGUF -> HF has no unique answer in gguf-py
(many HF spellings map to one GGUF name), so the HF side of the families we write back is listed
here per layout, keyed by gguf-py's MODEL_TENSOR; every template is checked at run time to map
forward to the same GGUF name (`hf_name_for`), so this table cannot drift from gguf-py.
What differs per family (GGUF arch, Q/K permutation, norm shift, transposed weights, HF class)
lives in the family's recipe under [convert]; which families convert, in its `supports` list.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import gguf
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES

from llmarch.arch.recipe_book import supported_names
from llmarch.arch.recipe_schema import Recipe
from llmarch.arch.spec import ArchSpec
from llmarch.errors import LlmarchError

T = MODEL_TENSOR
_L = "model.layers.{bid}."
HF_LAYOUTS: dict[str, dict[MODEL_TENSOR, str]] = {
    # transformers' Llama-style decoder (llama, mistral, qwen2/3, qwen3_moe, gemma3, olmo2, smollm3)
    "llama": {
        T.TOKEN_EMBD: "model.embed_tokens",
        T.OUTPUT_NORM: "model.norm",
        T.OUTPUT: "lm_head",
        T.ATTN_NORM: _L + "input_layernorm",
        T.ATTN_Q: _L + "self_attn.q_proj",
        T.ATTN_K: _L + "self_attn.k_proj",
        T.ATTN_V: _L + "self_attn.v_proj",
        T.ATTN_OUT: _L + "self_attn.o_proj",
        T.ATTN_Q_NORM: _L + "self_attn.q_norm",
        T.ATTN_K_NORM: _L + "self_attn.k_norm",
        T.ATTN_POST_NORM: _L + "post_attention_layernorm",
        T.FFN_NORM: _L + "post_attention_layernorm",
        T.FFN_PRE_NORM: _L + "pre_feedforward_layernorm",
        T.FFN_POST_NORM: _L + "post_feedforward_layernorm",
        T.FFN_GATE: _L + "mlp.gate_proj",
        T.FFN_UP: _L + "mlp.up_proj",
        T.FFN_DOWN: _L + "mlp.down_proj",
        T.FFN_GATE_INP: _L + "mlp.gate",
        T.FFN_GATE_EXP: _L + "mlp.experts.{xid}.gate_proj",
        T.FFN_UP_EXP: _L + "mlp.experts.{xid}.up_proj",
        T.FFN_DOWN_EXP: _L + "mlp.experts.{xid}.down_proj",
        # DeepSeek V3: MLA projections, shared experts, router correction bias
        T.ATTN_Q_A: _L + "self_attn.q_a_proj",
        T.ATTN_Q_B: _L + "self_attn.q_b_proj",
        T.ATTN_Q_A_NORM: _L + "self_attn.q_a_layernorm",
        T.ATTN_KV_A_MQA: _L + "self_attn.kv_a_proj_with_mqa",
        T.ATTN_KV_A_NORM: _L + "self_attn.kv_a_layernorm",
        T.ATTN_KV_B: _L + "self_attn.kv_b_proj",
        T.FFN_GATE_SHEXP: _L + "mlp.shared_experts.gate_proj",
        T.FFN_UP_SHEXP: _L + "mlp.shared_experts.up_proj",
        T.FFN_DOWN_SHEXP: _L + "mlp.shared_experts.down_proj",
        T.FFN_EXP_PROBS_B: _L + "mlp.gate.e_score_correction",
        # Gated DeltaNet (Qwen3-Next: fused in_proj_qkvz / _ba; Qwen3.5: split in_proj_qkv / _z / _b / _a)
        T.SSM_A: _L + "linear_attn.A_log",
        T.SSM_CONV1D: _L + "linear_attn.conv1d",
        T.SSM_DT: _L + "linear_attn.dt_bias",
        T.SSM_NORM: _L + "linear_attn.norm",
        T.SSM_OUT: _L + "linear_attn.out_proj",
        T.SSM_IN: _L + "linear_attn.in_proj_qkvz",
        T.SSM_BETA_ALPHA: _L + "linear_attn.in_proj_ba",
        T.ATTN_QKV: _L + "linear_attn.in_proj_qkv",
        T.ATTN_GATE: _L + "linear_attn.in_proj_z",
        T.SSM_BETA: _L + "linear_attn.in_proj_b",
        T.SSM_ALPHA: _L + "linear_attn.in_proj_a",
        T.FFN_GATE_INP_SHEXP: _L + "mlp.shared_expert_gate",
        # DeepSeek V3.2 / GLM-5: the sparse-attention indexer
        T.INDEXER_ATTN_Q_B: _L + "self_attn.indexer.wq_b",
        T.INDEXER_ATTN_K: _L + "self_attn.indexer.wk",
        T.INDEXER_K_NORM: _L + "self_attn.indexer.k_norm",
        T.INDEXER_PROJ: _L + "self_attn.indexer.weights_proj",
    },
    "gpt2": {
        T.TOKEN_EMBD: "transformer.wte",
        T.POS_EMBD: "transformer.wpe",
        T.OUTPUT_NORM: "transformer.ln_f",
        T.OUTPUT: "lm_head",
        T.ATTN_NORM: "transformer.h.{bid}.ln_1",
        T.ATTN_QKV: "transformer.h.{bid}.attn.c_attn",
        T.ATTN_OUT: "transformer.h.{bid}.attn.c_proj",
        T.FFN_NORM: "transformer.h.{bid}.ln_2",
        T.FFN_UP: "transformer.h.{bid}.mlp.c_fc",
        T.FFN_DOWN: "transformer.h.{bid}.mlp.c_proj",
    },
}
# GGUF tensors llama.cpp derives from config (regenerated, not carried back to HF)
GENERATED = {T.ROPE_FREQS}
EXPERT_KINDS = {T.FFN_GATE_EXP: "gate_proj", T.FFN_UP_EXP: "up_proj", T.FFN_DOWN_EXP: "down_proj"}


@dataclass(frozen=True)
class Family:
    family: str  # recipe family
    model_type: str  # transformers model_type written to config.json
    arch: MODEL_ARCH  # whose gguf-py tensor tables apply
    hf_class: str
    permute_qk: bool = False
    norm_shift: float = 0.0  # added to *norm.weight on the way to GGUF (Gemma's (1 + w) norms)
    transpose: tuple[str, ...] = ()  # HF weights stored [in, out] (GPT-2 Conv1D)
    skip: tuple[str, ...] = ()  # HF tensors that are buffers, not weights
    layout: str = "llama"
    fused_experts: bool = False  # experts stored fused ([E, in, out] gate_up_proj / down_proj)
    fused_split: str = "interleaved"  # gate/up inside gate_up_proj: "interleaved" (gpt-oss) or "halves" (Llama 4)
    fused_prefix: str = "model.layers.{bid}.mlp.experts"  # HF parent of the fused gate_up_proj / down_proj
    split_kv_b: bool = False  # MLA: kv_b_proj -> attn_k_b + attn_v_b (llama.cpp's absorbed layout)
    stacked: frozenset[MODEL_TENSOR] = frozenset()  # one GGUF tensor stacked from HF's numbered list
    recipe: Recipe = field(default_factory=lambda: Recipe(family=""), compare=False, hash=False)
    gguf_name: str = ""  # general.architecture when gguf-py has no arch of that name (its tables: `arch`)

    @property
    def arch_name(self) -> str:
        return self.gguf_name or MODEL_ARCH_NAMES[self.arch]

    def skipped(self, hf_name: str) -> bool:
        return any(hf_name.endswith(s) for s in self.skip) or "rotary_emb.inv_freq" in hf_name

    def split_on_index(self, kind: MODEL_TENSOR) -> bool:
        """One HF tensor per index of the GGUF tensor's first dimension: experts, stacked lists."""
        return kind in EXPERT_KINDS or kind in self.stacked

    def transposed(self, hf_name: str) -> bool:
        """Stored [in, out] in HF (GPT-2 Conv1D): transposed on the way to GGUF and back."""
        return hf_name.endswith(self.transpose)


def _arch(name: str, stand_in: str | None = None) -> MODEL_ARCH:
    for arch, n in MODEL_ARCH_NAMES.items():
        if n == name:
            return arch
    if stand_in:
        return _arch(stand_in)
    raise LlmarchError(f"gguf-py knows no architecture {name!r}")


def _pick(value, model_type: str, default):
    return value.get(model_type, default) if isinstance(value, Mapping) else (value if value is not None else default)


def family_to_gguf(spec: ArchSpec, path=None) -> Family:
    """The HF -> GGUF rules of the spec's family (its recipe, resolved by the fingerprint)."""
    if spec.recipe is not None and spec.recipe.convert.no_gguf_arch:
        raise LlmarchError(
            f"converting family {spec.family!r} to GGUF is not supported: llama.cpp has no architecture for it",
            path,
        )
    if spec.recipe is None or "convert" not in spec.supports:
        raise LlmarchError(
            f"converting family {spec.family!r} to GGUF is not supported yet "
            f"(supported families: {', '.join(supported_names('convert'))})",
            path,
        )
    fam = _family(spec.recipe, spec.text_family or spec.model_type)
    moe_arch = spec.recipe.convert.gguf_arch_moe
    ffns = {l.ffn for l in spec.schedule}
    if moe_arch and "moe" in ffns:
        if "dense" in ffns:
            raise LlmarchError(
                f"llama.cpp's {moe_arch} makes every FFN layer an MoE; this model also has dense FFN layers, "
                f"so GGUF cannot express it",
                path,
            )
        fam = replace(fam, arch=_arch(moe_arch))
    return fam


def family_from_gguf(spec: ArchSpec, path=None) -> Family:
    """The GGUF -> HF rules of the spec's family; the model_type written to config.json is the
    recipe's hf_model_type, else the one paired with the file's arch, else the first."""
    recipe = spec.recipe
    if recipe is None or "from_gguf" not in spec.supports:
        raise LlmarchError(
            f"converting GGUF architecture {spec.gguf_arch!r} to safetensors is not supported yet "
            f"(supported families: {', '.join(supported_names('from_gguf'))})",
            path,
        )
    types, archs = recipe.model_types, recipe.gguf_archs
    paired = types[archs.index(spec.gguf_arch)] if len(types) == len(archs) and spec.gguf_arch in archs else types[0]
    fam = _family(recipe, recipe.convert.hf_model_type or paired)
    if spec.gguf_arch in archs and spec.gguf_arch != fam.arch_name:  # one family, several llama.cpp arches
        fam = replace(fam, arch=_arch(spec.gguf_arch))
    return fam


def _family(recipe: Recipe, model_type: str) -> Family:
    conv = recipe.convert
    name = recipe.gguf_arch_for(model_type)
    arch = _arch(name, conv.gguf_tables)
    return Family(
        family=recipe.family,
        model_type=conv.hf_model_type or model_type,
        arch=arch,
        gguf_name=name if name != MODEL_ARCH_NAMES[arch] else "",
        hf_class=_pick(conv.hf_class, model_type, ""),
        permute_qk=recipe.gguf_permute_qk,
        norm_shift=conv.norm_shift,
        transpose=conv.transpose,
        skip=conv.skip,
        layout=conv.hf_layout,
        split_kv_b=conv.split_kv_b,
        stacked=frozenset(T[k] for k in conv.stacked),
        fused_experts=recipe.moe.fused_gate_up is not None,
        fused_split=recipe.moe.fused_gate_up or "interleaved",
        fused_prefix=conv.fused_prefix,
        recipe=recipe,
    )


@lru_cache(maxsize=64)
def name_map(arch: MODEL_ARCH, n_blocks: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(arch, n_blocks)


def recipe_kind_of(fam: Family, hf_name: str) -> tuple[MODEL_TENSOR, str] | None:
    """(kind, GGUF name) of an HF name spelled as the recipe's hf_names say where gguf-py's table
    does not know it (Nemotron-H's backbone.layers.N.mixer.experts.E.up_proj); experts' {xid}
    is matched without the index, as gguf-py's table names them."""
    for kind_name, tmpl in fam.recipe.convert.hf_names.items():
        pattern = re.escape(tmpl.replace(".{xid}", "")).replace(r"\{bid\}", r"(?P<bid>\d+)")
        m = re.fullmatch(pattern + r"(?P<suffix>\.weight|\.bias)", hf_name)
        if m:
            bid = int(m["bid"]) if "{bid}" in tmpl else None
            return T[kind_name], TENSOR_NAMES[T[kind_name]].format(bid=bid) + m["suffix"]
    return None


def scale_kind_of(fam: Family, hf_name: str) -> tuple[MODEL_TENSOR, str] | None:
    """(kind, GGUF name) of an HF parameter the recipe's hf_scales stores as a tensor's .scale."""
    for kind_name, tmpl in fam.recipe.convert.hf_scales.items():
        m = re.fullmatch(re.escape(tmpl).replace(r"\{bid\}", r"(?P<bid>\d+)"), hf_name)
        if m:
            bid = int(m["bid"]) if "{bid}" in tmpl else None
            return T[kind_name], TENSOR_NAMES[T[kind_name]].format(bid=bid) + ".scale"
    return None


def gguf_kind_of(name: str, arch: MODEL_ARCH, n_blocks: int) -> tuple[MODEL_TENSOR, int | None] | None:
    """GGUF tensor name -> (MODEL_TENSOR, block) among the kinds this arch has."""
    m = re.match(r"^(.*?)(\.weight|\.bias|\.scale)?$", name)
    base = m.group(1)
    bm = re.match(r"^blk\.(\d+)\.", base)
    bid = int(bm.group(1)) if bm else None
    for kind in MODEL_TENSORS[arch]:
        tmpl = TENSOR_NAMES[kind]
        if (bid is None and tmpl == base) or (bid is not None and tmpl.format(bid=bid) == base):
            return kind, bid
    return None


def hf_name_for(
    fam: Family,
    kind: MODEL_TENSOR,
    bid: int | None,
    suffix: str,
    n_blocks: int,
    xid: int | None = None,
    path: str | Path | None = None,
) -> str:
    """The HF name of a GGUF tensor kind, checked against gguf-py's forward mapping (path: the GGUF
    the kind was read from, named by the refusal)."""
    conv = fam.recipe.convert
    tmpl = conv.hf_names.get(kind.name) or HF_LAYOUTS[fam.layout].get(kind)
    if tmpl is None:
        raise LlmarchError(f"no Hugging Face name known for GGUF tensor kind {kind.name} in family {fam.family}", path)
    hf = tmpl.format(bid=bid, xid=xid) + suffix
    if kind == T.FFN_EXP_PROBS_B:  # gguf-py spells HF's e_score_correction_bias with a dot
        hf = hf.replace("e_score_correction.bias", "e_score_correction_bias")
        return hf[: -len(suffix)] if kind.name in conv.hf_bare else hf  # LFM2-MoE's bare expert_bias
    probe = tmpl.format(bid=bid, xid="{xid}").replace(".{xid}", "") + suffix if xid is not None else hf
    want = TENSOR_NAMES[kind].format(bid=bid) + suffix
    bare = kind.name in conv.hf_bare
    if bare:  # probed as the forward direction reads it: the bare name, respelled by hf_aliases
        probe = probe[: -len(suffix)]
        for old, new in conv.hf_aliases.items():
            if probe.endswith(old):
                probe = probe[: -len(old)] + new
    got = name_map(fam.arch, n_blocks).get_name(probe, try_suffixes=(".weight", ".bias"))
    if got is None and kind.name in conv.hf_names:  # a spelling gguf-py lacks: the recipe's table maps it both ways
        got = want
    if bare and got == want[: -len(suffix)]:  # llama.cpp's suffix-less tensors (ssm_a)
        got = want
    if got != want:
        raise LlmarchError(
            f"internal: HF name {probe} maps to {got}, not {want}, in gguf-py's table for {fam.arch_name}"
        )
    if kind.name in conv.hf_bare:  # HF parameters without a .weight suffix (gpt-oss sinks)
        hf = hf[: -len(suffix)]
    return hf

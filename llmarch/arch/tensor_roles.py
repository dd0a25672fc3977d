"""What a tensor is, from its name, in both Hugging Face and GGUF naming.

The fingerprint reads facts from tensors (which layers hold experts, QK-norm shape, biases,
sinks, post-norms) without caring which format named them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blk|blocks|block)\.(\d+)\.")
VISION_RE = re.compile(
    r"(vision_tower|vision_model|multi_modal_projector|visual\.|audio_tower|embed_vision|embed_audio|^v\.|^mm\.|^a\.)"
)

# role -> pattern over the part of the name after the layer prefix (or the whole name)
ROLES: dict[str, re.Pattern] = {
    name: re.compile(p)
    for name, p in {
        # (llama.cpp's ffn_down_exps.scale is Gemma 4's per-expert router scale, not an expert weight)
        "routed_expert": r"(?<![a-z_])experts\.|_exps\b(?!\.scale)",
        "shared_expert": r"shared_expert(?!_gate)|shared_experts|_shexp\b|shared_mlp",
        "shared_expert_gate": r"shared_expert_gate|ffn_gate_inp_shexp",
        "router": r"(mlp|ffn|feed_forward|block_sparse_moe|moe|mixer)\.(gate|router|router\.gate)\.weight$|ffn_gate_inp\.weight$",
        # the fixed token-id -> expert-ids table of a hash-routed layer
        "hash_router": r"(mlp|ffn|feed_forward)\.gate\.tid2eid$",
        "router_bias": r"e_score_correction_bias|expert_bias|exp_probs_b|(mlp|feed_forward)\.router\.bias$|(^|\.)ffn\.gate\.bias$|ffn_gate_inp\.bias$",
        "q_norm": r"(self_attn|attention|attn)\.(q_norm|q_layernorm)\.weight$|attn_q_norm\.weight$",
        "k_norm": r"(self_attn|attention|attn)\.(k_norm|k_layernorm)\.weight$|attn_k_norm\.weight$",
        "q_proj": r"(self_attn|attention|attn)\.(q_proj|wq)\.weight$|attn_q\.weight$",
        "qkv_bias": r"(q_proj|k_proj|v_proj|qkv_proj|c_attn|query_key_value|attn_q|attn_k|attn_v|attn_qkv)\.bias$",
        "out_bias": r"(o_proj|c_proj|dense|attn_output)\.bias$",
        "sinks": r"(\.sinks|attn_sinks?|attention_sink_bias)(\.weight)?$",
        "attn_gate": r"attn_gate\.weight$|self_attn\.(gate_proj|g_proj)\.weight$",  # gguf-py's ATTN_GATE names
        "indexer": r"indexer|\bidx_|indexer_",
        "mla_kv_a": r"kv_a_proj_with_mqa\.weight$|attn_kv_a_mqa\.weight$",
        "mla_q_a": r"q_a_proj\.weight$|attn_q_a\.weight$",
        # the mixer's pre-norm (LFM3 names it operator_norm: its mixer is attention or a short conv)
        "input_norm": r"input_layernorm\.weight$|(^|\.)attn_norm\.weight$|ln_1\.weight$|(^|\.)attention_norm\.weight$"
        r"|(^|\.)operator_norm\.weight$|(^|\.)attention_layer_norm\.weight$",  # not post_attention_norm
        "post_attn_norm": r"post_attention_layernorm\.weight$|post_attention_norm\.weight$|attn_post_norm\.weight$"
        r"|post_operator_norm\.weight$",
        "pre_ffn_norm": r"pre_(feedforward|mlp)_layernorm\.weight$|(^|\.)ffn_norm\.weight$|ln_2\.weight$"
        r"|(^|\.)feedforward_layer_norm\.weight$",  # OLMo-core's name (Olmo hybrid's linear layers)
        "post_ffn_norm": r"post_(feedforward|mlp)_layernorm\.weight$|post_ffw_norm\.weight$|ffn_post_norm\.weight$"
        r"|(^|\.)post_ffn_norm\.weight$",
        "linear_attn": r"linear_attn\.|ssm_|\.mixer\.(A_log|conv1d|dt_bias|in_proj)|\.(A_log|dt_bias)$|conv1d",
        "ple": r"per_layer",
        "ple_table": r"(embed_tokens_per_layer|per_layer_token_embd)\.weight$",
        # the token embedding table and the LM head, outside the blocks (params readings, fit's parts)
        "input_embedding": r"(^|\.)(embed_tokens|wte|token_embd|tok_embeddings|word_embeddings)\.weight$",
        "output_head": r"(^|\.)lm_head\.weight$|^output\.weight$",
    }.items()
}


def layer_of(name: str) -> int | None:
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def has_role(name: str, role: str) -> bool:
    return ROLES[role].search(name) is not None


def output_head_name(tensors: Mapping[str, Any], vocab: int, hidden: int) -> str | None:
    """The LM head's tensor: lm_head / GGUF output outside the blocks, else a top-level
    `head.weight` shaped [vocab, hidden] (DeepSeek's own naming, which transformers writes back for
    DeepSeek V4) where neither exists. None: the head is the embedding table (tied)."""
    for name in tensors:  # the suffix test first: a checkpoint may hold ~100k names
        if name.endswith(("lm_head.weight", "output.weight")) and has_role(name, "output_head"):
            if layer_of(name) is None and not is_vision(name):
                return name
    t = tensors.get("head.weight")
    return "head.weight" if t is not None and tuple(t.shape) == (vocab, hidden) else None


def is_vision(name: str) -> bool:
    return VISION_RE.search(name) is not None

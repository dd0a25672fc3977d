"""Type checks for the config.json keys llmarch reads, so that a wrong type is reported as
`config.json: num_hidden_layers must be an integer >= 1, got "many"` instead of a crash deep in
the fingerprint. Unknown keys are ignored; null is accepted wherever real configs use it.

Nested configs that hold the language model (text_config, llm_config, language_config) are
checked too, and named in the message (text_config.num_hidden_layers).
"""

from __future__ import annotations

import json
from pathlib import Path

from llmarch.errors import CheckpointError

# the size of the model: present => an integer >= 1 (never null; vocab_size may be null in
# encoder-only configs)
CORE_INTS = {"num_hidden_layers", "hidden_size", "num_attention_heads", "n_layer", "n_embd", "n_head"}
# integers >= 0 (null accepted)
INTS = {
    "vocab_size",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "n_positions",
    "n_inner",
    "shared_expert_intermediate_size",
    "intermediate_size_mlp",
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "num_experts_per_tok",
    "n_shared_experts",
    "num_shared_experts",
    "first_k_dense_replace",
    "moe_layer_freq",
    "decoder_sparse_step",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "sliding_window",
    "sliding_window_pattern",
    "full_attention_interval",
    "attention_chunk_size",
    "num_nextn_predict_layers",
    "hidden_size_per_layer_input",
    "num_kv_shared_layers",
    "n_group",
    "topk_group",
    "rotary_dim",
    "index_topk",
    "index_n_heads",
    "index_head_dim",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_conv_kernel_dim",
    "interleave_moe_layer_step",
    "no_rope_layer_interval",
}
# an integer or a list of integers (Gemma 3n: one FFN width per layer; ERNIE 4.5 VL: per modality)
INTS_OR_LISTS = {"intermediate_size", "moe_intermediate_size"}
NUMBERS = {
    "rope_theta",
    "rope_local_base_freq",
    "rms_norm_eps",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "norm_eps",
    "partial_rotary_factor",
    "routed_scaling_factor",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "query_pre_attn_scalar",
}
BOOLS = {
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "use_qk_norm",
    "norm_topk_prob",
    "use_sliding_window",
}
STRINGS = {"model_type", "hidden_act", "hidden_activation", "activation_function", "scoring_func", "topk_method"}
STRING_LISTS = {"architectures", "layer_types", "layers_block_type"}
ROPE_DICTS = {"rope_scaling", "rope_parameters"}
ROPE_NUMBERS = {
    "factor",
    "rope_theta",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "low_freq_factor",
    "high_freq_factor",
    "attention_factor",
    "partial_rotary_factor",
}
ROPE_INTS = {"original_max_position_embeddings"}
NESTED = ("text_config", "llm_config", "language_config", "thinker_config")


def _show(value) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _is_int(v) -> bool:
    """An integer; 1200.0 too (some configs write integral floats), never a bool."""
    if isinstance(v, float):
        return v.is_integer()
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_config(config: dict, path: Path, prefix: str = "") -> None:
    """Raise CheckpointError naming `path` and the key for the first value of the wrong type."""

    def bad(key: str, want: str):
        raise CheckpointError(f"{prefix}{key} must be {want}, got {_show(config[key])}", path)

    for key, value in config.items():
        if key in CORE_INTS:
            if not _is_int(value) or value < 1:
                bad(key, "an integer >= 1")
        elif value is None:
            continue
        elif key in INTS:
            if not _is_int(value) or value < 0:
                bad(key, "an integer >= 0 or null")
        elif key in INTS_OR_LISTS:
            ok = (_is_int(value) and value >= 0) or (
                isinstance(value, list) and all(_is_int(v) and v >= 0 for v in value)
            )
            if not ok:
                bad(key, "an integer >= 0, a list of them, or null")
        elif key in NUMBERS:
            if not _is_number(value):
                bad(key, "a number or null")
        elif key in BOOLS:
            if not isinstance(value, bool):
                bad(key, "true, false or null")
        elif key in STRINGS:
            if not isinstance(value, str):
                bad(key, "a string or null")
        elif key in STRING_LISTS:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                bad(key, "a list of strings or null")
        elif key in ROPE_DICTS:
            if not isinstance(value, dict):
                bad(key, "an object or null")
            _check_rope(value, path, f"{prefix}{key}")
        elif key in NESTED:
            if not isinstance(value, dict):
                bad(key, "an object or null")
            check_config(value, path, f"{prefix}{key}.")


def _check_rope(rope: dict, path: Path, where: str) -> None:
    # transformers 5 may key rope_parameters by layer type: {"full_attention": {...}, ...}
    if rope and all(isinstance(v, dict) for v in rope.values()):
        for k, v in rope.items():
            _check_rope(v, path, f"{where}.{k}")
        return
    for key, value in rope.items():
        if value is None:
            continue
        if key in ROPE_NUMBERS and not _is_number(value):
            raise CheckpointError(f"{where}.{key} must be a number, got {_show(value)}", path)
        if key in ROPE_INTS and not _is_int(value):
            raise CheckpointError(f"{where}.{key} must be an integer, got {_show(value)}", path)
        if key in ("type", "rope_type") and not isinstance(value, str):
            raise CheckpointError(f"{where}.{key} must be a string, got {_show(value)}", path)

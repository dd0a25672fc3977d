"""The one validation layer for what llmarch reads from files strangers publish.

parse_json: every JSON text (config.json, the index, a safetensors header, JSON inside GGUF
metadata) is strict UTF-8, has no key twice, and a nesting too deep for Python or an integer
too long to convert is one line naming the file, like any other syntax error.

check_config / check_value: each config.json key llmarch reads (and each GGUF key, under the
config key it stands for) has a declared kind: its type, that it is finite, and its range. A
wrong value is reported as `config.json: num_hidden_layers must be an integer >= 1, got "many"`
instead of a crash deep in the fingerprint. Unknown keys are only checked for finiteness and
depth; null is accepted wherever real configs use it. Integral floats (1200.0) of integer keys
are turned into ints in place, so that later arithmetic never sees a float count.

Nested configs that hold the language model (text_config, llm_config, language_config) are
checked too, and named in the message (text_config.num_hidden_layers).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from llmarch.errors import CheckpointError

MAX_COUNT = 1 << 31  # sizes, counts, lengths: no model comes near; a larger one is a broken file
MAX_MAGNITUDE = 1e15  # rope bases, scales, caps, eps: |value| above this is a broken file
MAX_DEPTH = 32  # a config nests a few levels; deeper is a broken (or hostile) file


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json object_pairs_hook: a key given twice is an error, not "the last one wins"."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return d


def parse_json(raw: bytes | str, path: Path, bad: str = "not valid JSON ({})", check_unique: bool = True) -> Any:
    """JSON from an untrusted file; every way it can be bad is a CheckpointError naming `path`:
    `bad` formatted with the reason. Strict UTF-8 (json.loads would guess UTF-16/32 from bytes;
    every format here says UTF-8). check_unique=False leaves the duplicate-key check to the
    caller (safetensors' fast path)."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, object_pairs_hook=unique_keys if check_unique else None)
    except _DuplicateKey as e:
        raise CheckpointError(bad.format(f"key {show(e.key)} appears twice"), path) from None
    except UnicodeDecodeError as e:
        raise CheckpointError(bad.format(f"not UTF-8: {e.reason} at byte {e.start}"), path) from None
    except RecursionError:
        raise CheckpointError(bad.format("nested too deeply"), path) from None
    except ValueError as e:  # JSONDecodeError, and ints past Python's digit limit
        raise CheckpointError(bad.format(str(e)[:120]), path) from None


# the size of the model: present => an integer >= 1 (never null; vocab_size may be null in
# encoder-only configs)
CORE_INTS = {"num_hidden_layers", "hidden_size", "num_attention_heads", "n_layer", "n_embd", "n_head"}
# integers >= 0 (null accepted); aliases the fingerprint reads are here too
INTS = {
    "vocab_size",
    "n_vocab",
    "num_layers",
    "n_layers",
    "d_model",
    "dim",
    "num_heads",
    "n_heads",
    "num_key_value_heads",
    "num_kv_heads",
    "n_kv_heads",
    "multi_query_group_num",
    "head_dim",
    "attention_head_dim",
    "kv_channels",
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
    "model_max_length",
    "n_inner",
    "shared_expert_intermediate_size",
    "intermediate_size_mlp",
    "expert_intermediate_size",
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_num_experts",
    "n_experts",
    "num_experts_per_tok",
    "num_experts_per_token",
    "experts_per_token",
    "top_k_experts",
    "moe_topk",
    "top_k",
    "n_shared_experts",
    "num_shared_experts",
    "shared_experts",
    "first_k_dense_replace",
    "first_k_dense",
    "num_dense_layers",
    "moe_layer_freq",
    "decoder_sparse_step",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "sliding_window",
    "attention_window_size",
    "max_window_layers",
    "sliding_window_pattern",
    "full_attention_interval",
    "attention_chunk_size",
    "num_nextn_predict_layers",
    "mtp_num_hidden_layers",
    "mtp_num_layers",
    "num_mtp_layers",
    "hidden_size_per_layer_input",
    "vocab_size_per_layer_input",
    "num_kv_shared_layers",
    "n_group",
    "topk_group",
    "rotary_dim",
    "rope_dim",
    "index_topk",
    "index_n_heads",
    "index_head_dim",
    "index_topk_freq",
    "index_skip_topk_offset",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_conv_kernel_dim",
    "mamba_num_heads",
    "mamba_head_dim",
    "ssm_state_size",
    "interleave_moe_layer_step",
    "no_rope_layer_interval",
    "global_head_dim",
    "conv_L_cache",
    "laurel_rank",
    "altup_num_inputs",
    "altup_active_idx",
    "hc_mult",
    "hc_sinkhorn_iters",
    "o_groups",
    "o_lora_rank",
    # GGUF keys without a config.json twin (llmarch/checkpoint/gguf_constants.py GENERIC_KEYS)
    "gguf_expert_gating_func",
    "gguf_key_length_mla",
    "gguf_value_length_mla",
    "gguf_rope_dimension_count",
    "gguf_rope_dimension_count_swa",
    "gguf_key_length_swa",
    "gguf_value_length_swa",
    "gguf_rope_scaling_original_context_length",
    "ssm_inner_size",
    "ssm_group_count",
    "ssm_time_step_rank",
}
# an integer or a list of integers (Gemma 3n: one FFN width per layer; ERNIE 4.5 VL: per modality)
INTS_OR_LISTS = {"intermediate_size", "moe_intermediate_size", "ffn_hidden_size"}
# lists of integers (layer indices, per-layer flags and counts)
INT_LISTS = {
    "no_rope_layers",
    "moe_layers",
    "mlp_only_layers",
    "num_key_value_heads_per_layer",
    "compress_ratios",
    "kv_source_layers",
}
NUMBERS = {
    "rope_theta",
    "rope_local_base_freq",
    "rotary_emb_base",
    "rope_base",
    "rms_norm_eps",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "norm_eps",
    "partial_rotary_factor",
    "routed_scaling_factor",
    "route_scale",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "query_pre_attn_scalar",
    "attention_value_scale",
    "floor_scale",
    "attn_scale",
    "swiglu_limit",
    "swiglu_alpha",
    "time_step_min",
    "hc_eps",
    "compress_rope_theta",
    "gguf_attention_scale",
    "gguf_rope_scaling_factor",
    "gguf_rope_yarn_log_multiplier",
}
NUMBER_LISTS = {"activation_sparsity_pattern"}
BOOLS = {
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "bias",
    "qkv_bias",
    "use_qk_norm",
    "norm_topk_prob",
    "moe_renormalize",
    "use_sliding_window",
    "rope_interleave",
    "attn_output_gate",
    "use_attn_gate",
    "gated_attention",
    "altup_correct_scale",
    "attention_k_eq_v",
    "use_double_wide_mlp",
    "enable_moe_block",
    "linear_allow_neg_eigval",
}
# true/false or a number (Llama 4's attn_temperature_tuning is 4 in its released configs)
FLAGS = {"attn_temperature_tuning"}
STRINGS = {
    "model_type",
    "hidden_act",
    "hidden_activation",
    "activation_function",
    "activation",
    "mlp_hidden_act",
    "mamba_hidden_act",
    "scoring_func",
    "topk_method",
    "hybrid_override_pattern",
    "gguf_rope_scaling_type",
}
STRING_LISTS = {"architectures", "layer_types", "layers_block_type", "mlp_layer_types", "indexer_types"}
OBJECTS = {"linear_attn_config", "compress_rates"}
# GGUF: a sliding-window pattern is a period (int) or one flag per layer; the indexer types (DSA)
# one value for every layer or one flag per layer
INT_OR_FLAG_LISTS = {"gguf_sliding_window_pattern", "gguf_indexer_types"}
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
    "llama_4_scaling_beta",
}
ROPE_INTS = {"original_max_position_embeddings"}
NESTED = ("text_config", "llm_config", "language_config", "thinker_config")
# {layer index: {config key: value}}: each inner object is checked as a config
PER_LAYER_OBJECTS = {"per_layer_config"}
# every config key the fingerprint reads has a kind here (tests/test_hostile_headers.py checks it)
DECLARED = (
    CORE_INTS | INTS | INTS_OR_LISTS | INT_LISTS | NUMBERS | NUMBER_LISTS | BOOLS | FLAGS | STRINGS | STRING_LISTS
) | (OBJECTS | INT_OR_FLAG_LISTS | ROPE_DICTS | set(NESTED) | PER_LAYER_OBJECTS)


def show(value) -> str:
    """A value for a one-line message: JSON where possible, never unbounded."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"an integer of {len(str(abs(value))) if abs(value) < 10**4000 else 'thousands of'} digits"
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(type(value).__name__)
    return text if len(text) <= 80 else text[:77] + "..."


def is_int(v) -> bool:
    """An integer; 1200.0 too (some configs write integral floats), never a bool."""
    if isinstance(v, float):
        return v.is_integer()
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite number, never a bool."""
    if isinstance(v, float):
        return math.isfinite(v)
    return isinstance(v, int) and not isinstance(v, bool)


def _count(v, low: int) -> bool:
    return is_int(v) and low <= v <= MAX_COUNT


def _magnitude(v) -> bool:
    return is_number(v) and abs(v) <= MAX_MAGNITUDE


def _kind_error(key: str, value, per_layer: bool) -> str | None:
    """What `value` of config key `key` must be, if it is not that; None when it is fine."""
    if key in CORE_INTS:
        if per_layer and isinstance(value, list) and value and all(_count(v, 0) for v in value):
            return None
        return None if _count(value, 1) else f"an integer from 1 to {MAX_COUNT}"
    if value is None:
        return None
    if key in INTS:
        if per_layer and isinstance(value, list) and all(_count(v, 0) for v in value):
            return None
        return None if _count(value, 0) else f"an integer from 0 to {MAX_COUNT}, or null"
    if key in INTS_OR_LISTS:
        ok = _count(value, 0) or (isinstance(value, list) and value and all(_count(v, 0) for v in value))
        return None if ok else "an integer >= 0, a non-empty list of them, or null"
    if key in INT_LISTS:
        ok = isinstance(value, list) and all(_count(v, 0) for v in value)
        return None if ok else "a list of integers >= 0, or null"
    if key in NUMBERS:
        return None if _magnitude(value) else f"a finite number of magnitude <= {MAX_MAGNITUDE:g}, or null"
    if key in NUMBER_LISTS:
        ok = isinstance(value, list) and all(_magnitude(v) for v in value)
        return None if ok else "a list of finite numbers, or null"
    if key in BOOLS:
        return None if isinstance(value, bool) else "true, false or null"
    if key in FLAGS:
        return None if isinstance(value, bool) or _magnitude(value) else "true, false, a number or null"
    if key in STRINGS:
        return None if isinstance(value, str) else "a string or null"
    if key in STRING_LISTS:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return None if ok else "a list of strings or null"
    if key in OBJECTS or key in ROPE_DICTS or key in NESTED or key in PER_LAYER_OBJECTS:
        return None if isinstance(value, dict) else "an object or null"
    if key in INT_OR_FLAG_LISTS:
        ok = _count(value, 0) or (isinstance(value, list) and all(isinstance(v, bool) or _count(v, 0) for v in value))
        return None if ok else "an integer or a list of per-layer flags"
    return None


def _normalized(key: str, value):
    """Integral floats of integer keys as ints (1200.0 -> 1200)."""
    if key in CORE_INTS or key in INTS or key in INTS_OR_LISTS or key in INT_LISTS:
        if isinstance(value, float):
            return int(value)
        if isinstance(value, list) and any(isinstance(v, float) for v in value):
            return [int(v) if isinstance(v, float) else v for v in value]
    return value


def check_value(key: str, value, path: Path, shown: str, per_layer: bool = False):
    """Check one value of config key `key` (reported as `shown`: the config path or the GGUF key);
    returns it normalized. per_layer: GGUF's per-layer arrays are accepted for integer keys."""
    want = _kind_error(key, value, per_layer)
    if want:
        raise CheckpointError(f"{shown} must be {want}, got {show(value)}", path)
    if key in ROPE_DICTS and isinstance(value, dict):
        _check_rope(value, path, shown)
    return _normalized(key, value)


def check_config(config: dict, path: Path, prefix: str = "") -> None:
    """Raise CheckpointError naming `path` and the key for the first value of the wrong kind."""
    if not prefix:
        _check_tree(config, path, "", 0)
    for key, value in config.items():
        if key in NESTED and isinstance(value, dict):
            check_config(value, path, f"{prefix}{key}.")
        elif key in PER_LAYER_OBJECTS and isinstance(value, dict):
            for i, layer in value.items():
                if not isinstance(layer, dict):
                    raise CheckpointError(f"{prefix}{key}.{i} must be an object, got {show(layer)}", path)
                check_config(layer, path, f"{prefix}{key}.{i}.")
        elif key in DECLARED:
            config[key] = check_value(key, value, path, f"{prefix}{key}")


def _check_tree(value, path: Path, where: str, depth: int) -> None:
    """Every value, known key or not: no NaN or infinity, no nesting deeper than MAX_DEPTH."""
    if isinstance(value, float) and not math.isfinite(value):
        raise CheckpointError(f"{where or 'a value'} must be a finite number, got {show(value)}", path)
    if isinstance(value, (dict, list)):
        if depth >= MAX_DEPTH:
            raise CheckpointError(f"{where} is nested more than {MAX_DEPTH} levels deep", path)
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in items:
            if isinstance(v, (dict, list, float)):
                _check_tree(v, path, f"{where}.{k}" if where else str(k), depth + 1)


def check_json_tree(value, path: Path, where: str = "") -> None:
    """_check_tree for JSON that is not a config (llmarch's own JSON in GGUF metadata)."""
    _check_tree(value, path, where, 0)


def _check_rope(rope: dict, path: Path, where: str) -> None:
    # transformers 5 may key rope_parameters by layer type: {"full_attention": {...}, ...}
    # (a key that names a rope parameter is never a layer type: {"rope_theta": {...}} is a bad theta)
    params = ROPE_NUMBERS | ROPE_INTS | {"type", "rope_type"}
    if rope and all(isinstance(v, dict) for v in rope.values()) and not params & rope.keys():
        for k, v in rope.items():
            _check_rope(v, path, f"{where}.{k}")
        return
    for key, value in rope.items():
        if key.endswith("_attention") and not isinstance(value, dict):  # a layer type's own parameters
            raise CheckpointError(f"{where}.{key} must be an object, got {show(value)}", path)
        if value is None:
            continue
        if key in ROPE_NUMBERS and not _magnitude(value):
            raise CheckpointError(f"{where}.{key} must be a finite number, got {show(value)}", path)
        if key in ROPE_INTS and not _count(value, 0):
            raise CheckpointError(f"{where}.{key} must be an integer from 0 to {MAX_COUNT}, got {show(value)}", path)
        if key in ("type", "rope_type") and not isinstance(value, str):
            raise CheckpointError(f"{where}.{key} must be a string, got {show(value)}", path)

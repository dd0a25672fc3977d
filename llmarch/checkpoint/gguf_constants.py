"""gguf-py's constants (GGUFValueType, GGMLQuantizationType, GGML_QUANT_SIZES, Keys, ...) without
`import gguf`.

`import gguf` runs the package's __init__, which pulls in numpy, the reader, the writer, the
quantizers and the tensor-name tables (~0.2 s); gguf/constants.py itself needs only enum and
typing. So the header-only readers load that one file on its own. When gguf is already imported
(the runtime, the converters, tests) its own module is reused, so the enum classes are the same.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_NAME = "llmarch._gguf_constants"


def _load():
    if "gguf.constants" in sys.modules:
        return sys.modules["gguf.constants"]
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    spec = importlib.util.find_spec("gguf")  # finds the package without importing it
    if spec is None or spec.origin is None:
        raise ImportError("the gguf package (gguf-py) is not installed")
    spec = importlib.util.spec_from_file_location(_NAME, Path(spec.origin).with_name("constants.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    try:
        spec.loader.exec_module(module)
    except Exception:  # a future gguf-py whose constants.py needs its package: the slow, sure way
        del sys.modules[_NAME]
        import gguf.constants

        return gguf.constants
    return module


_c = _load()
GGUFValueType = _c.GGUFValueType
GGMLQuantizationType = _c.GGMLQuantizationType
GGML_QUANT_SIZES = _c.GGML_QUANT_SIZES
Keys = _c.Keys
GGUF_MAGIC = _c.GGUF_MAGIC
GGUF_DEFAULT_ALIGNMENT = _c.GGUF_DEFAULT_ALIGNMENT

__all__ = [
    "GENERIC_KEYS",
    "GGUFValueType",
    "GGMLQuantizationType",
    "GGML_QUANT_SIZES",
    "Keys",
    "GGUF_MAGIC",
    "GGUF_DEFAULT_ALIGNMENT",
]


# gguf key template -> config key (generic: llama.cpp writes these for every architecture)
GENERIC_KEYS = {
    Keys.LLM.BLOCK_COUNT: "num_hidden_layers",
    Keys.LLM.EMBEDDING_LENGTH: "hidden_size",
    Keys.LLM.FEED_FORWARD_LENGTH: "intermediate_size",
    Keys.LLM.CONTEXT_LENGTH: "max_position_embeddings",
    Keys.LLM.VOCAB_SIZE: "vocab_size",
    Keys.LLM.EXPERT_COUNT: "num_experts",
    Keys.LLM.EXPERT_USED_COUNT: "num_experts_per_tok",
    Keys.LLM.EXPERT_SHARED_COUNT: "n_shared_experts",
    Keys.LLM.EXPERT_FEED_FORWARD_LENGTH: "moe_intermediate_size",
    Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH: "shared_expert_intermediate_size",
    Keys.LLM.LEADING_DENSE_BLOCK_COUNT: "first_k_dense_replace",
    Keys.LLM.EXPERT_GROUP_COUNT: "n_group",
    Keys.LLM.EXPERT_GROUP_USED_COUNT: "topk_group",
    Keys.LLM.EXPERT_WEIGHTS_SCALE: "routed_scaling_factor",
    Keys.LLM.EXPERT_WEIGHTS_NORM: "norm_topk_prob",
    Keys.LLM.EXPERT_GATING_FUNC: "gguf_expert_gating_func",
    Keys.LLM.NEXTN_PREDICT_LAYERS: "num_nextn_predict_layers",
    Keys.LLM.INTERLEAVE_MOE_LAYER_STEP: "interleave_moe_layer_step",
    Keys.LLM.FULL_ATTENTION_INTERVAL: "full_attention_interval",
    Keys.LLM.ATTN_LOGIT_SOFTCAPPING: "attn_logit_softcapping",
    Keys.LLM.FINAL_LOGIT_SOFTCAPPING: "final_logit_softcapping",
    Keys.LLM.EMBD_LENGTH_PER_LAYER_INP: "hidden_size_per_layer_input",
    Keys.LLM.ALTUP_NUM_INPUTS: "altup_num_inputs",
    Keys.Attention.HEAD_COUNT: "num_attention_heads",
    Keys.Attention.HEAD_COUNT_KV: "num_key_value_heads",
    Keys.Attention.KEY_LENGTH: "head_dim",
    Keys.Attention.VALUE_LENGTH: "v_head_dim",
    # the sliding layers' widths where they differ from the full layers' (Gemma 4)
    Keys.Attention.KEY_LENGTH_SWA: "gguf_key_length_swa",
    Keys.Attention.VALUE_LENGTH_SWA: "gguf_value_length_swa",
    Keys.Attention.KEY_LENGTH_MLA: "gguf_key_length_mla",
    Keys.Attention.VALUE_LENGTH_MLA: "gguf_value_length_mla",
    Keys.Attention.LAYERNORM_RMS_EPS: "rms_norm_eps",
    Keys.Attention.LAYERNORM_EPS: "layer_norm_epsilon",
    Keys.Attention.Q_LORA_RANK: "q_lora_rank",
    Keys.Attention.KV_LORA_RANK: "kv_lora_rank",
    Keys.Attention.SLIDING_WINDOW: "sliding_window",
    Keys.Attention.SLIDING_WINDOW_PATTERN: "gguf_sliding_window_pattern",
    Keys.Attention.SHARED_KV_LAYERS: "num_kv_shared_layers",
    Keys.Attention.SCALE: "gguf_attention_scale",
    Keys.Attention.Indexer.HEAD_COUNT: "index_n_heads",
    Keys.Attention.Indexer.KEY_LENGTH: "index_head_dim",
    Keys.Attention.Indexer.TOP_K: "index_topk",
    # one flag per layer, true = runs its own indexer (GLM-5's "full"), false = reuses the previous
    # one's selection; llama.cpp reads it, gguf-py 0.19 does not name it yet
    getattr(Keys.Attention.Indexer, "TYPES", "{arch}.attention.indexer.types"): "gguf_indexer_types",
    Keys.Rope.DIMENSION_COUNT: "gguf_rope_dimension_count",
    Keys.Rope.DIMENSION_COUNT_SWA: "gguf_rope_dimension_count_swa",
    Keys.Rope.FREQ_BASE: "rope_theta",
    Keys.Rope.FREQ_BASE_SWA: "rope_local_base_freq",
    Keys.Rope.SCALING_TYPE: "gguf_rope_scaling_type",
    Keys.Rope.SCALING_FACTOR: "gguf_rope_scaling_factor",
    Keys.Rope.SCALING_ORIG_CTX_LEN: "gguf_rope_scaling_original_context_length",
    Keys.Rope.SCALING_YARN_LOG_MUL: "gguf_rope_yarn_log_multiplier",
    Keys.SSM.CONV_KERNEL: "linear_conv_kernel_dim",
    Keys.SSM.STATE_SIZE: "ssm_state_size",
    Keys.SSM.INNER_SIZE: "ssm_inner_size",
    Keys.SSM.GROUP_COUNT: "ssm_group_count",
    Keys.SSM.TIME_STEP_RANK: "ssm_time_step_rank",
    Keys.ShortConv.L_CACHE: "conv_L_cache",  # LFM2's short convolution: kernel size
}

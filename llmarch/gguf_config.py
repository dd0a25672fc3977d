"""GGUF metadata -> a Hugging Face style config dict, so one fingerprint serves both formats.

Key names come from gguf-py's Keys; a family's own extra keys and the facts llama.cpp does not
write at all live in its recipe (recipes/*.toml, `gguf_keys` and `gguf_defaults`).
"""

from __future__ import annotations

from typing import Any

from llmarch.checkpoint.gguf_constants import Keys

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
    Keys.Rope.DIMENSION_COUNT: "gguf_rope_dimension_count",
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
}


def gguf_to_config(arch: str, meta: dict[str, Any], recipe: dict) -> tuple[dict, dict[str, str]]:
    """Return (config, evidence) where evidence maps each config key to the GGUF key it came from."""
    config: dict[str, Any] = {}
    evidence: dict[str, str] = {}
    mapping = {k.format(arch=arch): v for k, v in GENERIC_KEYS.items()}
    mapping.update({k.format(arch=arch): v for k, v in recipe.get("gguf_keys", {}).items()})
    for gkey, ckey in mapping.items():
        if gkey in meta:
            config[ckey] = meta[gkey]
            evidence[ckey] = gkey
    for ckey, value in recipe.get("gguf_defaults", {}).items():
        if ckey not in config:
            config[ckey] = value
            evidence[ckey] = f"recipe {recipe.get('family')} (llama.cpp does not write it)"
    # what llama.cpp hard-codes for the arch wins over the file (it is what runs there)
    conv = recipe.get("convert", {})
    hard = dict(conv.get("hard_coded", {}).get(arch, {}))
    off = conv.get("qk_norm_off_at_experts")  # Llama 4: QK-norm unless 128 experts (llama.cpp's rule)
    if off and "num_experts" in config:
        hard[off["key"]] = config["num_experts"] != off["experts"]
    for ckey, value in hard.items():
        config[ckey] = value
        evidence[ckey] = f"recipe {recipe.get('family')} (llama.cpp hard-codes it for {arch})"

    # per-layer arrays (e.g. head_count_kv per layer in some archs): keep the list, use the common value
    for key in ("num_key_value_heads", "num_attention_heads", "intermediate_size"):
        v = config.get(key)
        if isinstance(v, list):
            config[f"{key}_per_layer"] = v
            nonzero = [x for x in v if x]
            config[key] = max(nonzero) if nonzero else 0
    # llama.cpp's absorbed-MLA files store the latent widths in key/value_length, the per-head
    # widths in the *_mla keys (and head_count_kv = 1)
    kmla, vmla = config.pop("gguf_key_length_mla", None), config.pop("gguf_value_length_mla", None)
    if kmla:
        config["head_dim"], config["v_head_dim"] = kmla, vmla
    if config.get("head_dim") is None and config.get("hidden_size") and config.get("num_attention_heads"):
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]

    # RoPE scaling in the shape transformers uses
    stype = config.pop("gguf_rope_scaling_type", None)
    factor = config.pop("gguf_rope_scaling_factor", None)
    orig = config.pop("gguf_rope_scaling_original_context_length", None)
    if stype and stype != "none":
        config["rope_scaling"] = {"rope_type": stype, "factor": factor, "original_max_position_embeddings": orig}
    # Llama 3 scaling: llama.cpp keeps only a rope_freqs tensor; llmarch's converter also writes
    # the parameters as JSON under llmarch.rope_scaling (llmarch/convert/gguf_meta.py)
    if "rope_scaling" not in config and isinstance(meta.get("llmarch.rope_scaling"), str):
        import json

        try:
            config["rope_scaling"] = json.loads(meta["llmarch.rope_scaling"])
            evidence["rope_scaling"] = "llmarch.rope_scaling"
        except ValueError:
            pass
    # rotary dims -> partial fraction
    rdim = config.pop("gguf_rope_dimension_count", None)
    if rdim and config.get("head_dim"):
        rope_head = config.get("qk_rope_head_dim") or config["head_dim"]
        if config.get("kv_lora_rank"):  # MLA: the rope dims are their own head part
            config["qk_rope_head_dim"] = rdim
        elif rdim != rope_head:
            config["partial_rotary_factor"] = rdim / rope_head
    gating = config.pop("gguf_expert_gating_func", None)
    if gating is not None:
        config["scoring_func"] = {1: "softmax", 2: "sigmoid"}.get(gating, str(gating))
    pattern = config.pop("gguf_sliding_window_pattern", None)
    if isinstance(pattern, list):  # per-layer booleans: True = sliding
        config["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    elif isinstance(pattern, int) and pattern > 0:
        config["sliding_window_pattern"] = pattern
    return config, evidence

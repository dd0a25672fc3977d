"""GGUF metadata -> a Hugging Face style config dict, so one fingerprint serves both formats.

Key names come from gguf-py's Keys; the facts llama.cpp does not write at all live in the
family's recipe (recipes/*.toml: [gguf_defaults], and [convert] hard_coded for what it hard-codes).
"""

from __future__ import annotations

import copy
import math
from typing import Any

from llmarch.arch.recipe_schema import Recipe
from llmarch.checkpoint.gguf_constants import GENERIC_KEYS


def _yarn_extras(arch: str, meta: dict[str, Any], log_mul: Any) -> dict[str, float]:
    """YaRN's betas, and DeepSeek's mscale: llama.cpp stores 0.1 * mscale_all_dim as the log
    multiplier and takes mscale equal to it (its deepseek2 graph cancels the rotation's own
    magnitude). Only finite positive numbers count."""
    import math

    def positive(v: Any) -> float | None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        return float(v) if ok else None

    out = {}
    for key in ("beta_fast", "beta_slow"):
        v = positive(meta.get(f"{arch}.rope.scaling.yarn_{key}"))
        if v is not None:
            out[key] = v
    mul = positive(log_mul)
    if mul is not None:  # 0.1 stored as float32 gives 1.0, not 1.0000000149
        out["mscale_all_dim"] = out["mscale"] = _float32_shortest(mul / 0.1)
    return out


def _float32_shortest(x: float) -> float:
    """x rounded to float32, written with the fewest digits that read back to that float32
    (what numpy's str(np.float32(x)) gives; numpy is not imported on the header-only path)."""
    import struct

    def f32(v: float) -> float:
        return struct.unpack("<f", struct.pack("<f", v))[0]

    target = f32(x)
    return next((float(f"{target:.{p}g}") for p in range(1, 10) if f32(float(f"{target:.{p}g}")) == target), target)


def _gated_deltanet_widths(config: dict[str, Any], evidence: dict[str, str]) -> None:
    """llama.cpp writes a Gated DeltaNet's widths in the SSM keys (its qwen3next / qwen35
    converters): group count = key heads, time-step rank = value heads, state size = the key
    head width, inner size = value heads x value head width. Read back as the config keys
    transformers uses, so a GGUF's recurrent state is sized as its source's is; the reader has
    already checked each as an integer."""
    kh, vh = config.get("ssm_group_count"), config.get("ssm_time_step_rank")
    kd, inner = config.get("ssm_state_size"), config.get("ssm_inner_size")
    if not (kh and vh and kd and inner) or inner % vh:
        return  # incomplete or inconsistent widths: the state stays unknown rather than guessed
    for ckey, value, gkey in (
        ("linear_num_key_heads", kh, "ssm_group_count"),
        ("linear_num_value_heads", vh, "ssm_time_step_rank"),
        ("linear_key_head_dim", kd, "ssm_state_size"),
        ("linear_value_head_dim", inner // vh, "ssm_inner_size / ssm_time_step_rank"),
    ):
        if ckey not in config:
            config[ckey] = value
            evidence[ckey] = evidence.get(gkey, gkey)


def _mamba2_widths(config: dict[str, Any], evidence: dict[str, str]) -> None:
    """Mamba-2's widths from llama.cpp's SSM keys (GraniteHybridModel / NemotronHModel): time-step
    rank = heads, inner size / heads = head width, group count = groups, as transformers names them."""
    heads, inner = config.get("ssm_time_step_rank"), config.get("ssm_inner_size")
    if not (heads and inner) or inner % heads:
        return
    for ckey, value, gkey in (
        ("mamba_num_heads", heads, "ssm_time_step_rank"),
        ("mamba_head_dim", inner // heads, "ssm_inner_size / ssm_time_step_rank"),
        ("n_groups", config.get("ssm_group_count"), "ssm_group_count"),
        ("conv_kernel", config.get("linear_conv_kernel_dim"), "ssm_conv_kernel"),
    ):
        if value and ckey not in config:
            config[ckey], evidence[ckey] = value, evidence.get(gkey, gkey)


def _layer_kinds(config: dict[str, Any], evidence: dict[str, str], kda_head_dim, linear_type: str) -> None:
    """Layer kinds from the per-layer arrays llama.cpp tells them apart by (recipe layer_kind_arrays;
    its nemotron_h and kimi-linear loaders): no KV heads = no attention, and a layer with neither KV
    heads nor an FFN is recurrent. Where such a layer exists, every layer is one sub-block
    (Nemotron-H: recurrent, attention, or an FFN only, an MoE when the file has experts); else each
    layer has its FFN and a recurrent mixer where it has no KV heads (Kimi Linear, whose KDA heads
    are the attention heads, kda.head_dim wide)."""
    n, kv = config.get("num_hidden_layers"), config.get("num_key_value_heads_per_layer")
    if not isinstance(n, int) or not isinstance(kv, list) or len(kv) != n:
        return
    ff = config.get("intermediate_size_per_layer")
    ff = ff if isinstance(ff, list) and len(ff) == n else [1] * n
    src = evidence.get("num_key_value_heads", "head_count_kv")
    if any(not k and not f for k, f in zip(kv, ff)):
        ffn = "moe" if config.get("num_experts") else "mlp"
        config["layers_block_type"] = [
            "full_attention" if k else ffn if f else "linear_attention" for k, f in zip(kv, ff)
        ]  # transformers' names (NemotronHConfig)
        evidence["layers_block_type"] = f"{src} and feed_forward_length per layer"
        return
    config["layer_types"] = ["full_attention" if k else linear_type for k in kv]
    evidence["layer_types"] = f"{src} per layer"
    if kda_head_dim and config.get("num_attention_heads"):
        config["linear_attn_config"] = {
            "num_heads": config["num_attention_heads"],
            "head_dim": kda_head_dim,
            "short_conv_kernel_size": config.get("linear_conv_kernel_dim", 4),
        }
        evidence["linear_attn_config"] = "head_count, kda.head_dim, ssm.conv_kernel"


def _sliding_widths(config: dict[str, Any], evidence: dict[str, str]) -> None:
    """llama.cpp's key_length is the full-attention layers' head width and key_length_swa the
    sliding layers' (Gemma 4); transformers calls them global_head_dim and head_dim, and the
    schedule reads them so."""
    kswa, vswa = config.pop("gguf_key_length_swa", None), config.pop("gguf_value_length_swa", None)
    full = config.get("head_dim")
    if not kswa or not full:
        return
    # also when equal: transformers' Gemma 4 config takes 512 where global_head_dim is left out
    config["global_head_dim"], evidence["global_head_dim"] = full, evidence.get("head_dim", "key_length")
    config["head_dim"], evidence["head_dim"] = kswa, "attention.key_length_swa"
    if vswa:
        config["v_head_dim"] = vswa


NEVER_TURNS = 1e20  # a divisor this large leaves a pair unrotated at any position a context holds


def _proportional_rope(
    config: dict[str, Any], evidence: dict[str, str], recipe: Recipe, factors: list[float] | None, rdim_swa: Any
) -> None:
    """llama.cpp's rope_freqs divisors in the form its Gemma 4 converter writes proportional RoPE:
    1 for the first partial_rotary_factor of the full head's pairs, 1e30 (a pair that never turns)
    for the rest. Read back as transformers' proportional RoPE on the layers the recipe says the
    scaling applies to (llama.cpp's gemma4 graph passes rope_freqs to its full-attention layers
    only), with the sliding layers' own base and rotary share, keyed by layer type as transformers'
    config is. Other divisors (Llama 3's) stay unread here."""
    full = config.get("global_head_dim") or config.get("head_dim")
    if not factors or not full or len(factors) != full // 2:
        return
    rotated = next((i for i, v in enumerate(factors) if v != 1.0), len(factors))
    if rotated == len(factors) or any(v < NEVER_TURNS for v in factors[rotated:]):
        return
    partial = rotated / len(factors)
    if int(partial * full // 2) != rotated:  # transformers' own rounding gives back the same count
        partial = math.nextafter(partial, 1.0)
    params: dict[str, Any] = {"rope_type": "proportional", "partial_rotary_factor": partial}
    if config.get("rope_theta"):
        params["rope_theta"] = config["rope_theta"]
    if recipe.rope_scaling_on != "global":
        config["rope_scaling"], evidence["rope_scaling"] = params, "rope_freqs.weight"
        return
    local: dict[str, Any] = {"rope_type": "default"}
    theta = config.get("rope_local_base_freq") or config.get("rope_theta")
    if theta:
        local["rope_theta"] = theta
    head = config.get("head_dim")
    if isinstance(rdim_swa, int) and head and 0 < rdim_swa < head:
        local["partial_rotary_factor"] = rdim_swa / head
    config["rope_parameters"] = {"full_attention": params, "sliding_attention": local}
    evidence["rope_parameters"] = "rope_freqs.weight, rope.freq_base(_swa), rope.dimension_count_swa"


def _llama3_rope(config: dict[str, Any], evidence: dict[str, str], factors: list[float] | None) -> None:
    """A rope_freqs tensor that nothing else has explained (llama.cpp writes Llama 3 scaling as
    its divisors alone): the Llama 3 parameters that give those divisors, or, where none do, a
    scaling kind that says so, which run refuses rather than rotating without it."""
    if not factors or "rope_scaling" in config or "rope_parameters" in config or all(v == 1.0 for v in factors):
        return
    from llmarch.arch.rope_factors import UNKNOWN_DIVISORS, llama3_from_divisors

    fitted = llama3_from_divisors(factors, float(config.get("rope_theta") or 10000.0))
    config["rope_scaling"] = fitted or {"rope_type": UNKNOWN_DIVISORS}
    evidence["rope_scaling"] = "rope_freqs.weight"


def gguf_to_config(
    arch: str, meta: dict[str, Any], recipe: Recipe, rope_freqs: list[float] | None = None
) -> tuple[dict, dict[str, str]]:
    """Return (config, evidence) where evidence maps each config key to the GGUF key it came from.
    rope_freqs: the file's rope_freqs tensor (llmarch.checkpoint.gguf.read_rope_freqs), which holds
    what llama.cpp keeps of some RoPE kinds."""
    config: dict[str, Any] = {}
    evidence: dict[str, str] = {}
    mapping = {k.format(arch=arch): v for k, v in GENERIC_KEYS.items()}
    for gkey, ckey in mapping.items():
        if gkey in meta:
            config[ckey] = meta[gkey]
            evidence[ckey] = gkey
    for ckey, value in recipe.gguf_defaults.items():
        if ckey not in config:
            config[ckey] = value
            evidence[ckey] = f"recipe {recipe.family} (llama.cpp does not write it)"
    # what llama.cpp hard-codes for the arch wins over the file (it is what runs there)
    hard = dict(recipe.convert.hard_coded.get(arch, {}))
    off = recipe.convert.qk_norm_off_at_experts  # Llama 4: QK-norm unless 128 experts (llama.cpp's rule)
    if off and "num_experts" in config:
        hard[off.key] = config["num_experts"] != off.experts
    for ckey, value in hard.items():
        config[ckey] = copy.deepcopy(value)  # the recipe's lists stay the recipe's
        evidence[ckey] = f"recipe {recipe.family} (llama.cpp hard-codes it for {arch})"

    if recipe.linear_kind == "gated_deltanet":
        _gated_deltanet_widths(config, evidence)
    if recipe.linear_kind == "mamba2":
        _mamba2_widths(config, evidence)

    # per-layer facts llama.cpp hard-codes by layer index (Gemma 3n: KV owners, sparse FFN gates)
    conv, n_layers = recipe.convert, config.get("num_hidden_layers")
    if isinstance(n_layers, int) and conv.kv_owner_layers is not None:
        config["num_kv_shared_layers"] = max(0, n_layers - conv.kv_owner_layers)
        evidence["num_kv_shared_layers"] = f"recipe {recipe.family} (llama.cpp hard-codes it for {arch})"
    if isinstance(n_layers, int) and conv.sparse_ffn_layers is not None:
        # only the sparse layers listed (the layers after it have none): its length is the recipe's, not the file's
        config["activation_sparsity_pattern"] = [conv.sparse_ffn_fraction] * min(n_layers, conv.sparse_ffn_layers)
        evidence["activation_sparsity_pattern"] = f"recipe {recipe.family} (llama.cpp hard-codes it for {arch})"
    # per-layer arrays (e.g. head_count_kv per layer in some archs): keep the list, use the common value
    for key in ("num_key_value_heads", "num_attention_heads", "intermediate_size"):
        v = config.get(key)
        if isinstance(v, list):
            config[f"{key}_per_layer"] = v
            nonzero = [x for x in v if x]
            config[key] = max(nonzero) if nonzero else 0
    if recipe.convert.layer_kind_arrays:
        _layer_kinds(config, evidence, meta.get(f"{arch}.kda.head_dim"), recipe.convert.linear_layer_type)
    # llama.cpp's absorbed-MLA files store the latent widths in key/value_length, the per-head
    # widths in the *_mla keys (and head_count_kv = 1)
    kmla, vmla = config.pop("gguf_key_length_mla", None), config.pop("gguf_value_length_mla", None)
    if kmla:
        config["head_dim"], config["v_head_dim"] = kmla, vmla
    if config.get("head_dim") is None and config.get("hidden_size") and config.get("num_attention_heads"):
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    _sliding_widths(config, evidence)

    # RoPE scaling in the shape transformers uses
    stype = config.pop("gguf_rope_scaling_type", None)
    factor = config.pop("gguf_rope_scaling_factor", None)
    orig = config.pop("gguf_rope_scaling_original_context_length", None)
    if stype and stype != "none":
        config["rope_scaling"] = {"rope_type": stype, "factor": factor, "original_max_position_embeddings": orig}
    log_mul = config.pop("gguf_rope_yarn_log_multiplier", None)
    if stype == "yarn":
        config["rope_scaling"].update(_yarn_extras(arch, meta, log_mul))
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
    rdim_swa = config.pop("gguf_rope_dimension_count_swa", None)
    if rdim and config.get("head_dim"):
        rope_head = config.get("qk_rope_head_dim") or config.get("global_head_dim") or config["head_dim"]
        if config.get("kv_lora_rank"):  # MLA: the rope dims are their own head part
            config["qk_rope_head_dim"] = rdim
        elif rdim != rope_head:
            config["partial_rotary_factor"] = rdim / rope_head
    _proportional_rope(config, evidence, recipe, rope_freqs, rdim_swa)
    _llama3_rope(config, evidence, rope_freqs)
    gating = config.pop("gguf_expert_gating_func", None)
    if gating is not None:
        config["scoring_func"] = {1: "softmax", 2: "sigmoid"}.get(gating, str(gating))
    kinds = config.pop("gguf_indexer_types", None)  # DSA: per-layer flags, true = a full indexer
    if isinstance(kinds, list):
        config["indexer_types"] = ["full" if k else "shared" for k in kinds]
    elif kinds is not None and not kinds:  # one value for every layer: all shared, which no model can be
        config["indexer_types"] = ["shared"]  # (the fingerprint refuses it, naming the layer count)
    pattern = config.pop("gguf_sliding_window_pattern", None)
    if isinstance(pattern, list):  # per-layer booleans: True = sliding
        config["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    elif isinstance(pattern, int) and pattern > 0:
        config["sliding_window_pattern"] = pattern
    return config, evidence

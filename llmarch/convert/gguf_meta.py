"""ArchSpec -> GGUF metadata (the keys llama.cpp reads), by reversing llmarch.arch.gguf_config's table.

gguf_config.GENERIC_KEYS maps each gguf-py key template to an HF-style config key; here the spec
is flattened into those HF-style keys and each one is written under its template. Only what
llama.cpp hard-codes for a family (e.g. Gemma 3's 5:1 sliding pattern) is checked, not written.
"""

from __future__ import annotations

import json

import gguf
from gguf import GGUFValueType as V
from gguf import Keys

from llmarch.arch.recipe_schema import Recipe
from llmarch.arch.spec import ArchSpec
from llmarch.checkpoint.gguf_constants import GENERIC_KEYS
from llmarch.errors import LlmarchError

# GGUF stores these as float32 even when config.json writes an integer (rope_theta: 10000)
# exact HF rope scaling for scalings llama.cpp turns into tensors (read back by from_gguf)
LLMARCH_ROPE_KEY = "llmarch.rope_scaling"
FLOAT_KEYS = {
    "gguf_rope_yarn_log_multiplier",
    "rope_theta",
    "rope_local_base_freq",
    "rms_norm_eps",
    "layer_norm_epsilon",
    "routed_scaling_factor",
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "gguf_rope_scaling_factor",
}
NO_KV_MIXERS = {"linear", "mamba", "none"}  # layer mixers that keep no KV cache
ROPE_TYPES = {"linear": "linear", "yarn": "yarn"}  # HF rope_type -> gguf RopeScalingType value


def spec_to_hf_keys(spec: ArchSpec) -> dict:
    """The spec as the HF-style keys gguf_config uses (the inverse of gguf_to_config)."""
    a, moe = spec.attention, spec.moe
    hp = {
        "num_hidden_layers": spec.layers,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.context_length,
        "vocab_size": spec.vocab_size,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": a.head_dim,
        "v_head_dim": a.v_head_dim or a.head_dim,
        "final_logit_softcapping": spec.final_softcap,
        "attn_logit_softcapping": a.softcap,
    }
    hp["rms_norm_eps" if spec.norm.kind == "rms" else "layer_norm_epsilon"] = spec.norm.eps
    if spec.per_layer_embeddings:  # as llama.cpp's converter writes them (its gemma3n loader reads neither)
        hp["hidden_size_per_layer_input"] = spec.per_layer_embeddings.get("dim")
        hp["num_kv_shared_layers"] = sum(l.kv_shared_from is not None for l in spec.schedule)
    if spec.altup:
        hp["altup_num_inputs"] = spec.altup.streams
    if not spec.rope.learned_positions and spec.rope.theta:
        hp["rope_theta"] = spec.rope.theta
        hp["rope_local_base_freq"] = spec.rope.local_theta
        hp["gguf_rope_dimension_count"] = int(round(a.head_dim * spec.rope.partial))
        yarn = {Keys.Rope.SCALING_YARN_BETA_FAST: "beta_fast", Keys.Rope.SCALING_YARN_BETA_SLOW: "beta_slow"}
        sc = spec.rope.scaling or {}
        stype = ROPE_TYPES.get((sc.get("type") or "").lower())
        if stype:
            hp["gguf_rope_scaling_type"] = stype
            hp["gguf_rope_scaling_factor"] = sc.get("factor")
            hp["gguf_rope_scaling_original_context_length"] = sc.get("original_max_position_embeddings")
            if stype == "yarn":
                hp.update({tmpl: sc[k] for tmpl, k in yarn.items() if sc.get(k) is not None})
    if a.mla:  # llama.cpp's absorbed MLA: one latent "KV head" (DeepseekV2Model.set_gguf_parameters)
        hp.update(
            num_key_value_heads=1,
            head_dim=a.kv_lora_rank + a.qk_rope_head_dim,
            v_head_dim=a.kv_lora_rank,
            gguf_key_length_mla=(a.qk_nope_head_dim or 0) + a.qk_rope_head_dim,
            gguf_value_length_mla=a.v_head_dim,
            q_lora_rank=a.q_lora_rank,
            kv_lora_rank=a.kv_lora_rank,
            gguf_rope_dimension_count=a.qk_rope_head_dim,
        )
        mscale_all = (spec.rope.scaling or {}).get("mscale_all_dim")
        if mscale_all:
            hp["gguf_rope_yarn_log_multiplier"] = 0.1 * mscale_all
    if a.indexer:  # DeepSeek Sparse Attention (DeepseekV32Model / GlmMoeDsaModel.set_gguf_parameters)
        hp.update(index_n_heads=a.index_heads, index_head_dim=a.index_head_dim, index_topk=a.index_topk)
        # which layers run their own indexer (GLM-5's others reuse the previous selection), always
        # written: without it llama.cpp's glm-dsa assumes GLM-5.2's pattern at a context of 1M or more
        hp["gguf_indexer_types"] = [l.index_from is None for l in spec.schedule]
    full_heads = {l.head_dim for l in spec.schedule if l.mixer != "sliding" and l.head_dim}
    if full_heads:  # wider heads on the full layers (Gemma 4): key_length is theirs, *_swa the sliding ones'
        full = max(full_heads)
        hp.update(head_dim=full, v_head_dim=full, gguf_rope_dimension_count=full)
        hp[Keys.Attention.KEY_LENGTH_SWA] = hp[Keys.Attention.VALUE_LENGTH_SWA] = a.head_dim
        hp[Keys.Rope.DIMENSION_COUNT_SWA] = int(round(a.head_dim * spec.rope.partial))
    windows = {l.window for l in spec.schedule if l.mixer == "sliding" and l.window}
    if windows:
        hp["sliding_window"] = max(windows)
    if moe and any(l.ffn == "moe" for l in spec.schedule):  # not a config's defaults with no expert layer
        hp.update(
            num_experts=moe.experts,
            num_experts_per_tok=moe.experts_per_token,
            moe_intermediate_size=moe.expert_ffn,
            n_shared_experts=moe.shared_experts or None,
            shared_expert_intermediate_size=moe.shared_ffn,
            routed_scaling_factor=moe.routed_scaling_factor,
            norm_topk_prob=moe.norm_topk_prob,
            n_group=moe.n_group,
            topk_group=moe.topk_group,
            # only sigmoid is written: llama.cpp's softmax families hard-code their own variant
            gguf_expert_gating_func=2 if moe.router == "sigmoid" else None,
        )  # ExpertGatingFuncType.SIGMOID
        dense = moe.dense_layers
        if dense and dense == list(range(len(dense))):
            hp["first_k_dense_replace"] = len(dense)
    return {k: v for k, v in hp.items() if v is not None}


def _linear_keys(spec: ArchSpec, arch: str, path) -> dict:
    """Linear-attention sizes under llama.cpp's keys. Gated DeltaNet and Mamba-2 use the ssm.* keys
    (Qwen3NextModel / GraniteHybridModel.set_gguf_parameters: group count = key heads, time-step
    rank = value heads, state size = the key heads' width); Gated DeltaNet's layer pattern goes as
    full_attention_interval: llama.cpp makes layer i linear unless (i + 1) % interval == 0, and
    takes the value heads' width from state_size. KDA: conv kernel and kda.head_dim
    (KimiLinearModel.set_gguf_parameters)."""
    lin = spec.linear
    if lin is None:
        return {}
    if lin.kind == "short_conv":  # LFM2Model / LFM2MoeModel.set_gguf_parameters
        return {Keys.ShortConv.L_CACHE: lin.conv_kernel}
    if lin.kind == "kda":
        if lin.value_heads != spec.attention.heads:  # kimi-linear.cpp sizes KDA by head_count
            raise LlmarchError(
                f"llama.cpp's {arch} gives KDA the attention's head count; this model has {lin.value_heads} "
                f"KDA heads and {spec.attention.heads} attention heads, so GGUF cannot express it",
                path,
            )
        return {"linear_conv_kernel_dim": lin.conv_kernel, Keys.KDA.HEAD_DIM: lin.key_head_dim}
    sizes = {
        "linear_conv_kernel_dim": lin.conv_kernel,
        "ssm_state_size": lin.key_head_dim,
        "ssm_group_count": lin.key_heads,
        "ssm_time_step_rank": lin.value_heads,
        "ssm_inner_size": lin.value_heads * lin.value_head_dim,
    }
    if lin.kind != "gated_deltanet":
        return sizes
    if lin.key_head_dim != lin.value_head_dim:
        raise LlmarchError(
            f"llama.cpp's {arch} gives value heads the key heads' width; this model has "
            f"{lin.value_head_dim} vs {lin.key_head_dim}, so GGUF cannot express it",
            path,
        )
    linear = [l.mixer == "linear" for l in spec.schedule]
    step = next(
        (s for s in range(1, len(linear) + 1) if linear == [(i + 1) % s != 0 for i in range(len(linear))]), None
    )
    if step is None:
        raise LlmarchError(
            f"llama.cpp's {arch} puts full attention on every n-th layer; this model's layer_types "
            f"follow no such step, so GGUF cannot express it",
            path,
        )
    return {**sizes, "full_attention_interval": step}


def _rope_sections(spec: ArchSpec, recipe: Recipe) -> list[int]:
    """M-RoPE sections, four of them, in rotary pairs, where the family's llama.cpp arch requires
    them: the config's mrope_section when it covers the rotary pairs, else the interleaved split
    that gives every pair a text position (llama.cpp's imrope sends pair i to section i % 3 while
    i < 3 * that section's size, else to the fourth, whose position is 0 for text: a pair left
    unrotated). 32 pairs give Qwen3.5's [11, 11, 10], what llama.cpp's converter writes."""
    if not recipe.convert.rope_sections:
        return []
    pairs = int(round(spec.attention.head_dim * spec.rope.partial)) // 2
    rope = spec.config.get("rope_parameters") or spec.config.get("rope_scaling") or {}
    given = rope.get("mrope_section") if isinstance(rope, dict) else None
    ok = isinstance(given, list) and 0 < len(given) <= 4 and all(type(n) is int and n >= 0 for n in given)
    sections = list(given) if ok and sum(given) == pairs else [len(range(j, pairs, 3)) for j in range(3)]
    return sections + [0] * (4 - len(sections))


def _vtype(key: str, value) -> V:
    if isinstance(value, bool):
        return V.BOOL
    if key in FLOAT_KEYS or isinstance(value, float):
        return V.FLOAT32
    if isinstance(value, int):
        return V.UINT32
    return V.STRING


def model_kv(spec: ArchSpec, arch: str, recipe: Recipe, file_type: int, name: str, path=None) -> list[tuple]:
    _check_hard_coded(spec, recipe, arch, path)
    hp = spec_to_hf_keys(spec)
    hp.update(_linear_keys(spec, arch, path))
    if spec.norm.kind == "rms" and "layer_norm_epsilon" in spec.config:  # TextModel writes both, nemotron_h reads it
        hp.setdefault("layer_norm_epsilon", spec.norm.eps)
    sections = _rope_sections(spec, recipe)
    reverse = {ckey: tmpl for tmpl, ckey in GENERIC_KEYS.items()}
    out = [
        (Keys.General.NAME, name, V.STRING),
        (Keys.General.FILE_TYPE, int(file_type), V.UINT32),
        (Keys.General.QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION, V.UINT32),
    ]
    sc = spec.rope.scaling or {}
    if (sc.get("type") or "").lower() == "llama3":  # llama.cpp keeps only the rope_freqs tensor
        keep = {k: v for k, v in sc.items() if k not in ("type", "rope_theta") and v is not None}
        out.append((LLMARCH_ROPE_KEY, json.dumps({"rope_type": "llama3", **keep}, sort_keys=True), V.STRING))
    if recipe.convert.interleave_moe and spec.moe:  # Llama 4: MoE on layers (i + 1) % step == 0
        moe_layers = [i for i in range(spec.layers) if i not in set(spec.moe.dense_layers or [])]
        step = next(
            (s for s in range(1, spec.layers + 1) if moe_layers == [i for i in range(spec.layers) if (i + 1) % s == 0]),
            None,
        )
        if step is None:
            raise LlmarchError(
                f"llama.cpp's {arch} puts MoE on every n-th layer; this model's MoE layers "
                f"{moe_layers} follow no such step, so GGUF cannot express it",
                path,
            )
        out.append((Keys.LLM.INTERLEAVE_MOE_LAYER_STEP.format(arch=arch), step, V.UINT32))
    if recipe.convert.swa_pattern_array and "sliding_window" in hp:  # Olmo 3: True = sliding
        out.append(
            (
                Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch),
                [l.mixer == "sliding" for l in spec.schedule],
                V.ARRAY,
            )
        )
    out += _layer_kind_arrays(spec, arch, recipe, hp)
    out += _per_layer_arrays(spec, arch, hp)
    if sections:
        out.append((Keys.Rope.DIMENSION_SECTIONS.format(arch=arch), sections, V.ARRAY))
    for ckey, value in hp.items():
        tmpl = reverse.get(ckey) or (ckey if ckey.startswith("{arch}.") else None)
        if tmpl is None:
            continue
        if ckey == "norm_topk_prob":
            out.append((tmpl.format(arch=arch), bool(value), V.BOOL))
        elif ckey == "gguf_rope_scaling_type":
            out.append((tmpl.format(arch=arch), value, V.STRING))
        elif isinstance(value, list):  # per-layer flags
            out.append((tmpl.format(arch=arch), value, V.ARRAY))
        else:
            vt = _vtype(ckey, value)
            out.append((tmpl.format(arch=arch), float(value) if vt == V.FLOAT32 else value, vt))
    return out


def _layer_kind_arrays(spec: ArchSpec, arch: str, recipe: Recipe, hp: dict) -> list[tuple]:
    """Where llama.cpp tells a layer's kind by per-layer arrays (KimiLinearModel, NemotronHModel):
    head_count_kv 0 for a layer without attention (recurrent, or FFN only); where some layer has no
    FFN (Nemotron-H's one sub-block per layer), feed_forward_length too: 0 for a layer without an
    FFN, the expert width for an MoE. The scalar keys they replace are dropped from `hp`."""
    if not recipe.convert.layer_kind_arrays:
        return []
    kv = hp.pop("num_key_value_heads", None) or spec.attention.heads
    heads = [0 if l.mixer in NO_KV_MIXERS else l.kv_heads or kv for l in spec.schedule]
    out = [(Keys.Attention.HEAD_COUNT_KV.format(arch=arch), heads, V.ARRAY)]
    if any(l.ffn == "none" for l in spec.schedule):
        ffn = hp.pop("intermediate_size", None) or 0
        expert = spec.moe.expert_ffn if spec.moe else 0
        widths = [{"none": 0, "moe": expert}.get(l.ffn, l.ffn_width or ffn) for l in spec.schedule]
        out.append((Keys.LLM.FEED_FORWARD_LENGTH.format(arch=arch), [int(w or 0) for w in widths], V.ARRAY))
    return out


def _per_layer_arrays(spec: ArchSpec, arch: str, hp: dict) -> list[tuple]:
    """FFN widths and KV head counts that differ by layer go as one value per layer, as llama.cpp
    reads them (Gemma 4's double-wide FFNs on KV-shared layers, its full layers' own KV heads: a
    KV-shared full layer counts the full layers' heads, as llama.cpp's converter writes them);
    the scalar keys they replace are dropped from `hp`."""
    out = []
    if any(l.ffn_width for l in spec.schedule):
        widths = [int(l.ffn_width or spec.intermediate_size or 0) for l in spec.schedule]
        out.append((Keys.LLM.FEED_FORWARD_LENGTH.format(arch=arch), widths, V.ARRAY))
        hp.pop("intermediate_size", None)
    full_kv = {l.kv_heads for l in spec.schedule if l.mixer != "sliding" and l.kv_heads}
    if full_kv:
        kv = spec.attention.kv_heads or spec.attention.heads
        heads = [kv if l.mixer == "sliding" else l.kv_heads or max(full_kv) for l in spec.schedule]
        out.append((Keys.Attention.HEAD_COUNT_KV.format(arch=arch), heads, V.ARRAY))
        hp.pop("num_key_value_heads", None)
    return out


def _check_hard_coded(spec: ArchSpec, recipe: Recipe, arch: str, path) -> None:
    """llama.cpp hard-codes some facts per arch; a model that differs cannot be expressed."""
    for key, want in recipe.convert.hard_coded.get(arch, {}).items():
        have = spec.config.get(key)
        if have is not None and have != want:
            raise LlmarchError(
                f"llama.cpp's {arch} hard-codes {key} = {json.dumps(want)}; this model has "
                f"{json.dumps(have)}, so GGUF cannot express it",
                path,
            )
    off = recipe.convert.qk_norm_off_at_experts
    if (
        off
        and spec.moe
        and spec.config.get(off.key) is not None
        and bool(spec.config[off.key]) != (spec.moe.experts != off.experts)
    ):
        raise LlmarchError(
            f"llama.cpp's {arch} applies QK-norm exactly when the model does not have "
            f"{off.experts} experts; this model has {spec.moe.experts} experts and "
            f"{off.key} = {json.dumps(spec.config[off.key])}, so GGUF cannot express it",
            path,
        )
    conv = recipe.convert
    if conv.kv_owner_layers is not None:
        owners = [l.kv_shared_from is None for l in spec.schedule]
        if owners != [i < conv.kv_owner_layers for i in range(len(owners))]:
            raise LlmarchError(
                f"llama.cpp's {arch} gives KV caches to exactly the first {conv.kv_owner_layers} layers "
                f"(the rest reuse them); this model's num_kv_shared_layers differs, so GGUF cannot express it",
                path,
            )
    if conv.sparse_ffn_layers is not None:
        have = [l.ffn_sparsity or 0.0 for l in spec.schedule]
        want = [conv.sparse_ffn_fraction if i < conv.sparse_ffn_layers else 0.0 for i in range(len(have))]
        if have != want:
            raise LlmarchError(
                f"llama.cpp's {arch} hard-codes activation sparsity {conv.sparse_ffn_fraction} on the first "
                f"{conv.sparse_ffn_layers} layers and none after; this model's activation_sparsity_pattern "
                f"differs, so GGUF cannot express it",
                path,
            )
    pattern = recipe.gguf_defaults.sliding_window_pattern
    if (
        isinstance(pattern, int)
        and pattern > 1
        and not recipe.convert.swa_pattern_array  # written per layer: llama.cpp reads it instead
        and any(l.mixer == "sliding" for l in spec.schedule)
    ):
        sliding = [l.mixer == "sliding" for l in spec.schedule]
        # llama.cpp: every layer sliding except each pattern-th (gpt-oss's 2: the even layers)
        expect = [(i + 1) % pattern != 0 for i in range(len(sliding))]
        if sliding != expect:
            raise LlmarchError(
                f"llama.cpp's {arch} hard-codes a {pattern - 1}:1 sliding-window pattern; this "
                f"model's layer_types differ, so GGUF cannot express it",
                path,
            )

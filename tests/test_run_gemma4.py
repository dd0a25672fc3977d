"""Gemma 4's text model (per-layer inputs, wider heads and proportional RoPE on the global layers,
KV sharing, v = k on global layers, double-wide FFNs on KV-shared layers, stored layer scalars,
q/k/v norms, sliding window, final soft-cap, the MoE variant's dense MLP beside routed experts) against transformers' Gemma4ForCausalLM on tiny
random float32 checkpoints.

Expected values come from transformers: logits at prefill and every cached decode step within
1e-4, greedy tokens, and its config's kv_sharing_modes / per-layer head widths for the cache.
"""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fixtures.parity import DEVICE, check_generator, check_parity, kv_cache, text_in_wrapper  # noqa: E402

PROMPT, STEPS = 24, 32  # the window is 16

CASES = {
    "dense": {},
    # global layers: values are the key projection, one KV head; KV-shared layers: a 2x FFN
    "k_eq_v-double_wide": {"attention_k_eq_v": True, "num_global_key_value_heads": 1, "use_double_wide_mlp": True},
    # every layer: the dense MLP and 4 routed experts (top 2) side by side; 2 x 8 != hidden 32, so
    # the stored expert layout [E, 2I, d] is told from [E, d, 2I] by its shape
    "moe": {"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 8},
}


def _reference(path):
    from fixtures.reference import reference_model

    return reference_model("gemma4_text", path, DEVICE)


@pytest.fixture(scope="module")
def scaled(tiny, tmp_path_factory):
    """The dense case with layer_scalar values other than transformers' initial ones, and the
    config as Hub files write it (global_head_dim instead of transformers' per_layer_config)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("gemma4_scaled")
    shutil.copytree(tiny("gemma4_text"), out, dirs_exist_ok=True)
    st = next(out.glob("*.safetensors"))
    sd = load_file(st)
    gen = torch.Generator().manual_seed(3)
    for name in [n for n in sd if n.endswith(".layer_scalar")]:
        sd[name] = 0.5 + torch.rand(sd[name].shape, generator=gen)
    save_file(sd, st, metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    widths = {o["head_dim"] for o in config.pop("per_layer_config").values()}
    config["global_head_dim"] = widths.pop()
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_text_model_matches_transformers(tiny, device, case):
    path = tiny("gemma4_text", **CASES[case])
    ref = _reference(path)
    spec = check_parity(path, ref, device, PROMPT, STEPS, windowed=True).spec
    cfg = ref.config
    layers = ref.model.layers
    # the facts each case is about, read from the reference model itself
    assert [l.head_dim or spec.attention.head_dim for l in spec.schedule] == [m.self_attn.head_dim for m in layers]
    assert [l.v_from_k for l in spec.schedule] == [
        m.self_attn.use_alternative_attention and not m.self_attn.is_kv_shared_layer for m in layers
    ]
    widths = [m.mlp.intermediate_size for m in layers]
    assert [l.ffn_width or spec.intermediate_size for l in spec.schedule] == widths
    assert spec.rope.scaling["type"] == cfg.rope_parameters["full_attention"]["rope_type"] == "proportional"
    if cfg.enable_moe_block:
        assert (spec.moe.experts, spec.moe.experts_per_token) == (cfg.num_experts, cfg.top_k_experts)
        assert spec.moe.expert_ffn == cfg.moe_intermediate_size and spec.moe.dense_beside
        assert spec.moe.router_input_scale and spec.moe.per_expert_scale
    else:
        assert spec.moe is None


def test_layer_scalars_and_hub_config(scaled, device):
    ref = _reference(scaled)
    assert any(float(m.layer_scalar) != 1.0 for m in ref.model.layers)
    check_parity(scaled, ref, device, PROMPT, STEPS, windowed=True)


def test_wrapper_text_model_matches_transformers(scaled, device, tmp_path):
    path = text_in_wrapper(scaled, tmp_path / "gemma4", "gemma4", "Gemma4ForConditionalGeneration")
    spec = check_parity(path, _reference(scaled), device, PROMPT, STEPS, windowed=True).spec
    assert spec.family == "gemma4" and spec.text_family == "gemma4_text"


def test_only_kv_owner_layers_allocate(tiny):
    """Only the layers transformers does not mark "reuse" get a cache, each at its own head width
    and KV heads; inspect's KV bytes are what run allocates."""
    from llmarch.api import load_checkpoint_spec

    path = tiny("gemma4_text", **CASES["k_eq_v-double_wide"])
    _, spec = load_checkpoint_spec(str(path))
    ref = _reference(path)
    modes = ref.config.kv_sharing_modes
    owners = [i for i, m in enumerate(modes) if m != "reuse"]
    assert len(owners) < len(modes)
    for max_seq in (12, 300):
        cache = kv_cache(spec, max_seq, "cpu")
        assert sorted(cache.layers) == owners
        for i in owners:
            attn = ref.model.layers[i].self_attn
            assert cache.layers[i].k.shape[1] == attn.k_proj.out_features // attn.head_dim
            assert cache.layers[i].k.shape[-1] == attn.head_dim
        assert cache.nbytes() == spec.kv_cache(context=max_seq, kv_dtype="f32")["bytes"]


def test_generator_greedy_matches_transformers(tiny, device):
    """Chunked prefill (chunks shorter than the window) and CUDA-graph decode on a GPU."""
    path = tiny("gemma4_text")
    check_generator(path, _reference(path), device, PROMPT, STEPS)

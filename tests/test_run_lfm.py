"""llmarch run on LFM3 (gated short convolutions between sliding and full attention) vs transformers.

A tiny random float32 checkpoint made by transformers 5.24 (8 layers: 5 short-conv, 1 sliding with
window 16, 2 full; conv kernel 3): prefill logits and each of 32 cached decode steps match
transformers' forward on the same ids within 1e-4 and the greedy tokens are identical; the prompt
(77 tokens) is odd, longer than one prefill chunk (64) and passes the window twice. The attention
layers carry what inspect reports (per-head QK-norm, one sigmoid output gate per head, sandwich
norms, RoPE per layer type: proportional on full layers, default on sliding ones). Also: the
short conv's prefill form (one conv over the whole input) equals its one-token decode step on long
inputs, the Generator (prefill in chunks) gives transformers' tokens, and the cache holds exactly
the state bytes inspect reports. LFM2 (the same mixer, pre-norm attention without a gate) too.
"""

from __future__ import annotations

import json
import shutil
from unittest.mock import patch

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fixtures.parity import check_parity, kv_cache  # noqa: E402

STEPS = 32
PROMPT = 77  # odd, > one prefill chunk (64), > twice the window (16)


def test_logits_and_greedy_match_transformers(tiny, device):
    from fixtures.reference import reference_model

    path = tiny("lfm3")
    p = check_parity(path, reference_model("lfm3", path, device), device, PROMPT, STEPS, windowed=True)
    spec, cfg = p.spec, json.loads((path / "config.json").read_text())
    kinds = {"conv": ("linear", "short_conv"), "sliding_attention": ("sliding", None), "full_attention": ("full", None)}
    assert [(l.mixer, l.linear_kind) for l in spec.schedule] == [kinds[t] for t in cfg["layer_types"]]
    a = spec.attention
    assert a.gated and a.gate_per_head and a.qk_norm == "per_head" and spec.norm.placement == "sandwich"
    assert len(set(p.seq[0, PROMPT:].tolist())) > 3  # a sequence that is not one repeated token


def test_lfm2_logits_match_transformers(tiny, device):
    """LFM2: the same short convolution between full attention layers (q_layernorm / k_layernorm,
    out_proj, no gate, pre-norm) whose FFN width block_auto_adjust_ff_dim sets (int(2/3 * 96) = 64,
    rounded up to 16): read from the w1 tensors, and inspect reports it. On this tiny random checkpoint transformers' greedy
    tokens are one repeated token, so the logits carry the check."""
    from fixtures.reference import reference_model

    path = tiny("lfm2")
    p = check_parity(path, reference_model("lfm2", path, device), device, PROMPT, STEPS)
    cfg = json.loads((path / "config.json").read_text())
    assert [l.index for l in p.spec.schedule if l.mixer == "full"] == cfg["full_attn_idxs"]
    assert p.spec.intermediate_size == 64 and cfg["intermediate_size"] == 96
    assert not p.spec.attention.gated and p.spec.norm.placement == "pre"


def spread_lfm2_moe_routing(folder, others: float = 1.0) -> None:
    """Routing that every fact of Lfm2MoeTopKRouter shapes, in the checkpoint in `folder`: router
    weights x20 (sigmoid scores spread over ~0.2-0.8 instead of 0.5 +- 0.01) and a random
    expert_bias of about the same spread (transformers initialises the buffer to zeros, which would
    leave the choice-only bias untested); the other matrices (not the embeddings) x `others`."""
    from safetensors.torch import load_file, save_file

    sd = load_file(folder / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    for name in list(sd):
        if name.endswith("feed_forward.gate.weight"):
            sd[name] = sd[name] * 20
        elif name.endswith("feed_forward.expert_bias"):
            sd[name] = torch.randn(sd[name].shape, generator=g) * 0.2
        elif sd[name].ndim >= 2 and "embed_tokens" not in name:
            sd[name] = sd[name] * others
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def lfm2_moe(tiny, tmp_path_factory):
    """The tiny LFM2-MoE checkpoint with spread routing, routed_scaling_factor 1.5 and the other
    matrices x10, so that the layers move the residual enough for the greedy tokens to vary (at the
    fixture's scale they are one repeated token, which would make equal tokens a weak check)."""
    out = tmp_path_factory.mktemp("lfm2_moe") / "ckpt"
    shutil.copytree(tiny("lfm2_moe"), out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(cfg, routed_scaling_factor=1.5)))
    spread_lfm2_moe_routing(out, others=10)
    return out


def test_lfm2_moe_logits_match_transformers(lfm2_moe, device):
    """LFM2-MoE: LFM2's mixers, dense w1/w3/w2 FFNs in the first num_dense_layers (2) layers, then
    Lfm2MoeSparseMoeBlock: sigmoid scores, expert_bias added for the choice only, the k weights
    / (sum + 1e-6), x routed_scaling_factor; experts stored per expert (w1/w3/w2) as the Hub ships
    them. The bias decides: transformers' logits move when it is zeroed, so a run that ignored it fails."""
    from fixtures.reference import reference_model

    path = lfm2_moe
    ref = reference_model("lfm2_moe", path, device)
    p = check_parity(path, ref, device, PROMPT, STEPS)
    cfg = json.loads((path / "config.json").read_text())
    sched = p.spec.schedule
    assert [l.mixer for l in sched] == ["linear" if t == "conv" else "full" for t in cfg["layer_types"]]
    assert [l.ffn for l in sched] == ["dense"] * cfg["num_dense_layers"] + ["moe"] * (6 - cfg["num_dense_layers"])
    m = p.spec.moe
    assert (m.router, m.router_bias, m.norm_topk_prob, m.routed_scaling_factor) == ("sigmoid", True, True, 1.5)
    assert m.norm_topk_eps == 1e-6 and p.spec.intermediate_size == cfg["intermediate_size"]
    with torch.inference_mode():
        ids = p.seq[:, :PROMPT]
        before = ref(ids).logits
        for layer in ref.model.layers[cfg["num_dense_layers"] :]:
            layer.feed_forward.expert_bias.zero_()
        assert (ref(ids).logits - before).abs().max().item() > 1e-3


def test_lfm2_moe_experts_on_cpu_give_the_resident_tokens(lfm2_moe, device):
    """`--experts cpu` (16-bit experts on the host, run's decode step for host experts) gives the
    greedy tokens of all experts resident, and those are transformers' (prefill in chunks of 10)."""
    from fixtures.parity import reference_tokens
    from fixtures.reference import reference_model
    from llmarch.runtime import generate as g
    from llmarch.runtime.experts.decode import attach_decoder
    from llmarch.runtime.experts.report import offloaded
    from llmarch.runtime.load import load_runtime

    prompt = torch.randint(3, 128, (1, 23), generator=torch.Generator().manual_seed(2))
    expected = reference_tokens(reference_model("lfm2_moe", lfm2_moe), prompt, STEPS)
    with patch.object(g, "PREFILL_CHUNK", 10):
        rt = load_runtime(str(lfm2_moe), device, "float32")
        assert (
            g.Generator(rt, 23 + STEPS, cuda_graph=False).generate(prompt[0].tolist(), STEPS, g.Sampling()).tokens
            == expected
        )
        rt_cpu = load_runtime(str(lfm2_moe), device, "float32", experts="cpu", expert_bits=16)
        assert len(offloaded(rt_cpu.model)) == 4
        gen_cpu = g.Generator(rt_cpu, 23 + STEPS, cuda_graph=False)
        assert attach_decoder(gen_cpu)
        assert gen_cpu.generate(prompt[0].tolist(), STEPS, g.Sampling()).tokens == expected
    assert len(set(expected)) > 1  # not one repeated token


def test_variant_with_biases_no_gate_no_sandwich(tiny, device):
    """The config's other switches, each seen in the tensors: conv_bias (biases on in_proj, the conv
    and out_proj), use_attention_gate false (no g_proj), use_sandwich_norm false (pre-norm only)."""
    from fixtures.reference import reference_model

    path = tiny("lfm3", conv_bias=True, use_attention_gate=False, use_sandwich_norm=False)
    p = check_parity(path, reference_model("lfm3", path, device), device, PROMPT, 4, windowed=False)
    assert not p.spec.attention.gated and p.spec.norm.placement == "pre"
    assert p.rt.model.layers[0].attn.conv_bias is not None


def test_prefill_form_equals_decode_steps_on_long_inputs():
    """One causal conv over the whole input and the one-token step (shift the window, multiply-add)
    give the same outputs and final window over 300 tokens from a non-zero window, also cut into
    pieces (as the Generator's prefill chunks cut a long prompt), with and without the conv bias."""
    from fixtures.recurrence import check_chunked_equals_recurrent
    from llmarch.runtime.ops.short_conv import conv_step, prefill

    g = torch.Generator().manual_seed(0)
    B, C, K, T = 2, 24, 5, 300
    u = torch.randn(B, C, T, generator=g)  # channels first: T on dim 2, as the shared check slices
    weight = torch.randn(C, 1, K, generator=g) * 0.5
    start = torch.randn(B, C, K - 1, generator=g)
    for bias in (None, torch.randn(C, generator=g)):
        check_chunked_equals_recurrent(
            lambda x, window, bias=bias: prefill(window, x.transpose(1, 2), weight, bias).transpose(1, 2),
            lambda x, window, bias=bias: conv_step(window, x, weight, bias),
            [u],
            start,
        )


def test_generator_matches_transformers(tiny, device):
    """The Generator as `llmarch run` drives it (prefill in chunks of 10, so the layers' state
    carries across calls; on a GPU the decode replays a captured CUDA graph) gives transformers'
    greedy tokens."""
    from fixtures.parity import check_generator
    from fixtures.reference import reference_model

    path = tiny("lfm3")
    check_generator(path, reference_model("lfm3", path, device), device, prompt=PROMPT, steps=8)


@pytest.mark.parametrize("dtype,kv", [(torch.float32, "f32"), (torch.bfloat16, "bf16")])
def test_state_bytes_inspect_equals_run(tiny, dtype, kv):
    """inspect's kv_cache.state_bytes is what run allocates for the 5 conv layers: a window of
    conv_L_cache - 1 inputs of hidden_size channels each, in the cache dtype, no recurrent matrix
    (here also computed from config.json by hand); the attention layers add KV only."""
    from llmarch.api import load_checkpoint_spec

    path = tiny("lfm3")
    c = json.loads((path / "config.json").read_text())
    convs = c["layer_types"].count("conv")
    _, spec = load_checkpoint_spec(str(path))
    cache = kv_cache(spec, 64, "cpu", dtype)
    assert len(cache.linear) == convs == 5
    by_hand = convs * c["hidden_size"] * (c["conv_L_cache"] - 1) * dtype.itemsize
    assert cache.state_nbytes() == spec.kv_cache(kv_dtype=kv)["state_bytes"] == by_hand


def test_conv_kernel_the_checkpoint_does_not_carry_is_refused(tiny, tmp_path, capsys):
    """A config whose conv_L_cache the conv weights do not have: `llmarch run` prints one line
    naming the checkpoint and the tensor, exit 2, no traceback."""
    from tests.test_run_cli import cli

    bad = tmp_path / "bad"
    shutil.copytree(tiny("lfm3"), bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["conv_L_cache"] = 5
    (bad / "config.json").write_text(json.dumps(cfg))
    code, err = cli(["run", bad, "--prompt-ids", "5,6,7", "--max-tokens", "2", "--device", "cpu"], capsys)
    err = err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert str(bad) in err and "conv.conv.weight" in err and "(32, 1, 5)" in err, err

"""llmarch run on Kimi Linear (Kimi Delta Attention : MLA with NoPE, MoE + shared) vs transformers.

A tiny random float32 checkpoint made by transformers with 8 layers (6 KDA, 2 MLA; layer 0 dense,
the rest MoE + shared expert): prefill logits and each of 32 cached decode steps match transformers'
forward on the same ids within 1e-4 (max abs) and the greedy tokens are identical; the prompt (77
tokens) is odd and longer than one prefill chunk (32 tokens on the CPU, 64 on a GPU). transformers'
pure-PyTorch KDA is the reference (its fast kernels are not installed). Also: the chunked prefill
form equals the token-by-token recurrence on long inputs with per-channel gates strong enough that a
chunk decays past float32's range, the cache holds exactly the state bytes inspect reports, experts
on the CPU give the same greedy tokens as all on one device, and KDA sizes the tensors do not have
are refused in one line naming the file.
"""

from __future__ import annotations

import json
import shutil
from unittest.mock import patch

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fixtures.parity import TOL, check_parity, kv_cache, own_cache, reference_tokens  # noqa: E402

STEPS = 32
PROMPT = 77  # odd, > one prefill chunk (32 tokens on the CPU, 64 on a GPU)
# 1-based layer numbers, as the Hub config writes them: KDA 3:1 with MLA, two MLA layers
HYBRID = dict(
    num_hidden_layers=8,
    linear_attn_config=dict(
        head_dim=8, num_heads=4, short_conv_kernel_size=4, kda_layers=[1, 2, 3, 5, 6, 7], full_attn_layers=[4, 8]
    ),
)


def test_logits_and_greedy_match_transformers(tiny, device):
    """Prefill and each cached decode step against transformers' own cached decode, and the last
    step also against its full forward over the whole sequence."""
    from fixtures.reference import reference_model

    path = tiny("kimi_linear", **HYBRID)
    ref = reference_model("kimi_linear", path, device)
    p = check_parity(path, own_cache(ref, "cache"), device, PROMPT, STEPS)
    schedule = p.spec.schedule
    assert [l.linear_kind or l.mixer for l in schedule] == ["kda"] * 3 + ["mla"] + ["kda"] * 3 + ["mla"]
    assert not any(l.rope for l in schedule if l.mixer == "mla")  # NoPE MLA
    assert [l.ffn for l in schedule] == ["dense"] + ["moe"] * 7
    with torch.inference_mode():
        err = (p.last - ref(p.seq).logits[:, -1:]).abs().max().item()
    assert err < TOL, f"the last step differs from transformers' full forward by {err}"
    assert len(set(p.seq[0, PROMPT:].tolist())) > 3  # a sequence that is not one repeated token


def test_chunked_form_equals_recurrence_with_channel_gates():
    """Per-channel gates: the prefill form (chunks of 32 on the CPU, sub-chunks of 16, WY solve) and
    the one-token recurrence give the same outputs and final state over 300 tokens from a non-zero
    state, also cut into pieces that do not align with the chunks. The log-decays reach -6 per
    token, so one chunk decays by up to ~190 nats: exp(+-190) is outside float32, which a form
    splitting exp(G_i - G_j) into exp(G_i) exp(-G_j) would turn into inf / nan."""
    from fixtures.recurrence import check_chunked_equals_recurrent
    from llmarch.runtime.ops.delta_rule import chunked, l2norm, recurrent_step

    g = torch.Generator().manual_seed(0)
    B, H, T, D = 1, 3, 300, 16
    q = l2norm(torch.randn(B, H, T, D, generator=g)) * D**-0.5
    k = l2norm(torch.randn(B, H, T, D, generator=g))
    v = torch.randn(B, H, T, D, generator=g)
    decay = -torch.rand(B, H, T, D, generator=g) * 6  # log decay <= 0, one per key channel
    decay[:, :, :, 0] *= 0.01  # and some channels that keep their memory across chunks
    beta = torch.rand(B, H, T, generator=g)
    start = torch.randn(B, H, D, D, generator=g) * 0.1

    check_chunked_equals_recurrent(chunked, recurrent_step, [q, k, v, decay, beta], start)


@pytest.mark.parametrize("dtype,kv", [(torch.float32, "f32"), (torch.bfloat16, "bf16")])
def test_state_bytes_inspect_equals_run(tiny, dtype, kv):
    """inspect's kv_cache.state_bytes is what run allocates for the KDA layers: per layer a conv
    window over q, k and v (3 x heads x head_dim channels x (kernel - 1), cache dtype) and a
    head_dim x head_dim float32 matrix per head, from the config's linear_attn_config."""
    from llmarch.api import load_checkpoint_spec

    path = tiny("kimi_linear", **HYBRID)
    _, spec = load_checkpoint_spec(str(path))
    cache = kv_cache(spec, 64, "cpu", dtype)
    assert len(cache.linear) == 6
    c = json.loads((path / "config.json").read_text())["linear_attn_config"]
    h, d, kernel = c["num_heads"], c["head_dim"], c["short_conv_kernel_size"]
    by_hand = 6 * (h * d * d * 4 + 3 * h * d * (kernel - 1) * dtype.itemsize)
    assert cache.state_nbytes() == spec.kv_cache(kv_dtype=kv)["state_bytes"] == by_hand


def test_generator_and_offloaded_experts_agree(tiny, device):
    """The Generator, stepping eagerly (the captured graph of a MoE decode step is checked in
    tests/test_moe_graph.py), prefill cut into chunks of 10 so the KDA state and the MLA latents
    carry across calls, gives transformers' greedy tokens, twice on one cache (reset clears the
    state), and with --experts cpu (16-bit) the same tokens as all experts on one device."""
    from fixtures.reference import reference_model
    from llmarch.runtime import generate as g
    from llmarch.runtime.experts.decode import attach_decoder
    from llmarch.runtime.experts.report import offloaded
    from llmarch.runtime.load import load_runtime

    path = tiny("kimi_linear", **HYBRID)
    prompt = torch.randint(3, 128, (1, 23), generator=torch.Generator().manual_seed(2))
    expected = reference_tokens(own_cache(reference_model("kimi_linear", path), "cache"), prompt, STEPS)
    with patch.object(g, "PREFILL_CHUNK", 10):  # prefill in chunks, so state carries across calls
        rt = load_runtime(str(path), device, "float32")
        gen = g.Generator(rt, 23 + STEPS, cuda_graph=False)
        for _ in range(2):
            assert gen.generate(prompt[0].tolist(), STEPS, g.Sampling()).tokens == expected
        rt_cpu = load_runtime(str(path), device, "float32", experts="cpu", expert_bits=16)
        assert len(offloaded(rt_cpu.model)) == 7
        gen_cpu = g.Generator(rt_cpu, 23 + STEPS, cuda_graph=False)
        assert attach_decoder(gen_cpu)  # run's decode step for host experts, segments between round trips
        assert gen_cpu.generate(prompt[0].tolist(), STEPS, g.Sampling()).tokens == expected


def test_kda_sizes_disagreeing_with_the_tensors_is_refused(tiny, tmp_path, capsys):
    """A config whose KDA head width the tensors do not have: `llmarch run` prints one line naming
    the checkpoint and the tensor, exit 2, no traceback."""
    from tests.test_run_cli import cli

    bad = tmp_path / "bad"
    shutil.copytree(tiny("kimi_linear", **HYBRID), bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["linear_attn_config"]["head_dim"] = 16
    (bad / "config.json").write_text(json.dumps(cfg))
    code, err = cli(["run", bad, "--prompt-ids", "5,6,7", "--max-tokens", "2", "--device", "cpu"], capsys)
    err = err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert str(bad) in err and "q_proj.weight" in err and "(64, 32)" in err, err

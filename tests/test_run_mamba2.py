"""llmarch run on Nemotron-H / Nemotron 3 (Mamba-2 + GQA without RoPE + MoE / dense relu2 FFN, one
sub-block per layer) vs transformers' pure-PyTorch path (its mamba_ssm / causal_conv1d kernels are
not installed).

The whole model: a tiny random float32 checkpoint made by transformers with 8 layers (4 Mamba-2,
2 attention, 1 MoE with a shared expert, 1 dense MLP): prefill logits (77 tokens: odd, longer than
one 64-token chunk) and each of 32 cached decode steps within 1e-4 (max abs) of transformers' own
cached decode, identical greedy tokens; the Generator with prefill cut into chunks of 10 gives the
same tokens; Mamba-2 sizes the tensors do not have are one line naming the file, exit 2.

The mixer alone: a random transformers mixer (its own init: dt_bias from time_step_min..max,
A_log, D) with the conv bias and grouped norm, our Mamba2 given the same tensors. A prefill of an
odd length longer than one chunk, then 32 one-token steps through our cache state, each within
1e-4 of transformers' output at that position (its full forward is causal, so position t of one
forward over the whole sequence is what step t must give). Also: the chunked prefill form equals
the token-by-token recurrence over a long input, from a non-zero state, cut into pieces that do
not align with the chunks; inspect's recurrent-state bytes equal what run allocates.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fixtures.parity import TOL, check_parity, kv_cache, own_cache, reference_tokens  # noqa: E402

STEPS = 32
PROMPT = 77  # odd, > one prefill chunk (64)
# M = Mamba-2, * = attention, E = MoE, - = MLP: one sub-block per layer
PATTERN = "M*EMM-*M"
DENSE = "M*-MM*M-"  # no MoE layer: on CUDA the Generator then decodes through a captured graph
SIZES = dict(
    hidden_size=32,
    mamba_num_heads=4,
    mamba_head_dim=8,
    ssm_state_size=8,
    n_groups=2,
    conv_kernel=4,
    chunk_size=16,
    hybrid_override_pattern="M*-M*E",
)


def _pair(act: str = "silu"):
    """transformers' mixer (random init) and ours holding the same tensors, with our cache; act:
    the conv's activation (mamba_hidden_act)."""
    from transformers.models.nemotron_h import modeling_nemotron_h as m

    from llmarch.arch.spec import ArchSpec, LayerSpec, LinearAttentionSpec
    from llmarch.runtime.kv_cache import KVCache
    from llmarch.runtime.ops.mamba2 import Mamba2

    torch.manual_seed(0)
    cfg = transformers.NemotronHConfig(**SIZES, mamba_hidden_act=act)
    ref = m.NemotronHMamba2Mixer(cfg, layer_idx=0).eval()
    with torch.no_grad():  # a gated norm weight and biases that are not all ones / zeros
        ref.norm.weight.normal_(1.0, 0.2)
        ref.in_proj.weight.normal_(0.0, 0.3)
    lin = LinearAttentionSpec(
        kind="mamba2",
        key_heads=cfg.n_groups,
        value_heads=cfg.mamba_num_heads,
        key_head_dim=cfg.ssm_state_size,
        value_head_dim=cfg.mamba_head_dim,
        conv_kernel=cfg.conv_kernel,
        dt_min=cfg.time_step_min,
        conv_activation=act,
    )
    spec = ArchSpec(family="nemotron_h", format="safetensors", hidden_size=cfg.hidden_size)
    spec.linear = lin
    spec.norm.eps = cfg.layer_norm_epsilon
    layer = LayerSpec(index=0, mixer="mamba", ffn="none", linear_kind="mamba2")
    mine = Mamba2(spec, layer)
    p = lambda t: torch.nn.Parameter(t.detach().clone(), requires_grad=False)  # noqa: E731
    mine.in_proj.weight = p(ref.in_proj.weight)
    mine.conv, mine.conv_bias = p(ref.conv1d.weight), p(ref.conv1d.bias)
    mine.A_log, mine.dt_bias, mine.D = p(ref.A_log), p(ref.dt_bias), p(ref.D)
    mine.norm_weight, mine.out.weight = p(ref.norm.weight), p(ref.out_proj.weight)
    cache = KVCache([layer], 16, 1, 8, 8, torch.float32, "cpu", linear=lin)
    return ref, mine, cache


@pytest.mark.parametrize("act", ["silu", "relu"])
def test_mixer_prefill_and_decode_match_transformers(act):
    ref, mine, cache = _pair(act)
    x = torch.randn(1, PROMPT + STEPS, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = ref(x)
        out = mine(x[:, :PROMPT], torch.arange(PROMPT), cache)
        err = (out - expected[:, :PROMPT]).abs().max().item()
        assert err < TOL, f"prefill differs by {err}"
        worst = 0.0
        for t in range(PROMPT, PROMPT + STEPS):
            step = mine(x[:, t : t + 1], torch.tensor([t]), cache)
            worst = max(worst, (step - expected[:, t : t + 1]).abs().max().item())
        assert worst < TOL, f"decode steps differ by up to {worst}"
        assert expected.abs().max().item() > 1e-2  # outputs that are not all ~0


def test_chunked_form_equals_recurrence():
    """The SSD chunk form and the one-token recurrence over 300 tokens from a non-zero state, with
    decays strong enough that a chunk's cumulative log-decay is far outside float32's exp range,
    also cut into pieces that do not align with the 64-token chunks."""
    from fixtures.recurrence import check_chunked_equals_recurrent
    from llmarch.runtime.ops.mamba2 import chunked, recurrent_step

    g = torch.Generator().manual_seed(0)
    b, H, T, P, N = 1, 3, 300, 8, 16
    x = torch.randn(b, H, T, P, generator=g)
    dt = torch.rand(b, H, T, generator=g) * 2  # with A down to -3: up to -6 nats per token
    A = -torch.tensor([0.01, 1.0, 3.0])
    B, C = torch.randn(b, H, T, N, generator=g), torch.randn(b, H, T, N, generator=g)
    start = torch.randn(b, H, N, P, generator=g)

    check_chunked_equals_recurrent(chunked, recurrent_step, [x, dt, A, B, C], start)


@pytest.mark.parametrize("dtype,kv", [(torch.float32, "f32"), (torch.bfloat16, "bf16")])
def test_state_bytes_inspect_equals_run(tiny, dtype, kv):
    """inspect's kv_cache.state_bytes is what run allocates for the Mamba-2 layers: per layer a
    float32 heads x head_dim x state_size matrix and a conv window over [x B C] (heads x head_dim
    + 2 x groups x state_size channels, kernel - 1 wide, in the cache dtype), from config.json."""
    from llmarch.api import load_checkpoint_spec

    path = tiny("nemotron_h")
    _, spec = load_checkpoint_spec(str(path))
    c = json.loads((path / "config.json").read_text())
    mamba = [i for i, t in enumerate(c["layers_block_type"]) if t in ("mamba", "linear_attention")]
    assert [l.index for l in spec.schedule if l.mixer == "mamba"] == mamba
    cache = kv_cache(spec, 64, "cpu", dtype)
    assert sorted(cache.linear) == mamba
    h, p, n, g, k = c["mamba_num_heads"], c["mamba_head_dim"], c["ssm_state_size"], c["n_groups"], c["conv_kernel"]
    by_hand = len(mamba) * (h * p * n * 4 + (h * p + 2 * g * n) * (k - 1) * dtype.itemsize)
    assert cache.state_nbytes() == spec.kv_cache(kv_dtype=kv)["state_bytes"] == by_hand


def test_logits_and_greedy_match_transformers(tiny, device):
    from fixtures.reference import reference_model

    path = tiny("nemotron_h", hybrid_override_pattern=PATTERN)
    p = check_parity(path, own_cache(reference_model("nemotron_h", path, device), "cache"), device, PROMPT, STEPS)
    assert [(l.linear_kind or l.mixer, l.ffn) for l in p.spec.schedule] == [
        ("mamba2", "none"),
        ("full", "none"),
        ("none", "moe"),
        ("mamba2", "none"),
        ("mamba2", "none"),
        ("none", "dense"),
        ("full", "none"),
        ("mamba2", "none"),
    ]
    assert len(set(p.seq[0, PROMPT:].tolist())) > 1  # not one repeated token (this tiny model alternates two)


@pytest.mark.parametrize("pattern", [PATTERN, DENSE])
def test_generator_with_chunked_prefill_gives_transformers_tokens(tiny, device, pattern):
    """The Generator as `llmarch run` makes it (on CUDA without MoE layers: the decode step
    replayed from a captured graph, the state updated in place), prefill cut into chunks of 10 so
    the conv window and SSM state carry across calls, twice on one cache (reset clears the state)."""
    from fixtures.reference import reference_model
    from llmarch.runtime import generate as g
    from llmarch.runtime.load import load_runtime

    path = tiny("nemotron_h", hybrid_override_pattern=pattern)
    prompt = torch.randint(3, 128, (1, 23), generator=torch.Generator().manual_seed(2))
    expected = reference_tokens(own_cache(reference_model("nemotron_h", path), "cache"), prompt, STEPS)
    old = g.PREFILL_CHUNK
    g.PREFILL_CHUNK = 10
    try:
        rt = load_runtime(str(path), device, "float32")
        gen = g.Generator(rt, 23 + STEPS, cuda_graph=device.startswith("cuda") and pattern == DENSE)
        for _ in range(2):
            assert gen.generate(prompt[0].tolist(), STEPS, g.Sampling()).tokens == expected
    finally:
        g.PREFILL_CHUNK = old


def test_mamba2_sizes_disagreeing_with_the_tensors_is_refused(tiny, tmp_path, capsys):
    """A config whose ssm_state_size the Mamba-2 tensors do not have: `llmarch run` prints one line
    naming the checkpoint and the tensor, exit 2, no traceback."""
    import shutil

    from tests.test_run_cli import cli

    bad = tmp_path / "bad"
    shutil.copytree(tiny("nemotron_h", hybrid_override_pattern=PATTERN), bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["ssm_state_size"] = 16
    (bad / "config.json").write_text(json.dumps(cfg))
    code, err = cli(["run", bad, "--prompt-ids", "5,6,7", "--max-tokens", "2", "--device", "cpu"], capsys)
    err = err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    # in_proj rows: inner 32 + conv channels (32 + 2 groups x 16) + 4 heads
    assert str(bad) in err and "in_proj.weight" in err and "(132, 32)" in err, err


def test_conv_activation_read_from_the_config_and_unknown_ones_refused(tiny, tmp_path, capsys):
    """mamba_hidden_act is the conv's activation in the spec (transformers' default silu when the
    key is absent); one run does not implement is one line naming the file, exit 2."""
    import shutil

    from llmarch.api import load_spec
    from tests.test_run_cli import cli

    src = tiny("nemotron_h", hybrid_override_pattern=PATTERN)
    assert (
        load_spec(str(src)).linear.conv_activation == json.loads((src / "config.json").read_text())["mamba_hidden_act"]
    )
    for act, expected in (("relu", "relu"), (None, "silu"), ("softsign", "softsign")):
        folder = tmp_path / str(act)
        shutil.copytree(src, folder)
        cfg = json.loads((folder / "config.json").read_text())
        if act is None:
            del cfg["mamba_hidden_act"]
        else:
            cfg["mamba_hidden_act"] = act
        (folder / "config.json").write_text(json.dumps(cfg))
        assert load_spec(str(folder)).linear.conv_activation == expected
    code, err = cli(
        ["run", tmp_path / "softsign", "--prompt-ids", "5,6,7", "--max-tokens", "2", "--device", "cpu"], capsys
    )
    err = err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(tmp_path / "softsign") in err and "'softsign' (mamba_hidden_act) is not supported" in err, err

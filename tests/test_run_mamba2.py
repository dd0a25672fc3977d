"""Mamba-2 (Nemotron-H / Nemotron 3) mixer vs transformers' pure-PyTorch NemotronHMamba2Mixer.

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

TOL = 1e-4
STEPS = 32
PROMPT = 77  # odd, > one prefill chunk (64)
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


def _pair():
    """transformers' mixer (random init) and ours holding the same tensors, with our cache."""
    from transformers.models.nemotron_h import modeling_nemotron_h as m

    from llmarch.arch.spec import ArchSpec, LayerSpec, LinearAttentionSpec
    from llmarch.runtime.kv_cache import KVCache
    from llmarch.runtime.ops.mamba2 import Mamba2

    torch.manual_seed(0)
    cfg = transformers.NemotronHConfig(**SIZES)
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


def test_mixer_prefill_and_decode_match_transformers():
    ref, mine, cache = _pair()
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
    from llmarch.runtime.ops.mamba2 import chunked, recurrent_step

    g = torch.Generator().manual_seed(0)
    b, H, T, P, N = 1, 3, 300, 8, 16
    x = torch.randn(b, H, T, P, generator=g)
    dt = torch.rand(b, H, T, generator=g) * 2  # with A down to -3: up to -6 nats per token
    A = -torch.tensor([0.01, 1.0, 3.0])
    B, C = torch.randn(b, H, T, N, generator=g), torch.randn(b, H, T, N, generator=g)
    start = torch.randn(b, H, N, P, generator=g)

    s_rec = start.clone()
    out_rec = torch.stack(
        [recurrent_step(x[:, :, t], dt[:, :, t], A, B[:, :, t], C[:, :, t], s_rec) for t in range(T)], dim=2
    )
    s_chunk = start.clone()
    out_chunk = chunked(x, dt, A, B, C, s_chunk)
    assert torch.isfinite(out_chunk).all()
    assert (out_chunk - out_rec).abs().max().item() < 1e-4
    assert (s_chunk - s_rec).abs().max().item() < 1e-4
    s_cut = start.clone()
    pieces = [
        chunked(x[:, :, a:e], dt[:, :, a:e], A, B[:, :, a:e], C[:, :, a:e], s_cut)
        for a, e in ((0, 101), (101, 138), (138, 300))
    ]
    assert (torch.cat(pieces, dim=2) - out_rec).abs().max().item() < 1e-4
    assert (s_cut - s_rec).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype,kv", [(torch.float32, "f32"), (torch.bfloat16, "bf16")])
def test_state_bytes_inspect_equals_run(tiny, dtype, kv):
    """inspect's kv_cache.state_bytes is what run allocates for the Mamba-2 layers: per layer a
    float32 heads x head_dim x state_size matrix and a conv window over [x B C] (heads x head_dim
    + 2 x groups x state_size channels, kernel - 1 wide, in the cache dtype), from config.json."""
    from llmarch.api import load_checkpoint_spec
    from llmarch.runtime.kv_cache import KVCache

    path = tiny("nemotron_h")
    _, spec = load_checkpoint_spec(str(path))
    c = json.loads((path / "config.json").read_text())
    mamba = [i for i, t in enumerate(c["layers_block_type"]) if t in ("mamba", "linear_attention")]
    assert [l.index for l in spec.schedule if l.mixer == "mamba"] == mamba
    a = spec.attention
    cache = KVCache(spec.schedule, 64, a.kv_heads, a.head_dim, a.head_dim, dtype, "cpu", linear=spec.linear)
    assert sorted(cache.linear) == mamba
    h, p, n, g, k = c["mamba_num_heads"], c["mamba_head_dim"], c["ssm_state_size"], c["n_groups"], c["conv_kernel"]
    by_hand = len(mamba) * (h * p * n * 4 + (h * p + 2 * g * n) * (k - 1) * dtype.itemsize)
    assert cache.state_nbytes() == spec.kv_cache(kv_dtype=kv)["state_bytes"] == by_hand

"""The C forms of RMS norm and rotate-half RoPE that CPU decode uses (cpu_kernels.rms_norm,
cpu_kernels.rope_rotate_half, reached through ops/norms.RMSNorm and ops/rope.Rope), against the
formulas written out in float64 torch: y = x / sqrt(mean(x^2) + eps) * w, and
x * cos + rotate_half(x) * sin on the first rot dims of each head, the rest untouched."""

from __future__ import annotations

import pytest
import torch

from llmarch.runtime import cpu_kernels
from llmarch.runtime.ops.norms import RMSNorm
from llmarch.runtime.ops.rope import Rope

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no AVX2 or no C compiler")


@pytest.mark.parametrize("shape", [(1, 1, 640), (2, 3, 4, 256), (5, 96)])
def test_rms_norm_matches_formula(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3
    w = torch.randn(shape[-1], generator=g)
    norm = RMSNorm(shape[-1], eps=1e-6)
    norm.weight = torch.nn.Parameter(w, requires_grad=False)
    x64 = x.double()
    want = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    got = norm(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_dim,rot,T", [(256, 256, 1), (64, 32, 5)])
def test_rope_matches_formula(head_dim, rot, T):
    rope = Rope(head_dim, rot, 10000.0, None, 512)
    rope.build(300, "cpu", torch.float32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, T, head_dim, generator=g)
    pos = torch.tensor([7, 0, 299, 3, 150][:T])
    inv = 1.0 / (10000.0 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    ang = pos.double()[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    xr = x.double()[..., :rot]
    rotated = torch.cat([-xr[..., rot // 2 :], xr[..., : rot // 2]], -1)
    want = torch.cat([xr * cos + rotated * sin, x.double()[..., rot:]], -1)
    got = rope(x, pos)
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_rope_position_outside_tables_refused():
    rope = Rope(64, 64, 10000.0, None, 512)
    rope.build(8, "cpu", torch.float32)
    with pytest.raises(IndexError):
        rope(torch.zeros(1, 2, 1, 64), torch.tensor([8]))


@pytest.mark.parametrize("H,KV,S,D,Dv", [(4, 1, 70, 256, 256), (8, 2, 33, 64, 32)])
def test_decode_attention_matches_formula(H, KV, S, D, Dv):
    """One query token over a cache slice (keys of each head contiguous, heads a full buffer apart),
    some slots masked: softmax(scale * q k^T over visible keys) v, grouped query heads, in float64."""
    from llmarch.runtime.ops.attention import attend

    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, H, 1, D, generator=g)
    k_buf, v_buf = torch.randn(1, KV, S + 9, D, generator=g), torch.randn(1, KV, S + 9, Dv, generator=g)
    k, v = k_buf[:, :, :S], v_buf[:, :, :S]  # as the cache hands out its filled prefix
    mask = torch.rand(1, S, generator=g) > 0.3
    mask[0, 0] = True
    assert cpu_kernels.attend_one_ok(q, k, v, mask)
    got = attend(q, k, v, mask, 0.125)
    rep = H // KV
    kk, vv = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    scores = (q.double() @ kk.transpose(-1, -2)) * 0.125
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    assert got.shape == (1, H, 1, Dv)
    assert torch.allclose(got.double(), probs @ vv, atol=1e-5)


@pytest.mark.parametrize("load,cores,want", [(0.2, 2, 2), (1.0, 2, 1), (4.6, 2, 1), (3.0, 16, 13), (0.0, 1, 1)])
def test_cpu_threads_leave_busy_cores_alone(monkeypatch, load, cores, want):
    """Threads = cores minus the 1-minute load average, at least one; OMP_NUM_THREADS wins."""
    import os

    from llmarch.runtime import load as load_mod

    chosen = []
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    note = load_mod.pick_cpu_threads()
    assert chosen == [want] and note.startswith(f"{want} CPU thread")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert load_mod.pick_cpu_threads() is None and chosen == [want]

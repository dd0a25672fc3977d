"""decode_attention_cuda: a one-token decode step's attention on CUDA as one Triton kernel.

- the kernel against attend()'s explicit form in float64 (the same q, K, V upcast), on shapes that
  are not multiples of its tiles (GQA, MQA and MHA; head widths 64, 80, 128, 256; values narrower
  than keys; caches not a multiple of the slots a step reads; two batch rows), with the mask from
  a SlotGroup as a decode step builds it (empty slots, a ring window wrapped around, a captured
  step's limit=None over every slot), forced into several splits (the merge kernel) and into one,
  output poisoned with NaN first. Hidden slots hold keys 50x larger than the visible ones, so a
  slot the kernel wrongly counts takes nearly all the probability. The bound: probabilities are
  rounded to V's dtype before the product (as attend() rounds them), scores are float32;
  |out - exact| <= 2^-8 * (p @ |v|) + the output's own rounding;
- what takes the kernel (CUDA, one query token, one half-precision dtype, a [1, S] bool mask,
  LLMARCH_NO_DECODE_ATTN=0, or unset where DEFAULT_ON) and that attend() never sends CPU tensors to it;
- the step whose kernel also norms and rotates q/k and writes the cache (decode_attention_new):
  tiny llama, qwen3 and gemma3 decode logits against the module path's, both against the float32
  forward, and the keys / values it wrote against the module path's (on a CPU under the
  interpreter too);
- on LLMARCH_TEST_DEVICE=cuda: tiny llama and gemma3 (sliding layers: a ring of 16 slots, wrapped)
  decode logits with the op against the same model without it, both against the float32 forward;
  the captured and torch.compile'd decode giving the eager tokens (qwen3 with the new step too).

The kernel runs on CUDA with LLMARCH_TEST_DEVICE=cuda, else on CPU tensors under the Triton
interpreter (both products in float32 there: see the kernel); without triton those tests skip.
"""

from __future__ import annotations

import pytest
import torch
from test_gguf_cuda import (  # sets TRITON_INTERPRET on a CPU
    DEVICE,
    logits_by_step,
    needs_kernels,
    no_further_from_float32,
)

from llmarch.runtime import decode_attention_cuda as da
from llmarch.runtime.kv_cache import SlotGroup
from llmarch.runtime.ops.attention import Attention, attend


def group_mask(size: int, window: int | None, steps: int, graph: bool) -> torch.Tensor:
    """The [1, size] mask a decode step at position steps - 1 attends with: a SlotGroup fed one
    token a step, as the Generator feeds it (graph: limit=None, every slot; else the filled prefix,
    which a ring ignores). A window makes a ring of `size` slots (the cache's, as KVCache sizes it)."""
    g = SlotGroup(size, window, window is not None, "cpu")
    for p in range(steps):
        g.prepare(torch.tensor([p]), None if graph else p + 1)
    return g.mask


# (batch, heads, kv heads, head width, value width, slots, window, steps, chunk): none a multiple of
# the kernel's tiles; chunk forces slots per split (None: plan()'s choice)
CASES = [
    (1, 8, 2, 64, 64, 37, None, 30, None),  # GQA, a full cache partly filled (graph: empty slots hidden)
    (2, 6, 3, 128, 128, 100, None, 100, 32),  # two batch rows, every slot filled, 4 splits merged
    (1, 4, 1, 256, 256, 50, None, 21, 32),  # MQA, 256 wide; the second split sees nothing (all hidden)
    (1, 3, 3, 80, 48, 23, 23, 60, None),  # MHA, widths not powers of two, a ring wrapped twice
    (1, 12, 4, 64, 64, 300, None, 300, None),  # plan() splits 300 slots in two
    (1, 4, 2, 128, 128, 17, 17, 40, 16),  # a ring split in two
]


def poisoned_kv(B, KV, S, D, DV, mask, dtype, g):
    k = torch.randn(B, KV, S, D, generator=g)
    k[:, :, ~mask[0]] *= 50.0  # hidden slots: scores far above the visible ones
    v = torch.randn(B, KV, S, DV, generator=g)
    return k.to(dtype), v.to(dtype)


@needs_kernels
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_kernel_matches_float64_attend(case, dtype):
    B, H, KV, D, DV, S, window, steps, chunk = case
    g = torch.Generator().manual_seed(S * 100 + H)
    mask = group_mask(S, window, steps, graph=True)
    assert mask.any() and not mask.all() or steps >= S
    q = torch.randn(B, 1, H, D, generator=g).to(dtype).transpose(1, 2)  # as queries() hands it: a view
    k, v = poisoned_kv(B, KV, S, D, DV, mask, dtype, g)
    scale = D**-0.5
    out = torch.full((B, H, DV), float("nan"), dtype=dtype)
    dev = [t.to(DEVICE) for t in (q, k, v, mask, out)]
    assert da.takes(*dev[:4])
    da.launch(dev[0][:, :, 0], dev[1], dev[2], dev[3].reshape(-1), scale, dev[4], chunk=chunk)
    got = dev[4].double().cpu()
    assert not got.isnan().any(), "an output element was not written"
    exact = attend(q.double(), k.double(), v.double(), mask, scale)[:, :, 0]
    # attend()'s probabilities, for the bound: rounding each to V's dtype moves it by 2^-8 of itself
    rep = H // KV
    s = (q.double().reshape(B, KV, rep, D) @ k.double().transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~mask[0], float("-inf")), -1)
    slack = 2**-8 * (p @ v.double().abs()).reshape(B, H, DV) + torch.finfo(dtype).eps * exact.abs() + 1e-6
    err = (got - exact).abs()
    assert torch.all(err <= slack), f"max error {err.max():.3g} (allowed {slack.min():.3g}..{slack.max():.3g})"


# (heads, kv heads, head width, slots, this step's slot, chunk): the slot in a later step of the
# first split (300 slots in two splits of 256), in a later split (four of 32), in the third step of
# one split (64 slots a step)
NEW_CASES = [(8, 2, 64, 300, 200, None), (4, 1, 256, 100, 70, 32), (6, 3, 128, 200, 150, None)]


@needs_kernels
@pytest.mark.parametrize("case", NEW_CASES, ids=[f"slot{c[4]}" for c in NEW_CASES])
def test_new_step_kernel_against_rotated_float64_attend(case):
    """The step that rotates q and this step's key and writes them into the cache (NEW) wherever
    the slot falls: its output against attend() in float64 over the cache with the rotated key and
    the value put at the slot (q and k rotated in float32 and rounded to bf16, as the kernel keeps
    them), and the slot written with them. The slot holds keys 50x larger before the step, so a
    step that attended over the stale slot gets nearly all its probability from it."""
    H, KV, D, S, slot, chunk = case
    g = torch.Generator().manual_seed(slot)
    dt = torch.bfloat16
    mask = group_mask(S, None, slot + 1, graph=True)
    k, v = poisoned_kv(1, KV, S, D, D, mask, dt, g)
    k[:, :, slot] = (50.0 * torch.randn(KV, D, generator=g)).to(dt)
    q, k_new, v_new = (torch.randn(1, n, D, generator=g).to(dt) for n in (H, KV, KV))
    inv = 1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(S, dtype=torch.float64)[:, None] * inv[None]
    cos = torch.cat([ang.cos(), ang.cos()], -1).float()
    sin = torch.cat([-ang.sin(), ang.sin()], -1).float()  # the first half negated, as ops.rope keeps it

    def rotated(x):
        x = x.float()
        return (x * cos[slot] + torch.roll(x, D // 2, dims=-1) * sin[slot]).to(dt)

    at = torch.tensor([slot])
    out = torch.full((1, H, D), float("nan"), dtype=dt)
    dev = [t.to(DEVICE) for t in (q, k, v, mask, out, k_new, v_new, cos, sin, at)]
    new = da.NewStep(dev[5], dev[6], None, None, 0.0, dev[7], dev[8], dev[9], dev[9])
    da.launch(dev[0], dev[1], dev[2], dev[3].reshape(-1), D**-0.5, dev[4], chunk=chunk, new=new)
    got = dev[4].double().cpu()
    assert not got.isnan().any(), "an output element was not written"
    k2, v2 = k.clone(), v.clone()
    k2[:, :, slot], v2[:, :, slot] = rotated(k_new), v_new
    # one rounding apart at most (Triton's interpreter rounds float32 to bf16 toward zero)
    k_got = dev[1][:, :, slot].float().cpu()
    assert torch.all((k_got - k2[:, :, slot].float()).abs() <= 2**-7 * k_got.abs()), (
        "the key written is not the rotated key"
    )
    assert torch.equal(dev[2][:, :, slot].cpu(), v2[:, :, slot]), "the value written is not this step's"
    k2[:, :, slot] = dev[1][:, :, slot].cpu()  # attended as the kernel rounded it
    qr = rotated(q).double()[:, :, None]
    exact = attend(qr, k2.double(), v2.double(), mask, D**-0.5)[:, :, 0]
    s_ = (qr.reshape(1, KV, H // KV, D) @ k2.double().transpose(-1, -2)) * D**-0.5
    p_ = torch.softmax(s_.masked_fill(~mask[0], float("-inf")), -1)
    slack = 2**-8 * (p_ @ v2.double().abs()).reshape(1, H, D) + torch.finfo(dt).eps * exact.abs() + 1e-6
    err = (got - exact).abs()
    assert torch.all(err <= slack), f"max error {err.max():.3g} (allowed {slack.min():.3g}..{slack.max():.3g})"


@needs_kernels
def test_the_op_gives_the_kernels_result_and_plan_splits_long_caches():
    """The custom op (what attend() calls) returns the [B, H, 1, DV] attend() returns; plan() reads a
    short cache in one split and spreads a long one."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 1, 64, generator=g).to(torch.bfloat16).to(DEVICE)
    k = torch.randn(1, 2, 40, 64, generator=g).to(torch.bfloat16).to(DEVICE)
    v = torch.randn(1, 2, 40, 64, generator=g).to(torch.bfloat16).to(DEVICE)
    mask = group_mask(40, None, 33, graph=True).to(DEVICE)
    got = da.attend(q, k, v, mask, 0.125)
    assert got.shape == (1, 4, 1, 64)
    out = torch.empty(1, 4, 64, dtype=torch.bfloat16, device=DEVICE)
    da.launch(q[:, :, 0], k, v, mask.reshape(-1), 0.125, out)
    assert torch.equal(got[:, :, 0], out)
    assert da.plan(160, 64)[2] == 1 and da.plan(160, 128)[2] == 1
    bs, chunk, splits = da.plan(4096, 128)
    assert chunk % bs == 0 and splits * chunk >= 4096 > (splits - 1) * chunk and splits >= 16
    assert da.plan(1 << 20, 64)[2] <= da.MAX_SPLITS


def test_what_takes_the_kernel(monkeypatch):
    """One query token in one half-precision dtype with a [1, S] bool mask; not two tokens, float32,
    mixed dtypes or a mask of another shape. attend() sends only CUDA tensors (a CPU step keeps its
    own path even under the Triton interpreter), and only where asked (decode_kernel: an Attention
    built with enabled() true, which LLMARCH_NO_DECODE_ATTN sets)."""
    monkeypatch.setattr(da, "interpreting", lambda: True)  # CPU tensors stand in for CUDA in takes()
    bf = torch.bfloat16
    q, k, v = torch.zeros(1, 4, 1, 16, dtype=bf), torch.zeros(1, 2, 9, 16, dtype=bf), torch.zeros(1, 2, 9, 8, dtype=bf)
    mask = torch.ones(1, 9, dtype=torch.bool)
    assert da.takes(q, k, v, mask)
    assert not da.takes(torch.zeros(1, 4, 2, 16, dtype=bf), k, v, torch.ones(2, 9, dtype=torch.bool))
    assert not da.takes(q.float(), k.float(), v.float(), mask)
    assert not da.takes(q, k.half(), v, mask)
    assert not da.takes(q, k, v, torch.ones(9, dtype=torch.bool))
    assert not da.takes(q, k, v, mask.float())
    assert not da.takes(torch.zeros(1, 3, 1, 16, dtype=bf), k, v, mask)  # heads not a multiple of KV heads
    monkeypatch.setattr(da, "attend", lambda *a: pytest.fail("attend() sent CPU tensors to the CUDA op"))
    attend(q.normal_(), k.normal_(), v.normal_(), mask, 0.25, decode_kernel=True)
    monkeypatch.setattr(da, "HAVE_TRITON", True)
    for switch, on in (("1", False), ("0", True), (None, da.DEFAULT_ON)):
        if switch is None:
            monkeypatch.delenv("LLMARCH_NO_DECODE_ATTN", raising=False)
        else:
            monkeypatch.setenv("LLMARCH_NO_DECODE_ATTN", switch)
        assert da.enabled() == on
    monkeypatch.setattr(da, "HAVE_TRITON", False)
    monkeypatch.setenv("LLMARCH_NO_DECODE_ATTN", "0")
    assert not da.enabled()


# ------------------------------------------------------------------------------------ on CUDA

on_cuda = pytest.mark.skipif(
    not DEVICE.startswith("cuda") or not torch.cuda.is_available(), reason="needs LLMARCH_TEST_DEVICE=cuda and a GPU"
)


def _load(path, monkeypatch, use: bool):
    from llmarch.runtime.load import load_runtime

    monkeypatch.setenv("LLMARCH_NO_DECODE_ATTN", "0" if use else "1")
    monkeypatch.setenv("LLMARCH_NO_DECODE_ROPE", "1")  # attend()'s op alone (the new step: below)
    return load_runtime(str(path), DEVICE, "bfloat16")


def _counting(monkeypatch) -> list:
    calls: list = []
    real = da.attend
    monkeypatch.setattr(da, "attend", lambda *a: calls.append(1) or real(*a))
    return calls


@needs_kernels
@on_cuda
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_tiny_model_logits_with_and_without_the_op(family, tiny, monkeypatch):
    """Decode logits (teacher-forced, one token a step) with the op are no further from the float32
    forward than torch's bf16 attention is. gemma3's sliding layers hold a ring of 16 slots, which
    the 20-token sequence wraps."""

    path = tiny(family)
    seq = [2, 17, 5, 99, 42, 7, 64, 3, 11, 23, 31, 47, 53, 61, 71, 83, 97, 101, 19, 29]
    calls = _counting(monkeypatch)
    rt = _load(path, monkeypatch, True)
    assert all(m.decode_kernel for m in rt.model.modules() if isinstance(m, Attention))
    got = logits_by_step(rt, seq, DEVICE, torch.bfloat16)
    assert calls, "the decode steps did not take the op"
    calls.clear()
    base = logits_by_step(_load(path, monkeypatch, False), seq, DEVICE, torch.bfloat16)
    assert not calls
    no_further_from_float32(got, base, path, seq)


@needs_kernels
@on_cuda
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3-new"])
def test_captured_and_compiled_decode_gives_eager_tokens(family, compile, tiny, monkeypatch):
    """qwen3-new: the step whose kernel also norms and rotates q/k and writes the cache."""
    from llmarch.runtime.generate import Generator, Sampling

    name = "decode_attention_new" if family.endswith("-new") else "attend"
    if family.endswith("-new"):
        rt = _load_new(tiny(family.removesuffix("-new")), monkeypatch, True)
    else:
        rt = _load(tiny(family), monkeypatch, True)
    real = getattr(da, name)
    calls: list = []
    monkeypatch.setattr(da, name, lambda *a: calls.append(1) or real(*a))
    prompt = [2, 17, 5, 99]
    eager = Generator(rt, 32, cuda_graph=False).generate(prompt, 24, Sampling()).tokens
    assert calls
    # the counting wrapper only in the eager run: traced, its growing list would fail dynamo's
    # guards at every step, so each step would recompile (and tune kernels inside the capture)
    monkeypatch.setattr(da, name, real)
    graph = Generator(rt, 32, compile=compile).generate(prompt, 24, Sampling()).tokens
    assert graph == eager


# ------------------------------------------------------------------ the step with norm, RoPE and write


def _load_new(path, monkeypatch, new: bool, device=DEVICE):
    from llmarch.runtime.load import load_runtime

    monkeypatch.setattr(da, "CPU_TOO", True)  # on a CPU the interpreter stands in for the GPU
    monkeypatch.setenv("LLMARCH_NO_DECODE_ATTN", "0" if new else "1")
    monkeypatch.setenv("LLMARCH_NO_DECODE_ROPE", "0" if new else "1")
    return load_runtime(str(path), device, "bfloat16")


@needs_kernels
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_new_step_kernel_gives_the_module_path_logits(family, tiny, monkeypatch):
    """A decode step whose q/k norm (qwen3, gemma3: per head, gemma3's (1 + w)), RoPE (llama3
    scaling; gemma3's two bases), cache write (gemma3's sliding layers: a 16-slot ring, wrapped by
    the 20-token sequence) and attention run in the kernel: logits no further from the float32
    forward than the module path's bf16 ones, and the cache it wrote holds what the module path
    writes there."""

    path = tiny(family)
    seq = [2, 17, 5, 99, 42, 7, 64, 3, 11, 23, 31, 47, 53, 61, 71, 83, 97, 101, 19, 29]
    if not da.HAVE_TRITON:
        pytest.skip("triton is not importable")
    calls: list = []
    real = da.decode_attention_new
    monkeypatch.setattr(da, "decode_attention_new", lambda *a: calls.append(1) or real(*a))
    rt = _load_new(path, monkeypatch, True)
    assert any(m.decode_new for m in rt.model.modules() if isinstance(m, Attention))
    got = logits_by_step(rt, seq, DEVICE, torch.bfloat16, steps=2)
    assert calls, "the decode steps did not take the kernel"
    calls.clear()
    base = logits_by_step(_load_new(path, monkeypatch, False), seq, DEVICE, torch.bfloat16, steps=2)
    assert not calls
    no_further_from_float32(got, base, path, seq, 2)
    # the keys / values the kernel wrote: the module path's (rounded there after each of norm and
    # RoPE, once here) within 4 bf16 roundings of their size
    caches = [written_cache(r, seq) for r in (rt, _load_new(path, monkeypatch, False))]
    for name, new, old in zip(caches[0], caches[0].values(), caches[1].values(), strict=True):
        assert (new - old).abs().max() <= 4 * 2**-8 * old.abs().max(), name


def written_cache(rt, seq: list[int]) -> dict:
    """Every layer's K/V after a prefill of seq[:-1] and one decode step of seq[-1] (eager)."""
    from fixtures.parity import kv_cache

    cache = kv_cache(rt.spec, len(seq), DEVICE, torch.bfloat16)
    rt.model.setup(len(seq), DEVICE, torch.bfloat16)
    n = len(seq) - 1
    with torch.inference_mode():
        rt.model(torch.tensor([seq[:n]], device=DEVICE), torch.arange(n, device=DEVICE), cache, limit=n)
        rt.model(torch.tensor([[seq[n]]], device=DEVICE), torch.tensor([n], device=DEVICE), cache, limit=n + 1)
    return {f"{i}.{kv}": getattr(lc, kv).float().cpu() for i, lc in cache.layers.items() for kv in "kv"}

"""gemv_cuda's RMS-norm prologue and residual-add epilogue (a pre-norm layer's one-token CUDA step).

- the kernel with its prologue (x the residual stream, the product's input rms_norm(x) * w) against
  the float64 norm and product, on shapes that are not multiples of the tile (odd K; 1..4 rows;
  with and without bias), with a large eps and a unit-offset norm folded: the bound is checked to
  fail for a kernel that dropped either; the gated epilogue with the prologue too;
- the epilogue (y = r + x @ W^T) against float64, the product's rounding allowed once;
- a tiny llama / qwen3 / gemma3's decode logits with the fusion (LLMARCH_NO_FUSED_NORM=0) no
  further from the float32 forward than without it, and which steps take it: every llama / qwen3
  layer (2 prologues, 2 epilogues) and the head, gemma3's head only (its sandwich norms keep its
  layers on the unfused path); multi-token steps never;
- on LLMARCH_TEST_DEVICE=cuda: the captured and torch.compile'd decode with the fusion gives the
  eager tokens.

The kernel runs on CUDA with LLMARCH_TEST_DEVICE=cuda, else on CPU tensors under the Triton
interpreter (the model tests then swap the Linears for DecodeLinear by hand, as a CUDA load does);
without triton those tests skip.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_gemv_cuda import STREAM  # on a GPU both ways: the Triton kernel's one-row path on sm90+ too
from test_gguf_cuda import (  # sets TRITON_INTERPRET on a CPU
    DEVICE,
    logits_by_step,
    needs_kernels,
    no_further_from_float32,
)
from torch import nn

from llmarch.runtime import gemv_cuda as gv
from llmarch.runtime.ops.norms import RMSNorm

# (N, K): none a multiple of the tile's rows; K 256 (interpreter) and 2048 (CUDA) are one tile step
SHAPES = [(37, 200), (130, 1000), (9, 2048), (257, 72), (40, 256)]


def folded_norm(K: int, eps: float, unit_offset: bool, g: torch.Generator) -> RMSNorm:
    """An RMSNorm with a random weight on DEVICE, loaded as load_weights leaves it (fold_unit_offset)."""
    n = RMSNorm(K, eps, unit_offset)
    w = torch.randn(K, generator=g) * 0.5 + (0.0 if unit_offset else 1.0)
    n.weight = nn.Parameter(w.to(torch.bfloat16).to(DEVICE), requires_grad=False)
    n.fold_unit_offset()
    return n


@needs_kernels
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("ahead", ["1", "0"], ids=["plain", "ahead"])
@pytest.mark.parametrize("stream", STREAM)
def test_norm_prologue_matches_rmsnorm_then_float64_matmul(N, K, M, ahead, stream, monkeypatch):
    """ahead: LLMARCH_NO_GEMV_AHEAD (=0: the weight tiles a step ahead, the first before the prologue);
    stream: LLMARCH_NO_GEMV_STREAM (test_gemv_cuda.STREAM)."""
    monkeypatch.setenv("LLMARCH_NO_GEMV_AHEAD", ahead)
    monkeypatch.setenv("LLMARCH_NO_GEMV_STREAM", stream)
    g = torch.Generator().manual_seed(N * 1000 + K * 10 + M)
    dtype = torch.bfloat16 if M % 2 else torch.float16
    eps, unit_offset = (0.3, M % 2 == 1) if M <= 2 else (1e-6, M == 3)
    x = (torch.randn(M, K, generator=g) * 0.7).to(dtype).to(DEVICE)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype).to(DEVICE)
    b = torch.randn(N, generator=g).to(dtype).to(DEVICE) if M >= 3 else None
    norm = folded_norm(K, eps, unit_offset, g)
    y = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)
    gv.launch(x, w, b, y, norm_w=norm.weight_f32, eps=norm.eps)
    assert not y.isnan().any(), "an output element was not written"
    xd, wd = x.double().cpu(), w.double().cpu()
    bd = b.double().cpu() if b is not None else 0

    def rms(eps: float, nw: torch.Tensor) -> torch.Tensor:
        return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * nw

    def within(xn: torch.Tensor) -> bool:
        """y within float32 accumulation (1e-5 of sum |w| |xn|), the normed row's rounding to x's
        dtype (a whole unit in the last place: the interpreter truncates) and y's own rounding."""
        exact = xn @ wd.T + bd
        ulp = torch.finfo(dtype).eps
        slack = (1e-5 + ulp) * (xn.abs() @ wd.abs().T) + ulp * exact.abs() + 1e-7
        return bool(torch.all((y.double().cpu() - exact).abs() <= slack))

    nw = norm.weight_f32.double().cpu()
    assert within(rms(eps, nw)), "not rms_norm(x) * w (float64) within the bound"
    # and a bound that a kernel dropping eps (where it matters) or the unit offset misses
    if eps > 0.1:
        assert not within(rms(0.0, nw))
    if unit_offset:
        assert not within(rms(eps, nw - 1))


@needs_kernels
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("stream", STREAM)
def test_residual_epilogue_matches_float64(N, K, M, stream, monkeypatch):
    """y = r + (x @ W^T + b): float32 accumulation (1e-5 of sum |w| |x|), the product rounded to
    y's dtype once before the add (as the unfused r + linear(x)), and y's own rounding."""
    monkeypatch.setenv("LLMARCH_NO_GEMV_STREAM", stream)
    g = torch.Generator().manual_seed(N * 7 + K + M)
    dtype = torch.bfloat16 if M == 1 else torch.float16
    x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype).to(DEVICE)
    b = torch.randn(N, generator=g).to(dtype).to(DEVICE) if M == 3 else None
    r = (torch.randn(M, N, generator=g) * 3).to(dtype).to(DEVICE)
    y = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)
    gv.launch(x, w, b, y, residual=r)
    assert not y.isnan().any(), "an output element was not written"
    xd, wd = x.double().cpu(), w.double().cpu()
    p = xd @ wd.T + (b.double().cpu() if b is not None else 0)
    exact = r.double().cpu() + p
    eps = torch.finfo(dtype).eps
    slack = 1e-5 * (xd.abs() @ wd.abs().T) + eps * p.abs() + eps * exact.abs() + 1e-7
    err = (y.double().cpu() - exact).abs()
    assert torch.all(err <= slack), f"max error {err.max():.3g}"


@needs_kernels
@pytest.mark.parametrize("H,K", [(37, 200), (9, 2048), (130, 72), (20, 256)])
@pytest.mark.parametrize("stream", STREAM)
def test_gated_epilogue_with_norm_prologue_matches_float64(H, K, stream, monkeypatch):
    """silu(gate) * up of the normed row against float64, bound as the gated epilogue's own test
    (test_gemv_cuda) with the normed row's rounding added."""
    monkeypatch.setenv("LLMARCH_NO_GEMV_STREAM", stream)
    g = torch.Generator().manual_seed(H * 100 + K)
    x = torch.randn(1, K, generator=g).to(torch.bfloat16).to(DEVICE)
    w = (torch.randn(2 * H, K, generator=g) / K**0.5).to(torch.bfloat16).to(DEVICE)
    norm = folded_norm(K, 0.3, True, g)
    y = torch.full((1, H), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    gv.launch(x, w, None, y, glu=True, norm_w=norm.weight_f32, eps=norm.eps)
    xd, wd = x.double().cpu(), w.double().cpu()
    xd = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 0.3) * norm.weight_f32.double().cpu()
    s, sabs = xd @ wd.T, xd.abs() @ wd.abs().T
    gate, up = s[:, :H], s[:, H:]
    exact = F.silu(gate) * up
    # the normed row's rounding (a unit in the last place) counted with the float32 accumulation's
    rel = 1e-5 + torch.finfo(torch.bfloat16).eps
    slack = rel * (1.1 * up.abs() * sabs[:, :H] + F.silu(gate).abs() * sabs[:, H:])
    slack += torch.finfo(torch.bfloat16).eps * exact.abs() + 1e-7
    err = (y.double().cpu() - exact).abs()
    assert torch.all(err <= slack), f"max error {err.max():.3g}"


def test_prologue_takes_only_a_loaded_folded_rms_norm():
    """And reads a 16-bit weight in its own dtype (the float32 copy's values), a folded (1 + w) in
    float32."""
    x = torch.zeros(1, 8)
    n = RMSNorm(8, 1e-5, unit_offset=True)
    n.weight = nn.Parameter(torch.randn(8).to(torch.bfloat16), requires_grad=False)
    assert gv.prologue(n, x) is None  # not loaded yet
    n.fold_unit_offset()
    w, eps = gv.prologue(n, x)
    assert w.dtype == torch.float32 and eps == 1e-5 and gv.prologue(n, torch.zeros(1, 9)) is None
    plain = RMSNorm(8, 1e-5)
    plain.weight = nn.Parameter(torch.randn(8).to(torch.bfloat16), requires_grad=False)
    plain.fold_unit_offset()
    w16, _ = gv.prologue(plain, x)
    assert w16.dtype == torch.bfloat16 and torch.equal(w16.float(), plain.weight_f32)
    assert gv.prologue(nn.LayerNorm(8), x) is None


# ------------------------------------------------------------------------------- tiny models


def _load(path, monkeypatch, fused: bool):
    from llmarch.runtime.load import load_runtime

    monkeypatch.delenv("LLMARCH_NO_GEMV", raising=False)
    monkeypatch.setenv("LLMARCH_NO_FUSED_NORM", "0" if fused else "1")
    rt = load_runtime(str(path), DEVICE, "bfloat16")
    if DEVICE == "cpu":  # a CUDA load swaps them (use_for_decode); here the interpreter runs the kernels
        monkeypatch.setattr(gv, "available", lambda device: True)
        monkeypatch.setattr(gv, "_takes_weight", lambda w: w is not None and w.dtype in gv.DTYPES and w.dim() == 2)
        gv.use_for_decode(rt.model)
        monkeypatch.undo()
    return rt


# family -> layers taking the fusion (every layer, or none: gemma3's sandwich norms)
FAMILIES = {"llama": True, "qwen3": True, "gemma3": False}


@needs_kernels
@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_model_logits_with_and_without_the_fusion(family, tiny, monkeypatch):
    """Teacher-forced logits (a prefill, then one token a step) with the fusion no further from the
    float32 forward than without it; the decode steps' prologues and epilogues counted."""
    path = tiny(family)
    seq = [2, 17, 5, 99, 42, 7, 64, 3]
    base = logits_by_step(_load(path, monkeypatch, False), seq, DEVICE, torch.bfloat16)
    rt = _load(path, monkeypatch, True)
    layers = len(rt.model.layers)
    assert all(b.fused_norms == FAMILIES[family] for b in rt.model.layers)
    calls = {"norm": 0, "res": 0, "glu_norm": 0}
    real, real_glu = gv.decode_linear, gv.decode_gated_linear

    def counted(x, w, b, norm_w=None, eps=0.0, residual=None):
        calls["norm"] += norm_w is not None
        calls["res"] += residual is not None
        return real(x, w, b, norm_w, eps, residual)

    def counted_glu(x, w, b, norm_w=None, eps=0.0):
        calls["glu_norm"] += norm_w is not None
        return real_glu(x, w, b, norm_w, eps)

    monkeypatch.setattr(gv, "decode_linear", counted)
    monkeypatch.setattr(gv, "decode_gated_linear", counted_glu)
    got = logits_by_step(rt, seq, DEVICE, torch.bfloat16)
    steps = 3  # logits_by_step's one-token steps; its prefills take none
    per_layer = 1 if FAMILIES[family] else 0
    assert calls == {
        "norm": steps * (1 + per_layer * layers),  # the head, q|k|v
        "res": steps * 2 * per_layer * layers,  # o, down
        "glu_norm": steps * per_layer * layers,  # gate|up
    }
    # the prefill rows are the same path's; the decode rows within the unfused bf16 path's error
    assert torch.equal(got[0], base[0])
    no_further_from_float32(got, base, path, seq)


# ------------------------------------------------------------------------------------ on CUDA

on_cuda = pytest.mark.skipif(
    not DEVICE.startswith("cuda") or not torch.cuda.is_available(), reason="needs LLMARCH_TEST_DEVICE=cuda and a GPU"
)


@needs_kernels
@on_cuda
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("compile,launches", [(False, "default"), (True, "default"), (True, "pdl")])
def test_captured_and_compiled_decode_with_the_fusion_gives_eager_tokens(family, compile, launches, tiny, monkeypatch):
    """launches "pdl": the eager tokens from plain launches (LLMARCH_NO_PDL=1, LLMARCH_NO_GEMV_AHEAD=1),
    the captured ones from the GEMVs and the attention op as programmatic dependent launches, the
    GEMVs' weights loaded ahead (both =0; read at launch, so the capture records them)."""
    from llmarch.runtime.generate import Generator, Sampling

    rt = _load(tiny(family), monkeypatch, True)
    assert all(b.fused_norms for b in rt.model.layers)
    prompt = [2, 17, 5, 99]
    if launches == "pdl":
        if torch.cuda.get_device_capability()[0] < 9:
            pytest.skip("programmatic dependent launch needs sm90+")
        monkeypatch.setenv("LLMARCH_NO_PDL", "1")
        monkeypatch.setenv("LLMARCH_NO_GEMV_AHEAD", "1")
    eager = Generator(rt, 32, cuda_graph=False).generate(prompt, 20, Sampling()).tokens
    if launches == "pdl":
        monkeypatch.setenv("LLMARCH_NO_PDL", "0")
        monkeypatch.setenv("LLMARCH_NO_GEMV_AHEAD", "0")
    graph = Generator(rt, 32, compile=compile).generate(prompt, 20, Sampling()).tokens
    assert graph == eager

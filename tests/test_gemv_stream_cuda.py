"""gemv_stream_cuda: the one-row decode GEMV as a CUDA kernel that streams weights through shared memory.

- plan() (any machine): a CTA's shared memory leaves room for a second kernel's CTA on a sm90 SM
  (228 KB a SM, 1 KB reserved a CTA, 227 KB at most a block: the CUDA programming guide's figures
  for compute capability 9.0), and the widths of the decode matrices of the families we run
  (256..16384 values, gate|up up to 8192) are taken;
- the source compiles (NVRTC, sm_90, any machine: the test extra brings nvidia-cuda-nvrtc-cu12) in
  every configuration launch() can ask for;
- on a sm90+ GPU (LLMARCH_TEST_DEVICE=cuda): the kernel takes the product (launch() answers True)
  and matches float64 on shapes that exercise the ring (more stages than it holds, a partial last
  stage, CTAs of no rows where N is below the SM count, widths not a multiple of a thread's step),
  with bias, the gated epilogue, the norm prologue (float32 and 16-bit norm weights) and the residual
  epilogue, bfloat16 and float16;
- a chain of such launches, each reading the one before's output, captured in a CUDA graph and
  replayed on two inputs in turn gives, bit for bit, what it gave eagerly on that input, and that is
  the Triton kernel's chain (LLMARCH_NO_GEMV_STREAM=1) within bf16 rounding: a kernel that read its
  input before the kernel before had written it would read the other input's values.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_gemv_cuda import assert_dependent_chain, on_cuda
from test_gguf_cuda import DEVICE, close

from llmarch.runtime import cuda_rtc
from llmarch.runtime import gemv_cuda as gv
from llmarch.runtime import gemv_stream_cuda as gs

SM_SHARED = 228 * 1024
CTA_RESERVED = 1024
BLOCK_MAX = 227 * 1024


@pytest.mark.parametrize("K", [256, 896, 1000, 2048, 2560, 3072, 4096, 5120, 6144, 8192, 11008, 14336, 16384])
@pytest.mark.parametrize("glu", [False, True])
def test_plan_leaves_room_for_the_next_kernels_cta(K, glu):
    p = gs.plan(K, glu)
    if glu and K > 8192:
        assert p is None or 2 * (p[2] + CTA_RESERVED) <= SM_SHARED
        return
    assert p is not None, f"width {K} (glu={glu}) not taken"
    rows, stages, shared = p
    assert rows in (1, 2, 4, 8) and stages >= 2
    assert shared <= BLOCK_MAX and 2 * (shared + CTA_RESERVED) <= SM_SHARED
    assert shared >= stages * rows * K * 2 * (2 if glu else 1) + K * 2, "the ring and the input row"


def test_plan_refuses_rows_too_wide_for_two_stages():
    assert gs.plan(32768, False) is None and gs.plan(16384, True) is None


sm90 = pytest.mark.skipif(
    not DEVICE.startswith("cuda") or not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="needs LLMARCH_TEST_DEVICE=cuda and a sm90+ GPU",
)


def _rand(shape, g, scale=1.0, dtype=torch.bfloat16):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


# (N, K): N below the SM count, partial last stages, several ring turns (3000 rows of 2048 over
# 132 CTAs: 23 rows, three 8-row stages), K not a multiple of a row's thread step (1000, 72)
SHAPES = [(9, 2048), (37, 1000), (3000, 2048), (2048, 8192), (700, 72), (5000, 4096)]


@sm90
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
def test_kernel_matches_float64(N, K, dtype, bias):
    g = torch.Generator().manual_seed(N + K)
    x, w = _rand((1, K), g, dtype=dtype), _rand((N, K), g, K**-0.5, dtype)
    b = _rand((N,), g, dtype=dtype) if bias else None
    y = torch.full((1, N), float("nan"), dtype=dtype, device=DEVICE)
    assert gs.launch(x, w, b, y, False, None, 0.0, None), "the stream kernel did not take it"
    torch.cuda.synchronize()
    assert not y.isnan().any(), "an output element was not written"
    wd = w.double().cpu()
    if b is None:
        close(y, x, wd)
    else:
        ones = torch.ones(1, 1, dtype=dtype, device=DEVICE)
        close(y, torch.cat([x, ones], 1), torch.cat([wd, b.double().cpu()[:, None]], 1))


@sm90
@pytest.mark.parametrize("H,K", [(9, 2048), (1500, 2048), (300, 8192), (50, 1000), (8192, 2048)])
@pytest.mark.parametrize("norm", ["", "f32", "16"])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
def test_gated_epilogue_and_norm_prologue_match_float64(H, K, norm, bias):
    """silu(gate) * up (+ the biases) of x or of rms_norm(x) * nw, eps 0.3 (large, so dropping it
    would show): float32 accumulation (1e-5 of sum |w| |x|), the normed row's rounding (an ulp) and
    y's own rounding."""
    g = torch.Generator().manual_seed(H * 3 + K)
    x, w = _rand((1, K), g), _rand((2 * H, K), g, K**-0.5)
    b = _rand((2 * H,), g) if bias else None
    nw = (torch.rand(K, generator=g) + 0.5).to(torch.bfloat16)
    nw_arg = None if not norm else (nw.float() if norm == "f32" else nw).to(DEVICE)
    y = torch.full((1, H), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    assert gs.launch(x, w, b, y, True, nw_arg, 0.3, None)
    torch.cuda.synchronize()
    xd, wd = x.double().cpu(), w.double().cpu()
    if norm:
        xd = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 0.3) * nw.double()
    s, sabs = xd @ wd.T, xd.abs() @ wd.abs().T
    if b is not None:
        s = s + b.double().cpu()
    gate, up = s[:, :H], s[:, H:]
    exact = F.silu(gate) * up
    ulp = torch.finfo(torch.bfloat16).eps
    rel = 1e-5 + (ulp if norm else 0)
    dgate, dup = rel * sabs[:, :H], rel * sabs[:, H:]
    slack = (gate.abs() + dgate) * dup + dgate * (up.abs() + dup) + ulp * exact.abs() + 1e-6
    err = (y.double().cpu() - exact).abs()
    assert torch.all(err <= slack), f"max error {err.max():.3g}"
    assert err.max() < 0.1 * exact.abs().max(), "the bound is not loose enough to pass anything"


@sm90
@pytest.mark.parametrize("N,K", [(2048, 2048), (37, 8192), (3000, 1000)])
def test_residual_epilogue_matches_float64(N, K):
    g = torch.Generator().manual_seed(N - K)
    x, w, r = _rand((1, K), g), _rand((N, K), g, K**-0.5), _rand((1, N), g, 3.0)
    y = torch.full((1, N), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    assert gs.launch(x, w, None, y, False, None, 0.0, r)
    torch.cuda.synchronize()
    xd, wd = x.double().cpu(), w.double().cpu()
    p = xd @ wd.T
    exact = r.double().cpu() + p
    eps = torch.finfo(torch.bfloat16).eps
    slack = 1e-5 * (xd.abs() @ wd.abs().T) + eps * p.abs() + eps * exact.abs() + 1e-7
    err = (y.double().cpu() - exact).abs()
    assert torch.all(err <= slack), f"max error {err.max():.3g}"


@sm90
@on_cuda
def test_dependent_chain_captured_gives_eager_values_and_the_triton_kernels(monkeypatch):
    """The stream kernel's chain (LLMARCH_NO_GEMV_STREAM=0) against the Triton kernel's (=1), as
    test_gemv_cuda.assert_dependent_chain checks them: its values, and its captured replays."""
    assert_dependent_chain(monkeypatch, {"LLMARCH_NO_GEMV_STREAM": "1"}, {"LLMARCH_NO_GEMV_STREAM": "0"})
    assert gv.streaming(torch.device(DEVICE))


def _nvrtc():
    for major in ("13", "12"):
        lib = cuda_rtc.open_nvrtc(major)
        if lib is not None:
            return lib
    return None


needs_nvrtc = pytest.mark.skipif(_nvrtc() is None, reason="no NVRTC library (nvidia-cuda-nvrtc) found")


@needs_nvrtc
@pytest.mark.parametrize(
    "K,glu", [(2048, False), (2048, True), (8192, False), (1000, False), (6144, True), (72, False)]
)
@pytest.mark.parametrize("half", [False, True], ids=["bf16", "f16"])
def test_every_epilogue_and_prologue_compiles_for_sm90(K, glu, half):
    """The kernel's source compiles (NVRTC, sm_90, no GPU needed) in each configuration launch() can
    ask for: gated or not, with bias, the norm prologue with float32 / 16-bit weights or none, the
    residual epilogue (a broken macro or type in one of them shows here before any GPU run)."""
    rows, stages, shared = gs.plan(K, glu)
    nvrtc = _nvrtc()
    for norm in ("", "f32", "16"):
        for res, bias in ((False, False), (True, True)):
            if glu and res:
                continue
            source = gs.source(K, rows, stages, half, glu, norm, res, bias)
            assert len(cuda_rtc.compile_cubin(nvrtc, source, "sm_90")) > 1000

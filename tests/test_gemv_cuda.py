"""gemv_cuda: the decode step's float16/bfloat16 matrix-vector products by a Triton kernel.

- the kernel against torch's float64 matmul of the same (upcast) operands, on shapes that are not
  multiples of its tile (N, K odd; 1..4 rows; with and without bias), into an output poisoned with
  NaN first: float32 accumulation leaves errors within 1e-5 of sum |w| |x| per output plus the
  output's own rounding, while a wrong index misses by about the size of y itself;
- the gated epilogue (glu: silu(gate) * up from a [gate; up] matrix) against float64, and which
  GatedMLP steps take it (LLMARCH_NO_FUSED_GLU=0 / =1, silu only, one row);
- what takes the kernel (one row, one half-precision dtype, the device) and what stays F.linear;
- on LLMARCH_TEST_DEVICE=cuda: a tiny llama's logits with the kernel (with and without the gated
  epilogue) against the same model without it (LLMARCH_NO_GEMV=1), against the float32 forward;
  and the captured and torch.compile'd decode (epilogue on) giving the eager tokens.

The kernel runs on CUDA with LLMARCH_TEST_DEVICE=cuda, else on CPU tensors under the Triton
interpreter; without triton (CPU builds of torch) those tests skip.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_gguf_cuda import (  # sets TRITON_INTERPRET on a CPU
    DEVICE,
    close,
    logits_by_step,
    needs_kernels,
    no_further_from_float32,
)

from llmarch.runtime import gemv_cuda as gv

SHAPES = [(37, 200), (130, 1000), (9, 2048), (257, 72)]  # (N, K): none a multiple of the tile's rows
# LLMARCH_NO_GEMV_STREAM for the products below: on a GPU both ways, so that the Triton kernel's one-row
# path stays tested on sm90+, where gemv_cuda.launch sends one row to gemv_stream_cuda by default (the
# interpreter never takes that kernel)
STREAM = ["1", "0"] if DEVICE == "cuda" else ["1"]


@needs_kernels
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("ahead", ["1", "0"], ids=["plain", "ahead"])
@pytest.mark.parametrize("stream", STREAM)
def test_kernel_matches_float64_matmul(N, K, M, ahead, stream, monkeypatch):
    """ahead: LLMARCH_NO_GEMV_AHEAD (=0: weight tiles loaded a step ahead; K 1000 and 2048 take
    several steps of the interpreter's 256-value tile, 200 one masked step); stream: see STREAM."""
    monkeypatch.setenv("LLMARCH_NO_GEMV_AHEAD", ahead)
    monkeypatch.setenv("LLMARCH_NO_GEMV_STREAM", stream)
    g = torch.Generator().manual_seed(N * 1000 + K * 10 + M)
    dtype = torch.bfloat16 if M % 2 else torch.float16
    x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype).to(DEVICE)
    b = torch.randn(N, generator=g).to(dtype).to(DEVICE) if M >= 3 else None
    y = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)
    gv.launch(x, w, b, y)
    assert not y.isnan().any(), "an output element was not written"
    wd = w.double().cpu()
    if b is not None:  # the bias as one more input column of ones
        close(
            y,
            torch.cat([x, torch.ones(M, 1, dtype=dtype, device=DEVICE)], 1),
            torch.cat([wd, b.double().cpu()[:, None]], 1),
        )
    else:
        close(y, x, wd)


@needs_kernels
@pytest.mark.parametrize("H,K", [(37, 200), (9, 2048), (130, 72)])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("ahead", ["1", "0"], ids=["plain", "ahead"])
@pytest.mark.parametrize("stream", STREAM)
def test_gated_epilogue_matches_float64_silu_gate_times_up(H, K, M, ahead, stream, monkeypatch):
    """glu=True: w holds [gate; up] (2H rows), y = silu(x @ gate^T + b_g) * (x @ up^T + b_u) against
    float64, both sums kept in float32 until the activation. Bound: each sum's float32 error (1e-5 of
    sum |w| |x|) carried through silu (slope below 1.1) and the product, plus y's own rounding.
    ahead, stream: as in test_kernel_matches_float64_matmul (the up tile loaded ahead too)."""
    monkeypatch.setenv("LLMARCH_NO_GEMV_AHEAD", ahead)
    monkeypatch.setenv("LLMARCH_NO_GEMV_STREAM", stream)
    g = torch.Generator().manual_seed(H * 100 + K + M)
    dtype = torch.bfloat16 if M == 1 else torch.float16
    x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(2 * H, K, generator=g) / K**0.5).to(dtype).to(DEVICE)
    b = torch.randn(2 * H, generator=g).to(dtype).to(DEVICE) if M == 3 else None
    y = torch.full((M, H), float("nan"), dtype=dtype, device=DEVICE)
    gv.launch(x, w, b, y, glu=True)
    assert not y.isnan().any(), "an output element was not written"
    xd, wd = x.double().cpu(), w.double().cpu()
    s = xd @ wd.T + (b.double().cpu() if b is not None else 0)
    sabs = xd.abs() @ wd.abs().T + (b.double().cpu().abs() if b is not None else 0)
    gate, up = s[:, :H], s[:, H:]
    exact = F.silu(gate) * up
    slack = 1e-5 * (1.1 * up.abs() * sabs[:, :H] + F.silu(gate).abs() * sabs[:, H:])
    slack += torch.finfo(dtype).eps * exact.abs() + 1e-7
    err = (y.double().cpu() - exact).abs()
    assert torch.all(err <= slack), f"max error {err.max():.3g}"


@needs_kernels
def test_gated_mlp_takes_the_epilogue_where_switched_on(monkeypatch):
    """A silu GatedMLP built with LLMARCH_NO_FUSED_GLU=0 whose gate|up is a DecodeLinear sends a
    one-row step to the gated op and gives what its unfused form gives (within bf16 rounding of the
    [gate | up] row); two rows stay unfused; built with =1, or with a GELU gate, it never takes it."""
    from llmarch.runtime.ops.mlp import GatedMLP

    def build(act: str, switch: str) -> GatedMLP:
        monkeypatch.setenv("LLMARCH_NO_FUSED_GLU", switch)
        torch.manual_seed(4)
        mlp = GatedMLP(64, 96, act).to(torch.bfloat16).to(DEVICE)
        mlp.gate_up, mlp.down = gv.DecodeLinear.of(mlp.gate_up), gv.DecodeLinear.of(mlp.down)
        return mlp

    calls = []
    real = gv.decode_gated_linear
    monkeypatch.setattr(gv, "decode_gated_linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 1, 64).to(torch.bfloat16).to(DEVICE)
    unfused = build("silu", "1")(x)
    assert not calls
    mlp = build("silu", "0")
    fused = mlp(x)
    assert len(calls) == 1
    assert (fused.float() - unfused.float()).abs().max() <= 0.02 * unfused.float().abs().max()
    mlp(torch.randn(1, 2, 64).to(torch.bfloat16).to(DEVICE))
    build("gelu_pytorch_tanh", "0")(x)
    assert len(calls) == 1


@needs_kernels
def test_linear_takes_decode_rows_only(monkeypatch):
    """One row in one half-precision dtype goes through the op (any leading shape); 2 rows, float32
    and mixed dtypes are F.linear's, bit for bit."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 40, generator=g).to(torch.bfloat16).to(DEVICE)
    calls = []
    real = gv.decode_linear
    monkeypatch.setattr(gv, "decode_linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 1, 40, generator=g).to(torch.bfloat16).to(DEVICE)
    y = gv.linear(x, w)
    assert calls and y.shape == (1, 1, 24)
    close(y.reshape(1, 24), x.reshape(1, 40), w.double().cpu())
    calls.clear()
    two = torch.randn(2, 40, generator=g).to(torch.bfloat16).to(DEVICE)
    assert torch.equal(gv.linear(two, w), F.linear(two, w))
    x32, w32 = torch.randn(1, 40, generator=g).to(DEVICE), w.float()
    assert torch.equal(gv.linear(x32, w32), F.linear(x32, w32))
    assert not calls
    assert not gv.takes(x32.half(), w)  # mixed dtypes
    gv.linear(x32.half(), w.half())
    assert len(calls) == 1
    assert not gv.takes(torch.zeros(0, 40, dtype=torch.bfloat16), w.cpu())


# ------------------------------------------------------------------------------------ on CUDA

on_cuda = pytest.mark.skipif(
    not DEVICE.startswith("cuda") or not torch.cuda.is_available(), reason="needs LLMARCH_TEST_DEVICE=cuda and a GPU"
)


def _load(path, monkeypatch, use: bool, glu: bool = False):
    from llmarch.runtime.load import load_runtime

    if use:
        monkeypatch.delenv("LLMARCH_NO_GEMV", raising=False)
    else:
        monkeypatch.setenv("LLMARCH_NO_GEMV", "1")
    monkeypatch.setenv("LLMARCH_NO_FUSED_GLU", "0" if glu else "1")
    return load_runtime(str(path), DEVICE, "bfloat16")


@needs_kernels
@on_cuda
@pytest.mark.parametrize("glu", [False, True], ids=["gemv", "gemv+glu"])
def test_tiny_model_logits_with_and_without_the_kernel(glu, tiny, monkeypatch):
    """Decode logits (teacher-forced, one token a step) with the kernel (and with silu(gate) * up as
    the gate|up kernel's epilogue) are no further from the float32 forward than torch's bf16
    matmuls are."""

    path = tiny("llama")
    seq = [2, 17, 5, 99, 42, 7, 64, 3]
    rt = _load(path, monkeypatch, True, glu)
    swapped = [m for m in rt.model.modules() if isinstance(m, gv.DecodeLinear)]
    assert len(swapped) >= 2 * len(rt.model.layers)
    got = logits_by_step(rt, seq, DEVICE, torch.bfloat16)
    base = logits_by_step(_load(path, monkeypatch, False), seq, DEVICE, torch.bfloat16)
    no_further_from_float32(got, base, path, seq)


@needs_kernels
@on_cuda
@pytest.mark.parametrize("compile", [False, True])
def test_captured_and_compiled_decode_gives_eager_tokens(compile, tiny, monkeypatch):
    """With the gated epilogue on too."""
    from llmarch.runtime.generate import Generator, Sampling

    rt = _load(tiny("llama"), monkeypatch, True, glu=True)
    assert any(isinstance(m, gv.DecodeLinear) for m in rt.model.modules())
    prompt = [2, 17, 5, 99]
    eager = Generator(rt, 32, cuda_graph=False).generate(prompt, 20, Sampling()).tokens
    graph = Generator(rt, 32, compile=compile).generate(prompt, 20, Sampling()).tokens
    assert graph == eager


def _chain(x: torch.Tensor, mats: list[tuple]) -> torch.Tensor:
    """A pre-norm layer stack's GEMVs by launch() alone, each reading the one before's output: the
    norm prologue into q|k|v-like and gate|up rows, the residual epilogue out of o- and down-like."""
    h = x
    for nw, w_in, w_out, w_gate_up, w_down in mats:
        a = torch.empty(1, w_in.shape[0], dtype=h.dtype, device=h.device)
        gv.launch(h, w_in, None, a, norm_w=nw, eps=1e-6)
        r = torch.empty_like(h)
        gv.launch(a, w_out, None, r, residual=h)
        u = torch.empty(1, w_gate_up.shape[0] // 2, dtype=h.dtype, device=h.device)
        gv.launch(r, w_gate_up, None, u, glu=True, norm_w=nw, eps=1e-6)
        h = torch.empty_like(r)
        gv.launch(u, w_down, None, h, residual=r)
    return h


def assert_dependent_chain(monkeypatch, reference: dict, subject: dict) -> None:
    """_chain over six layers on two input rows: with the `subject` switches its eager values are the
    `reference` switches' within 2% of the two inputs' distance (the same sums within bf16 rounding;
    a kernel that read its input before the previous kernel had written it would read the other
    input's values, far off), and the chain captured in a CUDA graph and replayed on the inputs in
    turn gives, bit for bit, what it gave eagerly on that input (the same kernels)."""
    g = torch.Generator(device=DEVICE).manual_seed(7)
    d, f, layers = 2048, 4096, 6

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=DEVICE) * scale).to(torch.bfloat16)

    mats = [
        (rand(d, scale=0.2) + 1, rand(3072, d, scale=d**-0.5), rand(d, 3072, scale=3072**-0.5),
         rand(2 * f, d, scale=d**-0.5), rand(d, f, scale=f**-0.5))
        for _ in range(layers)
    ]  # fmt: skip
    inputs = [rand(1, d), rand(1, d)]
    for name, value in reference.items():
        monkeypatch.setenv(name, value)
    plain = [_chain(x, mats).float() for x in inputs]
    gap = (plain[0] - plain[1]).norm()
    for name, value in subject.items():
        monkeypatch.setenv(name, value)
    want = [_chain(x, mats) for x in inputs]  # eager, and the kernels compiled before the capture
    for w, p in zip(want, plain, strict=True):
        assert (w.float() - p).norm() <= 0.02 * gap, f"{subject} off {reference}"
    x = inputs[0].clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _chain(x, mats)
    for i in (0, 1, 0, 1, 1, 0):
        x.copy_(inputs[i])
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want[i]), f"replay on input {i}: max diff {(out.float() - want[i].float()).abs().max()}"


@needs_kernels
@on_cuda
def test_dependent_launches_captured_give_the_plain_launches_values(monkeypatch):
    """The Triton GEMVs launched as programmatic dependent launches with their weights loaded ahead
    (LLMARCH_NO_PDL=0, LLMARCH_NO_GEMV_AHEAD=0) against the plain launches (=1), as
    assert_dependent_chain checks them; the stream kernel, which takes one-row products on sm90+
    by default, switched off (LLMARCH_NO_GEMV_STREAM=1)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm90+")
    monkeypatch.setenv("LLMARCH_NO_GEMV_STREAM", "1")
    assert_dependent_chain(
        monkeypatch,
        {"LLMARCH_NO_PDL": "1", "LLMARCH_NO_GEMV_AHEAD": "1"},
        {"LLMARCH_NO_PDL": "0", "LLMARCH_NO_GEMV_AHEAD": "0"},
    )
    assert gv.pdl(torch.device(DEVICE))

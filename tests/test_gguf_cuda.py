"""gguf_cuda: a GGUF's Q8_0 / Q4_0 / Q4_K / Q5_K / Q6_K matrices kept as their stored blocks on
CUDA, multiplied by Triton kernels that dequantize in registers.

- repack + its torch dequantization (the prefill path and the embedding lookup) equal
  quant.dequantize (itself checked against gguf-py's dequantizer) bit for bit, rows reordered.
- the kernels against quant.dequantize(W) @ x in float64: the only difference left is float32
  accumulation (and the output's rounding), so within 1e-5 of sum |w| |x| per output; a wrong
  layout misses by about the size of y itself. Fused parts of two types, row order, the prefill
  path and the tied-embedding lookup too.
- end to end: tiny GGUFs (gemma3 Q8_0 with a tied Q8_0 embedding; llama with Q4_K / Q5_K / Q6_K /
  Q4_0 matrices written by gguf-py) give the logits of the same file dequantized, step by step.

The kernels run on LLMARCH_TEST_DEVICE=cuda, else on CPU tensors under the Triton interpreter;
without triton (CPU builds of torch) those tests skip and only the repack checks run.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from test_gguf_blocks import random_blocks  # noqa: E402

from fixtures.parity import kv_cache  # noqa: E402
from llmarch.errors import LlmarchError  # noqa: E402
from llmarch.runtime import gguf_cuda as gc  # noqa: E402
from llmarch.runtime.quant import dequantize as ref_dequantize  # noqa: E402

DEVICE = os.environ.get("LLMARCH_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined: jit reads it then
try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False
needs_kernels = pytest.mark.skipif(
    not HAVE_TRITON or (DEVICE.startswith("cuda") and not torch.cuda.is_available()),
    reason="triton is not importable (CPU build of torch; `pip install triton` runs the kernels in its "
    "interpreter), or LLMARCH_TEST_DEVICE=cuda without a GPU",
)


def blocks(qtype: str, rows: int, cols: int, rng, scale: float = 1.0) -> torch.Tensor:
    """Valid stored blocks as one uint8 tensor: gguf-py's quantization or random K-quant bytes
    (test_gguf_blocks.random_blocks), super-block scales multiplied by `scale`."""
    b = random_blocks(qtype, rows, cols, rng)
    if scale != 1.0:
        per, nbytes = gc.BLOCKS[qtype]
        v = b.reshape(rows, cols // per, nbytes)
        offsets = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}.get(qtype, (0,))
        for o in offsets:
            f = v[..., o : o + 2].copy().view(np.float16) * np.float16(scale)
            v[..., o : o + 2] = f.view(np.uint8)
        b = v.reshape(rows, -1)
    return torch.from_numpy(np.ascontiguousarray(b)).reshape(-1)


def reference(raw: torch.Tensor, qtype: str, rows: int, cols: int) -> torch.Tensor:
    return ref_dequantize(raw, qtype, (rows, cols)).double()


def close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rel: float = 1e-5) -> None:
    """|y - x @ w^T| within rel * (|x| @ |w|^T) (float64 reference) plus y's own rounding."""
    xd = x.double().cpu()
    exact = xd @ w.T
    slack = rel * (xd.abs() @ w.abs().T) + torch.finfo(y.dtype).eps * exact.abs() + 1e-7
    err = (y.double().cpu() - exact).abs()
    assert torch.all(err <= slack), f"max error {err.max():.3g}, allowed {slack.min():.3g}..{slack.max():.3g}"


def close_int8(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rel: float = 1e-5) -> None:
    """close() for the integer-dot-product kernels, whose activations are rounded to int8 in blocks
    of 32 (half a step at most: max |x| of the block / 254): each output may also miss by
    sum over blocks of (sum |w| in the block) * max |x| of the block / 254, the bound of that rounding.
    A wrong scale, min or nibble order misses by about |y| itself, far past it."""
    xd = x.double().cpu()
    M, K = xd.shape
    half_step = (xd.abs().view(M, K // 32, 32).amax(-1) / 254).repeat_interleave(32, 1)
    exact = xd @ w.T
    slack = 1.001 * half_step @ w.abs().T + rel * (xd.abs() @ w.abs().T) + torch.finfo(y.dtype).eps * exact.abs() + 1e-7
    err = (y.double().cpu() - exact).abs()
    assert torch.all(err <= slack), f"max error {err.max():.3g}, allowed {slack.min():.3g}..{slack.max():.3g}"
    # and not a bound that anything passes: the rounding error stays well under the outputs
    assert (err.norm() / exact.norm()).item() < 0.05


CASES = [("Q8_0", 96), ("Q8_0", 2048), ("Q4_0", 96), ("Q4_0", 1024)]
CASES += [(t, k) for t in ("Q4_K", "Q5_K", "Q6_K") for k in (256, 768, 2048)]


@pytest.mark.parametrize("qtype,cols", CASES)
def test_repack_dequantizes_as_quant(qtype, cols):
    """The split arrays, rows reordered, dequantize to exactly quant.dequantize's values."""
    rng = np.random.default_rng(hash((qtype, cols)) % 2**32)
    rows = 5
    raw = blocks(qtype, rows, cols, rng)
    order = torch.tensor([3, 0, 4, 1, 2])
    arrays = gc.repack(raw, qtype, rows, cols, "cpu", order)
    assert torch.equal(gc.dequantize(arrays, qtype, cols), ref_dequantize(raw, qtype, (rows, cols))[order])


CASE_ROWS = 37  # not a multiple of any tile: the last program's rows are masked


def matmul_case(qtype: str, cols: int, M: int, *seed) -> tuple[torch.Tensor, gc.CudaStoredLinear, torch.Tensor]:
    """(M activation rows, a stored-block Linear of CASE_ROWS random rows, its dequantized weight)."""
    rng = np.random.default_rng(hash((qtype, cols, M, *seed)) % 2**32)
    raw = blocks(qtype, CASE_ROWS, cols, rng)
    x = torch.from_numpy(rng.standard_normal((M, cols)).astype(np.float32))
    x[0, :32] *= 50  # blocks of very different sizes
    lin = gc.CudaStoredLinear([(qtype, gc.repack(raw, qtype, CASE_ROWS, cols, DEVICE))], cols)
    return x, lin, reference(raw, qtype, CASE_ROWS, cols)


@needs_kernels
@pytest.mark.parametrize("qtype,cols", CASES)
@pytest.mark.parametrize("M", [1, 3])
def test_kernel_matches_dequantized_matmul(qtype, cols, M, monkeypatch):
    """Every way the K-quant kernels make floats of the quants (gguf_cuda.ways: the int-to-float
    conversion, the exponent-bits trick, on CUDA also its inline-PTX form), each forced in turn;
    then, on CUDA, whatever the autotuner picks."""
    x, lin, w = matmul_case(qtype, cols, M)
    for way in gc.ways(qtype, torch.device(DEVICE).type):
        monkeypatch.setattr(gc, "FORCE_WAY", way)
        y = lin(x.to(DEVICE))
        assert y.dtype == torch.float32 and y.shape == (M, CASE_ROWS)
        close(y, x, w)
    monkeypatch.setattr(gc, "FORCE_WAY", None)
    monkeypatch.setattr(gc, "DP4A", "float")
    close(lin(x.to(DEVICE)), x, w)


DP4A_CASES = [(t, k) for t in gc.DP4A_TYPES for k in (256, 2048)]


@needs_kernels
@pytest.mark.parametrize("qtype,cols", DP4A_CASES)
@pytest.mark.parametrize("M", [1, 3])
def test_dp4a_kernel_matches_dequantized_matmul(qtype, cols, M, monkeypatch):
    """The integer-dot-product kernels (the default for Q4_K / Q6_K decode rows) against the float64
    product, within the int8 rounding of the activations; on CUDA both the PTX dp4a and the
    plain-integer form, then whatever the autotuner picks."""
    x, lin, w = matmul_case(qtype, cols, M, "dp4a")
    x[-1, 32:64] = 0  # an all-zero block: scale 0, no division by it
    for asm in (True, False) if DEVICE.startswith("cuda") else (None,):
        for mode in ("dp4a", "pre"):  # quantized inside every program, or once by quantize_rows
            monkeypatch.setattr(gc, "DP4A_ASM", asm)
            monkeypatch.setattr(gc, "DP4A", mode)
            y = lin(x.to(DEVICE))
            assert y.dtype == torch.float32 and y.shape == (M, CASE_ROWS)
            close_int8(y, x, w)
    monkeypatch.setattr(gc, "DP4A_ASM", None)
    monkeypatch.setattr(gc, "DP4A", "dp4a")
    xb = x.bfloat16()  # bf16 in and out, what CUDA decode runs
    close_int8(lin(xb.to(DEVICE)), xb, w)


@needs_kernels
@pytest.mark.parametrize("qtype,cols", CASES)
def test_dequantize_kernel_matches_repack_dequantize(qtype, cols):
    """The prefill path's Triton dequantization gives dequantize()'s float32 values (up to one
    rounding where the GPU fuses a multiply-add), every element written (the output is poisoned)."""
    rng = np.random.default_rng(hash((qtype, cols, "dq")) % 2**32)
    rows = 37
    arrays = gc.repack(blocks(qtype, rows, cols, rng), qtype, rows, cols, DEVICE)
    out = torch.full((rows, cols), float("nan"), device=DEVICE)
    gc.dequantize_into(qtype, arrays, out)
    ref = gc.dequantize(arrays, qtype, cols).cpu()
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-7, atol=2e-7 * ref.abs().max().item())


def test_decode_path_selection(monkeypatch):
    """LLMARCH_GGUF_CUDA_DP4A picks the K-quant decode path; other types and forced float ways
    always take the float kernels; auto takes the integer dot products under the interpreter."""
    for value, mode in (("0", "float"), ("float", "float"), ("PRE", "pre"), ("dp4a", "dp4a"), ("1", "auto")):
        monkeypatch.setenv("LLMARCH_GGUF_CUDA_DP4A", value)
        assert gc.mode_from_env() == mode
    monkeypatch.setenv("LLMARCH_GGUF_CUDA_DP4A", "fast")
    with pytest.raises(LlmarchError, match="LLMARCH_GGUF_CUDA_DP4A='fast'"):
        gc.mode_from_env()
    monkeypatch.delenv("LLMARCH_GGUF_CUDA_DP4A")
    assert gc.mode_from_env() == "pre"  # the fastest end to end on the H200 (gguf_cuda.DP4A)
    x = torch.zeros(1, 256)
    arrays = (torch.zeros(3, 128, dtype=torch.uint8),)
    y = torch.zeros(1, 3)
    for mode in ("float", "dp4a", "pre"):
        monkeypatch.setattr(gc, "DP4A", mode)
        assert [gc.decode_path(q, x, arrays, y, 0) for q in ("Q8_0", "Q4_0", "Q5_K", "Q4_K", "Q6_K")] == [
            "float"
        ] * 3 + [mode] * 2
        monkeypatch.setattr(gc, "FORCE_WAY", 1)
        assert gc.decode_path("Q4_K", x, arrays, y, 0) == "float"
        monkeypatch.setattr(gc, "FORCE_WAY", None)
    monkeypatch.setattr(gc, "DP4A", "auto")
    assert gc.decode_path("Q6_K", x, arrays, y, 0) == "dp4a"  # a CPU tensor: nothing to time


@needs_kernels
@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="auto times the paths on a GPU")
def test_auto_path_is_timed_once_per_shape_and_correct(monkeypatch):
    rng = np.random.default_rng(11)
    rows, cols = 3000, 2048
    raw = blocks("Q6_K", rows, cols, rng)
    w = reference(raw, "Q6_K", rows, cols)
    lin = gc.CudaStoredLinear([("Q6_K", gc.repack(raw, "Q6_K", rows, cols, DEVICE))], cols)
    monkeypatch.setattr(gc, "DP4A", "auto")
    monkeypatch.setattr(gc, "CHOSEN", {})
    x = torch.from_numpy(rng.standard_normal((1, cols)).astype(np.float32)).bfloat16()
    y = lin(x.to(DEVICE))
    (key, path), *more = gc.CHOSEN.items()
    assert not more and key[:4] == ("Q6_K", rows, cols, 1) and path in ("float", "dp4a", "pre")
    (close if path == "float" else close_int8)(y, x, w)
    assert torch.equal(lin(x.to(DEVICE)), y) and len(gc.CHOSEN) == 1


@needs_kernels
def test_bf16_activations_and_the_prefill_path(monkeypatch):
    """bf16 in, bf16 out (what CUDA decode runs); more than GEMV_ROWS rows take the dequantized
    slabs (made small here so that one matrix spans several)."""
    rng = np.random.default_rng(7)
    rows, cols = 40, 512
    raw = blocks("Q4_K", rows, cols, rng)
    w = reference(raw, "Q4_K", rows, cols)
    lin = gc.CudaStoredLinear([("Q4_K", gc.repack(raw, "Q4_K", rows, cols, DEVICE))], cols)
    x = torch.from_numpy(rng.standard_normal((2, cols)).astype(np.float32)).bfloat16()
    flat = list(lin.arrays(0))
    for mode, check in (("float", close), ("pre", close_int8)):  # decode rows: the float kernel, dp4a
        monkeypatch.setattr(gc, "DP4A", mode)
        check(lin(x.to(DEVICE)), x, w)
        # a float32 input with a bf16 output (what a compiled decode step passes)
        y = gc.stored_linear(x.float().to(DEVICE), flat, lin.codes, lin.rows, torch.bfloat16)
        assert y.dtype == torch.bfloat16
        check(y, x, w)
    x = torch.from_numpy(rng.standard_normal((gc.GEMV_ROWS + 3, cols)).astype(np.float32))
    old = gc.SLAB
    gc.SLAB = 16 * cols
    try:
        close(lin(x.to(DEVICE)), x, w)
    finally:
        gc.SLAB = old


@needs_kernels
def test_fused_parts_row_order_and_embedding_rows(monkeypatch):
    """A Linear stacked from a Q4_K and a Q6_K tensor, the first one's rows reordered (as the
    loader reorders llama's Q rows); its row() lookup gives the same weights."""
    rng = np.random.default_rng(2)
    a, b = blocks("Q4_K", 8, 256, rng), blocks("Q6_K", 4, 256, rng)
    order = torch.from_numpy(rng.permutation(8))
    lin = gc.CudaStoredLinear(
        [("Q4_K", gc.repack(a, "Q4_K", 8, 256, DEVICE, order)), ("Q6_K", gc.repack(b, "Q6_K", 4, 256, DEVICE))], 256
    )
    w = torch.cat([reference(a, "Q4_K", 8, 256)[order], reference(b, "Q6_K", 4, 256)])
    x = torch.from_numpy(rng.standard_normal((1, 256)).astype(np.float32))
    for mode, check in (("float", close), ("dp4a", close_int8)):
        monkeypatch.setattr(gc, "DP4A", mode)
        check(lin(x.to(DEVICE)), x, w)
    rows = lin.row(torch.tensor([[3, 0]], device=DEVICE), torch.float32)
    assert rows.shape == (1, 2, 256) and torch.equal(rows[0].cpu().double(), w[[3, 0]])


# ------------------------------------------------------------------------------------ end to end


def kquant_llama(tmp_path, tiny_gguf):
    """The tiny llama GGUF (Q8_0, llama.cpp's Q/K row order) with its matrices replaced by blocks
    of other types, written by gguf-py: Q4_K q/k/gate/up/output (as Q4_K_M), Q6_K v and down
    (Q4_K_M's more-bits tensors), Q5_K and Q4_0 out-projections."""
    from fixtures.gguf_edit import rewrite_gguf

    src = tiny_gguf("llama", hidden=256, ffn=256, heads=4, kv_heads=2, n_vocab=128)
    r = gguf.GGUFReader(src)
    kinds = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "ffn_gate": "Q4_K", "ffn_up": "Q4_K"}
    kinds.update({"ffn_down": "Q6_K", "output": "Q4_K"})
    rng = np.random.default_rng(5)
    add = {}
    for t in r.tensors:
        stem = t.name.split(".")[-2]
        kind = kinds.get(stem) or ({"attn_output": "Q5_K" if ".0." in t.name else "Q4_0"}.get(stem))
        if kind is None:
            continue
        rows, cols = (int(n) for n in reversed(t.shape))
        b = blocks(kind, rows, cols, rng, scale=0.02 if kind != "Q4_0" else 1.0)
        add[t.name] = (b.numpy().reshape(rows, -1), Q[kind])
    return rewrite_gguf(src, tmp_path / "kquant.gguf", drop=list(add), add=add)


def logits_by_step(rt, seq: list[int], device, dtype, steps: int = 3) -> torch.Tensor:
    """Logits of the last `steps` positions: from the whole sequence at once (the prefill path), and
    from a prefill of the rest then one token at a time (decode: the kernels), stacked [2, steps, vocab]."""
    out = []
    for split in (len(seq), len(seq) - steps):
        cache = kv_cache(rt.spec, len(seq), device, dtype)
        rt.model.setup(len(seq), device, dtype)
        with torch.inference_mode():
            ids = torch.tensor([seq[:split]], device=device)
            first = rt.model(ids, torch.arange(split, device=device), cache, limit=split, last_only=False)[0]
            rows = [first[i] for i in range(len(seq) - steps, split)]
            for p in range(split, len(seq)):
                ids = torch.tensor([[seq[p]]], device=device)
                rows.append(rt.model(ids, torch.tensor([p], device=device), cache, limit=p + 1, last_only=False)[0, -1])
        out.append(torch.stack(rows))
    return torch.stack(out).float().cpu()


def no_further_from_float32(got: torch.Tensor, base: torch.Tensor, path, seq: list[int], steps: int = 3) -> None:
    """A kernel path's logits_by_step (got) within 1.5x the bf16 torch path's (base) distance from the
    float32 CPU forward of the same checkpoint, plus 1e-3 of its largest logit."""
    from llmarch.runtime.load import load_runtime

    ref32 = logits_by_step(load_runtime(str(path), "cpu", "float32"), seq, "cpu", torch.float32, steps)
    top = ref32.abs().max().item()
    err, err_base = (got - ref32).abs().max().item(), (base - ref32).abs().max().item()
    assert err <= 1.5 * err_base + 1e-3 * top, (err, err_base)


@needs_kernels
@pytest.mark.parametrize("which", ["gemma3-q8_0-tied", "llama-kquants"])
def test_gguf_runs_from_stored_blocks_like_dequantized(which, tmp_path, tiny_gguf, monkeypatch):
    from llmarch.runtime.load import load_runtime

    path = tiny_gguf("gemma3", head_dim=64) if which.startswith("gemma3") else kquant_llama(tmp_path, tiny_gguf)
    seq = [2, 17, 5, 99, 42, 7, 64, 3]
    if DEVICE == "cpu":  # the Triton interpreter stands in for the GPU: the loader takes gguf_cuda on the CPU
        from llmarch.runtime import gguf_matmul

        monkeypatch.setattr(gguf_matmul, "from_source", lambda s, n, shape: gc.from_source(s, n, shape, "cpu"))
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    rt = load_runtime(str(path), DEVICE, str(dtype).replace("torch.", ""), stored_blocks=True)
    stored = [m for m in rt.model.modules() if isinstance(m, gc.CudaStoredLinear)]
    expected = {"gemma3-q8_0-tied": {"Q8_0"}, "llama-kquants": {"Q4_K", "Q5_K", "Q6_K", "Q4_0"}}[which]
    assert {t for m in stored for t in m.types} == expected
    # neighbouring tensors of one type (gemma3's q/k/v and gate/up) share one part: one kernel launch
    assert all(a != b for m in stored for a, b in zip(m.part_types, m.part_types[1:]))
    assert any(len(m.types) == 3 and len(m.part_types) == (1 if which.startswith("gemma3") else 2) for m in stored)
    if which.startswith("gemma3"):
        assert rt.model.tied_quant in stored  # the head and the embedding lookup read the same blocks
    monkeypatch.setattr(gc, "DP4A", "float")
    got_float = logits_by_step(rt, seq, DEVICE, dtype)  # every decode row by the float kernels
    got = got_float
    if DEVICE != "cpu":  # K-quant decode rows by auto's pick (the interpreter's time goes to the kernel tests)
        monkeypatch.setattr(gc, "DP4A", "auto")
        got = logits_by_step(rt, seq, DEVICE, dtype)
    monkeypatch.undo()
    ref32 = logits_by_step(load_runtime(str(path), "cpu", "float32", stored_blocks=False), seq, "cpu", torch.float32)
    top = ref32.abs().max().item()
    if DEVICE == "cpu":  # float32 throughout: only the order of the sums differs
        assert (got_float - ref32).abs().max().item() <= 1e-4 * top
    # in bf16: no further from the float32 logits than the dequantized-bf16 path itself (1.5x); with
    # the integer dot products' int8 activations 3x: they round to half a step of max |x| / 127 per
    # block of 32, several times bf16's half an ulp (here 0.020 against the bf16 path's 0.014 on the
    # CPU). A wrong matrix or row misses by about the logits' own size (2.4 here).
    deq = logits_by_step(load_runtime(str(path), DEVICE, "bfloat16", stored_blocks=False), seq, DEVICE, torch.bfloat16)
    base = (deq - ref32).abs().max().item()
    for y, factor in ((got, 3.0 if which == "llama-kquants" else 1.5), (got_float, 1.5)):
        err = (y - ref32).abs().max().item()
        assert err <= factor * base + 1e-3 * top, (err, base, top)
    assert gc.summary(rt.model).startswith(f"{len(stored)} matrices run from the GGUF's stored blocks on CUDA")


@needs_kernels
@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="CUDA graphs and torch.compile need LLMARCH_TEST_DEVICE=cuda")
# compiled with the int8 activations of auto's paths left out: inductor's fused norms may round an
# input differently, which int8 rounding can turn into another greedy token
@pytest.mark.parametrize("compile,mode", [(False, "float"), (True, "float"), (False, "auto"), (False, "pre")])
def test_captured_and_compiled_decode_gives_eager_tokens(compile, mode, tmp_path, tiny_gguf, monkeypatch):
    """The Generator's captured decode step (and torch.compile'd one) runs the custom op: greedy
    tokens equal the eager step's (with auto, the paths are timed in the warm-up, not the capture)."""
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime

    monkeypatch.setattr(gc, "DP4A", mode)
    monkeypatch.setattr(gc, "CHOSEN", {})
    path = kquant_llama(tmp_path, tiny_gguf)
    rt = load_runtime(str(path), DEVICE, "bfloat16", stored_blocks=True)
    prompt = [2, 17, 5, 99]
    eager = Generator(rt, 32, cuda_graph=False).generate(prompt, 20, Sampling()).tokens
    graph = Generator(rt, 32, compile=compile).generate(prompt, 20, Sampling()).tokens
    assert graph == eager


@needs_kernels
@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="CUDA graphs need LLMARCH_TEST_DEVICE=cuda")
@pytest.mark.parametrize("which", ["gemma3-q8_0-tied", "llama-kquants"])
def test_prefill_graph_with_stored_blocks(which, tmp_path, tiny_gguf):
    """A prompt length's second prefill is captured in a CUDA graph (prefill_graph) and its third
    replayed from it: with stored-block matrices (the prefill's dequantized slabs, the decode
    kernels of the last row's head) the tokens are the eager step's."""
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime

    path = tiny_gguf("gemma3", head_dim=64) if which.startswith("gemma3") else kquant_llama(tmp_path, tiny_gguf)
    rt = load_runtime(str(path), DEVICE, "bfloat16", stored_blocks=True)
    prompt = [2, 17, 5, 99, 42, 7]
    eager = Generator(rt, 40, cuda_graph=False).generate(prompt, 8, Sampling()).tokens
    g = Generator(rt, 40)
    runs = [g.generate(prompt, 8, Sampling()).tokens for _ in range(3)]
    assert g.prefill_graphs is not None and g.prefill_graphs.failed is None, g.prefill_graphs.failed
    assert runs == [eager] * 3

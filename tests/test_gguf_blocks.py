"""gguf_matmul: x @ W^T straight from a GGUF's stored blocks, against gguf-py's numpy dequantizer
(the reference for every ggml block layout) in float64.

Two checks per case. Exact: the kernel quantizes activations to int8 blocks of 32 (scale =
amax / 127, round to nearest even), so with the same rounding done here in numpy float32 the only
difference left is float32 accumulation: within 1e-4 of sum |w| |x_q| per output. Against float x:
rounding moves each activation by at most half its block's step (d / 2), so |y - x @ W^T| is at
most sum_i |w_i| d_i / 2 (plus the same float32 slack); a wrong block layout misses both by
about the size of y itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import quants  # noqa: E402

from llmarch.errors import LlmarchError  # noqa: E402
from llmarch.runtime import gguf_matmul as gm  # noqa: E402
from llmarch.runtime.quant import BLOCKS  # noqa: E402

pytestmark = pytest.mark.skipif(not gm.available(), reason="no AVX2 or no C compiler: the kernel is not built")

LEGACY = ("Q8_0", "Q4_0", "Q5_0")  # gguf-py quantizes these; K-quants get random block bytes


def random_blocks(qtype: str, rows: int, cols: int, rng) -> np.ndarray:
    """[rows, row bytes] of valid blocks: quantized normals, or random bytes with small finite f16 scales."""
    if qtype in LEGACY:
        return quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), gguf.GGMLQuantizationType[qtype])
    per, nbytes = BLOCKS[qtype]
    b = rng.integers(0, 256, (rows, cols // per, nbytes), dtype=np.uint8)

    def f16(lo, hi):
        v = rng.uniform(lo, hi, (rows, cols // per)).astype(np.float16)
        return np.frombuffer(v.tobytes(), np.uint8).reshape(rows, cols // per, 2)

    if qtype in ("Q4_K", "Q5_K"):
        b[..., 0:2], b[..., 2:4] = f16(1e-3, 1e-2), f16(1e-3, 1e-2)  # d, dmin
    else:  # Q6_K: d last
        b[..., 208:210] = f16(1e-3, 1e-2)
    return b.reshape(rows, -1)


def act_quant(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's activation rounding in float32: int8 values and the step of each value's block."""
    T, K = x.shape
    b = x.reshape(T, K // 32, 32).astype(np.float32)
    d = (np.abs(b).max(-1, keepdims=True) / np.float32(127)).astype(np.float32)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    q = np.rint(b * inv)
    return q.reshape(T, K), np.broadcast_to(d, b.shape).reshape(T, K)


def check(y: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
    q, d = act_quant(x)
    xq = q.astype(np.float64) * d
    aw = np.abs(w)
    exact = xq @ w.T
    slack = 1e-4 * (np.abs(xq) @ aw.T) + 1e-6
    assert np.all(np.abs(y - exact) <= slack), np.abs(y - exact).max()
    bound = (d.astype(np.float64) / 2) @ aw.T + slack
    assert np.all(np.abs(y - x.astype(np.float64) @ w.T) <= bound)


CASES = [(t, k) for t in LEGACY for k in (96, 512)] + [(t, k) for t in ("Q4_K", "Q5_K", "Q6_K") for k in (256, 768)]


@pytest.mark.parametrize("qtype,cols", CASES)
@pytest.mark.parametrize("T", [1, 3, 8])
def test_stored_blocks_match_gguf_dequantizer(qtype, cols, T):
    rng = np.random.default_rng(hash((qtype, cols, T)) % 2**32)
    rows = 37  # odd: OpenMP's split over rows ends mid-way
    raw = random_blocks(qtype, rows, cols, rng)
    w = quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).astype(np.float64)
    x = rng.standard_normal((T, cols)).astype(np.float32)
    x[0, :32] *= 50  # one block with a large scale, one all zero
    x[-1, 32:64] = 0
    y = gm.matmul_blocks(torch.from_numpy(x), torch.from_numpy(raw).reshape(-1), qtype, rows)
    check(y.double().numpy(), x, w)


@pytest.mark.parametrize(
    "qtype,cols",
    [("Q8_0", 96), ("Q8_0", 288), ("Q4_0", 288), ("Q5_0", 96), ("Q5_0", 288)]
    + [(t, k) for t in ("Q4_K", "Q5_K", "Q6_K") for k in (256, 768)],
)
def test_token_tiles_bit_equal_to_single_rows(qtype, cols):
    """A prefill of T rows (tiles of 8, then 4 tokens sharing each unpacked weight block, the rest one by one)
    gives exactly the bits of T one-row calls (the decode step's path): every row's float operations
    run in the same order. Widths of 3 and 9 legacy blocks end in a partial group of 8 (masked scales);
    T 4 is a whole tile, 9 and 13 take an 8-token tile (13 a 4-token one too), and each leaves 0-3 rows
    to the single-row code."""
    rng = np.random.default_rng([cols, *qtype.encode()])  # not hash(): str hashes change per process
    rows = 37
    raw = torch.from_numpy(random_blocks(qtype, rows, cols, rng)).reshape(-1)
    for T in (2, 3, 4, 5, 7, 9, 13):
        x = torch.from_numpy(rng.standard_normal((T, cols)).astype(np.float32))
        x[0, :32] *= 50
        x[-1, 32:64] = 0
        whole = gm.matmul_blocks(x, raw, qtype, rows)
        single = torch.cat([gm.matmul_blocks(x[t : t + 1], raw, qtype, rows) for t in range(T)])
        assert torch.equal(whole, single), (T, (whole - single).abs().max().item())


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_0", "Q4_K", "Q5_K"])
def test_largest_codes_at_full_activations(qtype):
    """Every weight code at its largest (15 or 31) against activations all +127 / all -127: the
    kernel's int16 partial sums for these unsigned codes are then at their bound (4 x 2 x 31 x 127),
    and the result still matches the dequantized weights (a wrapped sum would be off by 65536 steps)."""
    rng = np.random.default_rng(5)
    cols, rows = 512, 9
    b = random_blocks(qtype, rows, cols, rng).reshape(rows, cols // BLOCKS[qtype][0], -1)
    start = {"Q4_0": 2, "Q5_0": 2, "Q4_K": 16, "Q5_K": 16}[qtype]  # 5th bits (Q5) and nibbles follow
    b[..., start:] = 0xFF
    raw = b.reshape(rows, -1)
    w = quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).astype(np.float64)
    x = np.ones((2, cols), np.float32)
    x[1] = -1
    y = gm.matmul_blocks(torch.from_numpy(x), torch.from_numpy(raw).reshape(-1), qtype, rows)
    check(y.double().numpy(), x, w)


def test_long_prefill_takes_the_float_path():
    """More than MAX_ROWS rows: dequantized slabs and a float GEMM, so float32 exact."""
    rng = np.random.default_rng(1)
    raw = random_blocks("Q4_K", 20, 512, rng)
    w = quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K).astype(np.float64)
    x = rng.standard_normal((gm.MAX_ROWS + 1, 512)).astype(np.float32)
    y = gm.matmul_blocks(torch.from_numpy(x), torch.from_numpy(raw).reshape(-1), "Q4_K", 20).double().numpy()
    assert np.allclose(y, x.astype(np.float64) @ w.T, rtol=1e-4, atol=1e-4)


def test_fused_parts_and_row_order():
    """A Linear stacked from tensors of two types (q at Q4_K, k at Q6_K), its outputs reordered."""
    rng = np.random.default_rng(2)
    a, b = random_blocks("Q4_K", 8, 256, rng), random_blocks("Q6_K", 4, 256, rng)
    order = torch.from_numpy(rng.permutation(12))
    lin = gm.StoredBlockLinear(
        [(torch.from_numpy(a).reshape(-1), "Q4_K", 8), (torch.from_numpy(b).reshape(-1), "Q6_K", 4)], 256, order
    )
    w = np.concatenate([quants.dequantize(r, gguf.GGMLQuantizationType[t]) for r, t in ((a, "Q4_K"), (b, "Q6_K"))])
    x = rng.standard_normal((2, 256)).astype(np.float32)
    y = lin(torch.from_numpy(x)).double().numpy()
    check(y, x, w.astype(np.float64)[order.numpy()])
    rows = lin.row(torch.tensor([[3, 0]]), torch.float32)
    assert rows.shape == (1, 2, 256) and np.allclose(rows[0].numpy(), w[[3, 0]], rtol=1e-6)


def test_embedded_model_tensors():
    """Rows of the embedded Gemma 3 270M's own tensors, one of each stored type it has."""
    from llmarch.default_model import open_default_model
    from llmarch.runtime.weights import _raw

    ckpt = open_default_model()
    seen = {}
    for t in ckpt.tensors.values():
        if t.dtype in gm.KERNEL_TYPES and len(t.shape) == 2:
            seen.setdefault(t.dtype, t)
    assert {"Q8_0", "Q5_0", "Q4_K", "Q6_K"} <= set(seen)
    rng = np.random.default_rng(3)
    for qtype, t in seen.items():
        rows = 64
        raw = _raw(t)[: rows * (t.nbytes // t.shape[0])]
        w = quants.dequantize(raw.numpy().reshape(rows, -1), gguf.GGMLQuantizationType[qtype]).astype(np.float64)
        x = rng.standard_normal((2, t.shape[1])).astype(np.float32)
        check(gm.matmul_blocks(torch.from_numpy(x), raw, qtype, rows).double().numpy(), x, w)


@pytest.mark.parametrize(
    "qtype,rows,cols,nbytes,message",
    [
        ("Q4_K", 2, 320, 2 * 144, "whole number of 256-value blocks"),
        ("Q8_0", 2, 64, 2 * 2 * 34 - 1, "expected 136"),
        ("Q2_K", 2, 256, 2 * 84, "no stored-block kernel"),
        ("F16", 2, 64, 256, "no stored-block kernel"),
    ],
)
def test_odd_shapes_refused(qtype, rows, cols, nbytes, message):
    raw = torch.zeros(nbytes, dtype=torch.uint8)
    with pytest.raises(LlmarchError, match=message) as e:
        gm.matmul_blocks(torch.zeros(1, cols), raw, qtype, rows)
    assert "\n" not in str(e.value)


def test_embedded_model_runs_from_stored_blocks(monkeypatch):
    """--keep-quantized on the embedded GGUF: every matrix from the file's blocks, and decode steps
    (the kernel, int8 activations) pick the same next tokens as the float32 forward over the same
    sequence (with MAX_ROWS 0 the prefill takes the dequantize + float GEMM path: the float32
    weights) at least 90% of the time; the logits differ by activation rounding only."""
    from llmarch.runtime.kv_cache import KVCache
    from llmarch.runtime.load import load_runtime

    rt = load_runtime(None, "cpu", None, 8, stored_blocks=True)
    note = "73 matrices run from the GGUF's stored blocks"  # 18 layers x (qkv, o, gate_up, down) + the tied table
    assert any(n.startswith(note) for n in rt.notes), rt.notes
    spec, a = rt.spec, rt.spec.attention
    ids = torch.tensor([[2, 4093, 3324, 496, 990, 236764, 993, 691, 496, 1944, 5148, 528, 506, 6029, 529, 35194]])
    n = ids.shape[1]

    def cache():
        c = KVCache(spec.schedule, n, a.kv_heads, a.head_dim, a.v_head_dim or a.head_dim, rt.dtype, rt.device)
        rt.model.setup(n, rt.device, rt.dtype)
        return c

    with torch.no_grad():
        c = cache()
        with monkeypatch.context() as m:
            m.setattr(gm, "MAX_ROWS", 0)  # every call dequantizes: float32 weights, float activations
            ref = rt.model(ids, torch.arange(n), c, limit=n, last_only=False)[0]
        c = cache()
        steps = torch.cat([rt.model(ids[:, i : i + 1], torch.tensor([i]), c, limit=i + 1)[0] for i in range(n)])
    agree = (steps.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.85, agree  # 15 of 16 measured
    rel = ((steps - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    assert rel < 0.1, rel  # 0.046 measured: Gemma's activation outliers coarsen their 32-value blocks


@pytest.mark.parametrize(
    "options,note",
    [
        ({}, "9 matrices run from the GGUF's stored blocks (15 Q8_0 tensors), the rest in float"),
        (
            {"keep_quantized": True},
            "9 matrices run from the GGUF's stored blocks (15 Q8_0 tensors), the rest in int8 blocks",
        ),
        ({"dtype": "float32"}, None),  # float weights where asked
        ({"keep_quantized": True, "quant_bits": 8}, None),  # llmarch's own blocks where asked
    ],
)
def test_gguf_on_cpu_runs_from_stored_blocks_by_default(tiny_gguf, capsys, options, note):
    """`llmarch run` of a Q8_0 GGUF (tiny llama: 2 layers x qkv, o, gate_up, down + the head) on the
    CPU: stored blocks unless --dtype or --quant-bits asks otherwise; the run report says which."""
    from llmarch.runtime.run import RunOptions, run

    doc = run(RunOptions(source=str(tiny_gguf("llama")), prompt_ids="1,2", max_tokens=2, device="cpu", **options))
    assert len(doc["tokens"]) == 2
    err = capsys.readouterr().err
    lines = [l.removeprefix("llmarch: ") for l in err.splitlines() if "stored blocks" in l]
    assert lines == ([note] if note else []), err

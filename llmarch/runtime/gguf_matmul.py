"""Matmuls straight from a GGUF's stored blocks on the CPU: y = x @ W^T with W the file's own
Q8_0 / Q4_0 / Q5_0 / Q4_K / Q5_K / Q6_K bytes, memory-mapped, never copied or requantized.

Why: requantizing every matrix into llmarch's own blocks (quant.BlockQuantLinear) costs load time
and a second copy of the weights, and the file's blocks are already what a memory-bound decode
wants to stream. Activations are quantized to int8 in blocks of 32 (one float scale each, as
llama.cpp's Q8_0 activations), so every block's dot product is AVX2 integer SIMD (maddubs/madd);
K-quant sub-block scales and mins are applied per 32 (Q6_K: per 16) values in float. Layouts follow
ggml-quants.c (block_q8_0, block_q4_K, ...; the same ones quant.dequantize reads in torch).

Without AVX2 or a compiler, and for prefills of more than MAX_ROWS tokens, slabs of rows are
dequantized with quant.dequantize for a float GEMM instead (same weights, float activations).
"""

from __future__ import annotations

import ctypes
from collections import Counter
from functools import lru_cache

import torch
from torch import nn

from llmarch.errors import LlmarchError
from llmarch.runtime.cbuild import build_avx2
from llmarch.runtime.kernel_sources import GGUF_MATMUL as SOURCE
from llmarch.runtime.kernel_sources import KERNEL_TYPES
from llmarch.runtime.quant import BLOCKS, dequantize
from llmarch.runtime.run_checks import kernel_threads

# activation rows per kernel call: each row costs the kernel about one decode step's compute, while
# dequantizing the matrices for a float GEMM is a large fixed cost (embedded model, one thread: 128
# rows 1.3 s in the kernel vs 3.4 s dequantized, 256 rows 4.8 s vs 2.7 s), so longer prefills take
# the dequantize + GEMM path
MAX_ROWS = 128
ACT_BLOCK = 32  # activation values per int8 scale


@lru_cache(maxsize=1)
def _lib():
    lib = build_avx2("gguf_matmul", SOURCE, ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"])
    if lib is None:
        return None  # dequantize + float GEMM instead: same weights, slower
    p, i, lo = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    lib.quantize_act.argtypes = [p, p, p, p, lo]
    lib.quantize_act.restype = None
    lib.gguf_linear.argtypes = [p, i, i, i, p, p, p, p, p, i]
    lib.gguf_linear.restype = i
    return lib


def available() -> bool:
    return _lib() is not None


def check_shape(qtype: str, raw: torch.Tensor, rows: int, cols: int, what: str = "weight") -> None:
    """Refuse what the kernel cannot read: an unknown type, a width not a whole number of blocks,
    bytes that are not rows x blocks."""
    if qtype not in KERNEL_TYPES:
        raise LlmarchError(f"{what}: type {qtype} has no stored-block kernel (known: {', '.join(KERNEL_TYPES)})")
    per, nbytes = BLOCKS[qtype]
    if cols <= 0 or rows <= 0 or cols % per:
        raise LlmarchError(f"{what}: {qtype} needs a width that is a whole number of {per}-value blocks, got {cols}")
    if raw.dtype != torch.uint8 or raw.numel() != rows * (cols // per) * nbytes:
        raise LlmarchError(
            f"{what}: {raw.numel()} bytes of {qtype} for a [{rows}, {cols}] matrix, expected {rows * (cols // per) * nbytes}"
        )


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, K] float32 (K a multiple of 32) -> int8 blocks [T, K], scales [T, K/32], scale * block sum."""
    T, K = x.shape
    xq = torch.empty(T, K, dtype=torch.int8)
    xd = torch.empty(T, K // ACT_BLOCK, dtype=torch.float32)
    xs = torch.empty_like(xd)
    _lib().quantize_act(x.data_ptr(), xq.data_ptr(), xd.data_ptr(), xs.data_ptr(), T * K // ACT_BLOCK)
    return xq, xd, xs


def matmul_blocks(x: torch.Tensor, raw: torch.Tensor, qtype: str, rows: int) -> torch.Tensor:
    """x [T, K] float -> x @ W^T [T, rows] float32, with W `rows` rows of stored `qtype` blocks."""
    if x.ndim != 2:
        raise LlmarchError(f"activations must be [rows, width], got shape {tuple(x.shape)}")
    T, K = x.shape
    check_shape(qtype, raw, rows, K)
    x = x.float().contiguous()
    y = torch.empty(T, rows, dtype=torch.float32)
    parts = [(raw, qtype, rows)]
    _run(x, parts, y) if (available() and T <= MAX_ROWS) else _dequant_gemm(x, parts, y)
    return y


class _Parts:
    """The C arrays gguf_linear reads for one stack of parts, built once (the tensors stay referenced
    by the owner of `parts`)."""

    def __init__(self, parts):
        n = len(parts)
        self.n = n
        self.types = (ctypes.c_int * n)(*[KERNEL_TYPES[q] for _, q, _ in parts])
        self.ws = (ctypes.c_void_p * n)(*[raw.data_ptr() for raw, _, _ in parts])
        self.row_bytes = (ctypes.c_long * n)(*[raw.numel() // rows for raw, _, rows in parts])
        self.rows = (ctypes.c_int * n)(*[rows for _, _, rows in parts])
        self.args = [ctypes.addressof(a) for a in (self.types, self.ws, self.row_bytes, self.rows)]


def _run(x: torch.Tensor, parts, y: torch.Tensor, args: _Parts | None = None) -> None:
    """y [T, sum rows] = x [T, K] (float32, contiguous) @ the parts' rows^T, in one C call."""
    args = args or _Parts(parts)
    T, K = x.shape
    rc = _lib().gguf_linear(x.data_ptr(), T, K, args.n, *args.args, y.data_ptr(), kernel_threads())
    if rc:
        raise LlmarchError(f"stored-block kernel failed ({'out of memory' if rc == 2 else 'unknown type'})")


def _dequant_gemm(x: torch.Tensor, parts, y: torch.Tensor) -> None:
    """Slabs of rows dequantized (~16 MB of float at a time) and multiplied in float."""
    K = x.shape[1]
    col = 0
    for raw, qtype, rows in parts:
        row_bytes = raw.numel() // rows
        step = max(1, (1 << 22) // K)
        for i in range(0, rows, step):
            j = min(i + step, rows)
            w = dequantize(raw[i * row_bytes : j * row_bytes], qtype, (j - i, K))
            y[:, col + i : col + j] = x.to(w.dtype) @ w.t()
        col += rows


class StoredBlockLinear(nn.Module):
    """A bias-free Linear whose weight is one or more GGUF tensors' stored blocks stacked by rows
    (fused q/k/v, gate/up), read in place from the file's memory map.

    parts: (raw uint8 bytes, GGML type name, rows) each, top to bottom; out_order: an index over
    the output columns when the stored rows are in another order (llama-family Q/K RoPE rows)."""

    def __init__(self, parts, in_features: int, out_order: torch.Tensor | None = None):
        super().__init__()
        for raw, qtype, rows in parts:
            check_shape(qtype, raw, rows, in_features)
        self.parts = parts
        self.in_features = in_features
        self.out_features = sum(rows for _, _, rows in parts)
        self.out_order = out_order
        self.types = [qtype for _, qtype, _ in parts]
        self.args = _Parts(parts) if available() else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        y = torch.empty(x2.shape[0], self.out_features, dtype=torch.float32)
        if self.args is not None and x2.shape[0] <= MAX_ROWS:
            _run(x2, self.parts, y, self.args)
        else:
            _dequant_gemm(x2, self.parts, y)
        if self.out_order is not None:
            y = y[:, self.out_order]
        if x.dtype != torch.float32:
            y = y.to(x.dtype)
        return y.view(*shape[:-1], self.out_features)

    def row(self, ids: torch.Tensor, dtype) -> torch.Tensor:
        """Embedding lookup from the same blocks (a tied embedding shares them with the head)."""
        raw, qtype, rows = self.parts[0]
        row_bytes = raw.numel() // rows
        flat = ids.reshape(-1).tolist()
        out = torch.stack(
            [dequantize(raw[i * row_bytes : (i + 1) * row_bytes], qtype, (self.in_features,)) for i in flat]
        )
        return out.to(dtype).reshape(*ids.shape, self.in_features)


def from_source(source, names: list[str], shape: tuple[int, int]) -> StoredBlockLinear | None:
    """The stored-block form of the Linear made of the GGUF tensors `names` (stacked by rows), or
    None where it cannot be one: not a GGUF read tensor by tensor, a type the kernel lacks, a
    width not a whole number of blocks, rows the loader would change other than by reordering."""
    from llmarch.runtime.weights import GGUFSource

    if not isinstance(source, GGUFSource) or not available():
        return None
    found = stored_parts(source, names, shape, KERNEL_TYPES)
    if found is None:
        return None
    parts, perm = found
    identity = torch.equal(perm, torch.arange(shape[0]))
    return StoredBlockLinear(parts, shape[1], None if identity else perm)


def stored_parts(source, names: list[str], shape: tuple[int, int], types) -> tuple[list, torch.Tensor] | None:
    """The GGUF tensors `names` (stacked by rows) as (raw bytes, type, rows) parts and the order of
    the stacked rows the loader would give, or None where a type is not in `types`, a width is not
    a whole number of blocks, or the loader would change rows other than by reordering them."""
    from llmarch.runtime.weights import _raw

    infos = [source.info(n) for n in names]
    if any(t is None or t.dtype not in types or len(t.shape) != 2 for t in infos):
        return None
    out_f, in_f = shape
    if any(t.shape[1] != in_f or in_f % BLOCKS[t.dtype][0] for t in infos) or sum(t.shape[0] for t in infos) != out_f:
        return None
    parts = [(_raw(t), t.dtype, t.shape[0]) for t in infos]
    # the loader's fix() may permute rows (Q/K RoPE order): find the order by passing row numbers through it
    order, col = [], 0
    for n, t in zip(names, infos):
        probe = torch.arange(t.shape[0], dtype=torch.float64)[:, None] + col
        fixed = source.fix(n, probe)
        if fixed.shape != probe.shape or not torch.equal(fixed.sort(0).values, probe):
            return None  # changes values, not just the order
        order.append(fixed[:, 0].long())
        col += t.shape[0]
    return parts, torch.cat(order)


def summary(model: nn.Module, quant_bits: int | None = None, kind: type | None = None, where: str = "") -> str | None:
    """The run report's line: how many matrices ran from the file's blocks (modules of `kind`, with
    a `types` list; StoredBlockLinear by default), of which types, and what the others are
    (requantized to int`quant_bits`, or float)."""
    kind = kind or StoredBlockLinear
    types = Counter(t for m in model.modules() if isinstance(m, kind) for t in m.types)
    if not types:
        return None
    from llmarch.runtime.plan_build import stored_blocks_note

    mats = sum(1 for m in model.modules() if isinstance(m, kind))
    return stored_blocks_note(types, mats, quant_bits, where)

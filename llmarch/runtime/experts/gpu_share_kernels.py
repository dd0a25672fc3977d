"""Triton kernels of the GPU's share of host experts (gpu_share.py): the selected experts' stored
bytes gathered from host memory, which the GPU reads over PCIe at their host addresses, and
matrix-vector products over the gathered bytes in their stored layouts (dequantized in registers,
float32 accumulation). The gather moves whole 4-byte words: PCIe carries wide requests best, and
the products then read device memory, where byte loads cost little."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gather_experts(src, ids, dst, n_words, BLOCK: tl.constexpr):
    """dst[s] = src[ids[s]] for each slot s, n_words words an expert."""
    s = tl.program_id(0)
    b = tl.program_id(1)
    e = tl.load(ids + s).to(tl.int64)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    m = offs < n_words
    tl.store(dst + s.to(tl.int64) * n_words + offs, tl.load(src + e * n_words + offs, mask=m), mask=m)


@triton.jit
def gemv_ggml32(
    W,
    X,
    Y,
    rows,
    n_blocks,
    w_slot,
    x_slot,
    y_slot,
    BYTES: tl.constexpr,
    NIBBLES: tl.constexpr,
    BR: tl.constexpr,
    BB: tl.constexpr,
):
    """Y[s, r] = sum_k W[s, r, k] X[s, k] over ggml blocks of 32 weights led by an fp16 scale: Q4_0
    (NIBBLES: 16 bytes, weight j in the low nibble of byte j, j + 16 in the high one, stored + 8)
    or Q8_0 (32 int8). W: bytes [slots, rows, n_blocks * BYTES]."""
    s = tl.program_id(0)
    r = tl.program_id(1) * BR + tl.arange(0, BR)
    rm = r < rows
    acc = tl.zeros([BR], dtype=tl.float32)
    row_bytes = n_blocks * BYTES
    for b0 in range(0, n_blocks, BB):
        b = b0 + tl.arange(0, BB)
        m2 = rm[:, None] & (b < n_blocks)[None, :]
        base = W + s.to(tl.int64) * w_slot + r[:, None].to(tl.int64) * row_bytes + b[None, :] * BYTES
        d_lo = tl.load(base, mask=m2, other=0).to(tl.uint16)
        d_hi = tl.load(base + 1, mask=m2, other=0).to(tl.uint16)
        d = (d_lo | (d_hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        xb = X + s * x_slot + b[:, None] * 32
        if NIBBLES:
            j = tl.arange(0, 16)
            q = tl.load(base[:, :, None] + 2 + j[None, None, :], mask=m2[:, :, None], other=0)
            lo = (q & 15).to(tl.float32) - 8.0
            hi = (q >> 4).to(tl.float32) - 8.0
            xm = (b < n_blocks)[:, None]
            xl = tl.load(xb + j[None, :], mask=xm, other=0.0)
            xh = tl.load(xb + 16 + j[None, :], mask=xm, other=0.0)
            part = tl.sum(lo * xl[None, :, :] + hi * xh[None, :, :], axis=2)
        else:
            j = tl.arange(0, 32)
            q = tl.load(base[:, :, None] + 2 + j[None, None, :], mask=m2[:, :, None], other=0)
            qv = q.to(tl.int8, bitcast=True).to(tl.float32)
            xv = tl.load(xb + j[None, :], mask=(b < n_blocks)[:, None], other=0.0)
            part = tl.sum(qv * xv[None, :, :], axis=2)
        acc += tl.sum(d * part, axis=1)
    tl.store(Y + s * y_slot + r, acc, mask=rm)


@triton.jit
def gemv_grouped64(
    Q,
    S,
    X,
    Y,
    rows,
    n_groups,
    q_slot,
    s_slot,
    x_slot,
    y_slot,
    INT4: tl.constexpr,
    BR: tl.constexpr,
    BG: tl.constexpr,
):
    """Y[s, r] = sum_k W[s, r, k] X[s, k] in moe_cpu.c's own layouts, groups of 64 inputs: int4 (32
    bytes a group, byte j holding element j low and j + 32 high; S fp16 (scale, min) pairs:
    w = q * scale + min) or int8 (S one fp16 scale a group: w = q * scale)."""
    s = tl.program_id(0)
    r = tl.program_id(1) * BR + tl.arange(0, BR)
    rm = r < rows
    acc = tl.zeros([BR], dtype=tl.float32)
    for g0 in range(0, n_groups, BG):
        g = g0 + tl.arange(0, BG)
        gm = g < n_groups
        m2 = rm[:, None] & gm[None, :]
        xb = X + s * x_slot + g[:, None] * 64
        if INT4:
            j = tl.arange(0, 32)
            qb = Q + s.to(tl.int64) * q_slot + r[:, None, None].to(tl.int64) * (n_groups * 32)
            q = tl.load(qb + g[None, :, None] * 32 + j[None, None, :], mask=m2[:, :, None], other=0)
            xl = tl.load(xb + j[None, :], mask=gm[:, None], other=0.0)
            xh = tl.load(xb + 32 + j[None, :], mask=gm[:, None], other=0.0)
            dot = tl.sum((q & 15).to(tl.float32) * xl[None, :, :] + (q >> 4).to(tl.float32) * xh[None, :, :], axis=2)
            sb = S + s.to(tl.int64) * s_slot + r[:, None].to(tl.int64) * (2 * n_groups) + g[None, :] * 2
            scale = tl.load(sb, mask=m2, other=0.0).to(tl.float32)
            low = tl.load(sb + 1, mask=m2, other=0.0).to(tl.float32)
            acc += tl.sum(scale * dot + low * tl.sum(xl + xh, axis=1)[None, :], axis=1)
        else:
            j = tl.arange(0, 64)
            qb = Q + s.to(tl.int64) * q_slot + r[:, None, None].to(tl.int64) * (n_groups * 64)
            q = tl.load(qb + g[None, :, None] * 64 + j[None, None, :], mask=m2[:, :, None], other=0)
            xv = tl.load(xb + j[None, :], mask=gm[:, None], other=0.0)
            dot = tl.sum(q.to(tl.float32) * xv[None, :, :], axis=2)
            sb = S + s.to(tl.int64) * s_slot + r[:, None].to(tl.int64) * n_groups + g[None, :]
            acc += tl.sum(tl.load(sb, mask=m2, other=0.0).to(tl.float32) * dot, axis=1)
    tl.store(Y + s * y_slot + r, acc, mask=rm)

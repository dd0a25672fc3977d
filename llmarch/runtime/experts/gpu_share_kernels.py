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
def fp4_e2m1(code):
    """An fp4 e2m1 code (0..15) as float32: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives."""
    mag = code & 7
    e = (mag >> 1).to(tl.float32)
    m = (mag & 1).to(tl.float32)
    v = tl.where(e == 0.0, 0.5 * m, tl.exp2(e - 1.0) * (1.0 + 0.5 * m))
    return tl.where(code >= 8, -v, v)


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
    MODE: tl.constexpr,
    BR: tl.constexpr,
    BB: tl.constexpr,
):
    """Y[s, r] = sum_k W[s, r, k] X[s, k] over ggml blocks of 32 weights. MODE 0, Q4_0: an fp16
    scale, 16 bytes, weight j in the low nibble of byte j and j + 16 in the high one, stored + 8;
    1, Q8_0: an fp16 scale, 32 int8; 2, MXFP4: an e8m0 scale byte, then fp4 e2m1 codes laid out as
    Q4_0's. W: bytes [slots, rows, n_blocks * BYTES]."""
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
        xb = X + s * x_slot + b[:, None] * 32
        if MODE == 2:
            d = tl.exp2(d_lo.to(tl.float32) - 127.0)
            off = 1
        else:
            d_hi = tl.load(base + 1, mask=m2, other=0).to(tl.uint16)
            d = (d_lo | (d_hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
            off = 2
        if MODE != 1:
            j = tl.arange(0, 16)
            q = tl.load(base[:, :, None] + off + j[None, None, :], mask=m2[:, :, None], other=0)
            if MODE == 2:
                lo = fp4_e2m1(q & 15)
                hi = fp4_e2m1(q >> 4)
            else:
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


@triton.jit
def gemv_mxfp4(Q, S, X, Y, rows, n_blocks, q_slot, s_slot, x_slot, y_slot, BR: tl.constexpr, BB: tl.constexpr):
    """Y[s, r] = sum_k W[s, r, k] X[s, k] for OpenAI's MXFP4 as shipped (gpt-oss): Q [slots, rows,
    n_blocks * 16] fp4 e2m1 codes, byte j holding element 2j low and 2j + 1 high; S [slots, rows,
    n_blocks] e8m0 scales."""
    s = tl.program_id(0)
    r = tl.program_id(1) * BR + tl.arange(0, BR)
    rm = r < rows
    acc = tl.zeros([BR], dtype=tl.float32)
    j = tl.arange(0, 16)
    for b0 in range(0, n_blocks, BB):
        b = b0 + tl.arange(0, BB)
        bm = b < n_blocks
        m2 = rm[:, None] & bm[None, :]
        e = tl.load(S + s.to(tl.int64) * s_slot + r[:, None].to(tl.int64) * n_blocks + b[None, :], mask=m2, other=0)
        qb = Q + s.to(tl.int64) * q_slot + r[:, None, None].to(tl.int64) * (n_blocks * 16)
        q = tl.load(qb + b[None, :, None] * 16 + j[None, None, :], mask=m2[:, :, None], other=0)
        xb = X + s * x_slot + b[:, None] * 32 + 2 * j[None, :]
        xe = tl.load(xb, mask=bm[:, None], other=0.0)
        xo = tl.load(xb + 1, mask=bm[:, None], other=0.0)
        part = tl.sum(fp4_e2m1(q & 15) * xe[None, :, :] + fp4_e2m1(q >> 4) * xo[None, :, :], axis=2)
        acc += tl.sum(tl.exp2(e.to(tl.float32) - 127.0) * part, axis=1)
    tl.store(Y + s * y_slot + r, acc, mask=rm)


@triton.jit
def gemv_kquant(
    W, X, Y, rows, n_super, w_slot, x_slot, y_slot, KIND: tl.constexpr, BYTES: tl.constexpr, BR: tl.constexpr
):
    """Y[s, r] = sum_k W[s, r, k] X[s, k] over ggml K-quant super-blocks of 256 weights, each weight's
    bytes found from its index e in the super-block (as quant.py's torch dequantizer lays them out).
    KIND 0, Q4_K, and 1, Q5_K: fp16 d and dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks
    of 32 (get_scale_min_k4), Q5_K's 32 bytes of fifth bits, 128 bytes of nibbles (chunk i of 64
    weights: byte 32i + l, low nibble for sub-block 2i, high for 2i + 1); w = d sc q - dmin m.
    KIND 2, Q6_K: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales (one per 16
    weights), fp16 d at 208; w = d sc (q - 32)."""
    s = tl.program_id(0)
    r = tl.program_id(1) * BR + tl.arange(0, BR)
    rm = r < rows
    acc = tl.zeros([BR], dtype=tl.float32)
    e = tl.arange(0, 256)
    row_bytes = n_super * BYTES
    for sb in range(0, n_super):
        base = W + s.to(tl.int64) * w_slot + r[:, None].to(tl.int64) * row_bytes + sb * BYTES  # [BR, 1]
        m1 = rm[:, None]
        x = tl.load(X + s * x_slot + sb * 256 + e)
        if KIND == 2:
            half, quarter, l = e // 128, (e % 128) // 32, e % 32
            ql = tl.load(base + 64 * half + 32 * (quarter % 2) + l, mask=m1, other=0)
            nib = tl.where(quarter >= 2, ql >> 4, ql & 15)
            qh = tl.load(base + 128 + 32 * half + l, mask=m1, other=0)
            q = (nib | (((qh >> (2 * quarter)) & 3) << 4)).to(tl.float32) - 32.0
            sc = tl.load(base + 192 + e // 16, mask=m1, other=0).to(tl.int8, bitcast=True).to(tl.float32)
            d_lo = tl.load(base + 208, mask=m1, other=0).to(tl.uint16)
            d_hi = tl.load(base + 209, mask=m1, other=0).to(tl.uint16)
            d = (d_lo | (d_hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
            w = d * sc * q
        else:
            i, hi, l = e // 64, (e % 64) // 32, e % 32
            j = 2 * i + hi
            qs0 = 16 if KIND == 0 else 48
            qb = tl.load(base + qs0 + 32 * i + l, mask=m1, other=0)
            q = tl.where(hi == 1, qb >> 4, qb & 15)
            if KIND == 1:
                q = q | (((tl.load(base + 16 + l, mask=m1, other=0) >> j) & 1) << 4)
            lo4 = j < 4
            b_j = tl.load(base + 4 + j, mask=m1, other=0)
            b_j4 = tl.load(base + 8 + j, mask=m1, other=0)
            b_jm4 = tl.load(base + 4 + tl.where(lo4, j, j - 4), mask=m1, other=0)
            sc = tl.where(lo4, b_j & 63, (b_j4 & 15) | ((b_jm4 >> 6) << 4)).to(tl.float32)
            mn = tl.where(lo4, b_j4 & 63, (b_j4 >> 4) | ((b_j >> 6) << 4)).to(tl.float32)
            d_lo = tl.load(base, mask=m1, other=0).to(tl.uint16)
            d_hi = tl.load(base + 1, mask=m1, other=0).to(tl.uint16)
            m_lo = tl.load(base + 2, mask=m1, other=0).to(tl.uint16)
            m_hi = tl.load(base + 3, mask=m1, other=0).to(tl.uint16)
            d = (d_lo | (d_hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
            dmin = (m_lo | (m_hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
            w = d * sc * q.to(tl.float32) - dmin * mn
        acc += tl.sum(w * x[None, :], axis=1)
    tl.store(Y + s * y_slot + r, acc, mask=rm)

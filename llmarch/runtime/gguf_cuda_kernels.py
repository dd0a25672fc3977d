"""Triton kernels for gguf_cuda: y[m, col0 + n] = W[n, :] . x[m, :] with W one GGUF tensor's
blocks in gguf_cuda's repacked arrays, dequantized in registers, float32 accumulation.

Grid: (tiles of BN weight rows, activation rows). Each program streams its rows' bytes once per
activation row, WIDTH values at a time (a whole number of the type's blocks, at most 1024), as a 3D
tile [rows, blocks or chunks, 32 values] so that every per-block scale is one broadcast. Layouts:
ggml-quants.c's block_q8_0 / q4_0 / q4_K / q5_K / q6_K, split by gguf_cuda.repack into one array
per field (the same bits; Q4_K/Q5_K's 6-bit scales and mins one byte each).

Imported only where triton is (CUDA builds of torch bring it); TRITON_INTERPRET=1 runs these on
CPU tensors for the tests.
"""

import triton
import triton.language as tl


@triton.jit
def _rows(N, BN: tl.constexpr):
    """This program's weight rows, and the same clamped in range (int64) for loads without masks."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    return rows, tl.minimum(rows, N - 1).to(tl.int64)


@triton.jit
def gemv_q8_0(x, qs, d, y, N, K: tl.constexpr, ldy, col0, BN: tl.constexpr, G: tl.constexpr):
    """qs int8 [N, K]; d fp16 [N, K/32]. G blocks of 32 per step."""
    rows, r = _rows(N, BN)
    xrow = x + tl.program_id(1) * K
    g = tl.arange(0, G)
    v = g[:, None] * 32 + tl.arange(0, 32)[None, :]
    acc = tl.zeros([BN], dtype=tl.float32)
    for k0 in range(0, K, G * 32):
        q = tl.load(qs + r[:, None, None] * K + (k0 + v)[None, :, :]).to(tl.float32)
        xv = tl.load(xrow + k0 + v).to(tl.float32)
        s = tl.load(d + r[:, None] * (K // 32) + (k0 // 32 + g)[None, :]).to(tl.float32)
        acc += tl.sum(tl.sum(q * xv[None, :, :], axis=2) * s, axis=1)
    tl.store(y + tl.program_id(1) * ldy + col0 + rows, acc.to(y.dtype.element_ty), mask=rows < N)


@triton.jit
def gemv_q4_0(x, qs, d, y, N, K: tl.constexpr, ldy, col0, BN: tl.constexpr, G: tl.constexpr):
    """qs uint8 [N, K/2] (per block of 32: low nibbles values 0..15, high nibbles 16..31, each
    stored + 8); d fp16 [N, K/32]."""
    rows, r = _rows(N, BN)
    xrow = x + tl.program_id(1) * K
    g = tl.arange(0, G)
    j = tl.arange(0, 16)
    boff = g[:, None] * 16 + j[None, :]
    vlo = g[:, None] * 32 + j[None, :]
    acc = tl.zeros([BN], dtype=tl.float32)
    for k0 in range(0, K, G * 32):
        b = tl.load(qs + r[:, None, None] * (K // 2) + (k0 // 2 + boff)[None, :, :])
        xlo = tl.load(xrow + k0 + vlo).to(tl.float32)
        xhi = tl.load(xrow + k0 + vlo + 16).to(tl.float32)
        dot = tl.sum((b & 15).to(tl.float32) * xlo[None, :, :], axis=2)
        dot += tl.sum((b >> 4).to(tl.float32) * xhi[None, :, :], axis=2)
        dot -= 8.0 * (tl.sum(xlo, axis=1) + tl.sum(xhi, axis=1))[None, :]
        s = tl.load(d + r[:, None] * (K // 32) + (k0 // 32 + g)[None, :]).to(tl.float32)
        acc += tl.sum(dot * s, axis=1)
    tl.store(y + tl.program_id(1) * ldy + col0 + rows, acc.to(y.dtype.element_ty), mask=rows < N)


@triton.jit
def gemv_k45(
    x, qs, qh, sc, mn, dm, y, N, K: tl.constexpr, ldy, col0, BN: tl.constexpr, CC: tl.constexpr, HBITS: tl.constexpr
):
    """Q4_K (HBITS 0) and Q5_K (HBITS 1). qs uint8 [N, K/2]: per 64 values (a chunk) 32 bytes, low
    nibbles the first 32 values (sub-block 2c), high nibbles the next 32 (2c+1); qh uint8 [N, K/8]
    (Q5_K): per 256 values 32 bytes, bit j of byte i the 5th bit of value i of sub-block j; sc, mn
    uint8 [N, K/32]: 6-bit scale and min per sub-block; dm fp16 [N, K/256 * 2]: d, dmin. A value
    is d * sc * q - dmin * mn. CC chunks of 64 per step."""
    rows, r = _rows(N, BN)
    xrow = x + tl.program_id(1) * K
    c = tl.arange(0, CC)
    i = tl.arange(0, 32)
    boff = c[:, None] * 32 + i[None, :]
    vlo = c[:, None] * 64 + i[None, :]
    r2 = r[:, None]
    acc = tl.zeros([BN], dtype=tl.float32)
    for k0 in range(0, K, CC * 64):
        b = tl.load(qs + r[:, None, None] * (K // 2) + (k0 // 2 + boff)[None, :, :])
        lo = (b & 15).to(tl.int32)
        hi = (b >> 4).to(tl.int32)
        if HBITS:
            h = tl.load(qh + r[:, None, None] * (K // 8) + (k0 // 8 + (c // 4)[:, None] * 32 + i[None, :])[None, :, :])
            sh = ((c % 4) * 2)[None, :, None]
            h = h.to(tl.int32)
            lo = lo | (((h >> sh) & 1) << 4)
            hi = hi | (((h >> (sh + 1)) & 1) << 4)
        xlo = tl.load(xrow + k0 + vlo).to(tl.float32)
        xhi = tl.load(xrow + k0 + vlo + 32).to(tl.float32)
        dlo = tl.sum(lo.to(tl.float32) * xlo[None, :, :], axis=2)
        dhi = tl.sum(hi.to(tl.float32) * xhi[None, :, :], axis=2)
        sub = (k0 // 32 + 2 * c)[None, :]
        slo = tl.load(sc + r2 * (K // 32) + sub).to(tl.float32)
        shi = tl.load(sc + r2 * (K // 32) + sub + 1).to(tl.float32)
        mlo = tl.load(mn + r2 * (K // 32) + sub).to(tl.float32)
        mhi = tl.load(mn + r2 * (K // 32) + sub + 1).to(tl.float32)
        sb = (k0 // 256 + c // 4)[None, :]
        dd = tl.load(dm + r2 * (K // 128) + 2 * sb).to(tl.float32)
        dmin = tl.load(dm + r2 * (K // 128) + 2 * sb + 1).to(tl.float32)
        mins = mlo * tl.sum(xlo, axis=1)[None, :] + mhi * tl.sum(xhi, axis=1)[None, :]
        acc += tl.sum(dd * (slo * dlo + shi * dhi) - dmin * mins, axis=1)
    tl.store(y + tl.program_id(1) * ldy + col0 + rows, acc.to(y.dtype.element_ty), mask=rows < N)


@triton.jit
def gemv_q6_k(x, ql, qh, sc, d, y, N, K: tl.constexpr, ldy, col0, BN: tl.constexpr, HH: tl.constexpr):
    """Q6_K. Per 128 values (a half): ql 64 bytes [N, K/2], qh 32 bytes [N, K/4]; value l + 32g of
    the half is (low 4 bits: ql[l + 32 (g % 2)] >> 4 (g // 2)) | (qh[l] >> 2g & 3) << 4, minus 32;
    sc int8 [N, K/16] one scale per 16 values; d fp16 [N, K/256]. HH halves per step."""
    rows, r = _rows(N, BN)
    xrow = x + tl.program_id(1) * K
    h = tl.arange(0, HH)
    l = tl.arange(0, 32)  # noqa: E741
    r3 = r[:, None, None]
    boff = (h[:, None] * 64 + l[None, :])[None, :, :]
    hoff = (h[:, None] * 32 + l[None, :])[None, :, :]
    soff = (h[:, None] * 8 + (l // 16)[None, :])[None, :, :]
    base = h[:, None] * 128 + l[None, :]
    acc = tl.zeros([BN], dtype=tl.float32)
    for k0 in range(0, K, HH * 128):
        qla = tl.load(ql + r3 * (K // 2) + k0 // 2 + boff)
        qlb = tl.load(ql + r3 * (K // 2) + k0 // 2 + boff + 32)
        hb = tl.load(qh + r3 * (K // 4) + k0 // 4 + hoff)
        srow = sc + r3 * (K // 16) + k0 // 16 + soff
        xr = xrow + k0 + base
        q = ((qla & 15) | ((hb & 3) << 4)).to(tl.float32) - 32.0
        t = q * tl.load(srow).to(tl.float32) * tl.load(xr).to(tl.float32)[None, :, :]
        q = ((qlb & 15) | (((hb >> 2) & 3) << 4)).to(tl.float32) - 32.0
        t += q * tl.load(srow + 2).to(tl.float32) * tl.load(xr + 32).to(tl.float32)[None, :, :]
        q = ((qla >> 4) | (((hb >> 4) & 3) << 4)).to(tl.float32) - 32.0
        t += q * tl.load(srow + 4).to(tl.float32) * tl.load(xr + 64).to(tl.float32)[None, :, :]
        q = ((qlb >> 4) | ((hb >> 6) << 4)).to(tl.float32) - 32.0
        t += q * tl.load(srow + 6).to(tl.float32) * tl.load(xr + 96).to(tl.float32)[None, :, :]
        dd = tl.load(d + r[:, None] * (K // 256) + (k0 // 256 + h // 2)[None, :]).to(tl.float32)
        acc += tl.sum(tl.sum(t, axis=2) * dd, axis=1)
    tl.store(y + tl.program_id(1) * ldy + col0 + rows, acc.to(y.dtype.element_ty), mask=rows < N)

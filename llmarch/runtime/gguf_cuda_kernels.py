"""Triton kernels for gguf_cuda: y[m, col0 + n] = W[n, :] . x[m, :] with W one GGUF tensor's
blocks in gguf_cuda's repacked arrays, dequantized in registers, float32 accumulation.

Grid: (tiles of BN weight rows, activation rows). Each program streams its rows' bytes once per
activation row, WIDTH values at a time (a whole number of the type's blocks, at most 1024), as a 3D
tile [rows, blocks or chunks, 32 values] so that every per-block scale is one broadcast. Layouts:
ggml-quants.c's block_q8_0 / q4_0 / q4_K / q5_K / q6_K, split by gguf_cuda.repack into one array
per field (the same bits; Q4_K/Q5_K's 6-bit scales and mins one byte each). The dequant_* kernels
write a tensor's values to a bf16 (or float32) buffer for the prefill path's torch matmul.

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
def _as_float(q, bias: tl.constexpr, FAST: tl.constexpr):
    """Small non-negative integers q -> float32 q - bias, exactly. FAST: as 2**23 | q read as a
    float32 (2**23 + q) minus 2**23 + bias, an integer OR and a float add instead of the
    int-to-float conversion, a quarter-rate instruction on these GPUs."""
    if FAST:
        return (q.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + bias)
    return q.to(tl.float32) - bias


@triton.jit
def _nibbles_asm(b):
    """uint8 bytes -> (2**23 + low nibble, 2**23 + high nibble) as float32 (CUDA only: inline PTX,
    four bytes an instance): two masks and a shift of the whole word, then one byte permute a
    value that sets the nibble under the exponent bits 0x4B, instead of an extract, a mask and an
    OR a value."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 lo, hi, m;
        mov.b32 m, 0x4B000000;
        and.b32 lo, $8, 0x0F0F0F0F;
        shr.u32 hi, $8, 4;
        and.b32 hi, hi, 0x0F0F0F0F;
        prmt.b32 $0, lo, m, 0x7540;
        prmt.b32 $1, lo, m, 0x7541;
        prmt.b32 $2, lo, m, 0x7542;
        prmt.b32 $3, lo, m, 0x7543;
        prmt.b32 $4, hi, m, 0x7540;
        prmt.b32 $5, hi, m, 0x7541;
        prmt.b32 $6, hi, m, 0x7542;
        prmt.b32 $7, hi, m, 0x7543;
        }""",
        constraints="=r,=r,=r,=r,=r,=r,=r,=r,r",
        args=[b],
        dtype=(tl.float32, tl.float32),
        is_pure=True,
        pack=4,
    )


@triton.jit
def _q6_asm(qla, qlb, hb):
    """Q6_K's bytes (gemv_q6_k's qla, qlb, hb) -> its four groups' 2**23 + q as float32 (CUDA only:
    inline PTX, four bytes an instance): each group's 6-bit values assembled for four bytes at a
    time with word-wide masks and shifts, then one byte permute a value as in _nibbles_asm."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 a, t, m;
        mov.b32 m, 0x4B000000;
        and.b32 a, $16, 0x0F0F0F0F;
        shl.b32 t, $18, 4;
        and.b32 t, t, 0x30303030;
        or.b32 a, a, t;
        prmt.b32 $0, a, m, 0x7540;
        prmt.b32 $1, a, m, 0x7541;
        prmt.b32 $2, a, m, 0x7542;
        prmt.b32 $3, a, m, 0x7543;
        and.b32 a, $17, 0x0F0F0F0F;
        shl.b32 t, $18, 2;
        and.b32 t, t, 0x30303030;
        or.b32 a, a, t;
        prmt.b32 $4, a, m, 0x7540;
        prmt.b32 $5, a, m, 0x7541;
        prmt.b32 $6, a, m, 0x7542;
        prmt.b32 $7, a, m, 0x7543;
        shr.u32 a, $16, 4;
        and.b32 a, a, 0x0F0F0F0F;
        and.b32 t, $18, 0x30303030;
        or.b32 a, a, t;
        prmt.b32 $8, a, m, 0x7540;
        prmt.b32 $9, a, m, 0x7541;
        prmt.b32 $10, a, m, 0x7542;
        prmt.b32 $11, a, m, 0x7543;
        shr.u32 a, $17, 4;
        and.b32 a, a, 0x0F0F0F0F;
        shr.u32 t, $18, 2;
        and.b32 t, t, 0x30303030;
        or.b32 a, a, t;
        prmt.b32 $12, a, m, 0x7540;
        prmt.b32 $13, a, m, 0x7541;
        prmt.b32 $14, a, m, 0x7542;
        prmt.b32 $15, a, m, 0x7543;
        }""",
        constraints="=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,r,r,r",
        args=[qla, qlb, hb],
        dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
        is_pure=True,
        pack=4,
    )


@triton.jit
def _k45_quants(qs, qh, r3, k0, boff, hoff, hshift, K: tl.constexpr, HBITS: tl.constexpr):
    """One step's Q4_K / Q5_K quants as int32 [rows, chunks, 32]: the first and second 32 values
    of each chunk of 64 (low and high nibbles of the same bytes, plus Q5_K's 5th bits)."""
    b = tl.load(qs + r3 * (K // 2) + k0 // 2 + boff)
    lo = (b & 15).to(tl.int32)
    hi = (b >> 4).to(tl.int32)
    if HBITS:
        h = tl.load(qh + r3 * (K // 8) + k0 // 8 + hoff).to(tl.int32)
        lo = lo | (((h >> hshift) & 1) << 4)
        hi = hi | (((h >> (hshift + 1)) & 1) << 4)
    return lo, hi


@triton.jit
def _k45_offsets(CC: tl.constexpr):
    """Byte offsets [1, CC, 32] of a step's quants, of its 5th-bit bytes and their shifts, and the
    first 32 values' offsets [CC, 32] (the second 32 are 32 further)."""
    c = tl.arange(0, CC)
    i = tl.arange(0, 32)
    boff = (c[:, None] * 32 + i[None, :])[None, :, :]
    hoff = ((c // 4)[:, None] * 32 + i[None, :])[None, :, :]
    hshift = ((c % 4) * 2)[None, :, None]
    return boff, hoff, hshift, c[:, None] * 64 + i[None, :]


@triton.jit
def gemv_k45(
    x,
    qs,
    qh,
    sc,
    mn,
    dm,
    y,
    N,
    K: tl.constexpr,
    ldy,
    col0,
    BN: tl.constexpr,
    CC: tl.constexpr,
    HBITS: tl.constexpr,
    FAST: tl.constexpr,
):
    """Q4_K (HBITS 0) and Q5_K (HBITS 1). qs uint8 [N, K/2]: per 64 values (a chunk) 32 bytes, low
    nibbles the first 32 values (sub-block 2c), high nibbles the next 32 (2c+1); qh uint8 [N, K/8]
    (Q5_K): per 256 values 32 bytes, bit j of byte i the 5th bit of value i of sub-block j; sc, mn
    uint8 [N, K/32]: 6-bit scale and min per sub-block; dm fp16 [N, K/256 * 2]: d, dmin. A value
    is d * sc * q - dmin * mn: per sub-block one dot product of the quants, then its scale and min
    once. CC chunks of 64 per step. FAST (_as_float's) 2: Q4_K's nibbles by _nibbles_asm (CUDA only)."""
    rows, r = _rows(N, BN)
    xrow = x + tl.program_id(1) * K
    boff, hoff, hshift, vlo = _k45_offsets(CC)
    c = tl.arange(0, CC)
    r2 = r[:, None]
    acc = tl.zeros([BN], dtype=tl.float32)
    for k0 in range(0, K, CC * 64):
        if FAST == 2:  # Q4_K only
            flo, fhi = _nibbles_asm(tl.load(qs + r[:, None, None] * (K // 2) + k0 // 2 + boff))
            flo -= 8388608.0
            fhi -= 8388608.0
        else:
            lo, hi = _k45_quants(qs, qh, r[:, None, None], k0, boff, hoff, hshift, K, HBITS)
            flo = _as_float(lo, 0.0, FAST)
            fhi = _as_float(hi, 0.0, FAST)
        xlo = tl.load(xrow + k0 + vlo).to(tl.float32)
        xhi = tl.load(xrow + k0 + vlo + 32).to(tl.float32)
        dlo = tl.sum(flo * xlo[None, :, :], axis=2)
        dhi = tl.sum(fhi * xhi[None, :, :], axis=2)
        sub = r2 * (K // 32) + k0 // 32 + 2 * c[None, :]
        slo = tl.load(sc + sub).to(tl.float32)
        shi = tl.load(sc + sub + 1).to(tl.float32)
        mlo = tl.load(mn + sub).to(tl.float32)
        mhi = tl.load(mn + sub + 1).to(tl.float32)
        sb = r2 * (K // 128) + 2 * (k0 // 256 + c[None, :] // 4)
        dd = tl.load(dm + sb).to(tl.float32)
        dmin = tl.load(dm + sb + 1).to(tl.float32)
        mins = mlo * tl.sum(xlo, axis=1)[None, :] + mhi * tl.sum(xhi, axis=1)[None, :]
        acc += tl.sum(dd * (slo * dlo + shi * dhi) - dmin * mins, axis=1)
    tl.store(y + tl.program_id(1) * ldy + col0 + rows, acc.to(y.dtype.element_ty), mask=rows < N)


@triton.jit
def _q6_bytes(ql, qh, r3, k0, boff, hoff, K: tl.constexpr):
    """One step's Q6_K bytes [rows, halves, 32]: the two runs of 32 ql bytes, the 32 qh bytes."""
    qla = tl.load(ql + r3 * (K // 2) + k0 // 2 + boff)
    qlb = tl.load(ql + r3 * (K // 2) + k0 // 2 + boff + 32)
    hb = tl.load(qh + r3 * (K // 4) + k0 // 4 + hoff)
    return qla, qlb, hb


@triton.jit
def _q6_quants(ql, qh, r3, k0, boff, hoff, K: tl.constexpr):
    """One step's Q6_K quants as four int32 [rows, halves, 32] (values l + 32 g of each half of 128,
    g = 0..3), 0..63 (the -32 not applied)."""
    qla, qlb, hb = _q6_bytes(ql, qh, r3, k0, boff, hoff, K)
    q0 = ((qla & 15) | ((hb & 3) << 4)).to(tl.int32)
    q1 = ((qlb & 15) | (((hb >> 2) & 3) << 4)).to(tl.int32)
    q2 = ((qla >> 4) | (((hb >> 4) & 3) << 4)).to(tl.int32)
    q3 = ((qlb >> 4) | ((hb >> 6) << 4)).to(tl.int32)
    return q0, q1, q2, q3


@triton.jit
def _q6_scales(sc, r2, k0, h, first, g: tl.constexpr, K: tl.constexpr):
    """Group g's scale of each value [rows, halves, 32]: two int8 loads per half (values l < 16 and
    the rest), not one gather per value."""
    srow = sc + r2 * (K // 16) + k0 // 16 + h[None, :] * 8 + 2 * g
    a = tl.load(srow).to(tl.float32)[:, :, None]
    b = tl.load(srow + 1).to(tl.float32)[:, :, None]
    return tl.where(first, a, b)


@triton.jit
def gemv_q6_k(
    x, ql, qh, sc, d, y, N, K: tl.constexpr, ldy, col0, BN: tl.constexpr, HH: tl.constexpr, FAST: tl.constexpr
):
    """Q6_K. Per 128 values (a half): ql 64 bytes [N, K/2], qh 32 bytes [N, K/4]; value l + 32g of
    the half is (low 4 bits: ql[l + 32 (g % 2)] >> 4 (g // 2)) | (qh[l] >> 2g & 3) << 4, minus 32;
    sc int8 [N, K/16] one scale per 16 values; d fp16 [N, K/256]. HH halves per step. FAST 1: the
    integer-to-float trick and scales loaded once per 16 values; 2: the same with _q6_asm's
    unpacking (CUDA only)."""
    rows, r = _rows(N, BN)
    xrow = x + tl.program_id(1) * K
    h = tl.arange(0, HH)
    l = tl.arange(0, 32)  # noqa: E741
    r3 = r[:, None, None]
    r2 = r[:, None]
    boff = (h[:, None] * 64 + l[None, :])[None, :, :]
    hoff = (h[:, None] * 32 + l[None, :])[None, :, :]
    soff = (h[:, None] * 8 + (l // 16)[None, :])[None, :, :]
    first = (l < 16)[None, None, :]
    base = h[:, None] * 128 + l[None, :]
    acc = tl.zeros([BN], dtype=tl.float32)
    for k0 in range(0, K, HH * 128):
        xr = xrow + k0 + base
        if FAST:
            if FAST == 2:
                f0, f1, f2, f3 = _q6_asm(*_q6_bytes(ql, qh, r3, k0, boff, hoff, K))
                f0, f1, f2, f3 = f0 - 8388640.0, f1 - 8388640.0, f2 - 8388640.0, f3 - 8388640.0
            else:
                q0, q1, q2, q3 = _q6_quants(ql, qh, r3, k0, boff, hoff, K)
                f0, f1 = _as_float(q0, 32.0, True), _as_float(q1, 32.0, True)
                f2, f3 = _as_float(q2, 32.0, True), _as_float(q3, 32.0, True)
            t = f0 * _q6_scales(sc, r2, k0, h, first, 0, K) * tl.load(xr).to(tl.float32)[None]
            t += f1 * _q6_scales(sc, r2, k0, h, first, 1, K) * tl.load(xr + 32).to(tl.float32)[None]
            t += f2 * _q6_scales(sc, r2, k0, h, first, 2, K) * tl.load(xr + 64).to(tl.float32)[None]
            t += f3 * _q6_scales(sc, r2, k0, h, first, 3, K) * tl.load(xr + 96).to(tl.float32)[None]
        else:
            q0, q1, q2, q3 = _q6_quants(ql, qh, r3, k0, boff, hoff, K)
            srow = sc + r3 * (K // 16) + k0 // 16 + soff
            t = (q0.to(tl.float32) - 32.0) * tl.load(srow).to(tl.float32) * tl.load(xr).to(tl.float32)[None]
            t += (q1.to(tl.float32) - 32.0) * tl.load(srow + 2).to(tl.float32) * tl.load(xr + 32).to(tl.float32)[None]
            t += (q2.to(tl.float32) - 32.0) * tl.load(srow + 4).to(tl.float32) * tl.load(xr + 64).to(tl.float32)[None]
            t += (q3.to(tl.float32) - 32.0) * tl.load(srow + 6).to(tl.float32) * tl.load(xr + 96).to(tl.float32)[None]
        dd = tl.load(d + r2 * (K // 256) + (k0 // 256 + h // 2)[None, :]).to(tl.float32)
        acc += tl.sum(tl.sum(t, axis=2) * dd, axis=1)
    tl.store(y + tl.program_id(1) * ldy + col0 + rows, acc.to(y.dtype.element_ty), mask=rows < N)


# ------------------------------------------------------------------------------ dequantize (prefill)


@triton.jit
def dequant_k45(qs, qh, sc, mn, dm, out, N, K: tl.constexpr, BN: tl.constexpr, CC: tl.constexpr, HBITS: tl.constexpr):
    """Rows of a Q4_K (HBITS 0) or Q5_K (1) tensor (gemv_k45's arrays) -> out [N, K] in out's
    dtype, each value d * sc * q - dmin * mn in float32. Grid: (tiles of BN rows, steps of CC
    chunks of 64 values)."""
    rows, r = _rows(N, BN)
    k0 = tl.program_id(1) * CC * 64
    boff, hoff, hshift, vlo = _k45_offsets(CC)
    c = tl.arange(0, CC)[None, :]
    r2 = r[:, None]
    r3 = r[:, None, None]
    lo, hi = _k45_quants(qs, qh, r3, k0, boff, hoff, hshift, K, HBITS)
    sub = r2 * (K // 32) + k0 // 32 + 2 * c
    sb = r2 * (K // 128) + 2 * (k0 // 256 + c // 4)
    dd = tl.load(dm + sb).to(tl.float32)
    dmin = tl.load(dm + sb + 1).to(tl.float32)
    o = out + r3 * K + k0 + vlo[None, :, :]
    mask = (rows < N)[:, None, None]
    s = (dd * tl.load(sc + sub).to(tl.float32))[:, :, None]
    m = (dmin * tl.load(mn + sub).to(tl.float32))[:, :, None]
    tl.store(o, (s * _as_float(lo, 0.0, True) - m).to(out.dtype.element_ty), mask=mask)
    s = (dd * tl.load(sc + sub + 1).to(tl.float32))[:, :, None]
    m = (dmin * tl.load(mn + sub + 1).to(tl.float32))[:, :, None]
    tl.store(o + 32, (s * _as_float(hi, 0.0, True) - m).to(out.dtype.element_ty), mask=mask)


@triton.jit
def dequant_q6_k(ql, qh, sc, d, out, N, K: tl.constexpr, BN: tl.constexpr, HH: tl.constexpr):
    """Rows of a Q6_K tensor (gemv_q6_k's arrays) -> out [N, K], each value (d * sc) * (q - 32).
    Grid: (tiles of BN rows, steps of HH halves of 128 values)."""
    rows, r = _rows(N, BN)
    k0 = tl.program_id(1) * HH * 128
    h = tl.arange(0, HH)
    l = tl.arange(0, 32)  # noqa: E741
    r2 = r[:, None]
    r3 = r[:, None, None]
    boff = (h[:, None] * 64 + l[None, :])[None, :, :]
    hoff = (h[:, None] * 32 + l[None, :])[None, :, :]
    first = (l < 16)[None, None, :]
    dd = tl.load(d + r2 * (K // 256) + (k0 // 256 + h // 2)[None, :]).to(tl.float32)[:, :, None]
    o = out + r3 * K + k0 + (h[:, None] * 128 + l[None, :])[None, :, :]
    mask = (rows < N)[:, None, None]
    q0, q1, q2, q3 = _q6_quants(ql, qh, r3, k0, boff, hoff, K)
    ty = out.dtype.element_ty
    tl.store(o, ((dd * _q6_scales(sc, r2, k0, h, first, 0, K)) * _as_float(q0, 32.0, True)).to(ty), mask=mask)
    tl.store(o + 32, ((dd * _q6_scales(sc, r2, k0, h, first, 1, K)) * _as_float(q1, 32.0, True)).to(ty), mask=mask)
    tl.store(o + 64, ((dd * _q6_scales(sc, r2, k0, h, first, 2, K)) * _as_float(q2, 32.0, True)).to(ty), mask=mask)
    tl.store(o + 96, ((dd * _q6_scales(sc, r2, k0, h, first, 3, K)) * _as_float(q3, 32.0, True)).to(ty), mask=mask)


@triton.jit
def dequant_q8_q4(qs, d, out, N, K: tl.constexpr, BN: tl.constexpr, G: tl.constexpr, Q4: tl.constexpr):
    """Rows of a Q8_0 (Q4 0) or Q4_0 (Q4 1) tensor in repack's layout -> out [N, K]. Grid: (tiles of
    BN rows, steps of G blocks of 32)."""
    rows, r = _rows(N, BN)
    k0 = tl.program_id(1) * G * 32
    g = tl.arange(0, G)
    r3 = r[:, None, None]
    s = tl.load(d + r[:, None] * (K // 32) + k0 // 32 + g[None, :]).to(tl.float32)[:, :, None]
    mask = (rows < N)[:, None, None]
    if Q4:
        j = tl.arange(0, 16)
        b = tl.load(qs + r3 * (K // 2) + (k0 // 2 + g[:, None] * 16 + j[None, :])[None, :, :])
        o = out + r3 * K + (k0 + g[:, None] * 32 + j[None, :])[None, :, :]
        tl.store(o, (s * ((b & 15).to(tl.float32) - 8.0)).to(out.dtype.element_ty), mask=mask)
        tl.store(o + 16, (s * ((b >> 4).to(tl.float32) - 8.0)).to(out.dtype.element_ty), mask=mask)
    else:
        v = (g[:, None] * 32 + tl.arange(0, 32)[None, :])[None, :, :]
        q = tl.load(qs + r3 * K + k0 + v).to(tl.float32)
        tl.store(out + r3 * K + k0 + v, (s * q).to(out.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------ integer dot products (decode)
#
# llama.cpp's way for K-quants (its mmvq kernels): the activation row is quantized to int8 in blocks
# of 32 values with a float scale per block, and each 4 bytes of weights meet 4 bytes of activations
# in one dp4a (a 4-way int8 dot product into an int32): a few integer instructions a 32-bit word of
# weights (8 values of Q4_K) instead of a float conversion and multiply-add a value. The per-block
# scales, mins and activation scales are applied once per 32 values. Here every program quantizes
# the activation row itself (one pass over the row per program, shared by its BN weight rows)
# instead of a separate launch per matrix. The activation's rounding to int8 (at most half a step,
# max |x| / 254 of its block) is the only difference from the float kernels above; mins meet the
# exact float sum of the block's activations.


@triton.jit
def _dp4a(a, b, ASM: tl.constexpr):
    """Per int32 element: sum over its 4 bytes of (unsigned byte of a) * (signed byte of b). ASM:
    the PTX dp4a instruction (CUDA only); else the same sum in plain integer operations."""
    if ASM:
        return tl.inline_asm_elementwise(
            asm="dp4a.u32.s32 $0, $1, $2, 0;",
            constraints="=r,r,r",
            args=[a, b],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
    s = ((a & 255) * ((b << 24) >> 24)).to(tl.int32)
    s += ((a >> 8) & 255) * ((b << 16) >> 24)
    s += ((a >> 16) & 255) * ((b << 8) >> 24)
    s += ((a >> 24) & 255) * (b >> 24)
    return s


@triton.jit
def _quant32(ptrs):
    """Activations at ptrs [A, 8, 4] (A blocks of 32 values, each 8 words of 4) -> their int8
    quants packed 4 to an int32 word [A, 8] (round to nearest of x * 127 / max |x|), each block's
    scale (max |x| / 127) [A], each block's float sum [A] and each word's sum of quants [A, 8]."""
    xf = tl.load(ptrs).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(xf), axis=2), axis=1)
    inv = 127.0 / tl.maximum(amax, 1e-30)
    # round to nearest by the 1.5 * 2**23 trick: the low mantissa bits of the sum hold the integer
    v = (xf * inv[:, None, None] + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000
    shift = (tl.arange(0, 4) * 8)[None, None, :]
    words = tl.sum((v & 255) << shift, axis=2)  # disjoint bit fields: the sum is their OR
    return words, amax / 127.0, tl.sum(tl.sum(xf, axis=2), axis=1), tl.sum(v, axis=2)


@triton.jit
def quantize_rows(x, xq, xd, xs, K: tl.constexpr, NB: tl.constexpr):
    """Activation rows x [M, K] -> _quant32's words xq int32 [M, K/4], scales xd and float sums xs
    float32 [M, K/32]: once per row for every dp4a kernel that reads it (their PRE form). Grid:
    (rows, K / (32 NB))."""
    b = tl.program_id(1) * NB + tl.arange(0, NB)
    j = tl.arange(0, 8)
    off = b[:, None, None] * 32 + j[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
    words, dx, sx, _ = _quant32(x + tl.program_id(0) * K + off)
    tl.store(xq + tl.program_id(0) * (K // 4) + b[:, None] * 8 + j[None, :], words)
    tl.store(xd + tl.program_id(0) * (K // 32) + b, dx)
    tl.store(xs + tl.program_id(0) * (K // 32) + b, sx)


@triton.jit
def _x_blocks(x, xq, xd, xs, m, k0, blk, woff, K: tl.constexpr, PRE: tl.constexpr, ASM: tl.constexpr):
    """Activation blocks of 32 values from k0: blk [A] their block numbers from k0, woff [A, 8, 4]
    their values' offsets from k0 -> _quant32's four results, quantized here or (PRE) read from
    quantize_rows' output."""
    if PRE:
        words = tl.load(xq + m * (K // 4) + k0 * 8 // 32 + blk[:, None] * 8 + tl.arange(0, 8)[None, :])
        dx = tl.load(xd + m * (K // 32) + k0 // 32 + blk)
        sx = tl.load(xs + m * (K // 32) + k0 // 32 + blk)
        return words, dx, sx, _dp4a(tl.full(words.shape, 0x01010101, tl.int32), words, ASM)
    return _quant32(x + m * K + k0 + woff)


@triton.jit
def gemv_q4_k_dp4a(
    x,
    xq,
    xd,
    xs,
    qs,
    sc,
    mn,
    dm,
    y,
    N,
    K: tl.constexpr,
    ldy,
    col0,
    BN: tl.constexpr,
    CC: tl.constexpr,
    ASM: tl.constexpr,
    PRE: tl.constexpr,
):
    """Q4_K by integer dot products. qs int32 [N, K/8] (gemv_k45's bytes read as words: per chunk
    of 64 values 8 words, low nibbles sub-block 2c, high nibbles 2c+1); sc, mn, dm as gemv_k45's.
    A sub-block's sum is d * sc * dx * (q . xq) - dmin * mn * sum(x). CC chunks of 64 per step."""
    rows, r = _rows(N, BN)
    m = tl.program_id(1)
    c = tl.arange(0, CC)
    j = tl.arange(0, 8)
    xoff = c[:, None, None] * 64 + j[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
    woff = (c[:, None] * 8 + j[None, :])[None, :, :]
    r2 = r[:, None]
    acc = tl.zeros([BN], dtype=tl.float32)
    for i in range(0, K // (CC * 64)):
        k0 = i * (CC * 64)
        xlo, dxlo, sxlo, _ = _x_blocks(x, xq, xd, xs, m, k0, 2 * c, xoff, K, PRE, ASM)
        xhi, dxhi, sxhi, _ = _x_blocks(x, xq, xd, xs, m, k0, 2 * c + 1, xoff + 32, K, PRE, ASM)
        w = tl.load(qs + r[:, None, None] * (K // 8) + i * (CC * 8) + woff)
        dlo = tl.sum(_dp4a(w & 0x0F0F0F0F, tl.broadcast_to(xlo[None, :, :], (BN, CC, 8)), ASM), axis=2)
        dhi = tl.sum(_dp4a((w >> 4) & 0x0F0F0F0F, tl.broadcast_to(xhi[None, :, :], (BN, CC, 8)), ASM), axis=2)
        sub = r2 * (K // 32) + k0 // 32 + 2 * c[None, :]
        slo = tl.load(sc + sub).to(tl.float32)
        shi = tl.load(sc + sub + 1).to(tl.float32)
        mlo = tl.load(mn + sub).to(tl.float32)
        mhi = tl.load(mn + sub + 1).to(tl.float32)
        sb = r2 * (K // 128) + 2 * (k0 // 256 + c[None, :] // 4)
        dd = tl.load(dm + sb).to(tl.float32)
        dmin = tl.load(dm + sb + 1).to(tl.float32)
        prod = slo * dxlo[None, :] * dlo.to(tl.float32) + shi * dxhi[None, :] * dhi.to(tl.float32)
        acc += tl.sum(dd * prod - dmin * (mlo * sxlo[None, :] + mhi * sxhi[None, :]), axis=1)
    tl.store(y + tl.program_id(1) * ldy + col0 + rows, acc.to(y.dtype.element_ty), mask=rows < N)


@triton.jit
def gemv_q6_k_dp4a(
    x,
    xq,
    xd,
    xs,
    ql,
    qh,
    sc,
    d,
    y,
    N,
    K: tl.constexpr,
    ldy,
    col0,
    BN: tl.constexpr,
    HH: tl.constexpr,
    ASM: tl.constexpr,
    PRE: tl.constexpr,
):
    """Q6_K by integer dot products. ql int32 [N, K/8], qh int32 [N, K/16] (gemv_q6_k's bytes read
    as words); sc, d as gemv_q6_k's. Group g (values 32g..32g+31 of a half of 128) of the half's
    words: ql words 0-7 (g 0, 2) or 8-15 (g 1, 3), low or high nibbles, with 2 bits of qh words
    0-7 at bit 4; (q - 32) . xq as q . xq - 32 sum(xq), each word's product times its 16 values'
    scale in int32; then d * dx once per group. HH halves of 128 per step."""
    rows, r = _rows(N, BN)
    m = tl.program_id(1)
    h = tl.arange(0, HH)
    j = tl.arange(0, 8)
    xoff = h[:, None, None] * 128 + j[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
    loff = (h[:, None] * 16 + j[None, :])[None, :, :]
    hoff = (h[:, None] * 8 + j[None, :])[None, :, :]
    first = (j < 4)[None, None, :]
    r2 = r[:, None]
    r3 = r[:, None, None]
    acc = tl.zeros([BN], dtype=tl.float32)
    for i in range(0, K // (HH * 128)):
        k0 = i * (HH * 128)
        qla = tl.load(ql + r3 * (K // 8) + i * (HH * 16) + loff)
        qlb = tl.load(ql + r3 * (K // 8) + i * (HH * 16) + loff + 8)
        hb = tl.load(qh + r3 * (K // 16) + i * (HH * 8) + hoff)
        srow = sc + r2 * (K // 16) + k0 // 16 + h[None, :] * 8
        dd = tl.load(d + r2 * (K // 256) + (k0 // 256 + h // 2)[None, :]).to(tl.float32)
        tot = tl.zeros([BN, HH], dtype=tl.float32)
        for g in tl.static_range(4):
            if g == 0:
                q = (qla & 0x0F0F0F0F) | ((hb << 4) & 0x30303030)
            elif g == 1:
                q = (qlb & 0x0F0F0F0F) | ((hb << 2) & 0x30303030)
            elif g == 2:
                q = ((qla >> 4) & 0x0F0F0F0F) | (hb & 0x30303030)
            else:
                q = ((qlb >> 4) & 0x0F0F0F0F) | ((hb >> 2) & 0x30303030)
            xw, dx, _, qsum = _x_blocks(x, xq, xd, xs, m, k0, 4 * h + g, xoff + 32 * g, K, PRE, ASM)
            t = _dp4a(q, tl.broadcast_to(xw[None, :, :], (BN, HH, 8)), ASM) - 32 * qsum[None, :, :]
            s = tl.where(
                first,
                tl.load(srow + 2 * g).to(tl.int32)[:, :, None],
                tl.load(srow + 2 * g + 1).to(tl.int32)[:, :, None],
            )
            tot += tl.sum(t * s, axis=2).to(tl.float32) * dx[None, :]
        acc += tl.sum(tot * dd, axis=1)
    tl.store(y + tl.program_id(1) * ldy + col0 + rows, acc.to(y.dtype.element_ty), mask=rows < N)

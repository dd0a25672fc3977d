"""Triton kernel for gemv_cuda: y[m, n] = W[n, :] . x[m, :] (+ b[n]) for up to 4 activation rows,
W a float16 / bfloat16 [N, K] row-major matrix, float32 accumulation, y in W's dtype.

Grid: one program per BN weight rows. A program streams its rows once, BK values at a time (each
row's slice contiguous: 16-byte loads when K is a multiple of 8), and multiplies every tile by all
the activation rows, so the weights are read exactly once whatever M is. The products are summed
into a [MP, BN, BK] float32 tile and reduced across K once, after the loop. Rows past N are clamped
for the loads (no masks on the hot path) and masked at the store; K past the last whole BK is masked
only where K is not a multiple of BK (EVEN_K).

Imported only where triton is (CUDA builds of torch bring it); TRITON_INTERPRET=1 runs it on CPU
tensors for the tests.
"""

import triton
import triton.language as tl


@triton.jit
def gemv(
    x,
    w,
    b,
    y,
    M,
    N,
    K: tl.constexpr,
    MP: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GLU: tl.constexpr = False,
):
    """x [M, K] contiguous, w [N, K] contiguous, b [N] or unused, y [M, N] contiguous; MP: M rounded
    up to a power of two. K is a compile-time constant (a decode step has a handful of widths).

    GLU: w is [2N, K], a gated MLP's [gate; up] rows (b [2N] likewise), and y = silu(gate) * up,
    N wide: each program reads its BN gate rows and the BN up rows of the same outputs, and the
    activation is applied to the float32 sums, so the [gate | up] row never goes to memory."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    r = tl.minimum(rows, N - 1).to(tl.int64)
    m = tl.arange(0, MP)
    mc = tl.minimum(m, M - 1).to(tl.int64)  # rows of x past M re-read the last one; not stored
    kk = tl.arange(0, BK)
    wp = w + r[:, None] * K + kk[None, :]
    xp = x + mc[:, None] * K + kk[None, :]
    acc = tl.zeros([MP, BN, BK], dtype=tl.float32)
    if GLU:
        up = tl.zeros([MP, BN, BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        if EVEN_K:
            wt = tl.load(wp + k0, eviction_policy="evict_first")
            xt = tl.load(xp + k0)
            if GLU:
                ut = tl.load(wp + N * K + k0, eviction_policy="evict_first")
        else:
            inside = (k0 + kk) < K
            wt = tl.load(wp + k0, mask=inside[None, :], other=0.0, eviction_policy="evict_first")
            xt = tl.load(xp + k0, mask=inside[None, :], other=0.0)
            if GLU:
                ut = tl.load(wp + N * K + k0, mask=inside[None, :], other=0.0, eviction_policy="evict_first")
        xf = xt.to(tl.float32)[:, None, :]
        acc += wt.to(tl.float32)[None, :, :] * xf
        if GLU:
            up += ut.to(tl.float32)[None, :, :] * xf
    out = tl.sum(acc, axis=2)
    if HAS_BIAS:
        out += tl.load(b + r).to(tl.float32)[None, :]
    if GLU:
        u = tl.sum(up, axis=2)
        if HAS_BIAS:
            u += tl.load(b + N + r).to(tl.float32)[None, :]
        out = out * tl.sigmoid(out) * u
    keep = (m[:, None] < M) & (rows[None, :] < N)
    tl.store(y + m[:, None].to(tl.int64) * N + rows[None, :], out.to(y.dtype.element_ty), mask=keep)

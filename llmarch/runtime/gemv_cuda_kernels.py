"""Triton kernel for gemv_cuda: y[m, n] = W[n, :] . x[m, :] (+ b[n]) for up to 4 activation rows,
W a float16 / bfloat16 [N, K] row-major matrix, float32 accumulation, y in W's dtype.

Grid: one program per BN weight rows. A program streams its rows once, BK values at a time (each
row's slice contiguous: 16-byte loads when K is a multiple of 8), and multiplies every tile by all
the activation rows, so the weights are read exactly once whatever M is. The products are summed
into a [MP, BN, BK] float32 tile and reduced across K once, after the loop. Rows past N are clamped
for the loads (no masks on the hot path) and masked at the store; K past the last whole BK is masked
only where K is not a multiple of BK (EVEN_K).

Two optional fusions spare a decode step a launch and a row written and read back each:
- NORM, a prologue: x is the raw residual stream and the product takes rms_norm(x) * nw as its input,
  each program computing every row's sum of squares in float32 itself (x is a few kilobytes, read
  from L2) and rounding the normed values to x's dtype as ops/norms.RMSNorm's output is rounded;
- RES, an epilogue: y = res + x @ W^T, the product rounded to y's dtype before the add, as the
  unfused `res + linear(x)` rounds it.

Imported only where triton is (CUDA builds of torch bring it); TRITON_INTERPRET=1 runs it on CPU
tensors for the tests.
"""

import triton
import triton.language as tl


@triton.jit
def _weights(wp, k0, NK, K: tl.constexpr, kk, EVEN_K: tl.constexpr, GLU: tl.constexpr):
    """One step's [BN, BK] weight tile from column k0 (and the gated MLP's up rows NK values on;
    the gate tile again where not GLU, unused)."""
    if EVEN_K:
        wt = tl.load(wp + k0, eviction_policy="evict_first")
        ut = wt
        if GLU:
            ut = tl.load(wp + NK + k0, eviction_policy="evict_first")
    else:
        inside = ((k0 + kk) < K)[None, :]
        wt = tl.load(wp + k0, mask=inside, other=0.0, eviction_policy="evict_first")
        ut = wt
        if GLU:
            ut = tl.load(wp + NK + k0, mask=inside, other=0.0, eviction_policy="evict_first")
    return wt, ut


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
    nw=None,
    res=None,
    eps=0.0,
    NORM: tl.constexpr = False,
    RES: tl.constexpr = False,
    ONE: tl.constexpr = False,
    PDL: tl.constexpr = False,
    AHEAD: tl.constexpr = False,
):
    """x [M, K] contiguous, w [N, K] contiguous, b [N] or unused, y [M, N] contiguous; MP: M rounded
    up to a power of two. K is a compile-time constant (a decode step has a handful of widths).

    GLU: w is [2N, K], a gated MLP's [gate; up] rows (b [2N] likewise), and y = silu(gate) * up,
    N wide: each program reads its BN gate rows and the BN up rows of the same outputs, and the
    activation is applied to the float32 sums, so the [gate | up] row never goes to memory.

    NORM: nw [K] (the norm's weight, any unit offset folded in; float32, or x's dtype where that holds
    it exactly: half the bytes every program reads), eps: the input row is
    rms_norm(x[m]) * nw, computed as F.rms_norm does it in float32 (x * rsqrt(mean(x^2) + eps) * nw)
    and rounded to x's dtype; ONE: K == BK (one step), so the prologue's load of x is the loop's.
    RES: res [M, N] contiguous in y's dtype, and y = res + (x @ W^T + b).
    PDL: launched as a programmatic dependent launch (launch_pdl, sm90+): the program lets the next
    kernel launch at once and waits for the previous kernel's writes (gdc_wait) before it reads
    anything a kernel writes (x, res) or writes anything itself.
    AHEAD: each step's weight tile is loaded one step ahead (two tiles in flight a program where K
    takes several steps), the first one before the wait."""
    if PDL:  # the next kernel may start now: its programs take the SMs ours leave and wait in gdc_wait
        tl.extra.cuda.gdc_launch_dependents()
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    r = tl.minimum(rows, N - 1).to(tl.int64)
    m = tl.arange(0, MP)
    mc = tl.minimum(m, M - 1).to(tl.int64)  # rows of x past M re-read the last one; not stored
    kk = tl.arange(0, BK)
    wp = w + r[:, None] * K + kk[None, :]
    xp = x + mc[:, None] * K + kk[None, :]
    if AHEAD:  # the first step's weights before the wait: no kernel writes them, so under PDL their
        # loads overlap the previous kernel's last programs (x, the norm and the residual come after)
        wt, ut = _weights(wp, 0, N * K, K, kk, EVEN_K, GLU)
    if PDL:
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros([MP, BN, BK], dtype=tl.float32)
    if NORM:
        ss = tl.zeros([MP], dtype=tl.float32)
        if ONE:
            x0 = tl.load(xp)
            ss = tl.sum(x0.to(tl.float32) * x0.to(tl.float32), axis=1)
        else:
            for k1 in range(0, K, BK):
                xs = tl.load(xp + k1, mask=((k1 + kk) < K)[None, :], other=0.0).to(tl.float32)
                ss += tl.sum(xs * xs, axis=1)
        inv = tl.math.rsqrt(ss / K + eps)
    if GLU:
        up = tl.zeros([MP, BN, BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        if AHEAD:  # this step's weights were loaded a step ahead; the next step's go out before its math
            cw, cu = wt, ut
            if not ONE:
                if k0 + BK < K:
                    wt, ut = _weights(wp, k0 + BK, N * K, K, kk, EVEN_K, GLU)
        else:
            cw, cu = _weights(wp, k0, N * K, K, kk, EVEN_K, GLU)
        if EVEN_K:
            if NORM and ONE:
                xt = x0
            else:
                xt = tl.load(xp + k0)
            if NORM:
                nt = tl.load(nw + k0 + kk).to(tl.float32)
        else:
            inside = (k0 + kk) < K
            xt = tl.load(xp + k0, mask=inside[None, :], other=0.0)
            if NORM:
                nt = tl.load(nw + k0 + kk, mask=inside, other=0.0).to(tl.float32)
        if NORM:  # RMSNorm's output, rounded to x's dtype as the unfused norm writes it
            xt = ((xt.to(tl.float32) * inv[:, None]) * nt[None, :]).to(x.dtype.element_ty)
        xf = xt.to(tl.float32)[:, None, :]
        acc += cw.to(tl.float32)[None, :, :] * xf
        if GLU:
            up += cu.to(tl.float32)[None, :, :] * xf
    out = tl.sum(acc, axis=2)
    if HAS_BIAS:
        out += tl.load(b + r).to(tl.float32)[None, :]
    if GLU:
        u = tl.sum(up, axis=2)
        if HAS_BIAS:
            u += tl.load(b + N + r).to(tl.float32)[None, :]
        out = out * tl.sigmoid(out) * u
    keep = (m[:, None] < M) & (rows[None, :] < N)
    at = m[:, None].to(tl.int64) * N + rows[None, :]
    if RES:  # the product rounded first, then the residual added in float32 and rounded once more
        out = out.to(y.dtype.element_ty).to(tl.float32) + tl.load(res + at, mask=keep, other=0.0).to(tl.float32)
    tl.store(y + at, out.to(y.dtype.element_ty), mask=keep)

"""Triton kernels for decode_attention_cuda: one query token against a static KV cache.

`decode_attention` runs one program per (batch row, KV head, split of the slot axis). The `rep` query heads
that share the KV head are the rows of one tile (padded to REP_P >= 16 rows, what tl.dot needs), so
each K and V row is read once for all of them. A program walks its slots BS at a time: scores
q . k in float32 (tl.dot of the half-precision operands, float32 accumulation), times the scale,
-inf where the mask hides the slot, then an online softmax in float32 (running max m, running sum
l, output accumulator rescaled as the max grows) and probabilities (rounded to V's dtype, as
attend() rounds them) times V with float32 accumulation. With one
split it writes the normalised output; with more it writes (m, l, accumulator) per split and
`decode_attention_combine` merges the splits of each query head (flash-decoding).

Imported only where triton is (CUDA builds of torch bring it); TRITON_INTERPRET=1 runs it on CPU
tensors for the tests.
"""

import triton
import triton.language as tl


@triton.jit
def _slots(
    q_t,
    kbase,
    vbase,
    mask,
    s,
    d,
    dv,
    S,
    sk_s,
    sv_s,
    scale,
    m_i,
    l_i,
    acc,
    D: tl.constexpr,
    DV: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One step over slots s (d, dv: the key and value widths' lanes): the online softmax's (max,
    sum, accumulator) after them. UPCAST: both products in float32 (Triton's interpreter multiplies
    bfloat16 tiles wrongly in tl.dot; on a GPU the tensor cores take the half-precision operands
    with float32 accumulation)."""
    inside = s < S
    seen = tl.load(mask + s, mask=inside, other=0) != 0
    s64 = s.to(tl.int64)
    kt = tl.load(kbase + s64[:, None] * sk_s + d[None, :], mask=inside[:, None] & (d < D)[None, :], other=0.0)
    if UPCAST:
        sc = tl.dot(q_t.to(tl.float32), tl.trans(kt.to(tl.float32)), input_precision="ieee") * scale
    else:
        sc = tl.dot(q_t, tl.trans(kt)) * scale  # [REP_P, BS] float32
    sc = tl.where(seen[None, :], sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: exp(-inf) = 0
    p = tl.exp(sc - m_ref[:, None])
    alpha = tl.exp(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    vt = tl.load(vbase + s64[:, None] * sv_s + dv[None, :], mask=inside[:, None] & (dv < DV)[None, :], other=0.0)
    if UPCAST:
        pv = tl.dot(p, vt.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(vt.dtype), vt)  # probabilities rounded to V's dtype, as attend() rounds them
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _normed_rotated(base, rows, live, d, w, cos, sin, p, eps, D: tl.constexpr, ROT: tl.constexpr, NORM: tl.constexpr):
    """Rows base + rows[:, None] + d of a fresh projection, in float32: RMS-normed per row with
    weight w (NORM), then rotated (ROT > 0: the first ROT lanes, rotate-half pairs, by the cos / sin
    rows of position p, sin with its first half negated as ops.rope keeps it)."""
    inside = live[:, None] & (d < D)[None, :]
    x = tl.load(base + rows[:, None] + d[None, :], mask=inside, other=0.0).to(tl.float32)
    if NORM:
        f = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        x = x * f[:, None] * tl.load(w + d, mask=d < D, other=0.0)[None, :]
    if ROT > 0:
        dr = tl.where(d < ROT, (d + ROT // 2) % ROT, d)  # each lane's rotate-half partner
        y = tl.load(base + rows[:, None] + dr[None, :], mask=inside, other=0.0).to(tl.float32)
        if NORM:
            y = y * f[:, None] * tl.load(w + dr, mask=d < D, other=0.0)[None, :]
        c = tl.load(cos + p * ROT + d, mask=d < ROT, other=1.0).to(tl.float32)
        sn = tl.load(sin + p * ROT + d, mask=d < ROT, other=0.0).to(tl.float32)
        x = x * c[None, :] + y * sn[None, :]
    return x


@triton.jit
def decode_attention(
    q,
    k,
    v,
    mask,
    out,
    part_m,
    part_l,
    part_acc,
    S,
    scale,
    sq_b,
    sq_h,
    sk_b,
    sk_h,
    sk_s,
    sv_b,
    sv_h,
    sv_s,
    so_b,
    so_h,
    k_in,
    v_in,
    sn_b,
    sn_h,
    vn_b,
    vn_h,
    q_w,
    k_w,
    cos,
    sin,
    pos,
    slot_at,
    eps,
    KV: tl.constexpr,
    REP: tl.constexpr,
    REP_P: tl.constexpr,
    D: tl.constexpr,
    D_P: tl.constexpr,
    DV: tl.constexpr,
    DV_P: tl.constexpr,
    SPLITS,
    CHUNK: tl.constexpr,
    BS: tl.constexpr,
    PARTS: tl.constexpr,
    INTERPRETER: tl.constexpr,
    NEW: tl.constexpr = False,
    NORM: tl.constexpr = False,
    ROT: tl.constexpr = 0,
    PDL: tl.constexpr = False,
    LATE: tl.constexpr = False,
):
    """q [B, H, D] (strides sq_*), k [B, KV, S, D], v [B, KV, S, DV] (last dims contiguous), mask
    uint8 [S] (nonzero = visible), out [B, H, DV]; CHUNK slots per split (a multiple of BS). PARTS
    (SPLITS > 1): write part_* float32 [B * KV, SPLITS, REP_P (, DV_P)] for the combine kernel, not out.
    CHUNK is a power-of-two multiple of BS (an eager step's prefix grows: a new variant only as
    it doubles); S and SPLITS are runtime values.

    NEW: q holds this step's raw query projection, and k_in / v_in [B, KV, D(V)] (strides sn_*,
    vn_*) the raw key / value ones, not yet in the cache: the program norms (NORM: per-head RMS
    with float32 weights q_w / k_w, eps) and rotates (ROT lanes, cos / sin [positions, ROT], row
    pos[0]) q and its KV head's key itself, and the program whose split holds the cache slot
    slot_at[0] writes the key and value there before attending.

    PDL: launched as a programmatic dependent launch (launch_pdl, sm90+): the next kernel may launch
    at once (its programs fill the SMs this small grid leaves idle), and every read and write here
    waits for the previous kernel's writes (gdc_wait). LATE: the next kernel may launch only once
    the slots are attended (the program starts early and waits, but no copies of the next kernel
    compete with its loads)."""
    if PDL:
        if not LATE:
            tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    bk = tl.program_id(0)  # batch row * KV + KV head
    sp = tl.program_id(1)
    b = (bk // KV).to(tl.int64)
    kh = (bk % KV).to(tl.int64)
    r = tl.arange(0, REP_P)
    d = tl.arange(0, D_P)
    dv = tl.arange(0, DV_P)
    heads = kh * REP + r
    kbase = k + b * sk_b + kh * sk_h
    vbase = v + b * sv_b + kh * sv_h
    if NEW:
        p = tl.load(pos)
        slot = tl.load(slot_at)
        one = tl.arange(0, 1)
        q_t = _normed_rotated(q + b * sq_b, heads * sq_h, r < REP, d, q_w, cos, sin, p, eps, D, ROT, NORM)
        q_t = q_t.to(k.dtype.element_ty)
        k_new = _normed_rotated(k_in + b * sn_b + kh * sn_h, one, one < 1, d, k_w, cos, sin, p, eps, D, ROT, NORM)
        k_new = k_new.to(k.dtype.element_ty)  # [1, D_P]
        v_new = tl.load(v_in + b * vn_b + kh * vn_h + one[:, None] + dv[None, :], mask=(dv < DV)[None, :], other=0.0)
        v_new = v_new.to(v.dtype.element_ty)
        # the program whose split holds the slot writes this step's key and value there, and reads
        # them back below after the barrier (which makes a block's global writes visible to all
        # its threads); no other program reads that slot
        # as a [1, 1] block: Triton 3.9's interpreter turns a block & a scalar into int32, not a mask
        mine = one[:, None] < (sp == slot // CHUNK).to(tl.int32)
        tl.store(kbase + slot * sk_s + one[:, None] + d[None, :], k_new, mask=(d < D)[None, :] & mine)
        tl.store(vbase + slot * sv_s + one[:, None] + dv[None, :], v_new, mask=(dv < DV)[None, :] & mine)
        tl.debug_barrier()
    else:
        qp = q + b * sq_b + heads[:, None] * sq_h + d[None, :]
        q_t = tl.load(qp, mask=(r < REP)[:, None] & (d < D)[None, :], other=0.0)  # [REP_P, D_P]
    m_i = tl.full([REP_P], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([REP_P], dtype=tl.float32)
    acc = tl.zeros([REP_P, DV_P], dtype=tl.float32)
    start = sp * CHUNK
    if INTERPRETER:  # a compile-time trip count: the interpreter cannot loop to a runtime bound
        for s0 in range(0, CHUNK, BS):
            s = start + s0 + tl.arange(0, BS)
            m_i, l_i, acc = _slots(
                q_t,
                kbase,
                vbase,
                mask,
                s,
                d,
                dv,
                S,
                sk_s,
                sv_s,
                scale,
                m_i,
                l_i,
                acc,
                D,
                DV,
                True,
            )
    else:  # up to the split's last slot: a cache shorter than the chunk skips the empty steps
        for s0 in range(start, tl.minimum(start + CHUNK, S), BS):
            s = s0 + tl.arange(0, BS)
            m_i, l_i, acc = _slots(
                q_t,
                kbase,
                vbase,
                mask,
                s,
                d,
                dv,
                S,
                sk_s,
                sv_s,
                scale,
                m_i,
                l_i,
                acc,
                D,
                DV,
                False,
            )
    if PDL and LATE:  # the next kernel only now: its copies would slow this latency-bound loop
        tl.extra.cuda.gdc_launch_dependents()
    if not PARTS:
        o = acc / l_i[:, None]
        op = out + b * so_b + heads[:, None] * so_h + dv[None, :]
        tl.store(op, o.to(out.dtype.element_ty), mask=(r < REP)[:, None] & (dv < DV)[None, :])
    else:
        row = (bk * SPLITS + sp).to(tl.int64) * REP_P + r
        tl.store(part_m + row, m_i)
        tl.store(part_l + row, l_i)
        tl.store(part_acc + row[:, None] * DV_P + dv[None, :], acc)


@triton.jit
def decode_attention_combine(
    part_m,
    part_l,
    part_acc,
    out,
    so_b,
    so_h,
    SPLITS,
    H: tl.constexpr,
    REP: tl.constexpr,
    REP_P: tl.constexpr,
    DV: tl.constexpr,
    DV_P: tl.constexpr,
    SPLITS_P: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """One program per (batch row, query head): its SPLITS partial softmaxes, each weighted by
    exp(its max - the overall max), summed and normalised. PDL: as decode_attention's."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = bh % H
    bk = b * (H // REP) + h // REP
    sp = tl.arange(0, SPLITS_P)
    dv = tl.arange(0, DV_P)
    row = (bk * SPLITS + sp).to(tl.int64) * REP_P + h % REP
    live = sp < SPLITS
    m = tl.load(part_m + row, mask=live, other=float("-inf"))
    l_s = tl.load(part_l + row, mask=live, other=0.0)
    acc = tl.load(part_acc + row[:, None] * DV_P + dv[None, :], mask=live[:, None], other=0.0)
    m_all = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_all))
    o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_s * w, axis=0)
    tl.store(out + b * so_b + h * so_h + dv, o.to(out.dtype.element_ty), mask=dv < DV)

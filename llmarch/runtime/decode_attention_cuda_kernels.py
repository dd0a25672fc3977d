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
):
    """q [B, H, D] (strides sq_*), k [B, KV, S, D], v [B, KV, S, DV] (last dims contiguous), mask
    uint8 [S] (nonzero = visible), out [B, H, DV]; CHUNK slots per split (a multiple of BS). PARTS
    (SPLITS > 1): write part_* float32 [B * KV, SPLITS, REP_P (, DV_P)] for the combine kernel, not out.
    CHUNK is a power-of-two multiple of BS (an eager step's prefix grows: a new variant only as
    it doubles); S and SPLITS are runtime values."""
    bk = tl.program_id(0)  # batch row * KV + KV head
    sp = tl.program_id(1)
    b = (bk // KV).to(tl.int64)
    kh = (bk % KV).to(tl.int64)
    r = tl.arange(0, REP_P)
    d = tl.arange(0, D_P)
    dv = tl.arange(0, DV_P)
    heads = kh * REP + r
    qp = q + b * sq_b + heads[:, None] * sq_h + d[None, :]
    q_t = tl.load(qp, mask=(r < REP)[:, None] & (d < D)[None, :], other=0.0)  # [REP_P, D_P]
    kbase = k + b * sk_b + kh * sk_h
    vbase = v + b * sv_b + kh * sv_h
    m_i = tl.full([REP_P], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([REP_P], dtype=tl.float32)
    acc = tl.zeros([REP_P, DV_P], dtype=tl.float32)
    start = sp * CHUNK
    if INTERPRETER:  # a compile-time trip count: the interpreter cannot loop to a runtime bound
        for s0 in range(0, CHUNK, BS):
            s = start + s0 + tl.arange(0, BS)
            m_i, l_i, acc = _slots(q_t, kbase, vbase, mask, s, d, dv, S, sk_s, sv_s, scale, m_i, l_i, acc, D, DV, True)
    else:  # up to the split's last slot: a cache shorter than the chunk skips the empty steps
        for s0 in range(start, tl.minimum(start + CHUNK, S), BS):
            s = s0 + tl.arange(0, BS)
            m_i, l_i, acc = _slots(q_t, kbase, vbase, mask, s, d, dv, S, sk_s, sv_s, scale, m_i, l_i, acc, D, DV, False)
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
):
    """One program per (batch row, query head): its SPLITS partial softmaxes, each weighted by
    exp(its max - the overall max), summed and normalised."""
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

"""Probe: a bf16 decode step's chain of GEMVs as ONE persistent CUDA kernel whose weights stream
through a shared-memory ring without a pause at the matrices' borders, against the runtime's
launches (gemv_stream_cuda's kernel one launch a GEMV, and the Triton kernel's).

    python benchmarks/probe_stream_step.py [--model llama-3.2-1b] [--rounds 5] \
        [--rings 6x32,6x32c] [--delay-us 0,4] [--trace] [--attention [--attn-splits 1,4] [--pos 159]] [--json OUT]

Why: the launched stream kernel asks for its first ~96 KB a CTA before its PDL wait, but its ring
then stops until the kernel before is done and its input row is read: each border between two
matrices (four a layer) leaves HBM idle for the grid's drain and the next input's round trip. The
weights are no kernel's output, so nothing stops them from streaming across the borders. Here one
CTA a SM runs the whole chain: a producer warp walks the CTA's rows of every matrix in order and
keeps the ring (--rings: slots x KB, up to ~200 KB a SM, ~26 MB on the GPU: ~6 us of the copy rate)
full, stopping only where the ring is; eight consumer warps compute each matrix's rows as
gemv_stream_cuda does (so the outputs equal its launches' bit for bit).

Between the matrices, q, h and the residual row travel as 32-bit words: a value's 16 bits under a
16-bit flag naming the matrix that wrote it in this launch, so a reader spins on the words
themselves, with no grid barrier and no fence (a grid counter with a release fence before each
arrival measured slower: the fence waits behind the SM's in-flight bulk copies; see README). Rows
are a fixed share of each matrix a CTA, or (suffix c) claimed two stages at a time from a counter
a matrix so that a faster SM takes more (ca: the next claim kept in flight).

--attention also runs the chain with a real decode attention between q|k|v and o (RoPE on q and k,
the cache write, pos + 1 = 160 slots of a random cache by default): the stream launches with the
runtime's attention op (decode_attention_cuda) against the one kernel with an attention op kind of
its own (run_attn: an item a KV head, or a split of its slots with --attn-splits, whose cached keys
and values the producer brings through the ring like weights; its q|k|v words waited for like any
input; split items' partial softmaxes merged by o as it reads them), logits compared, then timed.
On the H200 it is level with the launches, not past them (README).

--delay-us holds the q|k|v -> o border that long (each o CTA waits that long after its input; the
launch chain gets a one-CTA kernel of that length with the attention op's late PDL trigger): a
stand-in for the attention op, whose latency the ring may hide. --trace: in-kernel clocks of one
run per ring (input waits, rows, the grid's pace per matrix kind).

The chain is gemv_chain.Chain's (bench_gemv_cuda.matrices' shapes without attention). Prints step
times, % of the copy-rate bound, the ratio to the stream launches and the error against them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from llmarch.runtime import cuda_rtc  # noqa: E402
from llmarch.runtime import gemv_stream_cuda as gs  # noqa: E402

CONSUMERS = 256  # eight warps compute; a ninth (the producer) asks for the weights
CLAIM = 2  # stages a producer claims at a time

# the GPU primitives STEP uses beside gemv_stream_cuda.HELPERS (a CPU emulation supplies its own)
PRIMS = r"""
__device__ __forceinline__ void bar_arrive(u64* b) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(smem_addr(b)) : "memory");
}
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" :: "n"(CONSUMERS) : "memory"); }
__device__ __forceinline__ h16 ldcg(const h16* p) { return __ldcg((const unsigned short*)p); }
__device__ __forceinline__ u64 now_ns() { u64 t; asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t)); return t; }
__device__ __forceinline__ uint4 load4(const unsigned int* p) {
    uint4 v;
    asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ unsigned int load1(const unsigned int* p) {
    unsigned int v; asm volatile("ld.volatile.global.u32 %0, [%1];" : "=r"(v) : "l"(p)); return v;
}
__device__ __forceinline__ void store1(unsigned int* p, unsigned int v) {
    asm volatile("st.volatile.global.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ ulonglong2 load2w(const unsigned long long* p) {
    ulonglong2 v;
    asm volatile("ld.volatile.global.v2.u64 {%0, %1}, [%2];" : "=l"(v.x), "=l"(v.y) : "l"(p));
    return v;
}
__device__ __forceinline__ void store1w(unsigned long long* p, unsigned long long v) {
    asm volatile("st.volatile.global.u64 [%0], %1;" :: "l"(p), "l"(v) : "memory");
}
/* a word that never comes is a bug (a flag no writer gives): an error after 2 s, not a hung GPU */
__device__ __forceinline__ void give_up_after(u64 since) {
    if (now_ns() - since > 2000000000ull) __trap();
}
__device__ __forceinline__ void fence_mbarrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
"""

STEP = r"""
struct Op {            /* one matrix of the chain, as the host packs it (72 bytes) */
    const h16* w;      /* N (2N with GLU: gate rows then up rows) rows of K */
    const void* x;     /* input row: 16-bit values (x_src < 0) or flagged words written by op x_src */
    const h16* nw;     /* RMS-norm weight (16-bit) or null */
    const void* res;   /* residual row, as x (res_src) */
    void* y;           /* output row: flagged words (y_flagged) or 16-bit values */
    int N, kind, x_src, res_src, y_flagged, delay_ns;
    float eps, pad;
};

#define NEG_INF __int_as_float(0xff800000)
/* the flag op j of launch `epoch` writes beside each value: never 0 (a zeroed buffer is unwritten) */
__device__ __forceinline__ unsigned int flag_of(unsigned int epoch, int n_ops, int j) {
    return (unsigned int)(((unsigned long long)epoch * n_ops + j) % 65535ull) + 1u;
}
__device__ __forceinline__ bool flagged(uint4 v, unsigned int f) {
    return (v.x >> 16) == f && (v.y >> 16) == f && (v.z >> 16) == f && (v.w >> 16) == f;
}
/* a 64-bit word: a float's bits under a 32-bit flag */
__device__ __forceinline__ bool flagged2(ulonglong2 v, unsigned int f) {
    return (unsigned int)(v.x >> 32) == f && (unsigned int)(v.y >> 32) == f;
}
__device__ __forceinline__ float value_of(unsigned long long w) { return __uint_as_float((unsigned int)w); }

/* the consumers' share of one matrix: input row (normed), then each stage of this CTA's rows;
   returns the ring index after them */
template <int K, int CR, int GLU, int NORM, int RES, int COMBINE>
__device__ int run_op(const Op op, int i, unsigned int epoch, int n_ops, int j, unsigned char* ring, h16* xs,
                      float* red, u64* full, u64* empty, const int4* desc, u64* trace) {
    constexpr int PARTS = GLU ? 2 : 1, VEC = K / 8, TPR = CONSUMERS / CR, VPT = (VEC + TPR - 1) / TPR, WPR = TPR / 32;
    constexpr int PER = (K + 4 * CONSUMERS - 1) / (4 * CONSUMERS);  /* 4-word loads a thread */
    const int t = threadIdx.x, G = gridDim.x, b = blockIdx.x;
    /* the input row: each flagged word is ready when its flag is the writer's (no fence, no barrier) */
    float vals[PER * 4];
#if ATTN && ATTN_SPL > 1
    if (COMBINE) {  /* o's input: the attention's ATTN_SPL partial softmaxes of each query head, merged */
        constexpr int D = ATTN_D, H = ATTN_KV * ATTN_REP, SPL = ATTN_SPL, RW = D + 2;
        const unsigned long long* aw = (const unsigned long long*)op.x;
        const unsigned int f = flag_of(epoch, n_ops, op.x_src);
#pragma unroll
        for (int p = 0; p < PER; ++p) {
            const int k0 = (t + p * CONSUMERS) * 4;
            if (k0 >= K) { vals[p * 4] = vals[p * 4 + 1] = vals[p * 4 + 2] = vals[p * 4 + 3] = 0.f; continue; }
            const int hq = k0 / D, d0 = k0 % D;
            /* per split: (max, sum), values d0, d0 + 1, values d0 + 2, d0 + 3; all asked for, then waited on */
            auto at = [&](int sp, int q) { return aw + ((long long)sp * H + hq) * RW + (q == 0 ? D : d0 + 2 * (q - 1)); };
            ulonglong2 w[SPL][3];
#pragma unroll
            for (int sp = 0; sp < SPL; ++sp)
#pragma unroll
                for (int q = 0; q < 3; ++q) w[sp][q] = load2w(at(sp, q));
#pragma unroll
            for (int sp = 0; sp < SPL; ++sp)
#pragma unroll
                for (int q = 0; q < 3; ++q)
                    for (const u64 since = now_ns(); !flagged2(w[sp][q], f);) {
                        give_up_after(since);
                        w[sp][q] = load2w(at(sp, q));
                    }
            float mx = NEG_INF, den = 0.f, num[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int sp = 0; sp < SPL; ++sp) mx = fmaxf(mx, value_of(w[sp][0].x));
#pragma unroll
            for (int sp = 0; sp < SPL; ++sp) {
                const float m = value_of(w[sp][0].x), wt = m == NEG_INF ? 0.f : __expf(m - mx);  /* empty split */
                den = fmaf(wt, value_of(w[sp][0].y), den);
                num[0] = fmaf(wt, value_of(w[sp][1].x), num[0]); num[1] = fmaf(wt, value_of(w[sp][1].y), num[1]);
                num[2] = fmaf(wt, value_of(w[sp][2].x), num[2]); num[3] = fmaf(wt, value_of(w[sp][2].y), num[3]);
            }
#pragma unroll
            for (int e = 0; e < 4; ++e) vals[p * 4 + e] = tof(to16(num[e] / den));  /* rounded as one split's */
        }
    } else
#endif
    if (op.x_src < 0) {
#pragma unroll
        for (int p = 0; p < PER; ++p)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int k = (t + p * CONSUMERS) * 4 + e;
                vals[p * 4 + e] = k < K ? tof(ldcg((const h16*)op.x + k)) : 0.f;
            }
    } else {
        const unsigned int f = flag_of(epoch, n_ops, op.x_src);
        const unsigned int* xw = (const unsigned int*)op.x;
        uint4 v[PER];
#pragma unroll
        for (int p = 0; p < PER; ++p) if ((t + p * CONSUMERS) * 4 < K) v[p] = load4(xw + (t + p * CONSUMERS) * 4);
#pragma unroll
        for (int p = 0; p < PER; ++p)
            if ((t + p * CONSUMERS) * 4 < K) {
                for (const u64 since = now_ns(); !flagged(v[p], f);) {
                    give_up_after(since);
                    v[p] = load4(xw + (t + p * CONSUMERS) * 4);
                }
                vals[p * 4] = tof((h16)v[p].x); vals[p * 4 + 1] = tof((h16)v[p].y);
                vals[p * 4 + 2] = tof((h16)v[p].z); vals[p * 4 + 3] = tof((h16)v[p].w);
            } else {
                vals[p * 4] = vals[p * 4 + 1] = vals[p * 4 + 2] = vals[p * 4 + 3] = 0.f;
            }
    }
    if (trace && t == 0) trace[((long long)j * G + b) * 4 + 1] = now_ns();
    if (op.delay_ns > 0 && t == 0) {  /* the stand-in for attention: its output comes this much later */
        u64 until = now_ns() + (u64)op.delay_ns;
        while (now_ns() < until) {}
    }
#pragma unroll
    for (int p = 0; p < PER; ++p)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int k = (t + p * CONSUMERS) * 4 + e;
            if (k < K) xs[k] = to16(vals[p * 4 + e]);
        }
    consumers_sync();
    if (NORM) {  /* the sum of squares in the order gemv_stream_cuda adds them: outputs equal bit for bit */
        float ss = 0.f;
        for (int k = t; k < K; k += CONSUMERS) { float x = tof(xs[k]); ss = fmaf(x, x, ss); }
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        float* part = red + 64;
        if ((t & 31) == 0) part[t >> 5] = ss;
        consumers_sync();
        ss = 0.f;
        for (int k = 0; k < CONSUMERS / 32; ++k) ss += part[k];
        const float inv = rsqrtf(ss / K + op.eps);
        for (int k = t; k < K; k += CONSUMERS) xs[k] = to16(tof(xs[k]) * inv * tof(op.nw[k]));
        consumers_sync();
    }
    const int row = t / TPR, lt = t % TPR, wi = lt >> 5;
    uint4 xr[VPT];
#pragma unroll
    for (int q = 0; q < VPT; ++q) xr[q] = lt + q * TPR < VEC ? ((const uint4*)xs)[lt + q * TPR] : make_uint4(0, 0, 0, 0);
    const unsigned int fy = flag_of(epoch, n_ops, j), fr = op.res_src < 0 ? 0u : flag_of(epoch, n_ops, op.res_src);
    for (int c = 0;; ++c) {  /* the ring's stages while they hold this matrix's rows (desc: matrix, first row, rows) */
        const int s = i % SLOTS;
        bar_wait(&full[s], (i / SLOTS) & 1);
        const int4 d = desc[s];
        if (d.x != j) break;
        const int rs = d.y, n = d.z;
        const uint4* wv = (const uint4*)(ring + s * SLOT) + row * VEC;
        float acc = 0.f, up = 0.f;
#pragma unroll
        for (int q = 0; q < VPT; ++q)
            if (lt + q * TPR < VEC) acc = dot8(wv[lt + q * TPR], xr[q], acc);
        if (GLU) {
            const uint4* uv = wv + CR * VEC;
#pragma unroll
            for (int q = 0; q < VPT; ++q)
                if (lt + q * TPR < VEC) up = dot8(uv[lt + q * TPR], xr[q], up);
        }
        for (int o = 16; o > 0; o >>= 1) {
            acc += __shfl_xor_sync(0xffffffffu, acc, o);
            if (GLU) up += __shfl_xor_sync(0xffffffffu, up, o);
        }
        float* rb = red + (c & 1) * 32;
        if ((t & 31) == 0) {
            rb[(row * WPR + wi) * PARTS] = acc;
            if (GLU) rb[(row * WPR + wi) * PARTS + 1] = up;
        }
        consumers_sync();  /* every consumer is done with slot s: the producer may refill it */
        if (t == 0) bar_arrive(&empty[s]);
        if (t < n) {
            float g = 0.f, u = 0.f;
            for (int k = 0; k < WPR; ++k) g += rb[(t * WPR + k) * PARTS];
            if (GLU) {
                for (int k = 0; k < WPR; ++k) u += rb[(t * WPR + k) * PARTS + 1];
                g = g * (1.f / (1.f + __expf(-g))) * u;
            }
            if (RES) {
                h16 r;
                if (op.res_src < 0) {
                    r = ldcg((const h16*)op.res + rs + t);
                } else {
                    unsigned int w;
                    const u64 since = now_ns();
                    while (((w = load1((const unsigned int*)op.res + rs + t)) >> 16) != fr) give_up_after(since);
                    r = (h16)w;
                }
                g = tof(to16(g)) + tof(r);
            }
            if (op.y_flagged) store1((unsigned int*)op.y + rs + t, (fy << 16) | to16(g));
            else ((h16*)op.y)[rs + t] = to16(g);
        }
        ++i;
    }
    return i;
}

#if ATTN
/* one KV head's decode attention (item g of an attention op): ATTN_REP query heads share the head,
   and ATTN_REP * ATTN_D == CONSUMERS, so thread t is (query head t / D, lane t % D) where it owns an
   output value. The producer streams the head's cached keys and values (slots before pos) through
   the ring as chunks of ATTN_CH slots, the keys then the values in one slot, long before the
   consumers get there: once q|k|v's words come, the work is in shared memory. Scores: D / 8
   threads a slot, each a 16-byte piece of its key against the same dims of every query head (held
   in registers), summed by shuffles. Weighing V: a thread a pair of values, the chunk's slots split
   among CONSUMERS / (D / 2) groups, summed through shared memory: each value read once.
   q, k and v are words of the q|k|v matrix's output; RoPE on q and k (row pos of cos / sin, sin's
   first half negated, as the runtime's tables); this step's key and value go to the cache slot pos
   (op.w: the layer's K cache, op.nw: its V cache, [KV, SMAX, D]); an online softmax across the
   chunks; the output flagged for o. Rounded as decode_attention_cuda rounds: q and k to 16 bits
   after RoPE, the probabilities before they weigh V, float32 sums. */
__device__ int run_attn(const Op op, int i, unsigned int epoch, int n_ops, int j, unsigned char* ring, h16* xs,
                        u64* full, u64* empty, const int4* desc, const float* cos_t, const float* sin_t, int pos,
                        u64* trace) {
    constexpr int D = ATTN_D, REP = ATTN_REP, KV = ATTN_KV, Q = KV * REP * D, W = CONSUMERS / 32, CH = ATTN_CH;
    constexpr int SPL = ATTN_SPL;                              /* splits of a head's slots: items */
    constexpr int TPS = D / 8, SPP = CONSUMERS / TPS;          /* scoring: threads a slot, slots a pass */
    constexpr int PAIRS = D / 2, SG = CONSUMERS / PAIRS;      /* weighing V: value pairs, slot groups */
    const int t = threadIdx.x, G = gridDim.x, b = blockIdx.x, h = t / D, d = t % D, partner = (d + D / 2) % D;
    const int piece = t % TPS, pair = t % PAIRS, grp = t / PAIRS;
    float* qs = (float*)xs;             /* [REP * D] rotated queries */
    float* kn = qs + REP * D;           /* [D] this step's key, rotated */
    float* vn = kn + D;                 /* [D] this step's value */
    float* p = vn + D;                  /* [REP][CONSUMERS] a chunk's scores, then probabilities */
    float* part = p + REP * CONSUMERS;  /* [2][REP][W] per-warp maxima, per-warp sums */
    float* pvs = part + 2 * REP * W;    /* [SG][REP][D] each slot group's weighed values */
    const unsigned int f = flag_of(epoch, n_ops, op.x_src), fy = flag_of(epoch, n_ops, j);
    const unsigned int* qkv = (const unsigned int*)op.x;
    const float* cs = cos_t + (long long)pos * D;
    const float* sn = sin_t + (long long)pos * D;
    const float scale = rsqrtf((float)D);
    float m[REP], l[REP], acc = 0.f, qr[REP][8];
    for (int c = 0;; ++c) {
        const int s = i % SLOTS;
        bar_wait(&full[s], (i / SLOTS) & 1);
        const int4 dsc = desc[s];
        if (dsc.x != j) break;
        const int g = dsc.y / SPL, sp = dsc.y % SPL, c0 = dsc.z;
        const int len = (pos + SPL) / SPL, lo = sp * len, hi = min(lo + len, pos + 1);  /* the split's slots */
        const h16* ks = (const h16*)(ring + s * SLOT);  /* slots c0.. of head g (those before pos) */
        const h16* vs = ks + CH * D;
        if (c0 == lo) {  /* the split's first chunk: its queries, this step's key and value */
            auto word = [&](int at) {  /* the value of q|k|v's word `at` once its flag is this step's */
                unsigned int w;
                const u64 since = now_ns();
                while (((w = load1(qkv + at)) >> 16) != f) give_up_after(since);
                return tof((h16)w);
            };
            const int qa = (g * REP + h) * D;
            const float qx = word(qa + d), qy = word(qa + partner);
            float kx = 0.f, ky = 0.f, vx = 0.f;
            if (t < D) { kx = word(Q + g * D + d); ky = word(Q + g * D + partner); vx = word(Q + KV * D + g * D + d); }
            if (trace && t == 0) trace[((long long)j * G + b) * 4 + 1] = now_ns();
            qs[t] = tof(to16(qx * cs[d] + qy * sn[d]));
            if (t < D) {
                kn[t] = tof(to16(kx * cs[d] + ky * sn[d]));
                vn[t] = vx;
                if (lo <= pos && pos < hi) {  /* for the next steps, by the split that holds slot pos */
                    const long long at = ((long long)g * SMAX + pos) * D + t;
                    ((h16*)op.w)[at] = to16(kn[t]);
                    ((h16*)op.nw)[at] = to16(vx);
                }
            }
#pragma unroll
            for (int r = 0; r < REP; ++r) { m[r] = NEG_INF; l[r] = 0.f; }
            acc = 0.f;
            consumers_sync();
#pragma unroll
            for (int r = 0; r < REP; ++r)
#pragma unroll
                for (int z = 0; z < 8; ++z) qr[r][z] = qs[r * D + 8 * piece + z];
        }
        for (int s0 = 0; s0 < CH; s0 += SPP) {  /* scores into p, a pass of SPP slots at a time */
            const int k = s0 + t / TPS, sl = c0 + k;
            float sc[REP];
#pragma unroll
            for (int r = 0; r < REP; ++r) sc[r] = 0.f;
            if (k < CH && sl < hi) {
                float kv[8];
                if (sl < pos) {
                    const uint4 u = ((const uint4*)(ks + k * D))[piece];
                    kv[0] = first(u.x); kv[1] = second(u.x); kv[2] = first(u.y); kv[3] = second(u.y);
                    kv[4] = first(u.z); kv[5] = second(u.z); kv[6] = first(u.w); kv[7] = second(u.w);
                } else {  /* slot pos: this step's key */
#pragma unroll
                    for (int z = 0; z < 8; ++z) kv[z] = kn[8 * piece + z];
                }
#pragma unroll
                for (int r = 0; r < REP; ++r)
#pragma unroll
                    for (int z = 0; z < 8; ++z) sc[r] = fmaf(qr[r][z], kv[z], sc[r]);
            }
#pragma unroll
            for (int r = 0; r < REP; ++r) {
                for (int o = TPS / 2; o > 0; o >>= 1) sc[r] += __shfl_xor_sync(0xffffffffu, sc[r], o);
                if (piece == 0 && k < CH) p[r * CONSUMERS + k] = sc[r];
            }
        }
        consumers_sync();
        const int sl = c0 + t;
        const bool live = t < CH && sl < hi;
        float sc[REP];
#pragma unroll
        for (int r = 0; r < REP; ++r) {
            sc[r] = live ? p[r * CONSUMERS + t] * scale : NEG_INF;
            float v = sc[r];
            for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
            if ((t & 31) == 0) part[r * W + (t >> 5)] = v;
        }
        consumers_sync();
        float alpha[REP], m_new[REP];
#pragma unroll
        for (int r = 0; r < REP; ++r) {
            float cm = NEG_INF;
            for (int w = 0; w < W; ++w) cm = fmaxf(cm, part[r * W + w]);
            m_new[r] = fmaxf(m[r], cm);  /* -inf only in a split with no slots (a cache shorter than the splits) */
            alpha[r] = m_new[r] == NEG_INF ? 1.f : __expf(m[r] - m_new[r]);
            const float pr = live ? __expf(sc[r] - m_new[r]) : 0.f;
            if (t < CH) p[r * CONSUMERS + t] = tof(to16(pr));  /* rounded as V's dtype before it weighs V */
            float v = pr;  /* the sum takes the unrounded probabilities, as the runtime's kernel */
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if ((t & 31) == 0) part[(REP + r) * W + (t >> 5)] = v;
        }
        consumers_sync();
#pragma unroll
        for (int r = 0; r < REP; ++r) {
            float sum = 0.f;
            for (int w = 0; w < W; ++w) sum += part[(REP + r) * W + w];
            l[r] = l[r] * alpha[r] + sum;
            m[r] = m_new[r];
        }
        float a2[REP][2];
#pragma unroll
        for (int r = 0; r < REP; ++r) a2[r][0] = a2[r][1] = 0.f;
        const int n = min(CH, hi - c0);
        for (int k = grp; k < n; k += SG) {
            float v0, v1;
            if (c0 + k == pos) {
                v0 = vn[2 * pair]; v1 = vn[2 * pair + 1];
            } else {
                const unsigned int w = ((const unsigned int*)(vs + k * D))[pair];
                v0 = first(w); v1 = second(w);
            }
#pragma unroll
            for (int r = 0; r < REP; ++r) {
                const float pk = p[r * CONSUMERS + k];
                a2[r][0] = fmaf(pk, v0, a2[r][0]);
                a2[r][1] = fmaf(pk, v1, a2[r][1]);
            }
        }
#pragma unroll
        for (int r = 0; r < REP; ++r) *(float2*)(pvs + (grp * REP + r) * D + 2 * pair) = make_float2(a2[r][0], a2[r][1]);
        consumers_sync();
        float pv = 0.f;
#pragma unroll
        for (int q = 0; q < SG; ++q) pv += pvs[(q * REP + h) * D + d];
        float ah = 0.f;
#pragma unroll
        for (int r = 0; r < REP; ++r) ah = r == h ? alpha[r] : ah;
        acc = acc * ah + pv;
        consumers_sync();  /* the slot, p, part and pvs are read by all before they are written again */
        if (t == 0) bar_arrive(&empty[s]);
        if (c0 + CH >= hi) {  /* the split's last chunk */
            float lh = 1.f, mh = 0.f;
#pragma unroll
            for (int r = 0; r < REP; ++r) { lh = r == h ? l[r] : lh; mh = r == h ? m[r] : mh; }
            if (SPL == 1) {
                store1((unsigned int*)op.y + (g * REP + h) * D + d, (fy << 16) | to16(acc / lh));
            } else {  /* the partial softmax for o's input to merge: acc unnormalised, then max and sum */
                unsigned long long* row = (unsigned long long*)op.y + ((long long)sp * KV * REP + g * REP + h) * (D + 2);
                const unsigned long long fl = (unsigned long long)fy << 32;
                store1w(row + d, fl | __float_as_uint(acc));
                if (d == 0) { store1w(row + D, fl | __float_as_uint(mh)); store1w(row + D + 1, fl | __float_as_uint(lh)); }
            }
        }
        ++i;
    }
    return i;
}
#endif

extern "C" __global__ void __launch_bounds__(CONSUMERS + 32, 1)
step_stream(const Op* __restrict__ ops, int n_ops, unsigned int* epoch_at, unsigned int* claims, u64* trace,
            const float* cos_t, const float* sin_t, int pos)
{
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char* ring = smem;
    h16* xs = (h16*)(smem + SLOTS * SLOT);
    float* red = (float*)(xs + KMAX);
    int4* desc = (int4*)(red + 128);
    u64* full = (u64*)(desc + SLOTS);
    u64* empty = full + SLOTS;
    const int t = threadIdx.x, G = gridDim.x;
    if (t == 0) {
        for (int s = 0; s < SLOTS; ++s) { bar_init(&full[s]); bar_init(&empty[s]); }
        fence_mbarrier_init();
    }
    __syncthreads();
    /* every CTA reads the launch's epoch before it claims or writes anything; CTA 0 moves it on at
       its end, after its last matrix, which needed every CTA's rows (every CTA has read it by then) */
    const unsigned int epoch = *(volatile unsigned int*)epoch_at;
    if (t >= CONSUMERS) {
        /* the producer: this CTA's rows of each matrix in order (CLAIMS: claimed CLAIM stages at a
           time from the matrix's counter, so that a faster SM takes more; each CTA's claims end with
           one that finds the matrix taken, so a launch adds exactly stages + G to the counter),
           each stage described for the consumers and copied as slots free up */
        if (t != CONSUMERS) return;
        int i = 0;
        for (int j = 0; j < n_ops; ++j) {
            const Op op = ops[j];  /* in registers: a reference would reload each field after each store */
            const int K = kind_k(op.kind), parts = kind_glu(op.kind) ? 2 : 1, N = op.N;
            const int CR = kind_rows(op.kind);  /* attention: an item a "row" */
            auto stage = [&](int rs, int end) {  /* rows rs.. (before end) of matrix j into the next slot */
#if ATTN
                if (kind_attn(op.kind)) {  /* item rs (KV head rs / ATTN_SPL, a split of its slots): its
                                              cached keys and values, ATTN_CH slots a stage */
                    const int len = (pos + ATTN_SPL) / ATTN_SPL, lo = rs % ATTN_SPL * len, hi = min(lo + len, pos + 1);
                    for (int c0 = lo; c0 < hi || c0 == lo; c0 += ATTN_CH) {
                        const int s = i % SLOTS, n = min(ATTN_CH, min(hi, pos) - c0);  /* slot pos is this step's */
                        if (i >= SLOTS) bar_wait(&empty[s], ((i / SLOTS) + 1) & 1);
                        desc[s] = make_int4(j, rs, c0, 0);
                        if (n > 0) {
                            const unsigned int bytes = (unsigned int)n * ATTN_D * 2;
                            const long long at = ((long long)(rs / ATTN_SPL) * SMAX + c0) * ATTN_D;
                            unsigned char* dst = ring + s * SLOT;
                            bar_expect(&full[s], 2 * bytes);
                            bulk_load(dst, op.w + at, bytes, &full[s]);
                            bulk_load(dst + ATTN_CH * ATTN_D * 2, op.nw + at, bytes, &full[s]);
                        } else {
                            bar_arrive(&full[s]);
                        }
                        ++i;
                    }
                    return;
                }
#endif
                const int s = i % SLOTS, n = min(CR, end - rs);
                if (i >= SLOTS) bar_wait(&empty[s], ((i / SLOTS) + 1) & 1);
                const unsigned int bytes = (unsigned int)n * K * 2;
                desc[s] = make_int4(j, rs, n, 0);
                bar_expect(&full[s], bytes * parts);
                unsigned char* dst = ring + s * SLOT;
                bulk_load(dst, op.w + (long long)rs * K, bytes, &full[s]);
                if (parts == 2) bulk_load(dst + CR * K * 2, op.w + ((long long)N + rs) * K, bytes, &full[s]);
                ++i;
            };
#if CLAIMS
            const int claim = kind_attn(op.kind) ? 1 : CLAIM;  /* attention: an item a claim */
            const unsigned int chunks = (unsigned int)((N + CR * claim - 1) / (CR * claim));
            const unsigned int base = epoch * (chunks + (unsigned int)G);
            unsigned int c = atomicAdd(&claims[j], 1u) - base;
            while (c < chunks) {
#if AHEAD  /* the next claim in flight while this one's stages wait for slots */
                const unsigned int next = atomicAdd(&claims[j], 1u) - base;
#endif
                for (int k = 0; k < claim && ((int)c * claim + k) * CR < N; ++k) stage(((int)c * claim + k) * CR, N);
#if AHEAD
                c = next;
#else
                c = atomicAdd(&claims[j], 1u) - base;
#endif
            }
#else  /* this CTA's share of the rows, the same every step */
            const int b = blockIdx.x, r1 = (int)((long long)N * (b + 1) / G);
            /* (a stage past r1 would compute the next CTA's rows too: in place on the residual row,
               that CTA would then find the words flagged by this matrix, not the one before, and wait
               for ever) */
            for (int rs = (int)((long long)N * b / G); rs < r1; rs += CR) stage(rs, r1);
#endif
        }
        const int s = i % SLOTS;  /* the end: a stage of no matrix */
        if (i >= SLOTS) bar_wait(&empty[s], ((i / SLOTS) + 1) & 1);
        desc[s] = make_int4(n_ops, 0, 0, 0);
        bar_arrive(&full[s]);
        return;
    }
    const int b = blockIdx.x;
    int i = 0;
    for (;;) {
        const int s = i % SLOTS;
        bar_wait(&full[s], (i / SLOTS) & 1);
        const int j = desc[s].x;
        if (j >= n_ops) break;
        const Op op = ops[j];  /* in registers: a reference would reload each field after each store */
        if (trace && t == 0) trace[((long long)j * G + b) * 4] = now_ns();
        switch (op.kind) {
KIND_CASES
        }
        if (trace && t == 0) trace[((long long)j * G + b) * 4 + 2] = now_ns();
        consumers_sync();  /* all have read desc[s] before the producer may write it again */
    }
    if (b == 0 && t == 0) *(volatile unsigned int*)epoch_at = epoch + 1u;
}
"""

DELAY = r"""
extern "C" __global__ void delay(int ns) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t)); } while (t - t0 < (unsigned long long)ns);
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
"""


def step_source(
    kinds: list[tuple[int, bool, bool, bool]],
    slots: int,
    slot_bytes: int,
    claims: bool = False,
    ahead: bool = False,
    attn: tuple[int, int, int, int, int] | None = None,
    helpers: str | None = None,
) -> str:
    """STEP for matrix kinds (K, glu, norm, res), a ring of `slots` slots of slot_bytes; attn: (query
    heads, KV heads, head width, cache slots, splits of a head's slots) of an attention op kind,
    numbered after the matrices (with splits, o merges their partial softmaxes as it reads them);
    helpers: the primitives (default gemv_stream_cuda.HELPERS + PRIMS, the GPU's)."""

    rows = [gs.stage_rows(K, g, slot_bytes) for K, g, _, _ in kinds]  # one rule for consumers and producer
    splits = 1 if attn is None else attn[4]
    cases = "\n".join(
        f"        case {n}: i = run_op<{K}, {rows[n]}, {int(g)}, {int(nm)}, {int(r)}, {int(n == O_KIND and splits > 1)}>"
        f"(op, i, epoch, n_ops, j, ring, xs, red, full, empty, desc, trace); break;"
        for n, (K, g, nm, r) in enumerate(kinds)
    )
    if attn is not None:
        cases += (
            f"\n        case {len(kinds)}: i = run_attn(op, i, epoch, n_ops, j, ring, xs, full, empty, desc, cos_t, sin_t, pos, "
            "trace); break;"
        )
    k_of = " ".join(f"if (kind == {n}) return {K};" for n, (K, _, _, _) in enumerate(kinds))
    g_of = " ".join(f"if (kind == {n}) return {int(g)};" for n, (_, g, _, _) in enumerate(kinds))
    r_of = " ".join(f"if (kind == {n}) return {r};" for n, r in enumerate(rows))  # attention's kind: 1
    defs = {
        "HALF": 0,
        "AHEAD": int(ahead),
        "CLAIMS": int(claims),
        "CLAIM": CLAIM,
        "SLOTS": slots,
        "SLOT": slot_bytes,
        "CONSUMERS": CONSUMERS,
        "KMAX": xs_values(kinds, attn),
        "ATTN": int(attn is not None),
    }
    if attn is not None:
        H, KV, D, smax, _ = attn
        # cache slots a stage: their keys and values fill a slot, at most a slot a consumer thread
        chunk = attn_chunk(slot_bytes, D)
        defs.update(
            {"ATTN_D": D, "ATTN_REP": H // KV, "ATTN_KV": KV, "SMAX": smax, "ATTN_CH": chunk, "ATTN_SPL": splits}
        )
    head = "".join(f"#define {k} {v}\n" for k, v in defs.items())
    shapes = (
        f"__device__ __forceinline__ int kind_k(int kind) {{ {k_of} return 0; }}\n"
        f"__device__ __forceinline__ int kind_glu(int kind) {{ {g_of} return 0; }}\n"
        f"__device__ __forceinline__ int kind_rows(int kind) {{ {r_of} return 1; }}\n"
        f"__device__ __forceinline__ int kind_attn(int kind) {{ return {'kind == ' + str(len(kinds)) if attn else 0}; }}\n"
    )
    return head + (helpers or gs.HELPERS + PRIMS) + shapes + STEP.replace("KIND_CASES", cases)


def xs_values(kinds: list, attn: tuple[int, int, int, int, int] | None) -> int:
    """16-bit values of the shared input row: the widest matrix input, or run_attn's float scratch
    (rotated queries, the new key and value, a chunk's probabilities, the per-warp partials, the slot
    groups' weighed values) where that is larger (it lives there), a multiple of 8."""
    n = max(k[0] for k in kinds)
    if attn is not None:
        H, KV, D = attn[:3]
        rep = H // KV
        n = max(n, 2 * (rep * D + 2 * D + rep * CONSUMERS + 2 * rep * (CONSUMERS // 32) + 2 * CONSUMERS * rep))
    return -(-n // 8) * 8


def attn_chunk(slot_bytes: int, head_width: int) -> int:
    """Cache slots a stage of run_attn: their keys then values fill one ring slot, and a consumer
    thread scores each."""
    return max(1, min(CONSUMERS, slot_bytes // (4 * head_width)))


def shared_bytes(slots: int, slot_bytes: int, kmax: int) -> int:
    return slots * slot_bytes + kmax * 2 + 128 * 4 + slots * 16 + 2 * slots * 8


OP = struct.Struct("<5Q6i2f")  # the kernel's struct Op


def parse_ring(ring: str) -> tuple[int, int, bool, bool]:
    """ "6x32" -> (slots, KB, rows claimed, claims one ahead): suffix c claims, ca claims ahead."""
    size = ring.rstrip("ca")
    slots, kb = (int(v) for v in size.split("x"))
    return slots, kb, "c" in ring[len(size) :], ring.endswith("a")


def pack_ops(torch, ops: list[tuple], device: str = "cuda") -> object:
    """The Op table: (w, x, nw, res, y, N, kind, x_src, res_src, y_flagged, delay_ns, eps) a matrix."""
    raw = b"".join(OP.pack(*(0 if p is None else p.data_ptr() for p in op[:5]), *op[5:], 0.0) for op in ops)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)


O_KIND = 1  # chain_kinds' o: the kind that merges split attention's partials


def chain_kinds(D: int, Q: int, F: int) -> list[tuple[int, bool, bool, bool]]:
    """The chain's matrix kinds (K, glu, norm, res) in Op.kind order: q|k|v, o, gate|up, down, and the
    head (q|k|v's kind, apart in the trace); an attention op kind is numbered after them."""
    qkv = (D, False, True, False)
    return [qkv, (Q, False, False, True), (D, True, True, False), (F, False, False, True), qkv]


def chain_ops(
    w: tuple, nw, x, logits, words: tuple, caches=None, attn_kind: int = 0, delay_ns: int = 0, splits: int = 1
) -> list:
    """The Op table's rows for the chain (pack_ops' tuples), each op naming the op whose flagged words
    it reads: w = (q|k|v [L, NQKV, D], o [L, D, Q], gate|up [L, 2F, D], down [L, D, F], head [V, D]);
    words = (q, h, residual, attention output) flagged-word buffers (the last unused without
    caches). Per layer q|k|v, [attention: caches = (K, V) [L, KV, SMAX, Dh]], o (+ x), gate|up,
    down (+ x); then the head. x is read as 16-bit values by the first q|k|v and the first o's
    residual, the flagged residual row after; delay_ns: o's stand-in for attention; splits: of each
    KV head's slots, an attention item each (their partial softmaxes in the attention output's 64-bit
    words, merged by o)."""
    wqkv, wo, wgu, wd, whead = w
    qw, hw, xw, aw = words
    ops: list = []
    xsrc = -1  # the op that last wrote the residual row (-1: x itself)
    for layer in range(wqkv.shape[0]):
        j = len(ops)
        xin = x if xsrc < 0 else xw
        ops.append((wqkv[layer], xin, nw, None, qw, wqkv.shape[1], 0, xsrc, -1, 1, 0, 1e-5))
        o_in = qw  # without attention: q's first rows stand in for its output
        if caches is not None:
            kc, vc = caches
            ops.append((kc[layer], qw, vc[layer], None, aw, kc.shape[1] * splits, attn_kind, j, -1, 1, 0, 0.0))
            o_in, j = aw, j + 1
        ops += [
            (wo[layer], o_in, None, xin, xw, wo.shape[1], 1, j, xsrc, 1, delay_ns, 0.0),
            (wgu[layer], xw, nw, None, hw, wgu.shape[1] // 2, 2, j + 1, -1, 1, 0, 1e-5),
            (wd[layer], hw, None, xw, xw, wd.shape[1], 3, j + 2, j + 1, 1, 0, 0.0),
        ]
        xsrc = j + 3
    ops.append((whead, xw, nw, None, logits, whead.shape[0], 4, xsrc, -1, 0, 0, 1e-5))
    return ops


def stream_chain(c, x, q, h, logits, between) -> None:
    """The chain by gemv_stream_cuda's launches, one a matrix; between(layer, q) runs what lies
    between q|k|v and o and returns o's input row."""
    for layer in range(c.L):
        gs.launch(x, c.wqkv[layer], None, q, False, c.nw, 1e-5, None)
        gs.launch(between(layer, q), c.wo[layer], None, x, False, None, 0.0, x)
        gs.launch(x, c.wgu[layer], None, h, True, c.nw, 1e-5, None)
        gs.launch(h, c.wd[layer], None, x, False, None, 0.0, x)
    gs.launch(x, c.whead, None, logits, False, c.nw, 1e-5, None)


def ran(torch, c, fn) -> tuple:
    """The buffers after three launches of a Persistent on fresh ones (the epoch moves on: each run
    must see only its own flags), the residual row read back from its flagged words."""
    b = c.bufs()
    for _ in range(3):
        fn(*b)
    torch.cuda.synchronize()
    return (fn.residual(), *b[1:])


class Attention:
    """A decode step's attention for both chains: the model's heads, per layer K and V caches
    [KV, SMAX, D] (random before slot pos), RoPE tables as the runtime keeps them (cos, and sin with
    its first half negated, [SMAX, D] float32) and the position (pos + 1 slots attended)."""

    def __init__(self, torch, c, cfg: dict, pos: int = 159, smax: int = 256, theta: float = 500000.0) -> None:
        self.H, self.KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.D = cfg.get("head_dim") or cfg["hidden_size"] // self.H
        self.pos, self.smax = pos, smax
        g = torch.Generator(device="cuda").manual_seed(1)
        shape = (c.L, self.KV, smax, self.D)
        self.kc, self.vc = (torch.randn(*shape, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
        inv = 1.0 / theta ** (torch.arange(0, self.D, 2, device="cuda", dtype=torch.float64) / self.D)
        freqs = torch.arange(smax, device="cuda", dtype=torch.float64)[:, None] * inv[None]
        self.cos = torch.cat([freqs.cos(), freqs.cos()], -1).float().contiguous()
        self.sin = torch.cat([-freqs.sin(), freqs.sin()], -1).float().contiguous()

    def shape(self) -> tuple[int, int, int, int]:
        return self.H, self.KV, self.D, self.smax

    def fits(self) -> bool:
        """run_attn's thread map: (query heads a KV head) x head width = the consumer threads."""
        return (self.H // self.KV) * self.D == CONSUMERS and self.D % 8 == 0


def attention_words(torch, heads: int, width: int, splits: int, device: str):
    """The attention's output between it and o: a flagged 32-bit word a value, or with splits a
    64-bit word a float, per split and query head its width's partial values then max and sum."""
    if splits == 1:
        return torch.zeros(heads * width, dtype=torch.int32, device=device)
    return torch.zeros(splits * heads * (width + 2), dtype=torch.int64, device=device)


class Persistent:
    """The chain as step_stream launches, on a ring of `slots` x kb KB: q, h and the residual row in
    flagged words (a value's 16 bits under its writer's flag) between the matrices."""

    def __init__(
        self,
        torch,
        c,
        kinds: list,
        ring: str,
        delay_ns: int,
        trace=None,
        att: Attention | None = None,
        splits: int = 1,
    ) -> None:
        self.torch, self.c, self.delay_ns, self.trace, self.att, self.splits = torch, c, delay_ns, trace, att, splits
        slots, kb, claims, ahead = parse_ring(ring)
        self.attn_kind = len(kinds)
        shape = None if att is None else (*att.shape(), splits)
        src = step_source(kinds, slots, kb * 1024, claims, ahead, shape)
        shared = shared_bytes(slots, kb * 1024, xs_values(kinds, shape))
        self.k = cuda_rtc.kernel(src, "step_stream", 0, CONSUMERS + 32, shared)
        self.sms = torch.cuda.get_device_properties(0).multi_processor_count
        words = {"dtype": torch.int32, "device": "cuda"}
        self.qw, self.hw, self.xw = (torch.zeros(n, **words) for n in (c.NQKV, c.F, c.D))
        self.epoch = torch.zeros(1, **words)
        self.claims = torch.zeros(5 * c.L + 1, **words)
        self.tables: dict = {}
        if att is not None:  # its own caches: the step writes slot pos
            self.kc, self.vc = att.kc.clone(), att.vc.clone()
            self.aw = attention_words(torch, att.H, att.D, splits, "cuda")

    def ops(self, x, logits) -> list[tuple]:
        c, att = self.c, self.att
        words = (self.qw, self.hw, self.xw, self.aw if att else None)
        caches = None if att is None else (self.kc, self.vc)
        w = (c.wqkv, c.wo, c.wgu, c.wd, c.whead)
        return chain_ops(w, c.nw, x, logits, words, caches, self.attn_kind, self.delay_ns, self.splits)

    def __call__(self, x, q, h, logits) -> None:
        key = (x.data_ptr(), logits.data_ptr())
        if key not in self.tables:  # one table a buffer set, packed before capture
            ops = self.ops(x, logits)
            self.tables[key] = (pack_ops(self.torch, ops), len(ops))
        table, n = self.tables[key]
        att = self.att
        rope = [None, None, 0] if att is None else [att.cos, att.sin, att.pos]
        self.k.launch(self.sms, [table, n, self.epoch, self.claims, self.trace, *rope])

    def residual(self):
        """The residual row after the chain, as 16-bit values."""
        return (self.xw & 0xFFFF).to(self.torch.int16).view(self.torch.bfloat16)[None]


def trace_report(torch, c, kinds: list, ring: str, names: list[str], sms: int, att=None, splits: int = 1) -> dict:
    """One run with in-kernel clocks: per op kind, the mean time a CTA waits for its input row,
    computes its rows (att: the attention op too, its input wait up to q|k|v's words), and the time
    between the grid's last rows of one op and the next."""
    trace = torch.zeros(4 * sms * (5 * c.L + 1), dtype=torch.int64, device="cuda")
    run = Persistent(torch, c, kinds, ring, 0, trace, att, splits)
    b = c.bufs()
    run(*b)
    torch.cuda.synchronize()
    trace.zero_()  # the second run alone: the first one's compile and page-in are behind
    run(*b)
    torch.cuda.synchronize()
    op_kinds = [op[6] for op in run.ops(b[0], b[3])]
    n = len(op_kinds)
    tr = trace[: 4 * sms * n].view(n, sms, 4).double().cpu()
    start = tr[:, :, 0][tr[:, :, 0] > 0].min()
    done = tr[:, :, 2].max(dim=1).values  # the grid's last rows of each matrix
    report: dict = {"total_us": float(done[-1] - start) / 1e3}
    for kind in sorted(set(op_kinds)):
        rows = [j for j in range(n) if op_kinds[j] == kind]
        sub = tr[rows]
        took = sub[:, :, 0] > 0  # the CTAs that claimed rows of the matrix
        wait = ((sub[:, :, 1] - sub[:, :, 0]) * took).sum().item() / took.sum().item() / 1e3
        busy = (sub[:, :, 2] - sub[:, :, 1]) * took
        work = busy.sum().item() / took.sum().item() / 1e3
        slowest = busy.max(dim=1).values.mean().item() / 1e3
        span = sum(float(done[j] - (done[j - 1] if j else start)) / 1e3 for j in rows) / len(rows)
        report[names[kind]] = {
            "wait_us": wait, "work_us": work, "slowest_work_us": slowest, "span_us": span,
            "ctas": took.sum().item() / len(rows),
        }  # fmt: skip
        print(f"  trace {names[kind]:8s} x{len(rows):3d}: {took.sum().item() / len(rows):5.1f} CTAs, input wait "
              f"{wait:5.2f} us, rows {work:5.2f} us (slowest CTA {slowest:5.2f}), grid done every {span:5.2f} us",
              flush=True)  # fmt: skip
    # whether the slow CTAs are the same ones through the step (a fixed split weighted by SM could
    # then balance it): per CTA its mean rows time over the first and the second half of the layers
    busy = (tr[:, :, 2] - tr[:, :, 1]) * (tr[:, :, 0] > 0)
    for kind in (2, 3):
        rows = [j for j in range(n) if op_kinds[j] == kind]
        h1, h2 = busy[rows[: len(rows) // 2]].mean(0), busy[rows[len(rows) // 2 :]].mean(0)
        corr = torch.corrcoef(torch.stack([h1, h2]))[0, 1].item()
        slow1, slow2 = set(h1.topk(13).indices.tolist()), set(h2.topk(13).indices.tolist())
        report[names[kind]]["cta_halves_corr"] = corr
        print(f"  trace {names[kind]}: per-CTA rows time, first vs second half of the layers: correlation {corr:.2f}, "
              f"slowest 10% shared {len(slow1 & slow2)}/13, spread {h1.min() / 1e3:.2f}-{h1.max() / 1e3:.2f} us",
              flush=True)  # fmt: skip
    print(f"  trace total {report['total_us']:.1f} us", flush=True)
    return report


def timed_rows(torch, c, variants: dict, rounds: int, rate: float, label: str, graph_times) -> list[dict]:
    """Each variant (fn(x, q, h, logits)) timed by graph_times, printed against the first one."""
    times = graph_times(torch, {n: (lambda b, fn=fn: fn(*b)) for n, fn in variants.items()}, c.bufs, rounds)
    first = next(iter(times))
    base = statistics.median(times[first])
    rows = []
    for n in times:
        t = statistics.median(times[n])
        print(f"  {label} {n:34s} {t * 1e6:7.1f} us, {100 * c.bytes / rate / t:5.1f}% of bound, "
              f"{base / t:.3f}x {first}", flush=True)  # fmt: skip
        rows.append({"variant": n, "us": t * 1e6, "samples_us": [v * 1e6 for v in times[n]]})
    return rows


def attention_rows(torch, c, kinds: list, a, rate: float, graph_times) -> list[dict]:
    """The chain with a real decode attention between q|k|v and o (pos + 1 slots, 160 by default): the stream
    launches with the runtime's attention op (decode_attention_cuda, q/k RoPE and the cache write in
    it, its late PDL trigger) against the one kernel with run_attn; logits compared, then timed."""
    from bench_run_gpu import SHAPES, environ

    from llmarch.runtime import decode_attention_cuda as dac

    att = Attention(torch, c, SHAPES[a.model][1], a.pos, a.pos + 97)
    if not att.fits():
        print(f"  attention: {att.H} heads / {att.KV} KV heads of {att.D} do not fit run_attn's thread map", flush=True)
        return []
    H, KV, D, Q = att.H, att.KV, att.D, c.Q
    kc, vc = att.kc.clone(), att.vc.clone()
    out = torch.empty(1, H, D, device="cuda", dtype=torch.bfloat16)
    pos = torch.tensor([att.pos], device="cuda", dtype=torch.int64)
    mask = torch.arange(att.smax, device="cuda") <= att.pos

    def attend(layer, q):
        kv = (q[:, Q : Q + KV * D].view(1, KV, D), q[:, Q + KV * D :].view(1, KV, D))
        new = dac.NewStep(*kv, None, None, 0.0, att.cos, att.sin, pos, pos)
        dac.launch(q[:, :Q].view(1, H, D), kc[layer][None], vc[layer][None], mask, D**-0.5, out, new=new)
        return out.view(1, Q)

    def launches(x, q, h, logits):
        # the runtime's attention op times its PDL by the stream kernel's switch, which Chain turns off
        with environ({"LLMARCH_NO_GEMV_STREAM": "0"}):
            stream_chain(c, x, q, h, logits, attend)

    ref = c.bufs()
    launches(*ref)
    torch.cuda.synchronize()
    variants: dict = {"stream launches + attention op": launches}
    rows: list[dict] = []
    for ring, splits in ((r, int(n)) for r in a.rings.split(",") for n in a.attn_splits.split(",")):
        name = f"persistent {ring} + run_attn" + (f", {splits} splits a head" if splits > 1 else "")
        try:
            fn = Persistent(torch, c, kinds, ring, 0, None, att, splits)
            b = ran(torch, c, fn)
        except Exception as e:
            print(f"{name}: {type(e).__name__}: {str(e)[:600]}", flush=True)
            return rows  # a trapped kernel leaves the context unusable
        if c.admit(name, b, ref, rows, "the launches with the attention op"):
            variants[name] = fn
    return rows + timed_rows(torch, c, variants, a.rounds, rate, "attention", graph_times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--rings",
        default="6x32,6x32c",
        help="slots x KB, comma-separated; suffix c: rows claimed, ca: claims one ahead",
    )
    ap.add_argument("--delay-us", default="0,4", help="attention stand-ins to try, comma-separated")
    ap.add_argument("--trace", action="store_true", help="where the first ring's CTAs wait, from in-kernel clocks")
    ap.add_argument(
        "--attention",
        action="store_true",
        help="also the chain with the real attention (the runtime's op between launches; run_attn in the kernel)",
    )
    ap.add_argument("--pos", type=int, default=159, help="with --attention: this step's position (pos + 1 slots)")
    ap.add_argument(
        "--attn-splits", default="1", help="with --attention: splits of a head's slots to try, comma-separated"
    )
    ap.add_argument("--json")
    a = ap.parse_args()

    import torch
    from bench_run_gpu import SHAPES, copy_rate
    from gemv_chain import Chain, graph_times

    c = Chain(torch, a.model)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    kinds = chain_kinds(c.D, c.Q, c.F)
    names = ["qkv", "o", "gate|up", "down", "head"]
    delay_kernel = cuda_rtc.kernel(DELAY, "delay", 0, 32, 0)

    def stream_launches(delay_ns: int):
        def stand_in(layer, q):  # q's first rows for attention's output, delay_ns later
            if delay_ns:
                delay_kernel.launch(1, [delay_ns], dependent=True)
            return q[:, : c.Q]

        return lambda x, q, h, logits: stream_chain(c, x, q, h, logits, stand_in)

    ref = c.bufs()
    stream_launches(0)(*ref)
    torch.cuda.synchronize()
    out: dict = {"model": a.model, "bytes": c.bytes, "rows": []}
    rate = copy_rate(torch)
    print(f"{a.model}: {c.bytes / 1e9:.2f} GB of weights a step, copy rate {rate / 1e12:.2f} TB/s, "
          f"bound {c.bytes / rate * 1e6:.0f} us, {sms} SMs; load {os.getloadavg()[0]:.1f}")  # fmt: skip
    for delay_us in (float(d) for d in a.delay_us.split(",")):
        ns = int(delay_us * 1000)
        variants = {"stream launches": stream_launches(ns)}
        if not ns:  # the Triton chain has no stand-in for the attention op
            variants["triton launches"] = c.launches
        for ring in a.rings.split(","):
            name = f"persistent {ring}"
            try:
                fn = Persistent(torch, c, kinds, ring, ns)
                b = ran(torch, c, fn)
            except Exception as e:
                print(f"{name}: {type(e).__name__}: {str(e)[:600]}", flush=True)
                continue
            if c.admit(f"{name} (delay {delay_us} us)", b, ref, out["rows"], "the stream launches"):
                variants[name] = fn
            out["rows"][-1].update(variant=name, delay_us=delay_us)
        for row in timed_rows(torch, c, variants, a.rounds, rate, f"delay {delay_us:3.1f} us", graph_times):
            out["rows"].append({**row, "delay_us": delay_us})
    if a.attention:
        out["attention"] = attention_rows(torch, c, kinds, a, rate, graph_times)
    if a.trace:
        out["trace"] = {}
        att = Attention(torch, c, SHAPES[a.model][1], a.pos, a.pos + 97) if a.attention else None
        splits = int(a.attn_splits.split(",")[-1]) if att else 1
        for ring in a.rings.split(","):
            print(f"  trace of {ring}{f' + run_attn, {splits} splits a head' if att else ''}:")
            out["trace"][ring] = trace_report(torch, c, kinds, ring, names + ["attention"], sms, att, splits)
    out["copy_rate"] = rate
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

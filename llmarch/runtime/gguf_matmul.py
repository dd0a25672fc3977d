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
from llmarch.runtime.quant import BLOCKS, dequantize

# the stored types the C kernel reads, and its code for each
KERNEL_TYPES = {"Q8_0": 0, "Q4_0": 1, "Q5_0": 2, "Q4_K": 3, "Q5_K": 4, "Q6_K": 5}
# activation rows per kernel call: each row costs the kernel about one decode step's compute, while
# dequantizing the matrices for a float GEMM is a large fixed cost (embedded model, one thread: 128
# rows 1.3 s in the kernel vs 3.4 s dequantized, 256 rows 4.8 s vs 2.7 s), so longer prefills take
# the dequantize + GEMM path
MAX_ROWS = 128
ACT_BLOCK = 32  # activation values per int8 scale

SOURCE = r"""
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float f16(const uint8_t* p) { uint16_t h; memcpy(&h, p, 2); return _cvtsh_ss(h); }

/* 32 signed weights . 32 signed activations -> 8 int32 (lane i: values 4i..4i+3) */
static inline __m256i dot_ss(__m256i w, __m256i x) {
    __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}
/* the same with |x| given (gguf_linear computes it once per token, not once per row) */
static inline __m256i dot_sa(__m256i w, __m256i x, __m256i ax) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w, x)), _mm256_set1_epi16(1));
}
/* 32 unsigned weights (< 128) . 32 signed activations */
static inline __m256i dot_us(__m256i w, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
}
static inline __m256i nibbles16(const uint8_t* p) {  /* 16 bytes -> low nibbles, then high nibbles */
    __m128i b = _mm_loadu_si128((const __m128i*)p);
    __m128i m = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
}
static inline __m256i bits32(const uint8_t* p) {  /* bit i of a little-endian uint32 -> 0xFF / 0 in byte i */
    uint32_t v; memcpy(&v, p, 4);
    const __m256i shuf = _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL, 0x0303030303030303LL);
    __m256i r = _mm256_shuffle_epi8(_mm256_set1_epi32((int)v), shuf);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    return _mm256_cmpeq_epi8(_mm256_and_si256(r, bit), bit);
}
static inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

/* activations: per 32 values an int8 block q, its scale d and s = d * sum(q) (for K-quant mins) */
void quantize_act(const float* x, int8_t* q, float* d, float* s, long n_blocks) {
    for (long b = 0; b < n_blocks; b++) {
        const float* v = x + b * 32;
        float amax = 0.f;
        for (int i = 0; i < 32; i++) { float a = fabsf(v[i]); if (a > amax) amax = a; }
        float sc = amax / 127.f, inv = sc > 0.f ? 1.f / sc : 0.f;
        int sum = 0;
        for (int i = 0; i < 32; i++) { int r = (int)lrintf(v[i] * inv); q[b * 32 + i] = (int8_t)r; sum += r; }
        d[b] = sc;
        s[b] = sc * (float)sum;
    }
}

/* Each row's bytes are streamed once; prefetching PF bytes ahead keeps one core's loads in flight
   (on the VMs measured, the hardware streamer alone caps a core near 6-8 GB/s). Rows are contiguous,
   so near a row's end the prefetch reaches into the next row. */
#ifndef PF
#define PF 2048
#endif
#define PREFETCH(p) __builtin_prefetch((const void*)(p), 0, 3)

/* [s0..s7]: the lane sums of eight int32 vectors, in order (three rounds of hadd, then the halves) */
static inline __m256i sum8(const __m256i* p) {
    __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
    __m128i lo = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    __m128i hi = _mm_add_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
    return _mm256_set_m128i(hi, lo);
}

/* The legacy types' 32 values of one block as bytes: Q8_0's signed; Q4_0's and Q5_0's unsigned, before
   their offset (8, 16) is taken off: sum((u - off) x) = sum(u x) - off sum(x), and d * sum(x) of each
   activation block is xs, so the offset costs one FMA per 8 blocks instead of a subtraction and two
   sign operations per block */
static inline __m256i vals_q8_0(const uint8_t* blk) { return _mm256_loadu_si256((const __m256i*)(blk + 2)); }
static inline __m256i vals_q4_0(const uint8_t* blk) { return nibbles16(blk + 2); }
static inline __m256i vals_q5_0(const uint8_t* blk) {  /* nibble | 5th bit << 4 */
    return _mm256_or_si256(nibbles16(blk + 6), _mm256_and_si256(bits32(blk + 2), _mm256_set1_epi8(0x10)));
}
static inline uint16_t u16(const uint8_t* p) { uint16_t v; memcpy(&v, p, 2); return v; }

/* One weight row (nb32 = K / 32 blocks of BYTES bytes, a float16 scale first) . one activation row.
   Blocks go 8 at a time: their integer dot products summed to one vector (sum8), scaled by the 8
   weight scales times the 8 activation scales as one vector, so no scalar work per block; the last
   group of a width not a multiple of 256 has its missing blocks zeroed. */
#define LEGACY_ROW(NAME, BYTES, VALS, OFF)                                                                    \
static inline float NAME(const uint8_t* w, const int8_t* xq, const int8_t* xa, const float* xd, const float* xs, int nb32) {    \
    __m256 acc = _mm256_setzero_ps(), off = _mm256_setzero_ps();                                              \
    for (int b = 0; b < nb32; b += 8, w += 8 * BYTES) {                                                       \
        const int n = nb32 - b < 8 ? nb32 - b : 8;                                                            \
        for (int o = 0; o < 8 * BYTES; o += 64) PREFETCH(w + PF + o);                                         \
        __m256i p[8];                                                                                         \
        uint16_t h[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                                             \
        for (int j = 0; j < 8; j++) {                                                                         \
            if (j < n) {                                                                                      \
                const __m256i x = _mm256_loadu_si256((const __m256i*)(xq + 32 * (b + j)));                    \
                p[j] = OFF ? dot_us(VALS(w + j * BYTES), x)                                                   \
                           : dot_sa(VALS(w + j * BYTES), x, _mm256_loadu_si256((const __m256i*)(xa + 32 * (b + j)))); \
                h[j] = u16(w + j * BYTES);                                                                    \
            } else p[j] = _mm256_setzero_si256();                                                             \
        }                                                                                                     \
        __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)h));                                      \
        const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); \
        __m256 as = n == 8 ? _mm256_loadu_ps(xd + b) : _mm256_maskload_ps(xd + b, live);                       \
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum8(p)), _mm256_mul_ps(ws, as), acc);                       \
        if (OFF) off = _mm256_fmadd_ps(ws, n == 8 ? _mm256_loadu_ps(xs + b) : _mm256_maskload_ps(xs + b, live), off); \
    }                                                                                                         \
    return hsum(acc) - (float)OFF * hsum(off);                                                                \
}
LEGACY_ROW(row_q8_0, 34, vals_q8_0, 0)
LEGACY_ROW(row_q4_0, 18, vals_q4_0, 8)
LEGACY_ROW(row_q5_0, 22, vals_q5_0, 16)

/* A K-quant super-block's 8 sub-blocks are summed in integers, then scaled as one vector: scale_j *
   activation scale_j for j < 8 (the activations' scales of the super-block are contiguous), so no
   scalar work per sub-block. */
/* Q4_K (hbits 0) and Q5_K (hbits 1): d, dmin, 12 bytes of 6-bit scales/mins, [Q5_K: 32 bytes of 5th bits], 128 bytes of nibbles */
static inline float row_k45(const uint8_t* w, const int8_t* xq, const int8_t* xa, const float* xd, const float* xs, int nb32, int hbits) {
    const int bytes = hbits ? 176 : 144;
    __m256 acc = _mm256_setzero_ps(), macc = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int b = 0; b < nb32 / 8; b++, w += bytes) {
        PREFETCH(w + PF);
        PREFETCH(w + PF + 64);
        PREFETCH(w + PF + 128);
        /* the 8 six-bit scales, then the 8 mins, one byte each (get_scale_min_k4 for all j at once) */
        uint32_t u[4];
        memcpy(u, w + 4, 12);
        u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
        const uint32_t mins03 = u[1] & 0x3f3f3f3f;
        u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
        u[2] = mins03;
        u[0] &= 0x3f3f3f3f;
        const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)u)));
        const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(u + 2))));
        const uint8_t* qs = w + (hbits ? 48 : 16);
        const int8_t* xb = xq + 256 * b;
        __m256i qh = hbits ? _mm256_loadu_si256((const __m256i*)(w + 16)) : _mm256_setzero_si256();
        __m256i p[8];
        for (int c = 0; c < 4; c++) {
            __m256i raw = _mm256_loadu_si256((const __m256i*)(qs + 32 * c));
            __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            if (hbits) {
                __m256i b0 = _mm256_set1_epi8((char)(1 << (2 * c))), b1 = _mm256_set1_epi8((char)(2 << (2 * c)));
                lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b0), b0), _mm256_set1_epi8(0x10)));
                hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b1), b1), _mm256_set1_epi8(0x10)));
            }
            p[2 * c] = dot_us(lo, _mm256_loadu_si256((const __m256i*)(xb + 64 * c)));
            p[2 * c + 1] = dot_us(hi, _mm256_loadu_si256((const __m256i*)(xb + 64 * c + 32)));
        }
        const __m256 f = _mm256_mul_ps(_mm256_set1_ps(f16(w)), _mm256_mul_ps(sc, _mm256_loadu_ps(xd + 8 * b)));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum8(p)), f, acc);
        macc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(f16(w + 2)), mn), _mm256_loadu_ps(xs + 8 * b), macc);
    }
    return hsum(acc) - hsum(macc);
}
/* Q6_K: 128 bytes low 4 bits, 64 bytes high 2 bits, 16 int8 scales (one per 16 values), d; the
   scales multiply the int16 pair sums (madd), so each 32-value block leaves one scaled int32 vector */
static inline float row_q6_k(const uint8_t* w, const int8_t* xq, const int8_t* xa, const float* xd, const float* xs, int nb32) {
    __m256 acc = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x03), off = _mm256_set1_epi8(32);
    for (int b = 0; b < nb32 / 8; b++, w += 210) {
        PREFETCH(w + PF);
        PREFETCH(w + PF + 64);
        PREFETCH(w + PF + 128);
        PREFETCH(w + PF + 192);
        const int8_t* sc = (const int8_t*)(w + 192);
        const int8_t* xb = xq + 256 * b;
        __m256i p[8];
        for (int half = 0; half < 2; half++) {
            __m256i l0 = _mm256_loadu_si256((const __m256i*)(w + 64 * half));
            __m256i l1 = _mm256_loadu_si256((const __m256i*)(w + 64 * half + 32));
            __m256i h = _mm256_loadu_si256((const __m256i*)(w + 128 + 32 * half));
            __m256i q[4] = {
                _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(h, m2), 4)),
                _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), m2), 4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), m2), 4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), m2), 4)),
            };
            for (int k = 0; k < 4; k++) {
                const int c = 4 * half + k;
                __m256i x = _mm256_loadu_si256((const __m256i*)(xb + 32 * c));
                __m256i ax = _mm256_loadu_si256((const __m256i*)(xa + 256 * b + 32 * c));
                __m256i p16 = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(_mm256_sub_epi8(q[k], off), x));
                p[c] = _mm256_madd_epi16(p16, _mm256_set_m128i(_mm_set1_epi16(sc[2 * c + 1]), _mm_set1_epi16(sc[2 * c])));
            }
        }
        const __m256 f = _mm256_mul_ps(_mm256_set1_ps(f16(w + 208)), _mm256_loadu_ps(xd + 8 * b));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum8(p)), f, acc);
    }
    (void)xs;
    return hsum(acc);
}
static inline float row_q4_k(const uint8_t* w, const int8_t* xq, const int8_t* xa, const float* xd, const float* xs, int nb32) {
    return row_k45(w, xq, xa, xd, xs, nb32, 0);
}
static inline float row_q5_k(const uint8_t* w, const int8_t* xq, const int8_t* xa, const float* xd, const float* xs, int nb32) {
    return row_k45(w, xq, xa, xd, xs, nb32, 1);
}

/* y[t * ldy + n] = W[n, :] . x[t, :] for n0 <= n < n1, t < T; W rows of row_bytes stored blocks each */
#define ROWS(ROW)                                                                                \
    for (int n = n0; n < n1; n++) {                                                              \
        const uint8_t* row = w + (size_t)n * row_bytes;                                          \
        for (int t = 0; t < T; t++)                                                              \
            y[(size_t)t * ldy + n] = ROW(row, xq + (size_t)t * K, xa + (size_t)t * K,              \
                                         xd + (size_t)t * nb32, xs + (size_t)t * nb32, nb32);     \
    }

static int rows_range(int type, const int8_t* xq, const int8_t* xa, const float* xd, const float* xs, const uint8_t* w, long row_bytes,
                      float* y, long ldy, int T, int n0, int n1, int K) {
    const int nb32 = K / 32;
    switch (type) {
        case 0: ROWS(row_q8_0) break;
        case 1: ROWS(row_q4_0) break;
        case 2: ROWS(row_q5_0) break;
        case 3: ROWS(row_q4_k) break;
        case 4: ROWS(row_q5_k) break;
        case 5: ROWS(row_q6_k) break;
        default: return 1;
    }
    return 0;
}

/* One Linear's whole forward in one call (each ctypes call and torch allocation costs microseconds,
   and a decode step makes ~70 of them): x [T, K] float32 quantized to int8 blocks once, then every
   part (stacked rows of stored blocks, e.g. fused q/k/v of different types) into y [T, sum rows]. */
int gguf_linear(const float* x, int T, int K, int nparts, const int* types, const void* const* ws,
                const long* row_bytes, const int* rows, float* y, int nthreads) {
    const int nb32 = K / 32;
    int8_t* xq = (int8_t*)malloc(2 * (size_t)T * K + 2 * sizeof(float) * (size_t)T * nb32);
    if (!xq) return 2;
    int8_t* xa = xq + (size_t)T * K;  /* |xq|: the signed types' dot products take it as is */
    float* xd = (float*)(xa + (size_t)T * K);  /* T * K is a multiple of 32: aligned for floats */
    float* xs = xd + (size_t)T * nb32;
    quantize_act(x, xq, xd, xs, (long)T * nb32);
    for (size_t i = 0; i < (size_t)T * K; i += 32)
        _mm256_storeu_si256((__m256i*)(xa + i), _mm256_abs_epi8(_mm256_loadu_si256((const __m256i*)(xq + i))));
    long ldy = 0;
    for (int p = 0; p < nparts; p++) {
        if (types[p] < 0 || types[p] > 5) { free(xq); return 1; }
        ldy += rows[p];
    }
    /* one parallel region for all parts, each thread a contiguous share of every part's rows and
       no barrier until the end: a decode step makes ~70 of these calls, and on a busy machine each
       extra fork/join is a chance to wait for a descheduled thread */
    #pragma omp parallel num_threads(nthreads)
    {
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();
        int col = 0;
        for (int p = 0; p < nparts; p++) {
            const int n0 = (int)((long)rows[p] * id / nt), n1 = (int)((long)rows[p] * (id + 1) / nt);
            rows_range(types[p], xq, xa, xd, xs, (const uint8_t*)ws[p], row_bytes[p], y + col, ldy, T, n0, n1, K);
            col += rows[p];
        }
    }
    free(xq);
    return 0;
}
"""


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
    rc = _lib().gguf_linear(x.data_ptr(), T, K, args.n, *args.args, y.data_ptr(), torch.get_num_threads())
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
    mats = sum(1 for m in model.modules() if isinstance(m, kind))
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(types.items()))
    rest = f"int{quant_bits} blocks" if quant_bits else "float"
    return f"{mats} matrices run from the GGUF's stored blocks{where} ({kinds} tensors), the rest in {rest}"

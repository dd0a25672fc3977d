"""The C sources of the CPU kernels, as strings, with no torch import: the stored-block matmul
(gguf_matmul.py), the float32 ops of a decode token (cpu_kernels.py) and the whole decode step built
from both (cpu_plan.py) compile from here, so a run that never needs torch (native_run.py) builds the
same library as one that does."""

# the stored types the C kernel reads, and its code for each
KERNEL_TYPES = {"Q8_0": 0, "Q4_0": 1, "Q5_0": 2, "Q4_K": 3, "Q5_K": 4, "Q6_K": 5}
# activation name (ArchSpec.activation) -> gated_act's code
GATED_ACTS = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1, "gelu_new": 1, "gelu_fast": 1, "gelu": 2}

GGUF_MATMUL = r"""
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
#ifndef KQUANT_UNIT
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
#endif

/* Each row's bytes are streamed once; prefetching PF bytes ahead keeps one core's loads in flight
   (on the VMs measured, the hardware streamer alone caps a core near 6-8 GB/s). Rows are contiguous,
   so near a row's end the prefetch reaches into the next row. */
#ifndef PF
#define PF 2048
#endif
#define PREFETCH(p) __builtin_prefetch((const void*)(p), 0, 3)

/* [s0..s7]: the lane sums of eight int32 vectors, in order (a transpose by unpacks and adds: single
   micro-op shuffles, where hadd costs several on the AMD cores measured) */
static inline __m256i sum8(const __m256i* p) {
    __m256i q[4], r[2];
    for (int i = 0; i < 4; i++)  /* per 128-bit half: [p2i 0+2, p2i+1 0+2, p2i 1+3, p2i+1 1+3] */
        q[i] = _mm256_add_epi32(_mm256_unpacklo_epi32(p[2 * i], p[2 * i + 1]), _mm256_unpackhi_epi32(p[2 * i], p[2 * i + 1]));
    for (int i = 0; i < 2; i++)  /* per half: the half-sums of p4i .. p4i+3 */
        r[i] = _mm256_add_epi32(_mm256_unpacklo_epi64(q[2 * i], q[2 * i + 1]), _mm256_unpackhi_epi64(q[2 * i], q[2 * i + 1]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(r[0], r[1], 0x20), _mm256_permute2x128_si256(r[0], r[1], 0x31));
}

/* The same from maddubs' int16 pair sums of unsigned weights below 32 and activations within +-127
   (each lane at most 2 * 31 * 127 = 7874): summed in int16 while 4 lanes fit (31496 < 32767), then
   widened once, where widening each block first (madd) costs 8 more micro-ops a token */
static inline __m256i sum8_u16(const __m256i* p) {
    __m256i q[4], r[2];
    for (int i = 0; i < 4; i++)
        q[i] = _mm256_add_epi16(_mm256_unpacklo_epi32(p[2 * i], p[2 * i + 1]), _mm256_unpackhi_epi32(p[2 * i], p[2 * i + 1]));
    for (int i = 0; i < 2; i++)
        r[i] = _mm256_madd_epi16(_mm256_add_epi16(_mm256_unpacklo_epi64(q[2 * i], q[2 * i + 1]), _mm256_unpackhi_epi64(q[2 * i], q[2 * i + 1])),
                                 _mm256_set1_epi16(1));
    return _mm256_add_epi32(_mm256_permute2x128_si256(r[0], r[1], 0x20), _mm256_permute2x128_si256(r[0], r[1], 0x31));
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

/* The row kernels: NT activation rows (token u's values at xq + u * K, its scales at xd + u * nb32,
   u < NT) . one weight row -> out[u]. Each weight block is unpacked once for all NT rows (a prefill
   tile of 8 tokens reads and unpacks every block an eighth as often as one token at a time), and each
   row's float operations run in the same order whatever NT is, so a tile's results are bit-equal to
   single-row calls (the decode step's NT = 1). Always inlined with a constant NT, so the loops over
   u unroll and the NT = 1 code is the single-row kernel. */
#define TILE static inline __attribute__((always_inline)) void
#define TILE_ARGS const uint8_t *w, const int8_t *xq, const int8_t *xa, const float *xd, const float *xs, int nb32, long K, int NT, float *out
#define TILE_MAX 8  /* 16 measured no faster: the per-token work dominates by then */

/* Legacy types: blocks go 8 at a time, their integer dot products summed to one vector (sum8), scaled
   by the 8 weight scales times the 8 activation scales as one vector, so no scalar work per block; the
   last group of a width not a multiple of 256 has its missing blocks zeroed. */
#define LEGACY_TILE(NAME, BYTES, VALS, OFF)                                                                   \
TILE NAME(TILE_ARGS) {                                                                                        \
    __m256 acc[TILE_MAX], off[TILE_MAX];                                                                      \
    for (int u = 0; u < NT; u++) acc[u] = off[u] = _mm256_setzero_ps();                                       \
    for (int b = 0; b < nb32; b += 8, w += 8 * BYTES) {                                                       \
        const int n = nb32 - b < 8 ? nb32 - b : 8;                                                            \
        for (int o = 0; o < 8 * BYTES; o += 64) PREFETCH(w + PF + o);                                         \
        __m256i wv[8];                                                                                        \
        uint16_t h[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                                             \
        for (int j = 0; j < 8; j++)  /* constant bounds: unrolled, wv stays in registers */               \
            if (j < n) { wv[j] = VALS(w + j * BYTES); h[j] = u16(w + j * BYTES); } else wv[j] = _mm256_setzero_si256(); \
        const __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)h));                                \
        const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); \
        for (int u = 0; u < NT; u++) {                                                                        \
            const int8_t* xb = xq + u * K + 32 * b;                                                           \
            const int8_t* ab = xa + u * K + 32 * b;                                                           \
            const float* d = xd + u * (long)nb32 + b;                                                         \
            const float* s = xs + u * (long)nb32 + b;                                                         \
            __m256i p[8];                                                                                     \
            for (int j = 0; j < 8; j++) {                                                                     \
                if (j < n) {                                                                                  \
                    const __m256i x = _mm256_loadu_si256((const __m256i*)(xb + 32 * j));                      \
                    p[j] = OFF ? _mm256_maddubs_epi16(wv[j], x) : dot_sa(wv[j], x, _mm256_loadu_si256((const __m256i*)(ab + 32 * j))); \
                } else p[j] = _mm256_setzero_si256();                                                         \
            }                                                                                                 \
            const __m256 as = n == 8 ? _mm256_loadu_ps(d) : _mm256_maskload_ps(d, live);                      \
            acc[u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(OFF ? sum8_u16(p) : sum8(p)), _mm256_mul_ps(ws, as), acc[u]); \
            if (OFF) off[u] = _mm256_fmadd_ps(ws, n == 8 ? _mm256_loadu_ps(s) : _mm256_maskload_ps(s, live), off[u]); \
        }                                                                                                     \
    }                                                                                                         \
    for (int u = 0; u < NT; u++) out[u] = hsum(acc[u]) - (float)OFF * hsum(off[u]);                           \
}
LEGACY_TILE(tile_q8_0, 34, vals_q8_0, 0)
LEGACY_TILE(tile_q4_0, 18, vals_q4_0, 8)
LEGACY_TILE(tile_q5_0, 22, vals_q5_0, 16)

/* A K-quant super-block's 8 sub-blocks are summed in integers, then scaled as one vector: scale_j *
   activation scale_j for j < 8 (the activations' scales of the super-block are contiguous), so no
   scalar work per sub-block. */
/* Q4_K (hbits 0) and Q5_K (hbits 1): d, dmin, 12 bytes of 6-bit scales/mins, [Q5_K: 32 bytes of 5th bits], 128 bytes of nibbles */
static inline __attribute__((always_inline)) void tile_k45(TILE_ARGS, int hbits) {
    const int bytes = hbits ? 176 : 144;
    __m256 acc[TILE_MAX], macc[TILE_MAX];
    for (int u = 0; u < NT; u++) acc[u] = macc[u] = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int b = 0; b < nb32 / 8; b++, w += bytes) {
        PREFETCH(w + PF);
        PREFETCH(w + PF + 64);
        PREFETCH(w + PF + 128);
        /* the 8 six-bit scales, then the 8 mins, one byte each (get_scale_min_k4 for all j at once) */
        uint32_t m[4];
        memcpy(m, w + 4, 12);
        m[3] = ((m[2] >> 4) & 0x0f0f0f0f) | (((m[1] >> 6) & 0x03030303) << 4);
        const uint32_t mins03 = m[1] & 0x3f3f3f3f;
        m[1] = (m[2] & 0x0f0f0f0f) | (((m[0] >> 6) & 0x03030303) << 4);
        m[2] = mins03;
        m[0] &= 0x3f3f3f3f;
        const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)m)));
        const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(m + 2))));
        const uint8_t* qs = w + (hbits ? 48 : 16);
        const __m256i qh = hbits ? _mm256_loadu_si256((const __m256i*)(w + 16)) : _mm256_setzero_si256();
        __m256i q[8];  /* sub-block j's 32 values (a 32-byte chunk's low nibbles, then its high ones) */
        for (int c = 0; c < 4; c++) {
            __m256i raw = _mm256_loadu_si256((const __m256i*)(qs + 32 * c));
            __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            if (hbits) {
                __m256i b0 = _mm256_set1_epi8((char)(1 << (2 * c))), b1 = _mm256_set1_epi8((char)(2 << (2 * c)));
                lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b0), b0), _mm256_set1_epi8(0x10)));
                hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b1), b1), _mm256_set1_epi8(0x10)));
            }
            q[2 * c] = lo;
            q[2 * c + 1] = hi;
        }
        const __m256 d = _mm256_set1_ps(f16(w)), dm = _mm256_mul_ps(_mm256_set1_ps(f16(w + 2)), mn);
        for (int u = 0; u < NT; u++) {
            const int8_t* xb = xq + u * K + 256 * b;
            __m256i p[8];
            for (int j = 0; j < 8; j++) p[j] = _mm256_maddubs_epi16(q[j], _mm256_loadu_si256((const __m256i*)(xb + 32 * j)));
            const __m256 f = _mm256_mul_ps(d, _mm256_mul_ps(sc, _mm256_loadu_ps(xd + u * (long)nb32 + 8 * b)));
            acc[u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum8_u16(p)), f, acc[u]);
            macc[u] = _mm256_fmadd_ps(dm, _mm256_loadu_ps(xs + u * (long)nb32 + 8 * b), macc[u]);
        }
    }
    (void)xa;
    for (int u = 0; u < NT; u++) out[u] = hsum(acc[u]) - hsum(macc[u]);
}
TILE tile_q4_k(TILE_ARGS) { tile_k45(w, xq, xa, xd, xs, nb32, K, NT, out, 0); }
TILE tile_q5_k(TILE_ARGS) { tile_k45(w, xq, xa, xd, xs, nb32, K, NT, out, 1); }

/* Q6_K: 128 bytes low 4 bits, 64 bytes high 2 bits, 16 int8 scales (one per 16 values), d; the
   scales multiply the int16 pair sums (madd), so each 32-value block leaves one scaled int32 vector */
TILE tile_q6_k(TILE_ARGS) {
    __m256 acc[TILE_MAX];
    for (int u = 0; u < NT; u++) acc[u] = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x03), off = _mm256_set1_epi8(32);
    for (int b = 0; b < nb32 / 8; b++, w += 210) {
        PREFETCH(w + PF);
        PREFETCH(w + PF + 64);
        PREFETCH(w + PF + 128);
        PREFETCH(w + PF + 192);
        const int8_t* sc = (const int8_t*)(w + 192);
        __m256i q[8];  /* sub-block j's 32 values, less 32 */
        for (int half = 0; half < 2; half++) {
            __m256i l0 = _mm256_loadu_si256((const __m256i*)(w + 64 * half));
            __m256i l1 = _mm256_loadu_si256((const __m256i*)(w + 64 * half + 32));
            __m256i h = _mm256_loadu_si256((const __m256i*)(w + 128 + 32 * half));
            q[4 * half] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(h, m2), 4));
            q[4 * half + 1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), m2), 4));
            q[4 * half + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), m2), 4));
            q[4 * half + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), m2), 4));
        }
        for (int j = 0; j < 8; j++) q[j] = _mm256_sub_epi8(q[j], off);
        const __m256 d = _mm256_set1_ps(f16(w + 208));
        for (int u = 0; u < NT; u++) {
            const int8_t* xb = xq + u * K + 256 * b;
            const int8_t* ab = xa + u * K + 256 * b;
            __m256i p[8];
            for (int j = 0; j < 8; j++) {
                __m256i p16 = _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i*)(ab + 32 * j)),
                                                   _mm256_sign_epi8(q[j], _mm256_loadu_si256((const __m256i*)(xb + 32 * j))));
                p[j] = _mm256_madd_epi16(p16, _mm256_set_m128i(_mm_set1_epi16(sc[2 * j + 1]), _mm_set1_epi16(sc[2 * j])));
            }
            const __m256 f = _mm256_mul_ps(d, _mm256_loadu_ps(xd + u * (long)nb32 + 8 * b));
            acc[u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum8(p)), f, acc[u]);
        }
    }
    (void)xs;
    for (int u = 0; u < NT; u++) out[u] = hsum(acc[u]);
}

/* y[t * ldy + n] = W[n, :] . x[t, :] for n0 <= n < n1, t < T; W rows of row_bytes stored blocks each.
   Rows go in groups of ROW_GROUP: per group, tiles of TILE_MAX tokens, then of 4, then one token at a
   time, each over the group's rows. A tile's activations (8 tokens of a 2048-wide input: 32 KB with
   |x|) then stay near the core across the group's rows and the group's weights in L2 across the
   tiles, where row by row every row would read all T tokens' activations again (512 KB at 128 tokens
   of that width: past a 512 KB L2). */
#ifndef ROW_GROUP
#define ROW_GROUP 32  /* 16, 32, 64 measured once each: 32 and 64 alike, 16 no gain on the 640-wide inputs */
#endif
#define TOKENS(KERNEL, NT)                                                                           \
    for (; t + NT <= T; t += NT)                                                                     \
        for (int n = g; n < g1; n++) {                                                               \
            float o[NT];                                                                             \
            KERNEL(w + (size_t)n * row_bytes, xq + (size_t)t * K, xa + (size_t)t * K,                \
                   xd + (size_t)t * nb32, xs + (size_t)t * nb32, nb32, K, NT, o);                    \
            for (int u = 0; u < NT; u++) y[(size_t)(t + u) * ldy + n] = o[u];                        \
        }
#define ROWS(KERNEL)                                                                                 \
    for (int g = n0; g < n1; g += ROW_GROUP) {                                                       \
        const int g1 = g + ROW_GROUP < n1 ? g + ROW_GROUP : n1;                                      \
        int t = 0;                                                                                   \
        TOKENS(KERNEL, TILE_MAX)                                                                     \
        TOKENS(KERNEL, 4)                                                                            \
        TOKENS(KERNEL, 1)                                                                            \
    }
/* the K-quant types' cases of a switch over the type code: rows_range's, or kquant_rows' */
#define KQUANT_CASES                                                                                 \
        case 3: ROWS(tile_q4_k) break;                                                               \
        case 4: ROWS(tile_q5_k) break;                                                               \
        case 5: ROWS(tile_q6_k) break;

#ifdef KQUANT_APART  /* the K-quant rows in a translation unit of their own (KQUANT_ROWS below) */
int kquant_rows(int type, const int8_t* xq, const int8_t* xa, const float* xd, const float* xs, const uint8_t* w,
                long row_bytes, float* y, long ldy, int T, int n0, int n1, int K);
#endif

static int rows_range(int type, const int8_t* xq, const int8_t* xa, const float* xd, const float* xs, const uint8_t* w, long row_bytes,
                      float* y, long ldy, int T, int n0, int n1, int K) {
    const int nb32 = K / 32;
    switch (type) {
        case 0: ROWS(tile_q8_0) break;
        case 1: ROWS(tile_q4_0) break;
        case 2: ROWS(tile_q5_0) break;
#ifdef KQUANT_APART
        case 3: case 4: case 5: return kquant_rows(type, xq, xa, xd, xs, w, row_bytes, y, ldy, T, n0, n1, K);
#else
        KQUANT_CASES
#endif
        default: return 1;
    }
    return 0;
}

/* The threads of a Linear. OpenMP's fork/join ends each parallel region at a barrier: when another
   job holds a core and the OS deschedules one of our threads, every one of a decode step's ~70
   matmuls waits for it (two threads on a busy 2-core machine measured several times slower than
   one; llama.cpp's collapse the same way). Here the rows are cut into chunks that threads claim one
   at a time from a shared ticket, and the calling thread does every chunk nobody claimed: it waits
   only for chunks another thread has started, so a descheduled helper costs its share of the work,
   not its time slice. Helpers spin a little between jobs (a step's matmuls come microseconds apart),
   then yield, then sleep on a futex. Linux only; elsewhere OpenMP's static split runs. */
#ifdef __linux__
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <unistd.h>
#define POOL 1
#define MAX_PARTS 16
#define MAX_HELPERS 63

typedef struct {
    const int8_t *xq, *xa; const float *xd, *xs;
    const int* types; const void* const* ws; const long* row_bytes; const int* rows;
    float* y; long ldy; int T, K, nparts, chunk, nchunks, helpers;
    int first[MAX_PARTS + 1], col[MAX_PARTS];  /* per part: its first chunk, its first output column */
} Job;

static Job job_;
/* (job number << 32) | next unclaimed chunk, or CLOSED while the caller writes job_: a helper copies
   job_ only from an open ticket, and claims only while the number it copied under still stands */
static _Atomic unsigned long long ticket_;
#define CLOSED 0x7fffffff
static _Atomic int done_;            /* chunks helpers finished in this job */
static _Atomic int wake_;            /* futex word: the job number, for sleeping helpers */
static _Atomic int sleepers_;
static int started_, create_failed_;
static pthread_mutex_t pool_lock_ = PTHREAD_MUTEX_INITIALIZER;

static void run_chunk(const Job* j, int c) {
    int p = 0;
    while (c >= j->first[p + 1]) p++;
    const int n0 = (c - j->first[p]) * j->chunk;
    const int n1 = n0 + j->chunk < j->rows[p] ? n0 + j->chunk : j->rows[p];
    rows_range(j->types[p], j->xq, j->xa, j->xd, j->xs, (const uint8_t*)j->ws[p], j->row_bytes[p], j->y + j->col[p],
               j->ldy, j->T, n0, n1, j->K);
}

/* the next chunk of job `number`, or -1 when none is left (or that job is over) */
static int claim(unsigned number, int nchunks) {
    unsigned long long t = atomic_load(&ticket_);
    while ((unsigned)(t >> 32) == number && (int)(t & 0xffffffff) < nchunks)
        if (atomic_compare_exchange_weak(&ticket_, &t, t + 1)) return (int)(t & 0xffffffff);
    return -1;
}

static void* helper(void* arg) {
    const int id = (int)(long)arg;
    unsigned seen = 0;
    long idle = 0;
    for (;;) {
        const unsigned long long t = atomic_load(&ticket_);
        const unsigned number = (unsigned)(t >> 32);
        if (number != seen) {
            if ((t & 0xffffffff) == CLOSED) { _mm_pause(); continue; }  /* job_ being written */
            seen = number;
            idle = 0;
            /* a copy torn by the next job is never used: its claims fail, the job number moved on */
            Job j = job_;
            if (id >= j.helpers) continue;
            for (int c; (c = claim(number, j.nchunks)) >= 0;) {
                run_chunk(&j, c);
                atomic_fetch_add(&done_, 1);
            }
            continue;
        }
        if (++idle < 20000) _mm_pause();
        else if (idle < 22000) sched_yield();
        else {
            atomic_fetch_add(&sleepers_, 1);
            syscall(SYS_futex, &wake_, FUTEX_WAIT_PRIVATE, (int)number, NULL, NULL, 0);
            atomic_fetch_sub(&sleepers_, 1);
            idle = 0;
        }
    }
    return NULL;
}

/* job j (its chunks set) on this thread and up to nthreads - 1 helpers; 0, or 1 when the pool
   cannot run it (the caller then splits the rows itself) */
static int pool_run(Job* j, int nthreads) {
    if (pthread_mutex_trylock(&pool_lock_)) return 1;  /* another caller holds it: run alone */
    j->helpers = nthreads - 1 < MAX_HELPERS ? nthreads - 1 : MAX_HELPERS;
    while (started_ < j->helpers && !create_failed_) {
        pthread_t th;
        if (pthread_create(&th, NULL, helper, (void*)(long)started_)) { create_failed_ = 1; break; }
        pthread_detach(th);
        started_++;
    }
    static unsigned number = 0;
    number++;
    atomic_store(&ticket_, ((unsigned long long)number << 32) | CLOSED);  /* the last job's claims fail from here */
    job_ = *j;
    atomic_store(&done_, 0);
    atomic_store(&ticket_, (unsigned long long)number << 32);
    atomic_store(&wake_, (int)number);
    if (atomic_load(&sleepers_)) syscall(SYS_futex, &wake_, FUTEX_WAKE_PRIVATE, 1 << 30, NULL, NULL, 0);
    int mine = 0;
    for (int c; (c = claim(number, j->nchunks)) >= 0; mine++) run_chunk(&job_, c);
    /* only chunks a helper has started; yield soon, so a helper waiting for this core can finish */
    for (long spins = 0; atomic_load(&done_) + mine < j->nchunks; spins++)
        if (spins < 2000) _mm_pause(); else sched_yield();
    pthread_mutex_unlock(&pool_lock_);
    return 0;
}
#endif

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
#ifdef POOL
    if (nthreads > 1 && nparts <= MAX_PARTS) {
        /* chunks of ~1/16 of a thread's share (at least 8 rows): small enough that a helper
           descheduled mid-chunk holds little, large enough that claiming stays cheap */
        Job j = {xq, xa, xd, xs, types, ws, row_bytes, rows, y, ldy, T, K, nparts, 0, 0, 0, {0}, {0}};
        j.chunk = (int)(ldy / (16L * nthreads));
        if (j.chunk < 8) j.chunk = 8;
        int col = 0;
        for (int p = 0; p < nparts; p++) {
            j.first[p + 1] = j.first[p] + (rows[p] + j.chunk - 1) / j.chunk;
            j.col[p] = col;
            col += rows[p];
        }
        j.nchunks = j.first[nparts];
        if (!pool_run(&j, nthreads)) { free(xq); return 0; }
    }
#endif
    /* one parallel region for all parts, each thread a contiguous share of every part's rows */
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

# The K-quant rows as a translation unit of their own, for a library whose source defines
# KQUANT_APART: their inlined tiles are about a third of the library's compile time, and
# cbuild.build compiles the units side by side (the same code either way, so the same results).
KQUANT_ROWS = (
    "#define KQUANT_UNIT\n#include <string.h>\n"
    + GGUF_MATMUL[: GGUF_MATMUL.index("#ifdef KQUANT_APART")]
    + r"""
int kquant_rows(int type, const int8_t* xq, const int8_t* xa, const float* xd, const float* xs, const uint8_t* w,
                long row_bytes, float* y, long ldy, int T, int n0, int n1, int K) {
    const int nb32 = K / 32;
    switch (type) {
        KQUANT_CASES
        default: return 1;
    }
    return 0;
}
"""
)

# The float32 ops of one decode token (RMS norm, rotate-half RoPE, one query's attention, gated activations).
FLOAT_OPS = r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* y = x / sqrt(mean(x^2) + eps) * w over rows of `dim` (a single op: torch's CPU rms_norm is several
   small ops, ~50-80 us for one decode token's 640 values on the machines measured, ~2 us here) */
void rms_norm(const float* x, const float* w, float* y, long rows, long dim, float eps) {
    for (long r = 0; r < rows; r++, x += dim, y += dim) {
        double ss = 0.0;  /* double: a long row's sum stays exact to float precision */
        for (long i = 0; i < dim; i++) ss += (double)x[i] * x[i];
        const float inv = 1.f / sqrtf((float)(ss / (double)dim) + eps);
        for (long i = 0; i < dim; i++) y[i] = x[i] * inv * w[i];
    }
}

/* rotate-half RoPE of x [rows = B * H, T, D] (contiguous) at positions pos[T], the first `rot` dims
   of each head rotated with the tables' rows cos/sin [npos, rot], the rest copied. Returns 1 when a
   position is outside the tables. */
int rope_rotate_half(const float* x, const float* cos, const float* sin, const int64_t* pos, float* y,
                     long rows, long T, long D, long rot, long npos) {
    const long half = rot / 2;
    for (long t = 0; t < T; t++)
        if (pos[t] < 0 || pos[t] >= npos) return 1;
    for (long r = 0; r < rows; r++)
        for (long t = 0; t < T; t++) {
            const float* xi = x + (r * T + t) * D;
            float* yi = y + (r * T + t) * D;
            const float* c = cos + pos[t] * rot;
            const float* s = sin + pos[t] * rot;
            for (long i = 0; i < half; i++) yi[i] = xi[i] * c[i] - xi[i + half] * s[i];
            for (long i = half; i < rot; i++) yi[i] = xi[i] * c[i] + xi[i - half] * s[i];
            for (long i = rot; i < D; i++) yi[i] = xi[i];
        }
    return 0;
}

/* a . b over n floats (AVX2: a plain loop is one serial chain of adds, ~4 cycles a value) */
static inline float dot_f32(const float* a, const float* b, int n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    __m256 v = _mm256_add_ps(s0, s1);
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    float r = _mm_cvtss_f32(lo);
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

/* One query token's attention (decode): q [H, D]; keys / values of KV heads, each head's rows of D /
   Dv floats contiguous, heads `k_stride` / `v_stride` floats apart; query head h reads KV head
   h / (H / KV); mask [S] (nonzero = visible). out [H, Dv] = softmax(scale * q.k over visible keys) @ v.
   scores: scratch of S floats. */
void attend_one(const float* q, const float* k, long k_stride, const float* v, long v_stride, const uint8_t* mask,
                float* out, float* scores, int H, int KV, int S, int D, int Dv, float scale) {
    const int rep = H / KV;
    for (int h = 0; h < H; h++) {
        const float* qh = q + (long)h * D;
        const float* kh = k + (long)(h / rep) * k_stride;
        const float* vh = v + (long)(h / rep) * v_stride;
        float mx = -INFINITY;
        for (int j = 0; j < S; j++) {
            if (!mask[j]) { scores[j] = -INFINITY; continue; }
            scores[j] = dot_f32(qh, kh + (long)j * D, D) * scale;
            if (scores[j] > mx) mx = scores[j];
        }
        float sum = 0.f;
        for (int j = 0; j < S; j++) { scores[j] = expf(scores[j] - mx); sum += scores[j]; }
        float* oh = out + (long)h * Dv;
        for (int i = 0; i < Dv; i++) oh[i] = 0.f;
        for (int j = 0; j < S; j++) {
            if (!mask[j]) continue;
            const float p = scores[j] / sum;
            const float* vj = vh + (long)j * Dv;
            for (int i = 0; i < Dv; i++) oh[i] += p * vj[i];
        }
    }
}

/* out[r, j] = act(gu[r, j]) * gu[r, hidden + j] over rows of [gate | up] (out may be gu): act 0 silu,
   1 gelu with the tanh approximation, 2 gelu. The formulas are aten's; libm's expf / tanhf / erff
   differ from its vectorized ones in the last bit, which is why the module path calls this too: a
   gated MLP computes the same bits whichever path runs it. */
void gated_act(const float* gu, float* out, long rows, long hidden, int kind) {
    const float beta = (float)(M_SQRT2 * M_2_SQRTPI * 0.5), kappa = 0.044715f;
    for (long r = 0; r < rows; r++, gu += 2 * hidden, out += hidden)
        for (long j = 0; j < hidden; j++) {
            const float x = gu[j];
            float a;
            if (kind == 0) a = x / (1.f + expf(-x));
            else if (kind == 1) a = 0.5f * x * (1.f + tanhf(beta * (x + kappa * (x * x * x))));
            else a = x * 0.5f * (1.f + erff(x * (float)M_SQRT1_2));
            out[j] = a * gu[hidden + j];
        }
}
"""

/* Routed experts on the CPU, straight from their quantized form (llmarch/runtime/experts/host.py).
 *
 * One call computes every selected (expert, token) pair of one MoE layer with all cores at once:
 *   0. each token's x rounded to int8 per group of 64 (below)
 *   1. gate_up rows of all selected experts, split across threads   h = W_gu x (+ b)
 *   2. activation, rounded to int8 like x                             a = act(gate) * up, or act(up)
 *                                                                     for non-gated experts
 *   3. down rows of all selected experts, split across threads        y = W_d a (+ b)
 *   4. out[token] += weight * y, rows summed in a fixed order (deterministic)
 * (a decode call, one row per selected expert, folds 0 into 1 and 2 into 3: experts_one_row)
 * Weights are read once per token group, never dequantized to memory: decode is bound by the
 * bytes of the selected experts, which is the figure experts/report.py reports.
 *
 * Layouts (group G = 64 along the input dim), `bits` names them:
 *   4 int4: row of K inputs = K/64 groups x 32 bytes; byte j holds element j (low nibble) and
 *           element j + 32 (high nibble); w = q * scale + min, (scale, min) float16 per group.
 *   8 int8: row = K int8; w = q * scale, scale float16 per group.
 *   2 MXFP4 (gpt-oss as shipped): row = K/32 blocks of 16 bytes, byte j holds element 2j (low
 *           nibble) and 2j + 1 (high), fp4 e2m1 codes; K/32 e8m0 scale bytes; w = fp4 * 2^(e - 127).
 *  16 ggml Q8_0 (a GGUF's blocks as stored): row = K/32 blocks of 34 bytes, fp16 d then 32 int8;
 *           w = q * d. No separate scale array.
 *  17 ggml Q4_0: row = K/32 blocks of 18 bytes, fp16 d then 16 bytes, byte j holds element j (low
 *           nibble) and j + 16 (high); w = (q - 8) * d.
 *  21 ggml MXFP4: row = K/32 blocks of 17 bytes, e8m0 e then 16 bytes as Q4_0's, fp4 e2m1 codes;
 *           w = fp4 * 2^(e - 127).
 *  18 ggml Q4_K: row = K/256 super-blocks of 144 bytes: fp16 d, fp16 dmin, 12 bytes of eight 6-bit
 *           scales and mins (one each per 32 elements), 128 bytes: each 32 bytes hold 64 elements,
 *           byte j element j (low nibble) and j + 32 (high); w = d * scale * q - dmin * min.
 *  19 ggml Q5_K: row = K/256 super-blocks of 176 bytes: Q4_K's with 32 bytes of fifth bits after the
 *           scales (bit 2i of byte j: element j of the i-th 64, bit 2i + 1: element j + 32).
 *  20 ggml Q6_K: row = K/256 super-blocks of 210 bytes: 128 bytes of low 4 bits, 64 bytes of high
 *           2 bits, 16 int8 scales (one per 16 elements), fp16 d; w = d * scale * (q - 32). Each
 *           half (128 elements) reads 64 low bytes l and 32 high bytes h: element j of its four 32s
 *           is l[j] low, l[j + 32] low, l[j] high, l[j + 32] high nibble, with bits 0-1, 2-3, 4-5,
 *           6-7 of h[j] on top.
 * (the ggml layouts as ggml-quants.c writes them; llmarch/runtime/quant.py reads the same in torch)
 * A GGUF stores gate and up as two tensors: with up_q given, gate rows come from gu_q [E, I, K] and
 * up rows from up_q [E, I, K] (block formats only: their scales are inside the rows). A GGUF may
 * store each of gate, up and down in its own block type (Q4_K_M: Q4_K gate/up, Q6_K down), so
 * `bits` holds gate/up's code in its low byte, up_q's in the next and down's in the third (0: the
 * same as gate/up's).
 * Built by experts/kernel.py with the system C compiler (gcc -O3 -march=native -fopenmp) and loaded
 * with ctypes: no torch headers, so it builds in about a second wherever it runs.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define G 64

#ifdef __F16C__
#include <immintrin.h>
static inline float h2f(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, f;
    if (exp == 0) {
        if (man == 0) { f = sign; }
        else { exp = 127 - 15 + 1; while (!(man & 0x400)) { man <<= 1; exp--; } man &= 0x3ff; f = sign | (exp << 23) | (man << 13); }
    } else if (exp == 31) { f = sign | 0x7f800000 | (man << 13); }
    else { f = sign | ((exp + 127 - 15) << 23) | (man << 13); }
    float out; memcpy(&out, &f, 4); return out;
}
#endif

/* Activations are rounded to int8 per group of 64 (like llama.cpp's Q8 activations) so each group
 * of weights is one integer dot product: AVX-512 VNNI / AVX-VNNI dpbusd, else AVX2 maddubs, else
 * plain C. Per group g of a row: xq[64] int8, xs[2g] = scale, xs[2g + 1] = scale * sum(xq) (the
 * int4 min term), and after those, xs[2 ng + 2g] and xs[2 ng + 2g + 1] = scale * the sums of its
 * two halves of 32 (the K-quant min terms, one min per 32): XSN(K) floats per row. The kernel
 * computes exactly dequant(W) . dequant(quant(x)); formats.py's fake_quant_activations() is the
 * same rounding in torch, for tests. */
#define XSN(K) (4 * ((K) / G))
enum { LAYOUT_PLAIN, LAYOUT_PAIRED, LAYOUT_EVEN_ODD };

/* -DMOE_PROFILE (benchmarks/moe_kernel_bench.c): seconds spent up to the end of each phase */
#ifdef MOE_PROFILE
#include <omp.h>
double moe_prof[6];
static double moe_t0;
#define PROF(i) do { if ((i) == 0) { moe_t0 = omp_get_wtime(); } else { _Pragma("omp master") moe_prof[i] += omp_get_wtime() - moe_t0; } } while (0)
#else
#define PROF(i) ((void)0)
#endif

#ifdef __AVX2__
#include <immintrin.h>
#endif

/* max |x| over one group: the same value as the fmaxf loop (max is exact in any order; a NaN is
 * skipped as fmaxf skips it, since max_ps returns its second operand when either is NaN) */
static inline float group_absmax(const float *xg) {
#ifdef __AVX2__
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 m = _mm256_setzero_ps();
    for (int j = 0; j < G; j += 8) m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(xg + j)), m);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
#else
    float amax = 0.f;
    for (int j = 0; j < G; j++) amax = fmaxf(amax, fabsf(xg[j]));
    return amax;
#endif
}

static void quant_row(const float *x, int K, int8_t *q, float *xs, int layout) {
    for (int g = 0; g < K / G; g++) {
        const float *xg = x + g * G;
        float amax = group_absmax(xg);
        float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
        int sum[2];
        for (int h = 0; h < 2; h++) {
            int sh = 0;
            for (int j = h * G / 2; j < (h + 1) * G / 2; j++) {  /* round half to even, as nearbyintf and
                                                                     torch.round, but in SIMD: */
                int v = (int)((xg[j] * inv + 12582912.f) - 12582912.f);  /* 1.5 * 2^23 drops the fraction */
                q[g * G + j] = (int8_t)v;
                sh += v;
            }
            sum[h] = sh;
        }
        xs[2 * g] = d;
        xs[2 * g + 1] = d * (float)(sum[0] + sum[1]);
        xs[2 * (K / G) + 2 * g] = d * (float)sum[0];
        xs[2 * (K / G) + 2 * g + 1] = d * (float)sum[1];
    }
    /* paired: groups g, g+1 stored [g 0..31, g+1 0..31, g 32..63, g+1 32..63], as the 512-bit int4
     * path reads two groups at once (a trailing odd group stays as it is) */
    for (int g = 0; layout == LAYOUT_PAIRED && g + 2 <= K / G; g += 2) {
        int8_t tmp[32];
        memcpy(tmp, q + g * G + 32, 32);
        memcpy(q + g * G + 32, q + g * G + 64, 32);
        memcpy(q + g * G + 64, tmp, 32);
    }
    /* even/odd (MXFP4): per group [even elements of block 0, of block 1, odd of block 0, of block 1],
     * lining up with a block's low and high nibbles */
    for (int g = 0; layout == LAYOUT_EVEN_ODD && g < K / G; g++) {
        int8_t tmp[G];
        for (int b = 0; b < 2; b++)
            for (int j = 0; j < 16; j++) {
                tmp[b * 16 + j] = q[g * G + b * 32 + 2 * j];
                tmp[32 + b * 16 + j] = q[g * G + b * 32 + 2 * j + 1];
            }
        memcpy(q + g * G, tmp, G);
    }
}

#ifdef __AVX2__
#include <immintrin.h>
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s); s = _mm_hadd_ps(s, s); return _mm_cvtss_f32(s);
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define ZMM4 1  /* int4 rows two groups per instruction; inputs stored paired (quant_row) */
#else
#define ZMM4 0
#endif
#if !defined(__F16C__)  /* the vector paths convert fp16 scales 8 at a time */
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#elif defined(__AVXVNNI__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#elif defined(__AVX2__)  /* u8 x s8 pairs -> s16 (no overflow: |q| <= 15 or 127, |x| <= 127), then -> s32 */
#define DPBUSD(acc, u, s) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
#endif

/* Each thread walks consecutive rows of one expert, so the bytes PF past the current ones are its
 * next rows: prefetched explicitly, since one core's own misses (without the hardware streamer's
 * help, as on the VMs measured) cap it near 6 GB/s. */
#ifndef PF
#define PF 2048
#endif
#define PFS (PF / 4)  /* in the scale stream (int4: 4 scale bytes per 32 weight bytes), twice as far */
#if PF
#define PREFETCH(p) __builtin_prefetch((const void *)(p), 0, 3)
#else
#define PREFETCH(p) ((void)(p))
#endif

/* one int4 row (K/64 groups of 32 bytes: byte j = element j low nibble, j + 32 high) . T int8 rows */
static void dot4(const uint8_t *q, const uint16_t *sm, const int8_t *xq, const float *xs, int K, int T, float *res) {
    int ng = K / G;
    PREFETCH((const char *)sm + PFS);  /* the scale stream, as far ahead in time as the weights' */
    PREFETCH((const char *)sm + PFS + 64);
    for (int t = 0; t < T; t++) {
        const int8_t *xt = xq + (long)t * K;
        const float *st = xs + (long)t * XSN(K);
        float accm = 0.f;
#ifdef DPBUSD
        /* per-group factors, 8 at a time: (scale, min) fp16 pairs x (x scale, x scale * sum(xq)) */
        float prod[2 * 1024];
        __m256 accm8 = _mm256_setzero_ps();
        const __m256 odd = _mm256_castsi256_ps(_mm256_set_epi32(-1, 0, -1, 0, -1, 0, -1, 0));
        int j = 0;
        for (; j + 8 <= 2 * ng; j += 8) {
            __m256 p = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sm + j))), _mm256_loadu_ps(st + j));
            _mm256_storeu_ps(prod + j, p);
            accm8 = _mm256_add_ps(accm8, _mm256_and_ps(p, odd));
        }
        for (; j < 2 * ng; j++) {
            prod[j] = h2f(sm[j]) * st[j];
            if (j & 1) accm += prod[j];
        }
        __m256 acc = accm8;  /* the min terms ride in the accumulator: one horizontal sum per row */
        int g = 0;
#if ZMM4
        __m512 accz = _mm512_setzero_ps();
        const __m512i mask2 = _mm512_set1_epi8(15);
        for (; g + 2 <= ng; g += 2) {  /* lanes 0-7: group g, 8-15: group g + 1 */
            if (t == 0) PREFETCH(q + g * 32 + PF);
            __m512i b = _mm512_loadu_si512((const void *)(q + g * 32));
            __m512i lo = _mm512_and_si512(b, mask2), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), mask2);
            __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void *)(xt + g * G)));
            s = _mm512_dpbusd_epi32(s, hi, _mm512_loadu_si512((const void *)(xt + g * G + 64)));
            __m512 f = _mm512_mask_broadcastss_ps(_mm512_set1_ps(prod[2 * g]), 0xFF00, _mm_load_ss(prod + 2 * g + 2));
            accz = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), f, accz);
        }
        acc = _mm256_add_ps(acc, _mm256_add_ps(_mm512_castps512_ps256(accz),
                                                _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(accz), 1))));
#endif
        const __m256i mask = _mm256_set1_epi8(15);
        for (; g < ng; g++) {
            if (t == 0 && !(g & 1)) PREFETCH(q + g * 32 + PF);
            __m256i b = _mm256_loadu_si256((const __m256i *)(q + g * 32));
            __m256i lo = _mm256_and_si256(b, mask), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
            __m256i s = DPBUSD(_mm256_setzero_si256(), lo, _mm256_loadu_si256((const __m256i *)(xt + g * G)));
            s = DPBUSD(s, hi, _mm256_loadu_si256((const __m256i *)(xt + g * G + 32)));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_broadcast_ss(prod + 2 * g), acc);
        }
        res[t] = hsum(acc) + accm;
#else
        float acc = 0.f;
        for (int g = 0; g < ng; g++) {
            const uint8_t *b = q + g * 32;
            const int8_t *xg = xt + g * G;
            int s = 0;
            for (int j = 0; j < 32; j++) s += (b[j] & 15) * xg[j] + (b[j] >> 4) * xg[j + 32];
            acc += (float)s * h2f(sm[2 * g]) * st[2 * g];
            accm += h2f(sm[2 * g + 1]) * st[2 * g + 1];
        }
        res[t] = acc + accm;
#endif
    }
}

/* R consecutive int4 rows (row r at q + r * (K / 2), its scales at sm + r * 2 (K / 64)) . one int8 row:
 * each row's arithmetic is dot4's with T = 1, op for op in the same order (the same bits), with the
 * rows interleaved so that the input is loaded once per group for all of them and the per-row work
 * (scale products, loop, horizontal sum) overlaps. A decode call's rows are short (Qwen3-30B-A3B's down
 * rows: 384 bytes), where that per-row work is a large part of the time. */
#define DOT4_ROWS 4
#ifndef DOT4_ROWS_MAXK
#define DOT4_ROWS_MAXK 1024  /* longer rows one at a time: their per-row work is a small part already */
#endif
#if defined(DPBUSD)
static inline __attribute__((always_inline)) void dot4_rows(const uint8_t *q, const uint16_t *sm, const int8_t *xt,
                                                            const float *st, int K, float *res) {
    enum { R = DOT4_ROWS };
    int ng = K / G, rb = K / 2, sb = 2 * ng;
    float prod[R][2 * 1024];
    __m256 acc[R];
    float accm[R];
    const __m256 odd = _mm256_castsi256_ps(_mm256_set_epi32(-1, 0, -1, 0, -1, 0, -1, 0));
    for (int r = 0; r < R; r++) {
        const uint16_t *smr = sm + r * sb;
        PREFETCH((const char *)smr + PFS);
        PREFETCH((const char *)smr + PFS + 64);
        __m256 accm8 = _mm256_setzero_ps();
        float am = 0.f;
        int j = 0;
        for (; j + 8 <= 2 * ng; j += 8) {
            __m256 p = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(smr + j))), _mm256_loadu_ps(st + j));
            _mm256_storeu_ps(prod[r] + j, p);
            accm8 = _mm256_add_ps(accm8, _mm256_and_ps(p, odd));
        }
        for (; j < 2 * ng; j++) {
            prod[r][j] = h2f(smr[j]) * st[j];
            if (j & 1) am += prod[r][j];
        }
        acc[r] = accm8;
        accm[r] = am;
    }
    int g = 0;
#if ZMM4
    __m512 accz[R];
    for (int r = 0; r < R; r++) accz[r] = _mm512_setzero_ps();
    const __m512i mask2 = _mm512_set1_epi8(15);
    for (; g + 2 <= ng; g += 2) {
        __m512i x0 = _mm512_loadu_si512((const void *)(xt + g * G)), x1 = _mm512_loadu_si512((const void *)(xt + g * G + 64));
        for (int r = 0; r < R; r++) {
            const uint8_t *qr = q + (long)r * rb;
            PREFETCH(qr + g * 32 + R * rb);  /* this row's bytes in the next R rows: one call ahead */
            __m512i b = _mm512_loadu_si512((const void *)(qr + g * 32));
            __m512i lo = _mm512_and_si512(b, mask2), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), mask2);
            __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, x0);
            s = _mm512_dpbusd_epi32(s, hi, x1);
            __m512 f = _mm512_mask_broadcastss_ps(_mm512_set1_ps(prod[r][2 * g]), 0xFF00, _mm_load_ss(prod[r] + 2 * g + 2));
            accz[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), f, accz[r]);
        }
    }
    for (int r = 0; r < R; r++)
        acc[r] = _mm256_add_ps(acc[r], _mm256_add_ps(_mm512_castps512_ps256(accz[r]),
                                                     _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(accz[r]), 1))));
#endif
    const __m256i mask = _mm256_set1_epi8(15);
    for (; g < ng; g++) {
        __m256i x0 = _mm256_loadu_si256((const __m256i *)(xt + g * G)), x1 = _mm256_loadu_si256((const __m256i *)(xt + g * G + 32));
        for (int r = 0; r < R; r++) {
            const uint8_t *qr = q + (long)r * rb;
            if (!(g & 1)) PREFETCH(qr + g * 32 + R * rb);
            __m256i b = _mm256_loadu_si256((const __m256i *)(qr + g * 32));
            __m256i lo = _mm256_and_si256(b, mask), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
            __m256i s = DPBUSD(_mm256_setzero_si256(), lo, x0);
            s = DPBUSD(s, hi, x1);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_broadcast_ss(prod[r] + 2 * g), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) res[r] = hsum(acc[r]) + accm[r];
}
#define HAVE_DOT4_ROWS 1
#endif

/* one int8 row (K/64 groups, fp16 scale each) . T int8 rows */
static void dot8(const int8_t *q, const uint16_t *sc, const int8_t *xq, const float *xs, int K, int T, float *res) {
    int ng = K / G;
    PREFETCH((const char *)sc + PFS / 2);  /* int8: half the scale bytes per weight byte of int4 */
    for (int t = 0; t < T; t++) {
        const int8_t *xt = xq + (long)t * K;
        const float *st = xs + (long)t * XSN(K);
#ifdef DPBUSD
        __m256 acc = _mm256_setzero_ps();
        for (int g = 0; g < ng; g++) {
            __m256i s = _mm256_setzero_si256();
            if (t == 0) PREFETCH(q + g * G + PF);
            for (int h = 0; h < G; h += 32) {  /* |w| (unsigned) . x * sign(w) */
                __m256i w = _mm256_loadu_si256((const __m256i *)(q + g * G + h));
                __m256i x = _mm256_loadu_si256((const __m256i *)(xt + g * G + h));
                s = DPBUSD(s, _mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
            }
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(h2f(sc[g]) * st[2 * g]), acc);
        }
        res[t] = hsum(acc);
#else
        float acc = 0.f;
        for (int g = 0; g < ng; g++) {
            int s = 0;
            for (int j = 0; j < G; j++) s += q[g * G + j] * xt[g * G + j];
            acc += (float)s * h2f(sc[g]) * st[2 * g];
        }
        res[t] = acc;
#endif
    }
}

/* fp4 e2m1 codes doubled, so they are integers; the scale halves them back */
static const int8_t FP4X2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

static inline float e8m0_half(uint8_t e) {  /* 2^(e - 127) / 2 */
    if (e < 2) return ldexpf(1.f, (int)e - 128);
    uint32_t bits = (uint32_t)(e - 1) << 23;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* one MXFP4 row . T int8 rows in the even/odd layout */
static void dotfp4(const uint8_t *q, const uint8_t *sc, const int8_t *xq, const float *xs, int K, int T, float *res) {
    int ng = K / G;
    PREFETCH((const char *)sc + PFS / 2);
    for (int t = 0; t < T; t++) {
        const int8_t *xt = xq + (long)t * K;
        const float *st = xs + (long)t * XSN(K);
#ifdef DPBUSD
        __m256 acc = _mm256_setzero_ps();
        const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)FP4X2));
        const __m256i mask = _mm256_set1_epi8(15);
        for (int g = 0; g < ng; g++) {  /* two blocks: int32 lanes 0-3 block 0, 4-7 block 1 */
            if (t == 0 && !(g & 1)) PREFETCH(q + g * 32 + PF);
            __m256i b = _mm256_loadu_si256((const __m256i *)(q + g * 32));
            __m256i wl = _mm256_shuffle_epi8(lut, _mm256_and_si256(b, mask));
            __m256i wh = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(b, 4), mask));
            __m256i xe = _mm256_loadu_si256((const __m256i *)(xt + g * G));
            __m256i xo = _mm256_loadu_si256((const __m256i *)(xt + g * G + 32));
            __m256i s = DPBUSD(_mm256_setzero_si256(), _mm256_sign_epi8(wl, wl), _mm256_sign_epi8(xe, wl));
            s = DPBUSD(s, _mm256_sign_epi8(wh, wh), _mm256_sign_epi8(xo, wh));
            __m256 f = _mm256_setr_m128(_mm_set1_ps(e8m0_half(sc[2 * g]) * st[2 * g]),
                                        _mm_set1_ps(e8m0_half(sc[2 * g + 1]) * st[2 * g]));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), f, acc);
        }
        res[t] = hsum(acc);
#else
        float acc = 0.f;
        for (int g = 0; g < ng; g++)
            for (int b = 0; b < 2; b++) {
                const uint8_t *qb = q + g * 32 + b * 16;
                const int8_t *xe = xt + g * G + b * 16, *xo = xe + 32;
                int s = 0;
                for (int j = 0; j < 16; j++) s += FP4X2[qb[j] & 15] * xe[j] + FP4X2[qb[j] >> 4] * xo[j];
                acc += (float)s * e8m0_half(sc[2 * g + b]) * st[2 * g];
            }
        res[t] = acc;
#endif
    }
}

#ifdef DPBUSD
/* acc + one ggml block (dotblk's kinds) . its 32 int8 inputs x, times the block's and the inputs' scales */
static inline __m256 blk_dot(const uint8_t *blk, int kind, __m256i x, float xscale, __m256 acc) {
    uint16_t dh;
    memcpy(&dh, blk, 2);
    __m256i wv;
    if (kind) {
        const __m256i mask = _mm256_set1_epi8(15);
        __m128i p = _mm_loadu_si128((const __m128i *)(blk + (kind == 2 ? 1 : 2)));
        __m256i u = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(p, 4), p), mask);  /* high half: the high nibbles */
        wv = kind == 1 ? _mm256_sub_epi8(u, _mm256_set1_epi8(8))
                       : _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)FP4X2)), u);
    } else {
        wv = _mm256_loadu_si256((const __m256i *)(blk + 2));
    }
    __m256i s = DPBUSD(_mm256_setzero_si256(), _mm256_sign_epi8(wv, wv), _mm256_sign_epi8(x, wv));
    float dw = kind == 2 ? e8m0_half(blk[0]) : h2f(dh);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(dw * xscale), acc);
}

/* DOT4_ROWS consecutive rows of `rb` bytes each (dotblk's kinds) . one int8 row: dotblk's arithmetic
 * per row with T = 1, the rows interleaved to share the input's loads (as dot4_rows) */
static inline __attribute__((always_inline)) void dotblk_rows(const uint8_t *row, long rb, int kind, const int8_t *xt,
                                                              const float *st, int K, float *res) {
    enum { R = DOT4_ROWS };
    int nb = K / 32, bs = kind == 0 ? 34 : (kind == 1 ? 18 : 17);
    __m256 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(xt + b * 32));
        for (int r = 0; r < R; r++) {
            const uint8_t *blk = row + r * rb + (long)b * bs;
            if (!(b & 1)) PREFETCH(blk + R * rb);  /* this row's bytes in the next R rows: one call ahead */
            acc[r] = blk_dot(blk, kind, x, st[2 * (b / 2)], acc[r]);
        }
    }
    for (int r = 0; r < R; r++) res[r] = hsum(acc[r]);
}
#endif

/* one ggml Q8_0 (kind 0), Q4_0 (1) or MXFP4 (2) row . T int8 rows in the plain layout: per block of 32
 * the weights as int8 (Q4_0: nibble - 8, MXFP4: its doubled fp4 value), one integer dot product, times
 * the block's scale (fp16 d, or MXFP4's e8m0 halved) and the input group's scale */
static void dotblk(const uint8_t *row, int kind, const int8_t *xq, const float *xs, int K, int T, float *res) {
    int nb = K / 32, bs = kind == 0 ? 34 : (kind == 1 ? 18 : 17);
    for (int t = 0; t < T; t++) {
        const int8_t *xt = xq + (long)t * K;
        const float *st = xs + (long)t * XSN(K);
#ifdef DPBUSD
        __m256 acc = _mm256_setzero_ps();
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = row + (long)b * bs;
            if (t == 0 && !(b & 1)) PREFETCH(blk + PF);
            __m256i x = _mm256_loadu_si256((const __m256i *)(xt + b * 32));
            acc = blk_dot(blk, kind, x, st[2 * (b / 2)], acc);
        }
        res[t] = hsum(acc);
#else
        float acc = 0.f;
        int off = kind == 2 ? 1 : 2;
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = row + (long)b * bs;
            uint16_t dh;
            memcpy(&dh, blk, 2);
            const int8_t *xb = xt + b * 32;
            int s = 0;
            for (int j = 0; j < 32; j++) {
                int nib = (blk[off + (j & 15)] >> (j < 16 ? 0 : 4)) & 15;
                int q = kind == 0 ? (int8_t)blk[2 + j] : (kind == 1 ? nib - 8 : FP4X2[nib]);
                s += q * xb[j];
            }
            acc += (float)s * (kind == 2 ? e8m0_half(blk[0]) : h2f(dh)) * st[2 * (b / 2)];
        }
        res[t] = acc;
#endif
    }
}

static inline float h2f_at(const uint8_t *p) {  /* an fp16 at any byte offset */
    uint16_t h;
    memcpy(&h, p, 2);
    return h2f(h);
}

/* Q4_K / Q5_K: the 6-bit scale and min of sub-block j (0..7) from a super-block's 12 bytes */
static inline void kscale(const uint8_t *p, int j, int *sc, int *mn) {
    if (j < 4) {
        *sc = p[j] & 63;
        *mn = p[j + 4] & 63;
    } else {
        *sc = (p[j + 4] & 15) | ((p[j - 4] >> 6) << 4);
        *mn = (p[j + 4] >> 4) | ((p[j] >> 6) << 4);
    }
}

/* K-quant sub-blocks have their own integer scale: 32 weights . 32 inputs with the scale lo on the first
 * 16 and hi on the last 16, as int32 lanes (0-3: the first 16). VNNI: dpbusd then an int32 multiply;
 * AVX2: maddubs' int16 pairs times the scales in the madd that widens them (no extra instruction). */
#if defined(DPBUSD) && ((defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__))
#define KSCALES(lo, hi) _mm256_setr_m128i(_mm_set1_epi32(lo), _mm_set1_epi32(hi))
#define KDOT(u, s, sc) _mm256_mullo_epi32(DPBUSD(_mm256_setzero_si256(), u, s), sc)
#elif defined(DPBUSD)
#define KSCALES(lo, hi) _mm256_setr_m128i(_mm_set1_epi16((short)(lo)), _mm_set1_epi16((short)(hi)))
#define KDOT(u, s, sc) _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), sc)
#endif

/* one ggml Q4_K (q5 = 0) or Q5_K (q5 = 1) row . T int8 rows in the plain layout: a super-block's four
 * 64s line up with the input groups; per 64 two scaled integer dot products (its two 32s) times d and
 * the group's scale, and the min term dmin * min * (the half's input sum) in float */
static void dotk45(const uint8_t *row, int q5, const int8_t *xq, const float *xs, int K, int T, float *res) {
    int nsb = K / 256, ng = K / G, bs = q5 ? 176 : 144;
    for (int t = 0; t < T; t++) {
        const int8_t *xt = xq + (long)t * K;
        const float *st = xs + (long)t * XSN(K), *halves = st + 2 * ng;
        float mins = 0.f;
#ifdef KDOT
        __m256 acc = _mm256_setzero_ps();
        const __m256i m15 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
#else
        float acc = 0.f;
#endif
        for (int sb = 0; sb < nsb; sb++) {
            const uint8_t *blk = row + (long)sb * bs, *qs = blk + (q5 ? 48 : 16), *qhb = blk + 16;
            if (t == 0)
                for (int o = 0; o < bs; o += 64) PREFETCH(blk + PF + o);
            float d = h2f_at(blk), dmin = h2f_at(blk + 2), msum = 0.f;
#ifdef KDOT
            __m256i qh = q5 ? _mm256_loadu_si256((const __m256i *)qhb) : _mm256_setzero_si256();
#endif
            for (int j = 0; j < 4; j++) {
                int g = 4 * sb + j, sl, ml, sh, mh;
                kscale(blk + 4, 2 * j, &sl, &ml);
                kscale(blk + 4, 2 * j + 1, &sh, &mh);
                msum += (float)ml * halves[2 * g] + (float)mh * halves[2 * g + 1];
#ifdef KDOT
                __m256i b = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
                __m256i lo = _mm256_and_si256(b, m15), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m15);
                if (q5) {  /* bit 2j of each qh byte tops the low nibble, bit 2j + 1 the high one */
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(qh, one), 4));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 1), one), 4));
                    qh = _mm256_srli_epi16(qh, 2);
                }
                __m256i s = _mm256_add_epi32(KDOT(lo, _mm256_loadu_si256((const __m256i *)(xt + g * G)), KSCALES(sl, sl)),
                                             KDOT(hi, _mm256_loadu_si256((const __m256i *)(xt + g * G + 32)), KSCALES(sh, sh)));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * st[2 * g]), acc);
#else
                int s_lo = 0, s_hi = 0;
                for (int l = 0; l < 32; l++) {
                    int lo = qs[32 * j + l] & 15, hi = qs[32 * j + l] >> 4;
                    if (q5) {
                        lo |= ((qhb[l] >> (2 * j)) & 1) << 4;
                        hi |= ((qhb[l] >> (2 * j + 1)) & 1) << 4;
                    }
                    s_lo += lo * xt[g * G + l];
                    s_hi += hi * xt[g * G + 32 + l];
                }
                acc += d * st[2 * g] * (float)(sl * s_lo + sh * s_hi);
#endif
            }
            mins += dmin * msum;
        }
#ifdef KDOT
        res[t] = hsum(acc) - mins;
#else
        res[t] = acc - mins;
#endif
    }
}

/* one ggml Q6_K row . T int8 rows in the plain layout: per 32 (q - 32) as int8, one scaled integer dot
 * product with the 16-element scales, per 64 times d and the group's scale */
static void dotq6k(const uint8_t *row, const int8_t *xq, const float *xs, int K, int T, float *res) {
    int nsb = K / 256;
    for (int t = 0; t < T; t++) {
        const int8_t *xt = xq + (long)t * K;
        const float *st = xs + (long)t * XSN(K);
#ifdef KDOT
        __m256 acc = _mm256_setzero_ps();
        const __m256i m15 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3), off = _mm256_set1_epi8(32);
#else
        float acc = 0.f;
#endif
        for (int sb = 0; sb < nsb; sb++) {
            const uint8_t *blk = row + (long)sb * 210;
            if (t == 0)
                for (int o = 0; o < 210; o += 64) PREFETCH(blk + PF + o);
            const int8_t *sc = (const int8_t *)(blk + 192);
            float d = h2f_at(blk + 208);
            for (int h = 0; h < 2; h++) {
                const uint8_t *ql = blk + 64 * h, *qhb = blk + 128 + 32 * h;
                const int8_t *sch = sc + 8 * h;
                int g0 = 4 * sb + 2 * h;  /* this half's two input groups: 32s 0-1, then 2-3 */
#ifdef KDOT
                __m256i l0 = _mm256_loadu_si256((const __m256i *)ql), l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
                __m256i qh = _mm256_loadu_si256((const __m256i *)qhb);
                __m256i w[4] = {
                    _mm256_and_si256(l0, m15),
                    _mm256_and_si256(l1, m15),
                    _mm256_and_si256(_mm256_srli_epi16(l0, 4), m15),
                    _mm256_and_si256(_mm256_srli_epi16(l1, 4), m15),
                };
                __m256i s[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
                for (int c = 0; c < 4; c++) {
                    __m256i top = _mm256_slli_epi16(_mm256_and_si256(qh, m3), 4);
                    qh = _mm256_srli_epi16(qh, 2);
                    __m256i q = _mm256_sub_epi8(_mm256_or_si256(w[c], top), off);
                    __m256i x = _mm256_loadu_si256((const __m256i *)(xt + (long)(g0 + c / 2) * G + (c & 1) * 32));
                    s[c / 2] = _mm256_add_epi32(s[c / 2], KDOT(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q),
                                                               KSCALES(sch[2 * c], sch[2 * c + 1])));
                }
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[0]), _mm256_set1_ps(d * st[2 * g0]), acc);
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[1]), _mm256_set1_ps(d * st[2 * g0 + 2]), acc);
#else
                for (int c = 0; c < 4; c++) {
                    int s_lo = 0, s_hi = 0;
                    const int8_t *x = xt + (long)(g0 + c / 2) * G + (c & 1) * 32;
                    for (int l = 0; l < 32; l++) {
                        int lb = ql[l + (c & 1) * 32];
                        int q = ((c < 2 ? lb : lb >> 4) & 15) | (((qhb[l] >> (2 * c)) & 3) << 4);
                        if (l < 16)
                            s_lo += (q - 32) * x[l];
                        else
                            s_hi += (q - 32) * x[l];
                    }
                    acc += d * st[2 * (g0 + c / 2)] * (float)(sch[2 * c] * s_lo + sch[2 * c + 1] * s_hi);
                }
#endif
            }
        }
#ifdef KDOT
        res[t] = hsum(acc);
#else
        res[t] = acc;
#endif
    }
}

/* bytes of one row of K inputs in a stored-block format (0: not one) */
static inline long block_row_bytes(int bits, int K) {
    switch (bits) {
    case 16: return (long)(K / 32) * 34;
    case 17: return (long)(K / 32) * 18;
    case 21: return (long)(K / 32) * 17;
    case 18: return (long)(K / 256) * 144;
    case 19: return (long)(K / 256) * 176;
    case 20: return (long)(K / 256) * 210;
    default: return 0;
    }
}

/* one weight row (row index `row` of a stacked [rows, K] matrix in format `bits`) . T input rows */
static void dot_row(int bits, const void *q, const void *s, long row, int K, const int8_t *xq, const float *xs,
                    int T, float *res) {
    if (bits == 4)
        dot4((const uint8_t *)q + row * (K / 2), (const uint16_t *)s + row * 2 * (K / G), xq, xs, K, T, res);
    else if (bits == 8)
        dot8((const int8_t *)q + row * K, (const uint16_t *)s + row * (K / G), xq, xs, K, T, res);
    else if (bits == 16 || bits == 17 || bits == 21)
        dotblk((const uint8_t *)q + row * block_row_bytes(bits, K), bits == 16 ? 0 : (bits == 17 ? 1 : 2), xq, xs, K, T, res);
    else if (bits == 18 || bits == 19)
        dotk45((const uint8_t *)q + row * block_row_bytes(bits, K), bits == 19, xq, xs, K, T, res);
    else if (bits == 20)
        dotq6k((const uint8_t *)q + row * block_row_bytes(bits, K), xq, xs, K, T, res);
    else
        dotfp4((const uint8_t *)q + row * (K / 2), (const uint8_t *)s + row * (K / 32), xq, xs, K, T, res);
}

/* The router weight w scales a row's dot product before the bias (pre_w: Llama 4's input weighting)
 * or after it (post_w). */
static inline float finish_row(float v, float wt, const float *b, long bi, int pre_w, int post_w) {
    if (pre_w) v *= wt;
    if (b) v += b[bi];
    return post_w ? v * wt : v;
}

/* OUT[r, n] = W[sel[i]][n] . x_r for n < N and the rows r of each selected expert i, spread over the
 * team (an orphaned omp for: called inside moe_experts' parallel region); w[r] as finish_row says.
 * q2: rows n >= N/2 come from this second matrix (a GGUF's up beside its gate), row n - N/2, in format bits2. */
static void expert_rows(int bits, const void *q, const void *s, const void *q2, int bits2, const float *b, int K, int N,
                        int n_sel, const int64_t *sel, const int32_t *start, const int8_t *XQ, const float *XS,
                        const float *w, int pre_w, int post_w, float *OUT) {
    int half = N / 2;
    #pragma omp for collapse(2) schedule(static)
    for (int i = 0; i < n_sel; i++) {
        for (int n = 0; n < N; n++) {
            int r0 = start[i], T = start[i + 1] - start[i];
            long e = sel[i];
            float res[64];
            for (int t0 = 0; t0 < T; t0 += 64) {
                int tn = T - t0 < 64 ? T - t0 : 64;
                const int8_t *xq = XQ + (long)(r0 + t0) * K;
                const float *xs = XS + (long)(r0 + t0) * XSN(K);
                if (!q2)
                    dot_row(bits, q, s, e * N + n, K, xq, xs, tn, res);
                else if (n < half)
                    dot_row(bits, q, s, e * half + n, K, xq, xs, tn, res);
                else
                    dot_row(bits2, q2, s, e * half + n - half, K, xq, xs, tn, res);
                for (int t = 0; t < tn; t++)
                    OUT[(long)(r0 + t0 + t) * N + n] = finish_row(res[t], w[r0 + t0 + t], b, e * N + n, pre_w, post_w);
            }
        }
    }
}

/* The activation of one value: 0 silu, 2 relu^2, 3 relu, 4 gelu (tanh approximation), 5 gelu (erf);
 * 1 (gpt-oss's clamped SwiGLU) is applied to gate and up together below. */
static inline float act_fn(int act, float v) {
    switch (act) {
    case 2: v = v > 0.f ? v : 0.f; return v * v;
    case 3: return v > 0.f ? v : 0.f;
    case 4: return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    case 5: return 0.5f * v * (1.f + erff(v * 0.7071067811865476f));
    default: return v / (1.f + expf(-v));
    }
}

/* a[j] = act(h[j]) * h[I + j] (gated: gate then up in h) or act(h[j]); a may be h (in place: a[j] is
 * written after h[j] and h[I + j] are read) */
static void activate_row(const float *h, float *a, int I, int act, int gated, float alpha, float limit) {
    for (int j = 0; j < I; j++) {
        if (!gated) {
            a[j] = act_fn(act, h[j]);
            continue;
        }
        float g = h[j], u = h[I + j];
        if (act == 1) {
            g = g > limit ? limit : g;
            u = u > limit ? limit : (u < -limit ? -limit : u);
            a[j] = (u + 1.f) * (g / (1.f + expf(-g * alpha)));
        } else {
            a[j] = act_fn(act, g) * u;
        }
    }
}

/* the order quant_row lays a row's int8 inputs out in for a format */
static inline int layout_of(int bits) {
    return bits == 2 ? LAYOUT_EVEN_ODD : (bits == 4 && ZMM4 ? LAYOUT_PAIRED : LAYOUT_PLAIN);
}

/* rows n0 .. n0 + R - 1 of expert e (N rows, q2 as expert_rows says) . one int8 input row */
static void rows_one_input(int bits, const void *q, const void *s, const void *q2, int bits2, long e, int N, int n0, int R,
                           int K, const int8_t *xq, const float *xs, float *res) {
    int half = N / 2;
#ifdef HAVE_DOT4_ROWS
    if (bits == 4 && !q2 && R == DOT4_ROWS && K <= DOT4_ROWS_MAXK) {
        long row = e * N + n0;
        dot4_rows((const uint8_t *)q + row * (K / 2), (const uint16_t *)s + row * 2 * (K / G), xq, xs, K, res);
        return;
    }
    if ((bits == 16 || bits == 17 || bits == 21) && !q2 && R == DOT4_ROWS && K <= DOT4_ROWS_MAXK) {
        long rb = block_row_bytes(bits, K);
        dotblk_rows((const uint8_t *)q + (e * N + n0) * rb, rb, bits == 16 ? 0 : (bits == 17 ? 1 : 2), xq, xs, K, res);
        return;
    }
#endif
    for (int r = 0; r < R; r++) {
        int n = n0 + r;
        if (!q2)
            dot_row(bits, q, s, e * N + n, K, xq, xs, 1, res + r);
        else if (n < half)
            dot_row(bits, q, s, e * half + n, K, xq, xs, 1, res + r);
        else
            dot_row(bits2, q2, s, e * half + n - half, K, xq, xs, 1, res + r);
    }
}

/* moe_experts where every selected expert has one row (a decode token: k experts, one token each).
 * The general path's serial steps become per-thread work on the stack: each thread rounds the input
 * of the rows it computes itself (instead of one phase, and a barrier, before gate_up), and at the
 * start of its down rows activates and rounds its expert's gate_up row itself (instead of a phase in
 * which only k of the threads have a row to work on, and a barrier). Rows go DOT4_ROWS at a time
 * (dot4_rows). Same arithmetic per value as the general path, so the same bits. */
#define LOCAL_MAX 8192  /* d and I up to this take the path (its stack copies: ~50 KB a thread) */
static void experts_one_row(int gu_bits, int up_bits, int dn_bits, int n_sel, const int64_t *sel, const int32_t *tok,
                            const float *w, const float *X, float *OUT, int d, int I, const void *gu_q,
                            const void *gu_s, const void *up_q, const void *dn_q, const void *dn_s, const float *gu_b,
                            const float *dn_b, float *H, float *Y, int act, int gated, float alpha, float limit,
                            int weight_input) {
    int I2 = gated ? 2 * I : I, layout_gu = layout_of(gu_bits), layout_dn = layout_of(dn_bits);
    enum { R4 = DOT4_ROWS };
    long ngu = (I2 + R4 - 1) / R4, ndn = (d + R4 - 1) / R4;
    #pragma omp parallel
    {
        int8_t xq[LOCAL_MAX];
        float xs[XSN(LOCAL_MAX)], res[R4];
        int have = -1;
        PROF(1);
        #pragma omp for schedule(static)
        for (long u = 0; u < n_sel * ngu; u++) {
            int i = (int)(u / ngu), n0 = (int)(u % ngu) * R4, R = I2 - n0 < R4 ? I2 - n0 : R4;
            if (tok[i] != have) {  /* a thread's rows are consecutive: it rounds each input once */
                quant_row(X + (long)tok[i] * d, d, xq, xs, layout_gu);
                have = tok[i];
            }
            rows_one_input(gu_bits, gu_q, gu_s, up_q, up_bits, sel[i], I2, n0, R, d, xq, xs, res);
            for (int r = 0; r < R; r++)
                H[(long)i * I2 + n0 + r] = finish_row(res[r], w[i], gu_b, sel[i] * I2 + n0 + r, weight_input, 0);
        }
        PROF(2);
        PROF(3);
        float a[LOCAL_MAX];
        int8_t aq[LOCAL_MAX];
        float as[XSN(LOCAL_MAX)];
        int have_i = -1;
        #pragma omp for schedule(static)
        for (long u = 0; u < n_sel * ndn; u++) {
            int i = (int)(u / ndn), n0 = (int)(u % ndn) * R4, R = d - n0 < R4 ? d - n0 : R4;
            if (i != have_i) {
                activate_row(H + (long)i * I2, a, I, act, gated, alpha, limit);
                quant_row(a, I, aq, as, layout_dn);
                have_i = i;
            }
            rows_one_input(dn_bits, dn_q, dn_s, NULL, 0, sel[i], d, n0, R, I, aq, as, res);
            for (int r = 0; r < R; r++)
                Y[(long)i * d + n0 + r] = finish_row(res[r], w[i], dn_b, sel[i] * d + n0 + r, 0, !weight_input);
        }
        PROF(4);
        #pragma omp for schedule(static)
        for (int n = 0; n < d; n++)
            for (int r = 0; r < n_sel; r++) OUT[(long)tok[r] * d + n] += Y[(long)r * d + n];
    }
}

/* sel: n_sel expert ids; rows r in [start[i], start[i+1]) belong to sel[i]; tok[r] its token, w[r] its weight.
 * X [n_tok, d]; OUT [n_tok, d] (added to). Scratch: XQ int8 [rows, d], XS [rows, XSN(d)], H [rows, 2I],
 * AQ int8 [rows, I], AS [rows, XSN(I)], Y [rows, d]. act: act_fn's code (1: gpt-oss clamped SwiGLU).
 * gated: gu holds gate rows then up rows (a = act(gate) * up); else up rows alone (a = act(up)).
 * up_q: the up rows as their own matrix (see the layouts), or NULL.
 * weight_input: Llama 4 (the router weight scales the expert's input, not its output). */
void moe_experts(int bits, int n_sel, const int64_t *sel, const int32_t *start, const int32_t *tok, const float *w,
                 const float *X, float *OUT, int d, int I,
                 const void *gu_q, const void *gu_s, const void *up_q, const void *dn_q, const void *dn_s,
                 const float *gu_b, const float *dn_b,
                 int8_t *XQ, float *XS, float *H, int8_t *AQ, float *AS, float *Y,
                 int act, int gated, float alpha, float limit, int weight_input) {
    int rows = start[n_sel], I2 = gated ? 2 * I : I;
    int gu_bits = bits & 255, up_bits = (bits >> 8) & 255, dn_bits = (bits >> 16) & 255;
    up_bits = up_bits ? up_bits : gu_bits;
    dn_bits = dn_bits ? dn_bits : gu_bits;
    int layout_gu = layout_of(gu_bits), layout_dn = layout_of(dn_bits);
    PROF(0);
    if (rows == n_sel && d <= LOCAL_MAX && I <= LOCAL_MAX) {
        experts_one_row(gu_bits, up_bits, dn_bits, n_sel, sel, tok, w, X, OUT, d, I, gu_q, gu_s, up_q, dn_q, dn_s, gu_b,
                        dn_b, H, Y, act, gated, alpha, limit, weight_input);
        PROF(5);
        return;
    }
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (int r = 0; r < rows; r++)  /* gather token rows so each expert's tokens are contiguous */
            quant_row(X + (long)tok[r] * d, d, XQ + (long)r * d, XS + (long)r * XSN(d), layout_gu);
        PROF(1);
        expert_rows(gu_bits, gu_q, gu_s, up_q, up_bits, gu_b, d, I2, n_sel, sel, start, XQ, XS, w, weight_input, 0, H);
        PROF(2);
        #pragma omp for schedule(static)
        for (int r = 0; r < rows; r++) {
            float *h = H + (long)r * I2;  /* the activation overwrites the gate half in place */
            activate_row(h, h, I, act, gated, alpha, limit);
            quant_row(h, I, AQ + (long)r * I, AS + (long)r * XSN(I), layout_dn);
        }
        PROF(3);
        expert_rows(dn_bits, dn_q, dn_s, NULL, 0, dn_b, I, d, n_sel, sel, start, AQ, AS, w, 0, !weight_input, Y);
        PROF(4);
        #pragma omp for schedule(static)
        for (int n = 0; n < d; n++)
            for (int r = 0; r < rows; r++) OUT[(long)tok[r] * d + n] += Y[(long)r * d + n];
    }
    PROF(5);
}

/* One decode token (T = 1) of one layer, everything read from a context prepared once
 * (experts/decode.py): the call from Python passes one pointer.
 * pack = [k expert ids as float, k weights, x (d floats)], as the GPU segment writes it. */
typedef struct {
    int bits, k, d, I, act, gated, weight_input;
    float alpha, limit;
    const float *pack;
    float *out;
    const void *gu_q, *up_q, *dn_q, *gu_s, *dn_s;
    const float *gu_b, *dn_b;
    int8_t *XQ, *AQ;
    float *XS, *H, *AS, *Y;
} moe_decode_ctx;

void moe_decode(void *arg) {
    const moe_decode_ctx *c = (const moe_decode_ctx *)arg;
    int64_t sel[256];
    int32_t start[257], tok[256];
    float w[256];
    int k = c->k < 256 ? c->k : 256;
    for (int i = 0; i < k; i++) {  /* insertion sort by expert id: rows of one expert stay together */
        int64_t e = (int64_t)c->pack[i];
        float wi = c->pack[k + i];
        int j = i;
        for (; j > 0 && sel[j - 1] > e; j--) { sel[j] = sel[j - 1]; w[j] = w[j - 1]; }
        sel[j] = e; w[j] = wi;
    }
    for (int i = 0; i <= k; i++) start[i] = i;
    for (int i = 0; i < k; i++) tok[i] = 0;
    memset(c->out, 0, sizeof(float) * c->d);
    moe_experts(c->bits, k, sel, start, tok, w, c->pack + 2 * k, c->out, c->d, c->I, c->gu_q, c->gu_s, c->up_q,
                c->dn_q, c->dn_s, c->gu_b, c->dn_b, c->XQ, c->XS, c->H, c->AQ, c->AS, c->Y, c->act, c->gated,
                c->alpha, c->limit, c->weight_input);
}

/* A whole decode step of the segmented decoder (experts/decode.py) in one call from Python: per
 * segment, launch its CUDA graph, wait for the event recorded after its copy of pack to host memory,
 * then compute that layer's experts; the next graph's first node copies the sum back. The CUDA calls
 * are the driver's cuGraphLaunch / cuEventSynchronize, passed in as pointers (this file links no CUDA
 * library), on the context current in the calling thread. Python's loop did the same through
 * torch's CUDAGraph.replay (which also refreshes the RNG state of every replay: the segments draw no
 * random numbers) and Event.synchronize; here the GPU's next segment starts as soon as the kernel
 * returns.
 * Early launch (wait_value and flag set): segment i + 1 is queued while segment i still runs on the
 * GPU, behind a stream wait (the driver's cuStreamWaitValue32) until the 32-bit flag in pinned host
 * memory reaches this layer's sequence number, which the host stores after layer i's kernel; the
 * launch call then leaves the path between the kernel's end and the GPU's next segment (a store the
 * GPU polls instead). Returns 0, or (segment + 1) * 1000 + the CUDA error code of the call that
 * failed (a pending stream wait is released first, so the stream never hangs on it). */
typedef int (*graph_launch_fn)(void *graph_exec, void *stream);
typedef int (*event_sync_fn)(void *event);
typedef int (*wait_value_fn)(void *stream, uint64_t addr, uint32_t value, unsigned flags);
typedef struct {
    int n;  /* segments (graphs); the host calls between them: n - 1 */
    graph_launch_fn launch;
    event_sync_fn wait;
    void *stream;
    void *const *graphs;
    void *const *events;
    void *const *ctxs;  /* moe_decode_ctx *, one per host call */
    double *times;      /* NULL, or 3 per segment: seconds (CLOCK_MONOTONIC) after its launch, wait, kernel
                           (early launch: segment i + 1's launch is marked when it is queued, before i's wait) */
    wait_value_fn wait_value;  /* NULL: launch after the kernel; else early launch through flag */
    uint32_t *flag;            /* pinned host memory the GPU can read (early launch) */
    uint64_t flag_dev;         /* its device address, what the stream wait polls */
} moe_step_plan;

/* the driver's CU_STREAM_WAIT_VALUE_GEQ: (int32_t)(*flag - value) >= 0, a cyclic test, so a later
 * value (raised on an error path) also releases an earlier wait, and 32 bits may wrap */
#define CU_STREAM_WAIT_VALUE_GEQ 0x0

static inline void step_mark(double *t) {
    if (t) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        *t = ts.tv_sec + 1e-9 * ts.tv_nsec;
    }
}

static inline void raise_flag(uint32_t *flag, uint32_t value) {
    /* after every store of the experts' sum (the kernel's threads have joined): the GPU's copy back,
     * released by this value, must read the finished sum */
    __atomic_store_n(flag, value, __ATOMIC_RELEASE);
}

int moe_step(void *arg) {
    const moe_step_plan *p = (const moe_step_plan *)arg;
    double *t = p->times;
    int early = p->wait_value && p->flag;
    int rc = p->launch(p->graphs[0], p->stream);
    if (rc) return 1000 + rc;
    step_mark(t);
    for (int i = 0; i < p->n - 1; i++) {
        uint32_t seq = 0;
        if (early) {
            seq = __atomic_load_n(p->flag, __ATOMIC_RELAXED) + 1;
            rc = p->wait_value(p->stream, p->flag_dev, seq, CU_STREAM_WAIT_VALUE_GEQ);
            if (rc) return (i + 2) * 1000 + rc;
            rc = p->launch(p->graphs[i + 1], p->stream);
            if (rc) {
                raise_flag(p->flag, seq);
                return (i + 2) * 1000 + rc;
            }
            step_mark(t ? t + 3 * (i + 1) : NULL);
        }
        rc = p->wait(p->events[i]);
        if (rc) {
            if (early) raise_flag(p->flag, seq);
            return (i + 1) * 1000 + rc;
        }
        step_mark(t ? t + 3 * i + 1 : NULL);
        moe_decode(p->ctxs[i]);
        step_mark(t ? t + 3 * i + 2 : NULL);
        if (early) {
            raise_flag(p->flag, seq);
            continue;
        }
        rc = p->launch(p->graphs[i + 1], p->stream);
        if (rc) return (i + 2) * 1000 + rc;
        step_mark(t ? t + 3 * (i + 1) : NULL);
    }
    return 0;
}

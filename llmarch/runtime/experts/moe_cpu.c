/* Routed experts on the CPU, straight from their quantized form (llmarch/runtime/experts/host.py).
 *
 * One call computes every selected (expert, token) pair of one MoE layer with all cores at once:
 *   0. each token's x rounded to int8 per group of 64 (below)
 *   1. gate_up rows of all selected experts, split across threads   h = W_gu x (+ b)
 *   2. activation, rounded to int8 like x                             a = act(gate) * up, or act(up)
 *                                                                     for non-gated experts
 *   3. down rows of all selected experts, split across threads        y = W_d a (+ b)
 *   4. out[token] += weight * y, rows summed in a fixed order (deterministic)
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
 * A GGUF stores gate and up as two tensors: with up_q given, gate rows come from gu_q [E, I, K] and
 * up rows from up_q [E, I, K] (block formats only: their scales are inside the rows).
 * Built by experts/kernel.py with the system C compiler (gcc -O3 -march=native -fopenmp) and loaded
 * with ctypes: no torch headers, so it builds in about a second wherever it runs.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

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
 * int4 min term). The kernel computes exactly dequant(W) . dequant(quant(x)); formats.py's
 * fake_quant_activations() is the same rounding in torch, for tests. */
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

static void quant_row(const float *x, int K, int8_t *q, float *xs, int layout) {
    for (int g = 0; g < K / G; g++) {
        const float *xg = x + g * G;
        float amax = 0.f;
        for (int j = 0; j < G; j++) amax = fmaxf(amax, fabsf(xg[j]));
        float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
        int sum = 0;
        for (int j = 0; j < G; j++) {  /* round half to even, as nearbyintf and torch.round, but in SIMD: */
            int v = (int)((xg[j] * inv + 12582912.f) - 12582912.f);  /* 1.5 * 2^23 drops the fraction */
            q[g * G + j] = (int8_t)v;
            sum += v;
        }
        xs[2 * g] = d;
        xs[2 * g + 1] = d * (float)sum;
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
        const float *st = xs + (long)t * 2 * ng;
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

/* one int8 row (K/64 groups, fp16 scale each) . T int8 rows */
static void dot8(const int8_t *q, const uint16_t *sc, const int8_t *xq, const float *xs, int K, int T, float *res) {
    int ng = K / G;
    PREFETCH((const char *)sc + PFS / 2);  /* int8: half the scale bytes per weight byte of int4 */
    for (int t = 0; t < T; t++) {
        const int8_t *xt = xq + (long)t * K;
        const float *st = xs + (long)t * 2 * ng;
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
        const float *st = xs + (long)t * 2 * ng;
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

/* one ggml Q8_0 (q4 = 0) or Q4_0 (q4 = 1) row . T int8 rows in the plain layout: per block of 32 the
 * weights as int8 (Q4_0: nibble - 8), one integer dot product, times d and the input group's scale */
static void dotblk(const uint8_t *row, int q4, const int8_t *xq, const float *xs, int K, int T, float *res) {
    int nb = K / 32, bs = q4 ? 18 : 34;
    for (int t = 0; t < T; t++) {
        const int8_t *xt = xq + (long)t * K;
        const float *st = xs + (long)t * 2 * (K / G);
#ifdef DPBUSD
        __m256 acc = _mm256_setzero_ps();
        const __m256i mask = _mm256_set1_epi8(15), eight = _mm256_set1_epi8(8);
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = row + (long)b * bs;
            if (t == 0 && !(b & 1)) PREFETCH(blk + PF);
            uint16_t dh;
            memcpy(&dh, blk, 2);
            __m256i wv;
            if (q4) {
                __m128i p = _mm_loadu_si128((const __m128i *)(blk + 2));
                __m256i u = _mm256_set_m128i(_mm_srli_epi16(p, 4), p);  /* high half: the high nibbles */
                wv = _mm256_sub_epi8(_mm256_and_si256(u, mask), eight);
            } else {
                wv = _mm256_loadu_si256((const __m256i *)(blk + 2));
            }
            __m256i x = _mm256_loadu_si256((const __m256i *)(xt + b * 32));
            __m256i s = DPBUSD(_mm256_setzero_si256(), _mm256_sign_epi8(wv, wv), _mm256_sign_epi8(x, wv));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(h2f(dh) * st[2 * (b / 2)]), acc);
        }
        res[t] = hsum(acc);
#else
        float acc = 0.f;
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = row + (long)b * bs;
            uint16_t dh;
            memcpy(&dh, blk, 2);
            const int8_t *xb = xt + b * 32;
            int s = 0;
            for (int j = 0; j < 32; j++) {
                int q = q4 ? ((blk[2 + (j & 15)] >> (j < 16 ? 0 : 4)) & 15) - 8 : (int8_t)blk[2 + j];
                s += q * xb[j];
            }
            acc += (float)s * h2f(dh) * st[2 * (b / 2)];
        }
        res[t] = acc;
#endif
    }
}

/* one weight row (row index `row` of a stacked [rows, K] matrix in format `bits`) . T input rows */
static void dot_row(int bits, const void *q, const void *s, long row, int K, const int8_t *xq, const float *xs,
                    int T, float *res) {
    if (bits == 4)
        dot4((const uint8_t *)q + row * (K / 2), (const uint16_t *)s + row * 2 * (K / G), xq, xs, K, T, res);
    else if (bits == 8)
        dot8((const int8_t *)q + row * K, (const uint16_t *)s + row * (K / G), xq, xs, K, T, res);
    else if (bits == 16 || bits == 17)
        dotblk((const uint8_t *)q + row * (K / 32) * (bits == 16 ? 34 : 18), bits == 17, xq, xs, K, T, res);
    else
        dotfp4((const uint8_t *)q + row * (K / 2), (const uint8_t *)s + row * (K / 32), xq, xs, K, T, res);
}

/* OUT[r, n] = W[sel[i]][n] . x_r for n < N and the rows r of each selected expert i, spread over the
 * team (an orphaned omp for: called inside moe_experts' parallel region). The router weight w[r]
 * scales the dot product before the bias (pre_w: Llama 4's input weighting) or after it (post_w).
 * q2: rows n >= N/2 come from this second matrix (a GGUF's up beside its gate), row n - N/2. */
static void expert_rows(int bits, const void *q, const void *s, const void *q2, const float *b, int K, int N,
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
                const float *xs = XS + (long)(r0 + t0) * 2 * (K / G);
                if (!q2)
                    dot_row(bits, q, s, e * N + n, K, xq, xs, tn, res);
                else if (n < half)
                    dot_row(bits, q, s, e * half + n, K, xq, xs, tn, res);
                else
                    dot_row(bits, q2, s, e * half + n - half, K, xq, xs, tn, res);
                for (int t = 0; t < tn; t++) {
                    float v = res[t], wt = w[r0 + t0 + t];
                    if (pre_w) v *= wt;
                    if (b) v += b[e * N + n];
                    OUT[(long)(r0 + t0 + t) * N + n] = post_w ? v * wt : v;
                }
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

/* sel: n_sel expert ids; rows r in [start[i], start[i+1]) belong to sel[i]; tok[r] its token, w[r] its weight.
 * X [n_tok, d]; OUT [n_tok, d] (added to). Scratch: XQ int8 [rows, d], XS [rows, 2 d/G], H [rows, 2I],
 * AQ int8 [rows, I], AS [rows, 2 I/G], Y [rows, d]. act: act_fn's code (1: gpt-oss clamped SwiGLU).
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
    int layout = bits == 2 ? LAYOUT_EVEN_ODD : (bits == 4 && ZMM4 ? LAYOUT_PAIRED : LAYOUT_PLAIN);
    PROF(0);
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (int r = 0; r < rows; r++)  /* gather token rows so each expert's tokens are contiguous */
            quant_row(X + (long)tok[r] * d, d, XQ + (long)r * d, XS + (long)r * 2 * (d / G), layout);
        PROF(1);
        expert_rows(bits, gu_q, gu_s, up_q, gu_b, d, I2, n_sel, sel, start, XQ, XS, w, weight_input, 0, H);
        PROF(2);
        #pragma omp for schedule(static)
        for (int r = 0; r < rows; r++) {
            float *h = H + (long)r * I2;  /* the activation overwrites the gate half in place */
            for (int j = 0; j < I; j++) {
                if (!gated) {
                    h[j] = act_fn(act, h[j]);
                    continue;
                }
                float g = h[j], u = h[I + j];
                if (act == 1) {
                    g = g > limit ? limit : g;
                    u = u > limit ? limit : (u < -limit ? -limit : u);
                    h[j] = (u + 1.f) * (g / (1.f + expf(-g * alpha)));
                } else {
                    h[j] = act_fn(act, g) * u;
                }
            }
            quant_row(h, I, AQ + (long)r * I, AS + (long)r * 2 * (I / G), layout);
        }
        PROF(3);
        expert_rows(bits, dn_q, dn_s, NULL, dn_b, I, d, n_sel, sel, start, AQ, AS, w, 0, !weight_input, Y);
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

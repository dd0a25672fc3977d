/* Routed experts on the CPU, straight from their quantized form (llmarch/runtime/offload.py).
 *
 * One call computes every selected (expert, token) pair of one MoE layer with all cores at once:
 *   1. gate_up rows of all selected experts, split across threads   h = W_gu x (+ b)
 *   2. activation                                                     a = act(gate) * up
 *   3. down rows of all selected experts, split across threads        y = W_d a (+ b)
 *   4. out[token] += weight * y, rows summed in a fixed order (deterministic)
 * Weights are read once per token group, never dequantized to memory: decode is bound by the
 * bytes of the selected experts, which is the figure offload.py reports.
 *
 * Layouts (group G = 64 along the input dim):
 *   int4: row of K inputs = K/64 groups x 32 bytes; byte j holds element j (low nibble) and
 *         element j + 32 (high nibble); w = q * scale + min, (scale, min) float16 per group.
 *   int8: row = K int8; w = q * scale, scale float16 per group.
 * Built by offload.py with the system C compiler (gcc -O3 -march=native -fopenmp) and loaded with
 * ctypes: no torch headers, so it builds in about a second wherever it runs.
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

/* dot of one quantized row with T vectors x[t*ldx ...]; xs = per-group sums of x (int4 mins).
 * 16 lane accumulators carry across groups (scale folded in per group), so the only horizontal
 * sum is at the end of the row: short groups would otherwise pay one per 64 weights. */
#ifdef __AVX2__
#include <immintrin.h>
static inline __m256 u8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
static inline __m256 i8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s); s = _mm_hadd_ps(s, s); return _mm_cvtss_f32(s);
}
#endif

static void dot4(const uint8_t *q, const uint16_t *sm, const float *x, const float *xs, int K, int T,
                 int ldx, float *res) {
    int ng = K / G;
    for (int t = 0; t < T; t++) {
        const float *xt = x + (long)t * ldx, *xst = xs + (long)t * ng;
#ifdef __AVX512F__
        {   /* 16 lanes: 4 conversions + 4 FMAs per group of 64 weights */
            __m512 acc = _mm512_setzero_ps();
            float accm2 = 0.f;
            const __m256i mask = _mm256_set1_epi8(15);
            for (int g = 0; g < ng; g++) {
                __m256i b = _mm256_loadu_si256((const __m256i *)(q + g * 32));
                __m256i lo = _mm256_and_si256(b, mask), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
                const float *xg = xt + g * G;
                __m512 d0 = _mm512_mul_ps(_mm512_loadu_ps(xg), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(lo))));
                __m512 d1 = _mm512_mul_ps(_mm512_loadu_ps(xg + 16), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(lo, 1))));
                d0 = _mm512_fmadd_ps(_mm512_loadu_ps(xg + 32), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(hi))), d0);
                d1 = _mm512_fmadd_ps(_mm512_loadu_ps(xg + 48), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(hi, 1))), d1);
                acc = _mm512_fmadd_ps(_mm512_set1_ps(h2f(sm[2 * g])), _mm512_add_ps(d0, d1), acc);
                accm2 += h2f(sm[2 * g + 1]) * xst[g];
            }
            res[t] = _mm512_reduce_add_ps(acc) + accm2;
            continue;
        }
#endif
#ifdef __AVX2__
        {   /* 32 bytes = 64 weights per group: low nibbles are elements 0..31, high 32..63 */
            __m256 acc = _mm256_setzero_ps();
            float accm2 = 0.f;
            const __m256i mask = _mm256_set1_epi8(15);
            for (int g = 0; g < ng; g++) {
                __m256i b = _mm256_loadu_si256((const __m256i *)(q + g * 32));
                __m256i lo = _mm256_and_si256(b, mask), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
                const float *xg = xt + g * G;
                __m128i l0 = _mm256_castsi256_si128(lo), l1 = _mm256_extracti128_si256(lo, 1);
                __m128i h0 = _mm256_castsi256_si128(hi), h1 = _mm256_extracti128_si256(hi, 1);
                __m256 d0 = _mm256_mul_ps(_mm256_loadu_ps(xg), u8x8(l0));
                __m256 d1 = _mm256_mul_ps(_mm256_loadu_ps(xg + 8), u8x8(_mm_srli_si128(l0, 8)));
                d0 = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 16), u8x8(l1), d0);
                d1 = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 24), u8x8(_mm_srli_si128(l1, 8)), d1);
                d0 = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 32), u8x8(h0), d0);
                d1 = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 40), u8x8(_mm_srli_si128(h0, 8)), d1);
                d0 = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 48), u8x8(h1), d0);
                d1 = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 56), u8x8(_mm_srli_si128(h1, 8)), d1);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(h2f(sm[2 * g])), _mm256_add_ps(d0, d1), acc);
                accm2 += h2f(sm[2 * g + 1]) * xst[g];
            }
            res[t] = hsum(acc) + accm2;
            continue;
        }
#endif
        float accv[16] = {0}, accm = 0.f;
        for (int g = 0; g < ng; g++) {
            const uint8_t *b = q + g * (G / 2);
            const float *xg = xt + g * G;
            float sc = h2f(sm[2 * g]);
            #pragma omp simd
            for (int l = 0; l < 16; l++) {
                float dl = xg[l] * (float)(b[l] & 15) + xg[l + 16] * (float)(b[l + 16] & 15)
                         + xg[l + 32] * (float)(b[l] >> 4) + xg[l + 48] * (float)(b[l + 16] >> 4);
                accv[l] += sc * dl;
            }
            accm += h2f(sm[2 * g + 1]) * xst[g];
        }
        float acc = accm;
        for (int l = 0; l < 16; l++) acc += accv[l];
        res[t] = acc;
    }
}

static void dot8(const int8_t *q, const uint16_t *sc, const float *x, int K, int T, int ldx, float *res) {
    int ng = K / G;
    for (int t = 0; t < T; t++) {
        const float *xt = x + (long)t * ldx;
#ifdef __AVX512F__
        {
            __m512 acc = _mm512_setzero_ps();
            for (int g = 0; g < ng; g++) {
                const int8_t *b = q + g * G;
                const float *xg = xt + g * G;
                __m512 d0 = _mm512_mul_ps(_mm512_loadu_ps(xg), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)b))));
                __m512 d1 = _mm512_mul_ps(_mm512_loadu_ps(xg + 16), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 16)))));
                d0 = _mm512_fmadd_ps(_mm512_loadu_ps(xg + 32), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 32)))), d0);
                d1 = _mm512_fmadd_ps(_mm512_loadu_ps(xg + 48), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 48)))), d1);
                acc = _mm512_fmadd_ps(_mm512_set1_ps(h2f(sc[g])), _mm512_add_ps(d0, d1), acc);
            }
            res[t] = _mm512_reduce_add_ps(acc);
            continue;
        }
#endif
#ifdef __AVX2__
        {
            __m256 acc = _mm256_setzero_ps();
            for (int g = 0; g < ng; g++) {
                const int8_t *b = q + g * G;
                const float *xg = xt + g * G;
                __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
                for (int j = 0; j < G; j += 16) {
                    __m128i v = _mm_loadu_si128((const __m128i *)(b + j));
                    d0 = _mm256_fmadd_ps(_mm256_loadu_ps(xg + j), i8x8(v), d0);
                    d1 = _mm256_fmadd_ps(_mm256_loadu_ps(xg + j + 8), i8x8(_mm_srli_si128(v, 8)), d1);
                }
                acc = _mm256_fmadd_ps(_mm256_set1_ps(h2f(sc[g])), _mm256_add_ps(d0, d1), acc);
            }
            res[t] = hsum(acc);
            continue;
        }
#endif
        float accv[16] = {0};
        for (int g = 0; g < ng; g++) {
            const int8_t *b = q + g * G;
            const float *xg = xt + g * G;
            float s = h2f(sc[g]);
            #pragma omp simd
            for (int l = 0; l < 16; l++) {
                float dl = xg[l] * (float)b[l] + xg[l + 16] * (float)b[l + 16]
                         + xg[l + 32] * (float)b[l + 32] + xg[l + 48] * (float)b[l + 48];
                accv[l] += s * dl;
            }
        }
        float acc = 0.f;
        for (int l = 0; l < 16; l++) acc += accv[l];
        res[t] = acc;
    }
}

static void group_sums(const float *x, int K, float *out) {
    for (int g = 0; g < K / G; g++) {
        float s = 0.f;
        #pragma omp simd reduction(+:s)
        for (int j = 0; j < G; j++) s += x[g * G + j];
        out[g] = s;
    }
}

/* sel: n_sel expert ids; rows r in [start[i], start[i+1]) belong to sel[i]; tok[r] its token, w[r] its weight.
 * X [n_tok, d]; OUT [n_tok, d] (added to). Scratch: XR [rows, d], XS [rows, d/G], H [rows, 2I], A [rows, I],
 * AS [rows, I/G], Y [rows, d]. act: 0 SwiGLU (silu), 1 gpt-oss clamped. weight_input: Llama 4. */
void moe_experts(int bits, int n_sel, const int64_t *sel, const int32_t *start, const int32_t *tok, const float *w,
                 const float *X, float *OUT, int d, int I,
                 const void *gu_q, const uint16_t *gu_s, const void *dn_q, const uint16_t *dn_s,
                 const float *gu_b, const float *dn_b,
                 float *XR, float *XS, float *H, float *A, float *AS, float *Y,
                 int act, float alpha, float limit, int weight_input, int n_tok) {
    int rows = start[n_sel], I2 = 2 * I;
    long gu_row = bits == 4 ? d / 2 : d, dn_row = bits == 4 ? I / 2 : I;  /* bytes per row */
    long gu_srow = bits == 4 ? 2 * (d / G) : d / G, dn_srow = bits == 4 ? 2 * (I / G) : I / G;
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (int r = 0; r < rows; r++) {  /* gather token rows so each expert's tokens are contiguous */
            memcpy(XR + (long)r * d, X + (long)tok[r] * d, sizeof(float) * d);
            if (bits == 4) group_sums(XR + (long)r * d, d, XS + (long)r * (d / G));
        }
        #pragma omp for collapse(2) schedule(static)
        for (int i = 0; i < n_sel; i++) {
            for (int n = 0; n < I2; n++) {
                int r0 = start[i], T = start[i + 1] - start[i];
                long e = sel[i];
                float res[64];
                for (int t0 = 0; t0 < T; t0 += 64) {
                    int tn = T - t0 < 64 ? T - t0 : 64;
                    long row = e * I2 + n;
                    if (bits == 4)
                        dot4((const uint8_t *)gu_q + row * gu_row, gu_s + row * gu_srow, XR + (long)(r0 + t0) * d,
                             XS + (long)(r0 + t0) * (d / G), d, tn, d, res);
                    else
                        dot8((const int8_t *)gu_q + row * gu_row, gu_s + row * gu_srow, XR + (long)(r0 + t0) * d, d, tn, d, res);
                    for (int t = 0; t < tn; t++) {
                        float v = res[t];
                        if (weight_input) v *= w[r0 + t0 + t];
                        if (gu_b) v += gu_b[e * I2 + n];
                        H[(long)(r0 + t0 + t) * I2 + n] = v;
                    }
                }
            }
        }
        #pragma omp for schedule(static)
        for (int r = 0; r < rows; r++) {
            float *h = H + (long)r * I2, *a = A + (long)r * I;
            for (int j = 0; j < I; j++) {
                float g = h[j], u = h[I + j];
                if (act == 1) {
                    g = g > limit ? limit : g;
                    u = u > limit ? limit : (u < -limit ? -limit : u);
                    a[j] = (u + 1.f) * (g / (1.f + expf(-g * alpha)));
                } else {
                    a[j] = g / (1.f + expf(-g)) * u;
                }
            }
            if (bits == 4) group_sums(a, I, AS + (long)r * (I / G));
        }
        #pragma omp for collapse(2) schedule(static)
        for (int i = 0; i < n_sel; i++) {
            for (int n = 0; n < d; n++) {
                int r0 = start[i], T = start[i + 1] - start[i];
                long e = sel[i];
                float res[64];
                for (int t0 = 0; t0 < T; t0 += 64) {
                    int tn = T - t0 < 64 ? T - t0 : 64;
                    long row = e * d + n;
                    if (bits == 4)
                        dot4((const uint8_t *)dn_q + row * dn_row, dn_s + row * dn_srow, A + (long)(r0 + t0) * I,
                             AS + (long)(r0 + t0) * (I / G), I, tn, I, res);
                    else
                        dot8((const int8_t *)dn_q + row * dn_row, dn_s + row * dn_srow, A + (long)(r0 + t0) * I, I, tn, I, res);
                    for (int t = 0; t < tn; t++) {
                        float v = res[t];
                        if (dn_b) v += dn_b[e * d + n];
                        Y[(long)(r0 + t0 + t) * d + n] = weight_input ? v : v * w[r0 + t0 + t];
                    }
                }
            }
        }
        #pragma omp for schedule(static)
        for (int n = 0; n < d; n++)
            for (int r = 0; r < rows; r++) OUT[(long)tok[r] * d + n] += Y[(long)r * d + n];
    }
    (void)n_tok;
}

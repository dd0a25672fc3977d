/* The expert kernel (llmarch/runtime/experts/moe_cpu.c) timed from C, no Python around it, next to
 * plain parallel reads of the same bytes: how much of a decode layer's CPU time is the kernel's own.
 *
 *   gcc -O3 -march=native -fopenmp benchmarks/moe_kernel_bench.c -o /tmp/kb -lm && /tmp/kb [format code] [reps]
 *       [read prefetch 0/1] [experts]
 *   (add -DMOE_PROFILE for the kernel's time per phase: quantize x, gate_up, activation, down, sum)
 *
 * Qwen3-30B-A3B shapes: 128 experts (more: a pool larger than the CPU's cache, as a token's 48 layers
 * are), d 2048, expert width 768, 8 per token; random weights.
 */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../llmarch/runtime/experts/moe_cpu.c"

static double now(void) { return omp_get_wtime(); }

static long row_bytes(int code, int K) { return code == 4 ? K / 2 : (code == 8 ? K : block_row_bytes(code, K)); }

/* random block bytes, but each block's fp16 scales set to ~0.0039 (no NaN, inf or subnormal) */
static void sane_block_scales(int code, uint8_t *p, size_t n) {
    int bs = code == 16 ? 34 : code == 17 ? 18 : code == 18 ? 144 : code == 20 ? 210 : 0, o1 = code == 20 ? 208 : 0;
    for (size_t i = 0; bs && i + bs <= n; i += bs) {
        p[i + o1] = 0x00, p[i + o1 + 1] = 0x1c;
        if (code == 18) p[i + 2] = 0x00, p[i + 3] = 0x1c;  /* Q4_K's dmin */
    }
}

int main(int argc, char **argv) {
    int bits = argc > 1 ? atoi(argv[1]) : 4, reps = argc > 2 ? atoi(argv[2]) : 200, prefetch = argc > 3 && atoi(argv[3]);
    const int E = argc > 4 && atoi(argv[4]) >= 8 ? atoi(argv[4]) : 128, d = 2048, I = 768, k = 8;
    /* moe_cpu.c's format codes: 4 int4, 8 int8, or a GGUF's blocks as stored: 16 Q8_0, 17 Q4_0, 18 Q4_K,
     * 20 Q6_K; gate/up's code in the low byte, down's in the third (Q4_K_M's mix: 18 + (20 << 16) = 1310738) */
    int gb = bits & 255, db = (bits >> 16) & 255 ? (bits >> 16) & 255 : bits & 255;
    long gu_row = row_bytes(gb, d), dn_row = row_bytes(db, I);
    long gu_srow = gb == 4 ? 2 * (d / G) : (gb == 8 ? d / G : 0), dn_srow = db == 4 ? 2 * (I / G) : (db == 8 ? I / G : 0);
    size_t gu_n = (size_t)E * 2 * I * gu_row, dn_n = (size_t)E * d * dn_row;
    uint8_t *gu = aligned_alloc(64, gu_n), *dn = aligned_alloc(64, dn_n);
    uint16_t *gus = aligned_alloc(64, (size_t)E * 2 * I * gu_srow * 2 + 64), *dns = aligned_alloc(64, (size_t)E * d * dn_srow * 2 + 64);
    #pragma omp parallel for
    for (size_t i = 0; i < gu_n; i++) gu[i] = (uint8_t)(i * 2654435761u >> 13);
    #pragma omp parallel for
    for (size_t i = 0; i < dn_n; i++) dn[i] = (uint8_t)(i * 2246822519u >> 11);
    for (size_t i = 0; i < (size_t)E * 2 * I * gu_srow; i++) gus[i] = i % 2 ? 0xa51e : 0x1c00;  /* -0.02, ~0.0039 */
    for (size_t i = 0; i < (size_t)E * d * dn_srow; i++) dns[i] = i % 2 ? 0xa51e : 0x1c00;
    sane_block_scales(gb, gu, gu_n);
    sane_block_scales(db, dn, dn_n);
    float *X = malloc(sizeof(float) * d), *OUT = malloc(sizeof(float) * d);
    for (int i = 0; i < d; i++) X[i] = (float)((i * 37) % 101) / 101.f - 0.5f;
    int8_t *XQ = malloc(k * d), *AQ = malloc(k * I);
    float *XS = malloc(4 * k * d), *H = malloc(4 * k * 2 * I), *AS = malloc(4 * k * I), *Y = malloc(4 * k * d);
    int64_t sel[8];
    int32_t start[9], tok[8];
    float w[8];
    for (int i = 0; i <= k; i++) start[i] = i;
    for (int i = 0; i < k; i++) { tok[i] = 0; w[i] = 0.125f; }
    double per_expert = (double)(2 * I * (gu_row + 2 * gu_srow) + d * (dn_row + 2 * dn_srow));
    {  /* fixed experts, OUT from zero: a hash of the output bits, to compare two builds of the kernel */
        for (int i = 0; i < k; i++) sel[i] = 5 + 13 * i;
        memset(OUT, 0, sizeof(float) * d);
        moe_experts(bits, k, sel, start, tok, w, X, OUT, d, I, gu, gus, NULL, dn, dns, NULL, NULL, XQ, XS, H, AQ, AS,
                    Y, 0, 1, 1.f, 0.f, 0);
        unsigned long hsh = 1469598103934665603ul;
        const unsigned char *ob = (const unsigned char *)OUT;
        for (size_t i = 0; i < sizeof(float) * d; i++) hsh = (hsh ^ ob[i]) * 1099511628211ul;
        printf("{\"out_hash\": \"%016lx\", \"out0\": %.9g}\n", hsh, OUT[0]);
#ifdef MOE_PROFILE
        memset(moe_prof, 0, sizeof(moe_prof));
#endif
    }
    srand(1);
    double tk = 0, tr = 0, td = 0, tg = 0;
    unsigned long sink = 0;
    for (int r = 0; r < reps + 10; r++) {
        for (int i = 0; i < k; i++) {  /* k distinct experts, sorted */
            int e, dup;
            do { e = rand() % E; dup = 0; for (int j = 0; j < i; j++) dup |= sel[j] == e; } while (dup);
            sel[i] = e;
        }
        double t0 = now();
        moe_experts(bits, k, sel, start, tok, w, X, OUT, d, I, gu, gus, NULL, dn, dns, NULL, NULL, XQ, XS, H, AQ, AS,
                    Y, 0, 1, 1.f, 0.f, 0);
        double t1 = now();
        for (int i = 0; i < k; i++) {  /* different experts for the read test: not cached */
            int e, dup;
            do { e = rand() % E; dup = 0; for (int j = 0; j < i; j++) dup |= sel[j] == e; } while (dup);
            sel[i] = e;
        }
        double t2 = now();
        unsigned long s = 0;
        #pragma omp parallel for collapse(2) reduction(^:s) schedule(static)
        for (int i = 0; i < k; i++)
            for (int n = 0; n < 2 * I + d; n++) {
                const uint64_t *p = n < 2 * I ? (const uint64_t *)(gu + (sel[i] * 2 * I + n) * gu_row)
                                              : (const uint64_t *)(dn + (sel[i] * d + n - 2 * I) * dn_row);
                long len = (n < 2 * I ? gu_row : dn_row) / 8;
                for (long j = 0; j < len; j++) {
                    if (prefetch && !(j & 7)) __builtin_prefetch(p + j + 256, 0, 3);
                    s ^= p[j];
                }
            }
        double t3 = now();
        for (int i = 0; i < k; i++) sel[i] = (sel[i] + 17) % E;  /* the down rows alone, split as the kernel does */
        #pragma omp parallel for collapse(2) reduction(^:s) schedule(static)
        for (int i = 0; i < k; i++)
            for (int n = 0; n < d; n++) {
                const uint64_t *p = (const uint64_t *)(dn + (sel[i] * d + n) * dn_row);
                for (long j = 0; j < dn_row / 8; j++) s ^= p[j];
            }
        double t4 = now();
        for (int i = 0; i < k; i++) sel[i] = (sel[i] + 29) % E;  /* the gate_up rows alone */
        #pragma omp parallel for collapse(2) reduction(^:s) schedule(static)
        for (int i = 0; i < k; i++)
            for (int n = 0; n < 2 * I; n++) {
                const uint64_t *p = (const uint64_t *)(gu + (sel[i] * 2 * I + n) * gu_row);
                for (long j = 0; j < gu_row / 8; j++) s ^= p[j];
            }
        double t5 = now();
        sink ^= s;
        if (r >= 10) { tk += t1 - t0; tr += t3 - t2; td += t4 - t3; tg += t5 - t4; }
    }
    tk /= reps; tr /= reps; td /= reps; tg /= reps;
    double rb = (double)k * (2 * I * gu_row + d * dn_row);
    printf("{\"bits\": %d, \"experts\": %d, \"threads\": %d, \"kernel_us\": %.1f, \"kernel_gb_s\": %.1f, \"read_us\": %.1f, "
           "\"read_gb_s\": %.1f, \"read_down_us\": %.1f, \"read_down_gb_s\": %.1f, \"read_gate_up_us\": %.1f, "
           "\"read_gate_up_gb_s\": %.1f, \"read_prefetch\": %d, \"sink\": %lu}\n", bits, E, omp_get_max_threads(), tk * 1e6,
           k * per_expert / tk / 1e9, tr * 1e6, rb / tr / 1e9, td * 1e6, (double)k * d * dn_row / td / 1e9, tg * 1e6,
           (double)k * 2 * I * gu_row / tg / 1e9, prefetch, sink & 1);
#ifdef MOE_PROFILE
    /* phases: 0 round x (the one-row path: the team's start only; it rounds x inside gate_up), 1 gate_up,
     * 2 activation (the one-row path: inside down), 3 down, 4 sum; bytes/s of the weight rows alone, to
     * set beside read_gate_up_gb_s / read_down_gb_s */
    double ph[5];
    for (int i = 0; i < 5; i++) ph[i] = (moe_prof[i + 1] - (i ? moe_prof[i] : 0)) / (reps + 10);
    printf("{\"phase_us\": [%.1f, %.1f, %.1f, %.1f, %.1f], \"gate_up_gb_s\": %.1f, \"down_gb_s\": %.1f, "
           "\"act_plus_down_gb_s\": %.1f}\n", ph[0] * 1e6, ph[1] * 1e6, ph[2] * 1e6, ph[3] * 1e6, ph[4] * 1e6,
           (double)k * 2 * I * gu_row / ph[1] / 1e9, (double)k * d * dn_row / ph[3] / 1e9,
           (double)k * d * dn_row / (ph[2] + ph[3]) / 1e9);
#endif
    return 0;
}

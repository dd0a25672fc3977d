"""Small AVX2 C kernels for block-quantized (8-bit / 4-bit, 32 values per scale) matmuls on the
CPU, built once with the system C compiler and loaded with ctypes.

Why: on AVX2 machines torch's own weight-only kernels are far below memory bandwidth
(aten._weight_int8pack_mm reads ~1 GB/s, _weight_int4pack_mm_for_cpu ~0.2 GB/s on 2 cores) and
fbgemm's dynamic int8 quantizes activations too. Decode is memory-bound, so a kernel that streams
int8 rows at bandwidth is what makes --keep-quantized faster than float32. Without a compiler the
runtime falls back to torch's kernel (same results, slower).

The same library holds the small float32 ops of a CPU decode step that torch runs as several
dispatches each (RMS norm, rotate-half RoPE, one query token's attention): at one token, each torch
op costs microseconds of overhead for nanoseconds of work, and a step makes hundreds of them.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from llmarch.runtime.cbuild import build_avx2
from llmarch.runtime.kernel_sources import FLOAT_OPS, GATED_ACTS  # noqa: F401 (re-exported for the ops)

SOURCE = (
    FLOAT_OPS
    + r"""

/* Block quantization as llama.cpp's Q8_0 / Q4_0: 32 values share one float scale. Activations are
   quantized to int8 blocks too, so each block's dot product is integer SIMD (maddubs/madd), which
   keeps two AVX2 cores at memory bandwidth instead of at int8->float conversion. */

static inline __m256 dot32(__m256i w, __m256i x, __m256 scale, __m256 acc) {
    __m256i ax = _mm256_sign_epi8(x, x);                     /* |x| as unsigned */
    __m256i sw = _mm256_sign_epi8(w, x);                     /* w * sign(x) */
    __m256i p16 = _mm256_maddubs_epi16(ax, sw);              /* pairs -> int16 */
    __m256i p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), scale, acc);
}

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

void quantize_q8(const float* x, int8_t* q, float* d, long n_blocks) {
    for (long b = 0; b < n_blocks; b++) {
        const float* v = x + b * 32;
        float amax = 0.f;
        for (int i = 0; i < 32; i++) { float a = fabsf(v[i]); if (a > amax) amax = a; }
        float s = amax / 127.f, inv = s > 0.f ? 1.f / s : 0.f;
        d[b] = s;
        for (int i = 0; i < 32; i++) q[b * 32 + i] = (int8_t)lrintf(v[i] * inv);
    }
}

/* y[t*N + n] = sum_b wd[n,b] * xd[t,b] * <w[n,b,:], x[t,b,:]> (+ bias[n]); bits 8: w int8 [N,K];
   bits 4: w packed [N,K/2], per block 16 bytes: low nibble = value i, high nibble = value i+16, minus 8 */
void qmatmul(const int8_t* xq, const float* xd, const uint8_t* w, const float* wd, const float* bias,
             float* y, int T, int N, int K, int bits, int nthreads) {
    const int nb = K / 32;
    const size_t row_bytes = bits == 8 ? (size_t)K : (size_t)K / 2;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t* row = w + (size_t)n * row_bytes;
        const float* rd = wd + (size_t)n * nb;
        for (int t = 0; t < T; t++) {
            const int8_t* xt = xq + (size_t)t * K;
            const float* xdt = xd + (size_t)t * nb;
            __m256 acc = _mm256_setzero_ps();
            for (int b = 0; b < nb; b++) {
                __m256i wv;
                if (bits == 8) {
                    wv = _mm256_loadu_si256((const __m256i*)(row + (size_t)b * 32));
                } else {
                    __m128i p = _mm_loadu_si128((const __m128i*)(row + (size_t)b * 16));
                    __m128i lo = _mm_and_si128(p, _mm_set1_epi8(0x0F));
                    __m128i hi = _mm_and_si128(_mm_srli_epi16(p, 4), _mm_set1_epi8(0x0F));
                    wv = _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8));
                }
                __m256i xv = _mm256_loadu_si256((const __m256i*)(xt + (size_t)b * 32));
                acc = dot32(wv, xv, _mm256_set1_ps(rd[b] * xdt[b]), acc);
            }
            float r = hsum(acc);
            y[(size_t)t * N + n] = bias ? r + bias[n] : r;
        }
    }
}
"""
)


@lru_cache(maxsize=1)
def _lib():
    lib = build_avx2("qmm", SOURCE, ["-O3", "-mavx2", "-mfma", "-fopenmp"])
    if lib is None:
        return None  # torch's kernel instead: same results, slower
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.quantize_q8.argtypes = [p, p, p, ctypes.c_long]
    lib.quantize_q8.restype = None
    lib.qmatmul.argtypes = [p, p, p, p, p, p, i, i, i, i, i]
    lib.qmatmul.restype = None
    lib.rms_norm.argtypes = [p, p, p, ctypes.c_long, ctypes.c_long, ctypes.c_float]
    lib.rms_norm.restype = None
    L = ctypes.c_long
    lib.rope_rotate_half.argtypes = [p, p, p, p, p, L, L, L, L, L]
    lib.rope_rotate_half.restype = i
    lib.attend_one.argtypes = [p, p, L, p, L, p, p, p, i, i, i, i, i, ctypes.c_float]
    lib.attend_one.restype = None
    lib.gated_act.argtypes = [p, p, L, L, i]
    lib.gated_act.restype = None
    return lib


def available() -> bool:
    return _lib() is not None


def gated_act(gu: torch.Tensor, kind: int) -> torch.Tensor:
    """act(gate) * up of float32 gu [..., 2 * hidden] = [gate | up] (kind: GATED_ACTS' code), one C call."""
    gu = gu.contiguous()
    hidden = gu.shape[-1] // 2
    out = torch.empty(*gu.shape[:-1], hidden, dtype=torch.float32)
    _lib().gated_act(gu.data_ptr(), out.data_ptr(), gu.numel() // (2 * hidden), hidden, kind)
    return out


def qmatmul(x: torch.Tensor, w: torch.Tensor, wd: torch.Tensor, bits: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, K] float32 -> [T, N] float32, with w / wd the block-quantized weight (see quant.BlockQuantLinear)."""
    lib = _lib()
    x = x.contiguous()
    T, K = x.shape
    N = wd.shape[0]
    xq = torch.empty(T, K, dtype=torch.int8)
    xd = torch.empty(T, K // 32, dtype=torch.float32)
    lib.quantize_q8(x.data_ptr(), xq.data_ptr(), xd.data_ptr(), T * K // 32)
    y = torch.empty(T, N, dtype=torch.float32)
    lib.qmatmul(
        xq.data_ptr(),
        xd.data_ptr(),
        w.data_ptr(),
        wd.data_ptr(),
        bias.data_ptr() if bias is not None else None,
        y.data_ptr(),
        T,
        N,
        K,
        bits,
        torch.get_num_threads(),
    )
    return y


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm of float32 x over its last dimension, times float32 w (one C call)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    dim = x.shape[-1]
    _lib().rms_norm(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.numel() // dim, dim, eps)
    return y


def rope_rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of float32 x [B, H, T, D] at int64 positions pos [T], tables cos/sin
    [positions, rot] (float32, contiguous); dims past rot pass through. One C call."""
    x = x.contiguous()
    pos = pos.contiguous()
    y = torch.empty_like(x)
    B, H, T, D = x.shape
    rc = _lib().rope_rotate_half(
        x.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        pos.data_ptr(),
        y.data_ptr(),
        B * H,
        T,
        D,
        cos.shape[1],
        cos.shape[0],
    )
    if rc:
        raise IndexError(f"RoPE position outside the tables (0..{cos.shape[0] - 1})")
    return y


def attend_one_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether attend_one can take this decode step: one query token of batch 1, float32 on the CPU,
    each KV head's rows contiguous, a bool mask [1, S]."""
    return (
        isinstance(mask, torch.Tensor)
        and q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype == torch.float32
        and q.dim() == 4
        and q.shape[0] == 1
        and q.shape[2] == 1
        and k.shape[:3] == v.shape[:3]
        and q.shape[1] % k.shape[1] == 0
        and q.shape[3] == k.shape[3]
        and k.stride(3) == 1
        and k.stride(2) == k.shape[3]
        and v.stride(3) == 1
        and v.stride(2) == v.shape[3]
        and mask.dtype == torch.bool
        and tuple(mask.shape) == (1, k.shape[2])
        and not q.requires_grad
        and available()
    )


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [1, H, 1, D], k / v [1, KV, S, D / Dv], mask bool [1, S] -> [1, H, 1, Dv] (see attend_one_ok)."""
    H, D = q.shape[1], q.shape[3]
    KV, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    q = q.contiguous()
    mask = mask.contiguous()
    out = torch.empty(1, H, 1, Dv, dtype=torch.float32)
    scores = torch.empty(S, dtype=torch.float32)
    _lib().attend_one(
        q.data_ptr(),
        k.data_ptr(),
        k.stride(1),
        v.data_ptr(),
        v.stride(1),
        mask.data_ptr(),
        out.data_ptr(),
        scores.data_ptr(),
        H,
        KV,
        S,
        D,
        Dv,
        scale,
    )
    return out

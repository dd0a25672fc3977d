"""A small AVX2/FMA C kernel for weight-only int8 matmuls on the CPU, built once with the system C
compiler and loaded with ctypes.

Why: on AVX2 machines torch's own weight-only kernels are far below memory bandwidth
(aten._weight_int8pack_mm reads ~1 GB/s, _weight_int4pack_mm_for_cpu ~0.2 GB/s on 2 cores) and
fbgemm's dynamic int8 quantizes activations too. Decode is memory-bound, so a kernel that streams
int8 rows at bandwidth is what makes --keep-quantized faster than float32. Without a compiler the
runtime falls back to torch's kernel (same results, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

/* y[t*N + n] = s[n] * sum_k x[t*K + k] * q[n*K + k]  (+ bias[n]); K % 16 == 0 */
void q8_matmul(const float* x, const int8_t* q, const float* s, const float* bias, float* y,
               int T, int N, int K, int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    {
        float* buf = (float*)aligned_alloc(32, sizeof(float) * (size_t)K);
        #pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            const int8_t* row = q + (size_t)n * K;
            if (T == 1) {
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                for (int k = 0; k < K; k += 16) {
                    __m128i b = _mm_loadu_si128((const __m128i*)(row + k));
                    __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
                    __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
                    a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), a0);
                    a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), a1);
                }
                float r = hsum(_mm256_add_ps(a0, a1)) * s[n];
                y[n] = bias ? r + bias[n] : r;
                continue;
            }
            for (int k = 0; k < K; k += 16) {
                __m128i b = _mm_loadu_si128((const __m128i*)(row + k));
                _mm256_store_ps(buf + k, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)));
                _mm256_store_ps(buf + k + 8, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))));
            }
            for (int t = 0; t < T; t++) {
                const float* xt = x + (size_t)t * K;
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                for (int k = 0; k < K; k += 16) {
                    a0 = _mm256_fmadd_ps(_mm256_load_ps(buf + k), _mm256_loadu_ps(xt + k), a0);
                    a1 = _mm256_fmadd_ps(_mm256_load_ps(buf + k + 8), _mm256_loadu_ps(xt + k + 8), a1);
                }
                float r = hsum(_mm256_add_ps(a0, a1)) * s[n];
                y[(size_t)t * N + n] = bias ? r + bias[n] : r;
            }
        }
        free(buf);
    }
}
"""


def _cache_dir() -> Path:
    base = os.environ.get("LLMARCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llmarch")
    return Path(base) / "kernels"


@lru_cache(maxsize=1)
def _lib():
    if os.environ.get("LLMARCH_NO_CKERNEL") or torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        return None
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
    so = _cache_dir() / f"q8_{digest}.so"
    if not so.exists():
        cc = os.environ.get("CC", "cc")
        so.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "q8.c"
            src.write_text(SOURCE)
            out = Path(tmp) / so.name
            try:
                subprocess.run([cc, "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(out)],
                               check=True, capture_output=True, timeout=120)
            except (OSError, subprocess.SubprocessError):
                return None
            os.replace(out, so)  # atomic: concurrent builders never load a half-written file
    lib = ctypes.CDLL(str(so))
    p = ctypes.c_void_p
    lib.q8_matmul.argtypes = [p, p, p, p, p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.q8_matmul.restype = None
    return lib


def available() -> bool:
    return _lib() is not None


def q8_matmul(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, K] float32 contiguous, q [N, K] int8, s [N] float32 -> [T, N] float32."""
    lib = _lib()
    T, K = x.shape
    N = q.shape[0]
    y = torch.empty(T, N, dtype=torch.float32)
    lib.q8_matmul(x.data_ptr(), q.data_ptr(), s.data_ptr(), bias.data_ptr() if bias is not None else None,
                  y.data_ptr(), T, N, K, torch.get_num_threads())
    return y

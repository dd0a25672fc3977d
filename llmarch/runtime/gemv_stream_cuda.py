"""The one-row decode GEMV as a CUDA C++ kernel (compiled by cuda_rtc) that streams its weights
through shared memory: y = x @ W^T for one float16 / bfloat16 row, with gemv_cuda's bias, gated
(silu(gate) * up), RMS-norm prologue and residual epilogue, computed and rounded as its Triton kernel
computes them.

Why: a decode step of a 1-2B model is ~65-115 matrix-vector products of 2-20 us of bytes each, and
the Triton kernel pays ~2.5 us a launch of ramp (its first loads wait on memory) and tail: the
q|k|v and o products ran at ~50% of the copy rate. Here one CTA a SM owns a contiguous range of
weight rows, which is a contiguous range of bytes, and has the copy engine bring it in ~32 KB
copies into a ring of shared-memory stages (cp.async.bulk, completing on an mbarrier a stage), the
first stages asked for *before* `griddepcontrol.wait`: launched as a programmatic dependent launch,
a kernel's CTAs start beside the kernel before's while it drains (a CTA takes at most half a SM's
shared memory), and its bytes are already arriving when its input row is ready. Measured on the H200 (README): a
decode step 1.6-2.9% faster than with the Triton kernel, 3.2-4.1% with the attention op launched
early beside it (gemv_cuda.attention_late_pdl).

sm90+ only (bulk copies, griddepcontrol); launch() answers False where it does not take the call
(another GPU, more than one row, a width it does not fit, unaligned weights, no NVRTC), and
gemv_cuda then launches its Triton kernel.
"""

from __future__ import annotations

from functools import cache

import torch

from llmarch.runtime import cuda_rtc

THREADS = 256
STAGE_BYTES = 32 * 1024  # bytes a stage aims at (whole rows: 1-8 of them)
STAGES = 3
# at most half a SM's 228 KB (with the 1 KB each CTA reserves), so that the next kernel's CTA fits
# beside one of ours. Per-matrix rings (64 KB stages, 192 KB a CTA, for gate|up, down and the head;
# two 32 KB stages for q|k|v) streamed faster alone on the H200 but made the decode step slower
# (README): this one ring is what measured best end to end
CTA_SHARED = 112 * 1024

# the 16-bit conversions, the dot product and the bulk-copy / mbarrier wrappers (also the probes')
HELPERS = r"""
typedef unsigned short h16;
typedef unsigned long long u64;

__device__ __forceinline__ float tof(h16 h) {
#if HALF
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
#else
    return __uint_as_float(((unsigned int)h) << 16);
#endif
}
__device__ __forceinline__ h16 to16(float f) {
    h16 h;
#if HALF
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
    return h;
}
/* a 32-bit word's two 16-bit values, low one first */
__device__ __forceinline__ float first(unsigned int u) {
#if HALF
    return tof((h16)(u & 0xffffu));
#else
    return __uint_as_float(u << 16);
#endif
}
__device__ __forceinline__ float second(unsigned int u) {
#if HALF
    return tof((h16)(u >> 16));
#else
    return __uint_as_float(u & 0xffff0000u);
#endif
}
__device__ __forceinline__ float dot8(uint4 a, uint4 b, float acc) {
    acc = fmaf(first(a.x), first(b.x), acc); acc = fmaf(second(a.x), second(b.x), acc);
    acc = fmaf(first(a.y), first(b.y), acc); acc = fmaf(second(a.y), second(b.y), acc);
    acc = fmaf(first(a.z), first(b.z), acc); acc = fmaf(second(a.z), second(b.z), acc);
    acc = fmaf(first(a.w), first(b.w), acc); acc = fmaf(second(a.w), second(b.w), acc);
    return acc;
}
__device__ __forceinline__ unsigned int smem_addr(const void* p) {
    unsigned int r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ void bar_init(u64* b) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem_addr(b)) : "memory");
}
__device__ __forceinline__ void bar_expect(u64* b, unsigned int bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(smem_addr(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bar_wait(u64* b, unsigned int parity) {
    asm volatile("{\n .reg .pred done;\n WAIT:\n"
                 " mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 " @!done bra WAIT;\n }" :: "r"(smem_addr(b)), "r"(parity) : "memory");
}
__device__ __forceinline__ void bulk_load(void* dst, const void* src, unsigned int bytes, u64* b) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(b)) : "memory");
}
"""

# the kernel itself (SOURCE below: with the helpers)
KERNEL = r"""

#define VEC (K / 8)              /* 16-byte vectors a row */
#define PARTS (GLU ? 2 : 1)      /* gate and up rows a stage */
#define TPR (THREADS / CR)       /* threads a row (a multiple of 32) */
#define VPT ((VEC + TPR - 1) / TPR)
#define WPR (TPR / 32)
#define ROW_BYTES (K * 2)
#define STAGE (CR * ROW_BYTES * PARTS)
#define RED (2 * CR * WPR * PARTS)

/* stage c's rows [r0 + c * CR, ...) (and their up rows N on) into ring slot c % STAGES */
__device__ __forceinline__ void issue(const h16* w, int N, int r0, int r1, int c, unsigned char* ring, u64* full) {
    int s = c % STAGES, rs = r0 + c * CR, n = min(CR, r1 - rs);
    unsigned int bytes = (unsigned int)n * ROW_BYTES;
    bar_expect(&full[s], bytes * PARTS);
    unsigned char* dst = ring + s * STAGE;
    bulk_load(dst, w + (long long)rs * K, bytes, &full[s]);
    if (GLU) bulk_load(dst + CR * ROW_BYTES, w + ((long long)N + rs) * K, bytes, &full[s]);
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
gemv_stream(const h16* __restrict__ w, const h16* x, const h16* __restrict__ bias, const NW_T* __restrict__ nw,
            const h16* res, h16* y, int N, float eps)
{
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char* ring = smem;
    h16* xs = (h16*)(smem + STAGES * STAGE);
    float* red = (float*)(xs + VEC * 8);
    u64* full = (u64*)(red + RED + 32);
    const int t = threadIdx.x, G = gridDim.x, b = blockIdx.x;
    const int r0 = (int)((long long)N * b / G), r1 = (int)((long long)N * (b + 1) / G);
    const int nc = (r1 - r0 + CR - 1) / CR;
    if (t == 0) {
        for (int s = 0; s < STAGES; ++s) bar_init(&full[s]);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        /* the weights are no kernel's output: ask for them before waiting on the kernel before */
        for (int c = 0; c < STAGES && c < nc; ++c) issue(w, N, r0, r1, c, ring, full);
    }
    /* the next kernel may start in the SMs' other slot; x (and res) only once the kernel before is done */
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    asm volatile("griddepcontrol.wait;" ::: "memory");
#if NORM
    float inv;
    {
        float ss = 0.f;
        for (int i = t; i < K; i += THREADS) { float v = tof(x[i]); ss = fmaf(v, v, ss); }
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        float* part = red + RED;
        if ((t & 31) == 0) part[t >> 5] = ss;
        __syncthreads();
        ss = 0.f;
        for (int i = 0; i < THREADS / 32; ++i) ss += part[i];
        inv = rsqrtf(ss / K + eps);
    }
#endif
    /* the input row (RMSNorm's output rounded to the row's dtype, as the unfused norm writes it) */
    for (int i = t; i < K; i += THREADS) {
#if NORM
        xs[i] = to16(tof(x[i]) * inv * (float)NW_LOAD(nw[i]));
#else
        xs[i] = x[i];
#endif
    }
    __syncthreads();
    const int row = t / TPR, lt = t % TPR, wi = lt >> 5;
    uint4 xr[VPT];
#pragma unroll
    for (int j = 0; j < VPT; ++j) xr[j] = lt + j * TPR < VEC ? ((const uint4*)xs)[lt + j * TPR] : make_uint4(0, 0, 0, 0);
    for (int c = 0; c < nc; ++c) {
        const int s = c % STAGES, rs = r0 + c * CR, n = min(CR, r1 - rs);
        bar_wait(&full[s], (c / STAGES) & 1);
        const uint4* wv = (const uint4*)(ring + s * STAGE) + row * VEC;
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < VPT; ++j)
            if (lt + j * TPR < VEC) acc = dot8(wv[lt + j * TPR], xr[j], acc);
#if GLU
        float up = 0.f;
        const uint4* uv = wv + CR * VEC;
#pragma unroll
        for (int j = 0; j < VPT; ++j)
            if (lt + j * TPR < VEC) up = dot8(uv[lt + j * TPR], xr[j], up);
#endif
        for (int o = 16; o > 0; o >>= 1) {
            acc += __shfl_xor_sync(0xffffffffu, acc, o);
#if GLU
            up += __shfl_xor_sync(0xffffffffu, up, o);
#endif
        }
        float* rb = red + (c & 1) * CR * WPR * PARTS;  /* two buffers: chunk c + 1 writes the other */
        if ((t & 31) == 0) {
            rb[(row * WPR + wi) * PARTS] = acc;
#if GLU
            rb[(row * WPR + wi) * PARTS + 1] = up;
#endif
        }
        __syncthreads();  /* every thread is done with slot s: refill it */
        if (t == 0 && c + STAGES < nc) issue(w, N, r0, r1, c + STAGES, ring, full);
        if (t < n) {
            float g = 0.f;
            for (int i = 0; i < WPR; ++i) g += rb[(t * WPR + i) * PARTS];
#if GLU
            float u = 0.f;
            for (int i = 0; i < WPR; ++i) u += rb[(t * WPR + i) * PARTS + 1];
#endif
#if BIAS
            g += tof(bias[rs + t]);
#if GLU
            u += tof(bias[N + rs + t]);
#endif
#endif
#if GLU
            g = g * (1.f / (1.f + __expf(-g))) * u;
#endif
#if RES
            g = tof(to16(g)) + tof(res[rs + t]);  /* the product rounded, then the residual added */
#endif
            y[rs + t] = to16(g);
        }
    }
}
"""
SOURCE = HELPERS + KERNEL


@cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@cache
def sm90(index: int) -> bool:
    """Whether CUDA device `index` is compute capability 9.0 or later (bulk copies, griddepcontrol)."""
    return torch.cuda.get_device_capability(index)[0] >= 9


@cache
def stage_rows(K: int, glu: bool, stage_bytes: int = STAGE_BYTES) -> int:
    """Rows of K 16-bit values (each a gate and an up row where glu) a stage of stage_bytes holds:
    8, 4, 2 or 1 (one row even where it does not fit: plan() then refuses the width)."""
    row = K * 2 * (2 if glu else 1)
    rows = 8
    while rows > 1 and rows * row > stage_bytes:
        rows //= 2
    return rows


def plan(
    K: int, glu: bool, stage_bytes: int = STAGE_BYTES, stages: int = STAGES, cta_shared: int = CTA_SHARED
) -> tuple[int, int, int] | None:
    """(rows a stage, stages, shared bytes) for rows of K values (gate and up rows where glu), or
    None where two stages of one row and the input row do not fit in cta_shared (the other
    arguments: the probe's sweep of rings)."""
    rows = stage_rows(K, glu, stage_bytes)
    stage = rows * K * 2 * (2 if glu else 1)
    fixed = K * 2 + (2 * 8 * (2 if glu else 1) + 32) * 4 + stages * 8
    stages = min(stages, (cta_shared - fixed) // stage)
    if stages < 2:
        return None
    return rows, stages, stages * stage + fixed


def source(K: int, rows: int, stages: int, half: bool, glu: bool, norm: str, res: bool, bias: bool) -> str:
    """SOURCE with one configuration's macros (norm: "" none, "f32" / "16" the weight's dtype)."""
    defs = {
        "K": K, "CR": rows, "STAGES": stages, "THREADS": THREADS, "HALF": int(half), "GLU": int(glu),
        "NORM": int(bool(norm)), "RES": int(res), "BIAS": int(bias),
        "NW_T": "float" if norm == "f32" else "h16", "NW_LOAD(v)": "(v)" if norm == "f32" else "tof(v)",
    }  # fmt: skip
    return "".join(f"#define {k} {v}\n" for k, v in defs.items()) + SOURCE


@cache
def kernel(
    index: int, K: int, rows: int, stages: int, shared: int, half: bool, glu: bool, norm: str, res: bool, bias: bool
):
    return cuda_rtc.kernel(source(K, rows, stages, half, glu, norm, res, bias), "gemv_stream", index, THREADS, shared)


def usable(device: torch.device) -> bool:
    """A sm90+ GPU and NVRTC present."""
    return device.type == "cuda" and sm90(device.index or 0) and cuda_rtc.available()


def takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """One row, 16-byte aligned whole rows, on a device usable() (plan() decides the width)."""
    return x.shape[0] == 1 and w.shape[1] % 8 == 0 and w.data_ptr() % 16 == 0 and usable(x.device)


def launch(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    y: torch.Tensor,
    glu: bool,
    norm_w: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
) -> bool:
    """gemv_cuda.launch's product for one row (its arguments, all contiguous and on one device), or
    False where this kernel does not take it. Always a programmatic dependent launch: the kernel
    before may still be running while this one's weights arrive (it waits before reading x)."""
    if not takes(x, w):
        return False
    index, K = x.device.index or 0, w.shape[1]
    N = w.shape[0] // 2 if glu else w.shape[0]
    ring = plan(K, glu)
    # the kernel reads a 16-bit norm weight as x's dtype
    if ring is None or (norm_w is not None and norm_w.dtype not in (torch.float32, x.dtype)):
        return False
    norm = "" if norm_w is None else ("f32" if norm_w.dtype == torch.float32 else "16")
    try:
        k = kernel(index, K, *ring, x.dtype == torch.float16, glu, norm, residual is not None, b is not None)
    except cuda_rtc.RtcError:
        return False
    k.launch(min(_sms(index), N), [w, x, b, norm_w, residual, y, N, float(eps)], dependent=True)
    return True

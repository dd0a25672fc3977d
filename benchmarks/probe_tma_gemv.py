"""Probe: a bf16 decode step's chain of GEMVs as CUDA C++ kernels (NVRTC) that stream their weights
through shared memory with bulk copies issued before they wait on the kernel before them.

    python benchmarks/probe_tma_gemv.py [--model llama-3.2-1b] [--rounds 5] [--stages 3] [--json OUT]

A decode step of a 1-2B model is ~65-115 GEMV launches of 2-20 us of bytes each; each launch of the
runtime's Triton kernel pays ~2.5 us of ramp (its first loads wait on memory) and tail, about a
quarter of the step. Prefetching into L2, PDL on the Triton kernel and one persistent Triton kernel
did not win (README). This probe measures the way a hand-written kernel allows: one CTA a SM owns a
contiguous range of weight rows (a contiguous range of bytes) and asks the copy engine for all of
it, --stages chunks of ~32 KB at a time into a shared-memory ring (cp.async.bulk completing on an
mbarrier), *before* `griddepcontrol.wait`; launched as a programmatic dependent launch, each
kernel's CTAs start on the SMs' second slot while the kernel before drains, so the next matrix's
bytes are already arriving when its input is ready. A CTA takes at most half a SM's shared memory
so that two kernels' CTAs fit side by side.

The chain is bench_gemv_cuda.matrices' shapes without attention, as probe_persistent_gemv: per
layer q|k|v from rms_norm(x), x += (q's first rows) @ o^T, gate|up gated from rms_norm(x),
x += h @ down^T; then the head from rms_norm(x). The same chain by gemv_cuda.launch (the runtime's
Triton kernel, one launch each) gives the reference output and the time to beat. Also times each
matrix kind alone (its 16+ layers back to back) both ways. Prints step times, % of the copy-rate
bound and the error against the launches' logits.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SOURCE = r"""
typedef unsigned short bf16;
typedef unsigned long long u64;

__device__ __forceinline__ float lo(unsigned int u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float hi(unsigned int u) { return __uint_as_float(u & 0xffff0000u); }
__device__ __forceinline__ float bf(bf16 h) { return __uint_as_float(((unsigned int)h) << 16); }
__device__ __forceinline__ bf16 tobf(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}
__device__ __forceinline__ unsigned int saddr(const void* p) {
    unsigned int r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ void bar_init(u64* b, unsigned int n) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(saddr(b)), "r"(n) : "memory");
}
__device__ __forceinline__ void bar_expect(u64* b, unsigned int bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(saddr(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bar_wait(u64* b, unsigned int parity) {
    asm volatile("{\n .reg .pred P1;\n WAIT:\n"
                 " mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
                 " @P1 bra DONE;\n bra WAIT;\n DONE:\n }" :: "r"(saddr(b)), "r"(parity) : "memory");
}
__device__ __forceinline__ void bulk_load(void* dst, const void* src, unsigned int bytes, u64* b) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(saddr(dst)), "l"(src), "r"(bytes), "r"(saddr(b)) : "memory");
}

#define VEC (K / 8)
#define PARTS (GLU ? 2 : 1)
#define TPR (THREADS / CR)
#define VPT (VEC / TPR)
#define WPR (TPR / 32)
#define ROW_BYTES (K * 2)
#define STAGE_BYTES (CR * ROW_BYTES * PARTS)

__device__ __forceinline__ void issue(const bf16* w, int N, int r0, int r1, int c, unsigned char* stages, u64* full) {
    int s = c % STAGES, rs = r0 + c * CR, n = min(CR, r1 - rs);
    unsigned int bytes = (unsigned int)n * ROW_BYTES;
    bar_expect(&full[s], bytes * PARTS);
    unsigned char* dst = stages + s * STAGE_BYTES;
    bulk_load(dst, w + (long long)rs * K, bytes, &full[s]);
    if (GLU) bulk_load(dst + CR * ROW_BYTES, w + (long long)(N + rs) * K, bytes, &full[s]);
}

__device__ __forceinline__ float dot8(uint4 a, uint4 b, float acc) {
    acc = fmaf(lo(a.x), lo(b.x), acc); acc = fmaf(hi(a.x), hi(b.x), acc);
    acc = fmaf(lo(a.y), lo(b.y), acc); acc = fmaf(hi(a.y), hi(b.y), acc);
    acc = fmaf(lo(a.z), lo(b.z), acc); acc = fmaf(hi(a.z), hi(b.z), acc);
    acc = fmaf(lo(a.w), lo(b.w), acc); acc = fmaf(hi(a.w), hi(b.w), acc);
    return acc;
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
gemv_tma(const bf16* __restrict__ w, const bf16* __restrict__ x, const bf16* __restrict__ nw,
         const bf16* res, bf16* y, int N, float eps)
{
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char* stages = smem;
    bf16* xs = (bf16*)(smem + STAGES * STAGE_BYTES);
    float* red = (float*)(xs + K);
    u64* full = (u64*)(red + 2 * CR * WPR * PARTS + 32);
    const int t = threadIdx.x, G = gridDim.x, b = blockIdx.x;
    const int r0 = (int)((long long)N * b / G), r1 = (int)((long long)N * (b + 1) / G);
    const int nc = (r1 - r0 + CR - 1) / CR;
    if (t == 0) {
        for (int s = 0; s < STAGES; ++s) bar_init(&full[s], 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        for (int c = 0; c < STAGES && c < nc; ++c) issue(w, N, r0, r1, c, stages, full);
    }
#if PDL
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    // the input row: rms_norm(x) * nw rounded to bf16 (NORM), else x
    float inv = 1.0f;
    if (NORM) {
        float ss = 0.f;
        for (int i = t; i < K; i += THREADS) { float v = bf(x[i]); ss = fmaf(v, v, ss); }
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        float* sq = red + 2 * CR * WPR * PARTS;
        if ((t & 31) == 0) sq[t >> 5] = ss;
        __syncthreads();
        ss = 0.f;
        for (int i = 0; i < THREADS / 32; ++i) ss += sq[i];
        inv = rsqrtf(ss / K + eps);
    }
    for (int i = t; i < K; i += THREADS) {
        float v = bf(x[i]);
        xs[i] = NORM ? tobf(v * inv * bf(nw[i])) : x[i];
    }
    __syncthreads();
    const int row = t / TPR, lt = t % TPR, wi = lt >> 5;
    uint4 xr[VPT];
#pragma unroll
    for (int j = 0; j < VPT; ++j) xr[j] = ((const uint4*)xs)[lt + j * TPR];
    for (int c = 0; c < nc; ++c) {
        const int s = c % STAGES, rs = r0 + c * CR, n = min(CR, r1 - rs);
        bar_wait(&full[s], (c / STAGES) & 1);
        const uint4* wv = (const uint4*)(stages + s * STAGE_BYTES) + row * VEC;
        float acc = 0.f, acc2 = 0.f;
#pragma unroll
        for (int j = 0; j < VPT; ++j) acc = dot8(wv[lt + j * TPR], xr[j], acc);
        if (GLU) {
            const uint4* uv = wv + CR * VEC;
#pragma unroll
            for (int j = 0; j < VPT; ++j) acc2 = dot8(uv[lt + j * TPR], xr[j], acc2);
        }
        for (int o = 16; o > 0; o >>= 1) {
            acc += __shfl_xor_sync(0xffffffffu, acc, o);
            if (GLU) acc2 += __shfl_xor_sync(0xffffffffu, acc2, o);
        }
        float* rb = red + (c & 1) * CR * WPR * PARTS;
        if ((t & 31) == 0) { rb[(row * WPR + wi) * PARTS] = acc; if (GLU) rb[(row * WPR + wi) * PARTS + 1] = acc2; }
        __syncthreads();
        if (t == 0 && c + STAGES < nc) issue(w, N, r0, r1, c + STAGES, stages, full);
        if (t < n) {
            float g = 0.f, u = 0.f;
            for (int i = 0; i < WPR; ++i) { g += rb[(t * WPR + i) * PARTS]; if (GLU) u += rb[(t * WPR + i) * PARTS + 1]; }
            float out;
            if (GLU) out = g / (1.f + __expf(-g)) * u;
            else out = g;
            if (RES) out = bf(res[rs + t]) + bf(tobf(out));
            y[rs + t] = tobf(out);
        }
    }
}
"""

THREADS = 256


class _Value(ctypes.Union):
    _fields_ = [("pad", ctypes.c_char * 64), ("i", ctypes.c_int), ("u64", ctypes.c_uint64)]


class _Attr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _Value)]


class _Config(ctypes.Structure):
    _fields_ = [
        ("gx", ctypes.c_uint), ("gy", ctypes.c_uint), ("gz", ctypes.c_uint),
        ("bx", ctypes.c_uint), ("by", ctypes.c_uint), ("bz", ctypes.c_uint),
        ("smem", ctypes.c_uint), ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_Attr)), ("nattrs", ctypes.c_uint),
    ]  # fmt: skip


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what}: CUDA error {rc}")


def compile_cuda(torch, libcuda, src: str, name: str) -> ctypes.c_void_p:
    """NVRTC (the library CUDA builds of torch bring) to a sm_XY cubin, loaded into the current
    context; the kernel's handle."""
    nvrtc = torch.cuda._utils._get_nvrtc_library()
    major, minor = torch.cuda.get_device_capability()
    prog = ctypes.c_void_p()
    _check(nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"k.cu", 0, None, None), "nvrtcCreateProgram")
    opts = [f"--gpu-architecture=sm_{major}{minor}".encode(), b"-std=c++17"]
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    if rc != 0:
        n = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        nvrtc.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(log.value.decode()[-2000:])
    n = ctypes.c_size_t()
    _check(nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(n)), "nvrtcGetCUBINSize")
    cubin = ctypes.create_string_buffer(n.value)
    _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    torch.cuda.init()
    torch.empty(1, device="cuda")
    mod, func = ctypes.c_void_p(), ctypes.c_void_p()
    _check(libcuda.cuModuleLoadData(ctypes.byref(mod), cubin), "cuModuleLoadData")
    _check(libcuda.cuModuleGetFunction(ctypes.byref(func), mod, name.encode()), "cuModuleGetFunction")
    return func


class Kernel:
    """One compiled configuration: K, rows a chunk, stages, GLU / NORM / RES, PDL."""

    def __init__(
        self, torch, K: int, glu: bool, norm: bool, res: bool, stages: int, pdl: bool, carveout=None, stage_kb=32
    ):
        parts = 2 if glu else 1
        self.cr = max(1, min(8, stage_kb * 1024 // (K * 2 * parts)))
        assert (THREADS // self.cr) % 32 == 0 and (K // 8) % (THREADS // self.cr) == 0, (K, self.cr)
        defs = dict(K=K, GLU=int(glu), NORM=int(norm), RES=int(res), STAGES=stages, PDL=int(pdl), THREADS=THREADS,
                    CR=self.cr)  # fmt: skip
        src = "".join(f"#define {k} {v}\n" for k, v in defs.items()) + SOURCE
        self.lib = torch.cuda._utils._get_gpu_runtime_library()
        self.func = compile_cuda(torch, self.lib, src, "gemv_tma")
        wpr = THREADS // self.cr // 32
        self.smem = stages * self.cr * K * 2 * parts + K * 2 + (2 * self.cr * wpr * parts + 32) * 4 + stages * 8
        _check(self.lib.cuFuncSetAttribute(self.func, 8, self.smem), "cuFuncSetAttribute")  # max dynamic smem
        if carveout is not None:  # CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, % of the SM's
            _check(self.lib.cuFuncSetAttribute(self.func, 9, carveout), "cuFuncSetAttribute")
        self.pdl = pdl
        self.torch = torch
        self.sms = torch.cuda.get_device_properties(0).multi_processor_count

    def __call__(self, x, w, y, N, nw=None, res=None, eps=0.0):
        args = [ctypes.c_void_p(t.data_ptr() if t is not None else 0) for t in (w, x, nw, res, y)]
        args += [ctypes.c_int(N), ctypes.c_float(eps)]
        arr = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
        attr = _Attr(id=6)  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value.i = 1
        cfg = _Config(self.sms, 1, 1, THREADS, 1, 1, self.smem, self.torch.cuda.current_stream().cuda_stream,
                      ctypes.pointer(attr), 1 if self.pdl else 0)  # fmt: skip
        rc = self.lib.cuLaunchKernelEx(ctypes.byref(cfg), self.func, arr, None)
        if rc != 0:
            raise RuntimeError(f"cuLaunchKernelEx: {rc}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--stages", default="3", help="ring depths to try, comma-separated")
    ap.add_argument("--stage-kb", default="32", help="KB a stage aims at, comma-separated")
    ap.add_argument("--carveout", action="store_true", help="also with the SM's shared-memory carveout at 100%%")
    ap.add_argument("--unchained", action="store_true", help="also as plain launches (no PDL)")
    ap.add_argument("--json")
    a = ap.parse_args()

    import torch
    from bench_gemv_cuda import matrices
    from bench_run_gpu import SHAPES, copy_rate

    from llmarch.runtime import gemv_cuda as gv

    cfg = SHAPES[a.model][1]
    dims = {name: (N, K) for name, N, K, _ in matrices(cfg)}
    L, D, F, V = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"], dims["head"][0]
    NQKV, Q = dims["qkv"][0], dims["o"][1]
    bf = torch.bfloat16
    torch.manual_seed(0)

    def w(*shape):
        return torch.randn(*shape, device="cuda", dtype=bf) / shape[-1] ** 0.5

    wqkv, wo, wgu, wd, whead = w(L, NQKV, D), w(L, D, Q), w(L, 2 * F, D), w(L, D, F), w(V, D)
    nw = torch.ones(D, device="cuda", dtype=bf)
    x0 = torch.randn(1, D, device="cuda", dtype=bf)
    nbytes = sum(t.numel() * 2 for t in (wqkv, wo, wgu, wd, whead))
    kind_bytes = {"qkv": wqkv.numel() * 2, "o": wo.numel() * 2, "gate|up": wgu.numel() * 2, "down": wd.numel() * 2}

    def launches(x, q, h, logits, only=None):
        for layer in range(L):
            if only in (None, "qkv"):
                gv.launch(x, wqkv[layer], None, q, norm_w=nw, eps=1e-5)
            if only in (None, "o"):
                gv.launch(q[:, :Q], wo[layer], None, x, residual=x)
            if only in (None, "gate|up"):
                gv.launch(x, wgu[layer], None, h, glu=True, norm_w=nw, eps=1e-5)
            if only in (None, "down"):
                gv.launch(h, wd[layer], None, x, residual=x)
        if only is None:
            gv.launch(x, whead, None, logits, norm_w=nw, eps=1e-5)

    def tma_chain(stages: int, pdl: bool, carveout=None, stage_kb=32):
        kq = Kernel(torch, D, False, True, False, stages, pdl, carveout, stage_kb)
        ko = Kernel(torch, Q, False, False, True, stages, pdl, carveout, stage_kb)
        kg = Kernel(torch, D, True, True, False, stages, pdl, carveout, stage_kb)
        kd = Kernel(torch, F, False, False, True, stages, pdl, carveout, stage_kb)

        def run(x, q, h, logits, only=None):
            for layer in range(L):
                if only in (None, "qkv"):
                    kq(x, wqkv[layer], q, NQKV, nw=nw, eps=1e-5)
                if only in (None, "o"):
                    ko(q, wo[layer], x, D, res=x)
                if only in (None, "gate|up"):
                    kg(x, wgu[layer], h, F, nw=nw, eps=1e-5)
                if only in (None, "down"):
                    kd(h, wd[layer], x, D, res=x)
            if only is None:
                kq(x, whead, logits, V, nw=nw, eps=1e-5)

        return run

    def bufs():
        return (x0.clone(), torch.empty(1, NQKV, device="cuda", dtype=bf), torch.empty(1, F, device="cuda", dtype=bf),
                torch.empty(1, V, device="cuda", dtype=bf))  # fmt: skip

    ref = bufs()
    launches(*ref)
    torch.cuda.synchronize()
    variants = {"launches (Triton)": launches}
    out: dict = {"model": a.model, "bytes": nbytes, "rows": []}
    configs = [
        (int(st), kb, pdl, None) for kb in a.stage_kb.split(",") for st in a.stages.split(",") for pdl in (True, False)
    ]
    if a.carveout:
        configs += [(int(st), kb, True, 100) for kb in a.stage_kb.split(",") for st in a.stages.split(",")]
    for st, kb, pdl, carveout in configs:
        if not pdl and not a.unchained:
            continue
        name = f"tma {st}x{kb} KB" + (" pdl" if pdl else "") + (f" carveout {carveout}" if carveout else "")
        try:
            fn = tma_chain(st, pdl, carveout, int(kb))
            b = bufs()
            fn(*b)
            torch.cuda.synchronize()
        except Exception as e:
            print(f"{name}: {type(e).__name__}: {str(e)[:400]}", flush=True)
            continue
        err = ((b[3].double() - ref[3].double()).norm() / ref[3].double().norm()).item()
        errx = ((b[0].double() - ref[0].double()).norm() / ref[0].double().norm()).item()
        print(f"{name}: logits rel. error {err:.2e}, x {errx:.2e} against the launches", flush=True)
        out["rows"].append({"variant": name, "rel_err_logits": err, "rel_err_x": errx})
        if err < 0.05:
            variants[name] = fn
    rate = copy_rate(torch)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{a.model}: {nbytes / 1e9:.2f} GB of weights a step, copy rate {rate / 1e12:.2f} TB/s, "
          f"bound {nbytes / rate * 1e6:.0f} us, {sms} SMs; load {os.getloadavg()[0]:.1f}")  # fmt: skip
    for only, nb in [(None, nbytes)] + list(kind_bytes.items()):
        graphs = {}
        for name, fn in variants.items():
            b = bufs()
            fn(*b, only=only)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(10):
                    fn(*b, only=only)
            graphs[name] = g
        times: dict = {n: [] for n in graphs}
        names = list(graphs)
        for r in range(a.rounds):
            for n in names if r % 2 == 0 else names[::-1]:
                graphs[n].replay()
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                for _ in range(3):
                    graphs[n].replay()
                e.record()
                torch.cuda.synchronize()
                times[n].append(s.elapsed_time(e) / 1e3 / 30)
        base = statistics.median(times[names[0]])
        label = only or "whole chain"
        for n in names:
            t = statistics.median(times[n])
            print(f"  {label:11s} {n:32s} {t * 1e6:7.1f} us, {100 * nb / rate / t:5.1f}% of bound, "
                  f"{base / t:.3f}x launches", flush=True)  # fmt: skip
            out["rows"].append({"kind": label, "variant": n, "us": t * 1e6, "samples_us": [v * 1e6 for v in times[n]]})
    out["copy_rate"] = rate
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

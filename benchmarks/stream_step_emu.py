"""probe_stream_step's kernel run on the CPU: its CUDA C++ compiled by the host's C++ compiler against
primitives that stand in for the GPU's, one OS thread a GPU thread, so that its protocol (the
producer's stage descriptors, the mbarrier phases, the flagged words, the epoch) and its arithmetic
can be checked where no GPU is (tests/test_stream_step_emulated.py).

What stands in: a thread's threadIdx / blockIdx / shared memory (thread-local), __syncthreads and
the consumers' named barrier (std::barrier per CTA), warp shuffles (a barrier per warp and an
exchange row), mbarriers (a phase, pending arrivals and transaction bytes under a mutex; a bulk copy
is a memcpy that then completes its bytes), the flagged words' volatile loads and stores (relaxed
atomics), the clock (steady_clock), __trap (a message and abort: run it in a child process). What
does not: the GPU's memory model beyond that, timing, and occupancy (all CTAs run at once here as
on the GPU, where a CTA a SM is resident).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import subprocess
import tempfile
from pathlib import Path

EMU = r"""
#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>
typedef unsigned short h16;
typedef unsigned long long u64;
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(a, b)
#define __restrict__ __restrict
struct uint4 { unsigned int x, y, z, w; };
struct int4 { int x, y, z, w; };
static inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
static inline int4 make_int4(int a, int b, int c, int d) { return {a, b, c, d}; }
struct alignas(8) float2 { float x, y; };
struct alignas(16) ulonglong2 { unsigned long long x, y; };
static inline float2 make_float2(float a, float b) { return {a, b}; }
struct Dim { int x; };
struct Cta {
    std::barrier<> all{CONSUMERS + 32}, consumers{CONSUMERS};
    std::vector<std::barrier<>*> warps;
    float exchange[CONSUMERS / 32][32];
};
struct MBar { std::mutex m; std::atomic<unsigned> phase{0}; int pending = 1, count = 1; long long tx = 0; };
static thread_local Dim threadIdx, blockIdx, gridDim;
static thread_local unsigned char* smem;
static thread_local Cta* cta;
static std::mutex mbars_lock;
static std::vector<MBar*> mbars;
using std::min;

static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline float __int_as_float(unsigned u) { return __uint_as_float(u); }
static inline unsigned as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static inline unsigned __float_as_uint(float f) { return as_uint(f); }
static inline float tof(h16 h) { return __uint_as_float(((unsigned)h) << 16); }
static inline h16 to16(float f) {  /* round to nearest even, as cvt.rn.bf16.f32 */
    unsigned u = as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (h16)((u >> 16) | 0x40u);
    return (h16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
WORDS_AND_DOT8
#define __expf(x) expf(x)
static inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
static inline void __syncthreads() { cta->all.arrive_and_wait(); }
static inline void consumers_sync() { cta->consumers.arrive_and_wait(); }
static inline float __shfl_xor_sync(unsigned, float v, int o) {
    const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    cta->exchange[w][l] = v;
    cta->warps[w]->arrive_and_wait();
    const float r = cta->exchange[w][l ^ o];
    cta->warps[w]->arrive_and_wait();
    return r;
}
static inline MBar* mbar(u64* b) { std::lock_guard<std::mutex> g(mbars_lock); return mbars[*b]; }
static inline void bar_init(u64* b) {
    std::lock_guard<std::mutex> g(mbars_lock);
    mbars.push_back(new MBar());
    *b = mbars.size() - 1;
}
static inline void fence_mbarrier_init() {}
static inline void settle(MBar* m) {  /* under m->m: the phase completes with its arrivals and bytes */
    if (m->pending == 0 && m->tx == 0) { m->pending = m->count; m->phase.fetch_add(1); }
}
static inline void bar_expect(u64* b, unsigned bytes) {
    MBar* m = mbar(b); std::lock_guard<std::mutex> g(m->m); m->tx += bytes; m->pending -= 1; settle(m);
}
static inline void bar_arrive(u64* b) { MBar* m = mbar(b); std::lock_guard<std::mutex> g(m->m); m->pending -= 1; settle(m); }
static inline void bulk_load(void* dst, const void* src, unsigned bytes, u64* b) {
    std::memcpy(dst, src, bytes);
    MBar* m = mbar(b); std::lock_guard<std::mutex> g(m->m); m->tx -= bytes; settle(m);
}
static inline void bar_wait(u64* b, unsigned parity) {
    MBar* m = mbar(b);
    while ((m->phase.load() & 1u) == parity) std::this_thread::yield();
}
static inline unsigned short __ldcg(const unsigned short* p) { return *p; }
static inline uint4 __ldcg(const uint4* p) { return *p; }
static inline h16 ldcg(const h16* p) { return *p; }
static inline u64 now_ns() {
    return (u64)std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::chrono::steady_clock::now().time_since_epoch()).count();
}
static inline unsigned load1(const unsigned* p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline uint4 load4(const unsigned* p) { return {load1(p), load1(p + 1), load1(p + 2), load1(p + 3)}; }
static inline void store1(unsigned* p, unsigned v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline ulonglong2 load2w(const unsigned long long* p) {
    return {__atomic_load_n(p, __ATOMIC_RELAXED), __atomic_load_n(p + 1, __ATOMIC_RELAXED)};
}
static inline void store1w(unsigned long long* p, unsigned long long v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static inline void __trap() { std::fprintf(stderr, "emulated kernel: __trap\n"); std::abort(); }
static inline void give_up_after(u64 since) {
    if (now_ns() - since > 20000000000ull) { std::fprintf(stderr, "emulated kernel: a flag never came\n"); std::abort(); }
    std::this_thread::yield();
}
"""

ENTRY = r"""
extern "C" void emulate(int grid, int shared, const Op* ops, int n_ops, unsigned* epoch, unsigned* claims, u64* trace,
                        const float* cos_t, const float* sin_t, int pos) {
    std::vector<Cta*> ctas;
    std::vector<std::vector<unsigned char>> mem(grid, std::vector<unsigned char>(shared + 128));
    for (int b = 0; b < grid; ++b) {
        ctas.push_back(new Cta());
        for (int w = 0; w < CONSUMERS / 32; ++w) ctas.back()->warps.push_back(new std::barrier<>(32));
    }
    std::vector<std::thread> threads;
    for (int b = 0; b < grid; ++b)
        for (int t = 0; t < CONSUMERS + 32; ++t)
            threads.emplace_back([&, b, t] {
                threadIdx.x = t; blockIdx.x = b; gridDim.x = grid; cta = ctas[b];
                smem = mem[b].data() + (128 - (reinterpret_cast<std::uintptr_t>(mem[b].data()) & 127)) % 128;
                step_stream(ops, n_ops, epoch, claims, trace, cos_t, sin_t, pos);
            });
    for (auto& th : threads) th.join();
    for (Cta* c : ctas) { for (auto* w : c->warps) delete w; delete c; }
    /* every CTA has ended: the launch's mbarriers with it (bar_init numbers them afresh the next one) */
    std::lock_guard<std::mutex> g(mbars_lock);
    for (MBar* m : mbars) delete m;
    mbars.clear();
}
"""


def _words_and_dot8() -> str:
    """gemv_stream_cuda's first / second / dot8 as the GPU compiles them (plain C++ for bf16): the
    arithmetic under test, not a copy of it."""
    from llmarch.runtime import gemv_stream_cuda as gs

    start = gs.HELPERS.index("/* a 32-bit word's two 16-bit values")
    return gs.HELPERS[start : gs.HELPERS.index("__device__ __forceinline__ unsigned int smem_addr")]


def source(step_source: str) -> str:
    """A probe_stream_step.step_source(..., helpers=EMU) text made host C++: the kernel's shared
    memory is the thread's CTA buffer, and an entry that runs a grid of CTAs."""
    text = step_source.replace("extern __shared__ __align__(128) unsigned char smem[];", "")
    text = text.replace("WORDS_AND_DOT8", _words_and_dot8())
    text = text.replace('extern "C" __global__ void', "static void")
    return "#include <cstdint>\n" + text + ENTRY


def build(text: str, folder: Path | None = None) -> ctypes.CDLL:
    """The emulation compiled by the host's C++ compiler (CXX, else g++) into a cached shared library."""
    folder = folder or Path(tempfile.gettempdir()) / "llmarch-step-emu"
    folder.mkdir(parents=True, exist_ok=True)
    cxx = os.environ.get("CXX", "g++")
    flags = ["-O2", "-g", "-std=c++20", "-pthread", "-fno-strict-aliasing", "-Wno-unknown-pragmas", "-shared", "-fPIC"]
    key = hashlib.sha256((text + cxx + " ".join(flags)).encode()).hexdigest()[:16]
    lib = folder / f"step_{key}.so"
    if not lib.exists():
        src = folder / f"step_{key}.cpp"
        src.write_text(text)
        tmp = folder / f"step_{key}.{os.getpid()}.so"
        subprocess.run([cxx, *flags, str(src), "-o", str(tmp)], check=True, capture_output=True)
        tmp.replace(lib)
    return ctypes.CDLL(str(lib))


def run(lib: ctypes.CDLL, grid: int, shared: int, table, n_ops: int, epoch, claims, trace=None, rope=None) -> None:
    """One launch of the emulated kernel on CPU tensors (their data pointers)."""
    ptr = ctypes.c_void_p

    def p(t):
        return ptr(0 if t is None else t.data_ptr())

    cos, sin, pos = rope if rope is not None else (None, None, 0)
    lib.emulate(
        ctypes.c_int(grid), ctypes.c_int(shared), p(table), ctypes.c_int(n_ops), p(epoch), p(claims), p(trace),
        p(cos), p(sin), ctypes.c_int(pos),
    )  # fmt: skip


def tiny_chain(torch, layers: int = 2, attention: bool = True, seed: int = 0, heads=(8, 2, 64), pos: int = 37) -> dict:
    """A small random chain in bf16 on the CPU (hidden 256, `heads` = query heads, KV heads, head width
    (run_attn needs query heads a KV head x width = 256), ffn 512, 96 logits): its weights, norms, a
    residual row, and the attention's caches (random before slot pos) and RoPE tables as
    probe_stream_step's Attention keeps them."""
    g = torch.Generator().manual_seed(seed)
    (H, KV, Dh), (D, F, V, smax) = heads, (256, 512, 96, 48)
    Q = H * Dh

    def w(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale / shape[-1] ** 0.5).to(torch.bfloat16)

    c = {
        "L": layers, "D": D, "H": H, "KV": KV, "Dh": Dh, "Q": Q, "F": F, "V": V, "NQKV": Q + 2 * KV * Dh,
        "smax": smax, "pos": pos, "attention": attention,
    }  # fmt: skip
    c["wqkv"], c["wo"] = w(layers, c["NQKV"], D, scale=3.0), w(layers, D, Q)
    c["wgu"], c["wd"], c["whead"] = w(layers, 2 * F, D), w(layers, D, F), w(V, D)
    c["nw"] = (1 + 0.2 * torch.randn(D, generator=g)).to(torch.bfloat16)
    c["x0"] = torch.randn(1, D, generator=g).to(torch.bfloat16)
    c["kc"], c["vc"] = (torch.randn(layers, KV, smax, Dh, generator=g).to(torch.bfloat16) for _ in range(2))
    inv = 1.0 / 10000.0 ** (torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    f = torch.arange(smax, dtype=torch.float64)[:, None] * inv[None]
    c["cos"] = torch.cat([f.cos(), f.cos()], -1).float().contiguous()
    c["sin"] = torch.cat([-f.sin(), f.sin()], -1).float().contiguous()
    return c


def reference(torch, c: dict, chunk: int | None = None, splits: int = 1) -> tuple:
    """The chain in float32 sums with the kernel's bf16 roundings (the norm's output, each product, the
    residual adds, RoPE'd q and k, the probabilities before V, each against the running maximum of
    the chunks of `chunk` cache slots before it in its split of `splits`, the splits merged as o
    merges them, the attention's output): (logits, the caches after the step)."""
    bf = torch.bfloat16
    kc, vc = c["kc"].clone(), c["vc"].clone()

    def r16(t):
        return t.to(bf).float()

    def norm(x):
        xf = x.float()
        inv = torch.rsqrt((xf * xf).sum() / xf.shape[-1] + 1e-5)
        return r16(xf * inv * c["nw"].float())

    def mm(x, w):
        return x.float() @ w.float().T

    x = c["x0"].float()
    H, KV, Dh, Q, pos = c["H"], c["KV"], c["Dh"], c["Q"], c["pos"]
    rep = H // KV
    cos, sin = c["cos"][pos], c["sin"][pos]

    def rope(t):
        return r16(t * cos + torch.roll(t, Dh // 2, dims=-1) * sin)

    for layer in range(c["L"]):
        qkv = r16(mm(norm(x), c["wqkv"][layer]))
        if c["attention"]:
            q = qkv[:, :Q].view(H, Dh)
            k = qkv[:, Q : Q + KV * Dh].view(KV, Dh)
            v = qkv[:, Q + KV * Dh :].view(KV, Dh)
            q, k = rope(q), rope(k)
            kc[layer, :, pos], vc[layer, :, pos] = k.to(bf), v.to(bf)
            out = torch.empty(H, Dh)
            span = (pos + splits) // splits
            for h in range(H):
                g = h // rep
                s = (kc[layer, g, : pos + 1].float() @ q[h]) / Dh**0.5
                vs = vc[layer, g, : pos + 1].float()
                parts = []
                for lo in range(0, splits * span, span):
                    hi = min(lo + span, pos + 1)
                    m, total, acc = -math.inf, torch.tensor(0.0), torch.zeros(Dh)
                    for c0 in range(lo, hi, chunk or pos + 1):  # an online softmax, as the kernel's
                        part = s[c0 : min(c0 + (chunk or pos + 1), hi)]
                        m_new = max(m, part.max().item())
                        alpha, p = math.exp(m - m_new), torch.exp(part - m_new)
                        total, acc = total * alpha + p.sum(), acc * alpha + r16(p) @ vs[c0 : c0 + len(part)]
                        m = m_new
                    parts.append((m, total, acc))
                top = max(m for m, _, _ in parts)
                weights = [0.0 if m == -math.inf else math.exp(m - top) for m, _, _ in parts]
                num = sum(w * acc for w, (_, _, acc) in zip(weights, parts, strict=True))
                out[h] = num / sum(w * total for w, (_, total, _) in zip(weights, parts, strict=True))
            o_in = r16(out.reshape(1, Q))
        else:
            o_in = qkv[:, :Q]
        x = r16(r16(mm(o_in, c["wo"][layer])) + x)
        gu = mm(norm(x), c["wgu"][layer])
        gate, up = gu[:, : c["F"]], gu[:, c["F"] :]
        h = r16(gate * torch.sigmoid(gate) * up)
        x = r16(r16(mm(h, c["wd"][layer])) + x)
    return r16(mm(norm(x), c["whead"])), kc, vc


def emulated(
    torch, c: dict, claims: bool = False, runs: int = 2, grid: int = 2, slot_kb: int = 32, splits: int = 1
) -> list:
    """The chain through probe_stream_step's kernel emulated on CPU threads, `runs` launches in a row
    (the epoch moves on between them), on a ring of 6 slots of slot_kb KB, each KV head's slots in
    `splits`: per run (logits, K cache, V cache)."""
    import probe_stream_step as pss

    D, Q, F, Dh = c["D"], c["Q"], c["F"], c["Dh"]
    kinds = pss.chain_kinds(D, Q, F)
    attn = (c["H"], c["KV"], Dh, c["smax"], splits) if c["attention"] else None
    text = source(pss.step_source(kinds, 6, slot_kb * 1024, claims, False, attn, helpers=EMU))
    lib = build(text)
    shared = pss.shared_bytes(6, slot_kb * 1024, pss.xs_values(kinds, attn))
    words = {"dtype": torch.int32}
    qw, hw, xw = (torch.zeros(n, **words) for n in (c["NQKV"], F, D))
    aw = pss.attention_words(torch, c["H"], Dh, splits, "cpu")
    kc, vc = c["kc"].clone(), c["vc"].clone()
    logits = torch.zeros(1, c["V"], dtype=torch.bfloat16)
    weights = (c["wqkv"], c["wo"], c["wgu"], c["wd"], c["whead"])
    caches = None if attn is None else (kc, vc)
    ops = pss.chain_ops(weights, c["nw"], c["x0"], logits, (qw, hw, xw, aw), caches, len(kinds), 0, splits)
    table = pss.pack_ops(torch, ops, device="cpu")
    epoch, counters = torch.zeros(1, **words), torch.zeros(len(ops), **words)
    out = []
    for _ in range(runs):
        logits.zero_()
        run(lib, grid, shared, table, len(ops), epoch, counters, None, (c["cos"], c["sin"], c["pos"]))
        out.append((logits.clone(), kc.clone(), vc.clone()))
    return out

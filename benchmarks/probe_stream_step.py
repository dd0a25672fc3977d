"""Probe: a bf16 decode step's chain of GEMVs as ONE persistent CUDA kernel whose weights stream
through a shared-memory ring without a pause at the matrices' borders, against the runtime's
launches (gemv_stream_cuda's kernel one launch a GEMV, and the Triton kernel's).

    python benchmarks/probe_stream_step.py [--model llama-3.2-1b] [--rounds 5] \
        [--rings 6x32,4x48,3x64] [--delay-us 0,4] [--json OUT]

Why: the launched stream kernel asks for its first ~96 KB a CTA before its PDL wait, but its ring
then stops until the kernel before is done and its input row is read: each border between two
matrices (four a layer) leaves HBM idle for the grid's drain and the next input's round trip. The
weights are no kernel's output, so nothing stops them from streaming across the borders. Here one
CTA a SM runs the whole chain: a producer warp walks the CTA's rows of every matrix in order and
keeps the ring (--rings: slots x KB, up to ~200 KB a SM, ~26 MB on the GPU: ~6 us of the copy rate)
full, stopping only where the ring is; eight consumer warps compute each matrix's rows as
gemv_stream_cuda does (so the outputs equal its launches' bit for bit) and wait at a grid-wide
counter (every CTA arrives after its rows of a matrix) before reading the next input row.

--delay-us holds the q|k|v -> o border that long (CTA 0 arrives late; the launch chains get a
one-CTA kernel of that length with the attention op's late PDL trigger): a stand-in for the
attention op, whose latency the ring may hide.

The chain is gemv_chain.Chain's (bench_gemv_cuda.matrices' shapes without attention). Prints step
times, % of the copy-rate bound, the ratio to the stream launches and the error against them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from llmarch.runtime import cuda_rtc  # noqa: E402
from llmarch.runtime import gemv_stream_cuda as gs  # noqa: E402

CONSUMERS = 256  # eight warps compute; a ninth (the producer) asks for the weights

STEP = r"""
struct Op {            /* one matrix of the chain, as the host packs it (72 bytes) */
    const h16* w;      /* N (2N with GLU: gate rows then up rows) rows of K */
    const h16* x;      /* input row */
    const h16* nw;     /* RMS-norm weight (16-bit) or null */
    const h16* res;    /* residual row or null */
    h16* y;            /* output row */
    int N, kind, delay_ns, pad;
    float eps, pad2, pad3, pad4;
};

__device__ __forceinline__ void bar_arrive(u64* b) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(smem_addr(b)) : "memory");
}
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" :: "n"(CONSUMERS) : "memory"); }
__device__ __forceinline__ unsigned int load_acquire(const unsigned int* p) {
    unsigned int v; asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ h16 ldcg(const h16* p) { return __ldcg((const unsigned short*)p); }
__device__ __forceinline__ u64 now_ns() { u64 t; asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t)); return t; }

/* rows of one stage for K values (x2 with GLU) in a SLOT-byte slot: 8, 4, 2 or 1 */
__device__ __forceinline__ int stage_rows(int K, int parts) {
    int rows = 8;
    while (rows > 1 && rows * K * 2 * parts > SLOT) rows >>= 1;
    return rows;
}

/* the consumers' share of one matrix: input row (normed), then each stage of this CTA's rows;
   returns the ring index after them */
template <int K, int CR, int GLU, int NORM, int RES>
__device__ int run_op(const Op op, int i, unsigned char* ring, h16* xs, float* red, u64* full, u64* empty) {
    constexpr int PARTS = GLU ? 2 : 1, VEC = K / 8, TPR = CONSUMERS / CR, VPT = (VEC + TPR - 1) / TPR, WPR = TPR / 32;
    const int t = threadIdx.x, G = gridDim.x, b = blockIdx.x, N = op.N;
    const int r0 = (int)((long long)N * b / G), r1 = (int)((long long)N * (b + 1) / G);
    float inv = 1.f;
    if (NORM) {
        float ss = 0.f;
        for (int k = t; k < K; k += CONSUMERS) { float v = tof(ldcg(op.x + k)); ss = fmaf(v, v, ss); }
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        float* part = red + 64;
        if ((t & 31) == 0) part[t >> 5] = ss;
        consumers_sync();
        ss = 0.f;
        for (int k = 0; k < CONSUMERS / 32; ++k) ss += part[k];
        inv = rsqrtf(ss / K + op.eps);
    }
    for (int k = t; k < K; k += CONSUMERS)
        xs[k] = NORM ? to16(tof(ldcg(op.x + k)) * inv * tof(op.nw[k])) : ldcg(op.x + k);
    consumers_sync();
    const int row = t / TPR, lt = t % TPR, wi = lt >> 5;
    uint4 xr[VPT];
#pragma unroll
    for (int j = 0; j < VPT; ++j) xr[j] = lt + j * TPR < VEC ? ((const uint4*)xs)[lt + j * TPR] : make_uint4(0, 0, 0, 0);
    for (int rs = r0, c = 0; rs < r1; rs += CR, ++c, ++i) {
        const int s = i % SLOTS, n = min(CR, r1 - rs);
        bar_wait(&full[s], (i / SLOTS) & 1);
        const uint4* wv = (const uint4*)(ring + s * SLOT) + row * VEC;
        float acc = 0.f, up = 0.f;
#pragma unroll
        for (int j = 0; j < VPT; ++j)
            if (lt + j * TPR < VEC) acc = dot8(wv[lt + j * TPR], xr[j], acc);
        if (GLU) {
            const uint4* uv = wv + CR * VEC;
#pragma unroll
            for (int j = 0; j < VPT; ++j)
                if (lt + j * TPR < VEC) up = dot8(uv[lt + j * TPR], xr[j], up);
        }
        for (int o = 16; o > 0; o >>= 1) {
            acc += __shfl_xor_sync(0xffffffffu, acc, o);
            if (GLU) up += __shfl_xor_sync(0xffffffffu, up, o);
        }
        float* rb = red + (c & 1) * 32;
        if ((t & 31) == 0) {
            rb[(row * WPR + wi) * PARTS] = acc;
            if (GLU) rb[(row * WPR + wi) * PARTS + 1] = up;
        }
        consumers_sync();  /* every consumer is done with slot s: the producer may refill it */
        if (t == 0) bar_arrive(&empty[s]);
        if (t < n) {
            float g = 0.f, u = 0.f;
            for (int k = 0; k < WPR; ++k) g += rb[(t * WPR + k) * PARTS];
            if (GLU) {
                for (int k = 0; k < WPR; ++k) u += rb[(t * WPR + k) * PARTS + 1];
                g = g * (1.f / (1.f + __expf(-g))) * u;
            }
            if (RES) g = tof(to16(g)) + tof(ldcg(op.res + rs + t));
            op.y[rs + t] = to16(g);
        }
    }
    return i;
}

extern "C" __global__ void __launch_bounds__(CONSUMERS + 32, 1)
step_stream(const Op* __restrict__ ops, int n_ops, unsigned int* counter, u64* trace)
{
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char* ring = smem;
    h16* xs = (h16*)(smem + SLOTS * SLOT);
    float* red = (float*)(xs + KMAX);
    u64* full = (u64*)(red + 128);
    u64* empty = full + SLOTS;
    const int t = threadIdx.x, G = gridDim.x, b = blockIdx.x;
    if (t == 0) {
        for (int s = 0; s < SLOTS; ++s) { bar_init(&full[s]); bar_init(&empty[s]); }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (t >= CONSUMERS) {  /* the producer: this CTA's rows of every matrix, in order, as slots free up */
        if (t != CONSUMERS) return;
        int i = 0;
        for (int j = 0; j < n_ops; ++j) {
            const Op op = ops[j];  /* in registers: a reference would reload each field from memory after each store */
            const int K = kind_k(op.kind), parts = kind_glu(op.kind) ? 2 : 1, CR = stage_rows(K, parts), N = op.N;
            const int r0 = (int)((long long)N * b / G), r1 = (int)((long long)N * (b + 1) / G);
            for (int rs = r0; rs < r1; rs += CR, ++i) {
                const int s = i % SLOTS;
                if (i >= SLOTS) bar_wait(&empty[s], ((i / SLOTS) + 1) & 1);
                const unsigned int bytes = (unsigned int)min(CR, r1 - rs) * K * 2;
                bar_expect(&full[s], bytes * parts);
                unsigned char* dst = ring + s * SLOT;
                bulk_load(dst, op.w + (long long)rs * K, bytes, &full[s]);
                if (parts == 2) bulk_load(dst + CR * K * 2, op.w + ((long long)N + rs) * K, bytes, &full[s]);
            }
        }
        return;
    }
    int i = 0;
    for (int j = 0; j < n_ops; ++j) {
        const Op op = ops[j];  /* in registers: a reference would reload each field from memory after each store */
        if (trace && t == 0) trace[((long long)j * G + b) * 4] = now_ns();
        if (j > 0) {  /* every CTA is done with the matrix before: its output row is whole */
            if (t == 0) {
                while (load_acquire(counter) < (unsigned int)(G * j)) {}
            }
            consumers_sync();
        }
        if (trace && t == 0) trace[((long long)j * G + b) * 4 + 1] = now_ns();
        switch (op.kind) {
KIND_CASES
        }
        consumers_sync();  /* all of this CTA's rows are written */
        if (trace && t == 0) trace[((long long)j * G + b) * 4 + 2] = now_ns();
        if (t == 0) {
            if (b == 0 && op.delay_ns > 0) {
                u64 until = now_ns() + (u64)op.delay_ns;
                while (now_ns() < until) {}
            }
#if ARRIVE_RED  /* no round trip: the host zeroes the counter before each step */
            asm volatile("red.release.gpu.global.add.u32 [%0], 1;" :: "l"(counter) : "memory");
#else
            __threadfence();
            unsigned int seen = atomicAdd(counter, 1u);
            if (seen == (unsigned int)(G * n_ops - 1)) *counter = 0u;  /* the last arrival: ready for the next step */
#endif
            if (trace) trace[((long long)j * G + b) * 4 + 3] = now_ns();
        }
    }
}
"""

DELAY = r"""
extern "C" __global__ void delay(int ns) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t)); } while (t - t0 < (unsigned long long)ns);
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
"""


def step_source(kinds: list[tuple[int, bool, bool, bool]], slots: int, slot_bytes: int, red: bool = False) -> str:
    """STEP for matrix kinds (K, glu, norm, res), a ring of `slots` slots of slot_bytes."""

    def rows(K: int, glu: bool) -> int:
        r = 8
        while r > 1 and r * K * 2 * (2 if glu else 1) > slot_bytes:
            r //= 2
        return r

    cases = "\n".join(
        f"        case {n}: i = run_op<{K}, {rows(K, g)}, {int(g)}, {int(nm)}, {int(r)}>"
        f"(op, i, ring, xs, red, full, empty); break;"
        for n, (K, g, nm, r) in enumerate(kinds)
    )
    k_of = " ".join(f"if (kind == {n}) return {K};" for n, (K, _, _, _) in enumerate(kinds))
    g_of = " ".join(f"if (kind == {n}) return {int(g)};" for n, (_, g, _, _) in enumerate(kinds))
    defs = {
        "HALF": 0,
        "ARRIVE_RED": int(red),
        "SLOTS": slots,
        "SLOT": slot_bytes,
        "CONSUMERS": CONSUMERS,
        "KMAX": max(k[0] for k in kinds),
    }
    head = "".join(f"#define {k} {v}\n" for k, v in defs.items())
    shapes = (
        f"__device__ __forceinline__ int kind_k(int kind) {{ {k_of} return 0; }}\n"
        f"__device__ __forceinline__ int kind_glu(int kind) {{ {g_of} return 0; }}\n"
    )
    return head + gs.HELPERS + shapes + STEP.replace("KIND_CASES", cases)


def shared_bytes(slots: int, slot_bytes: int, kmax: int) -> int:
    return slots * slot_bytes + kmax * 2 + 128 * 4 + 2 * slots * 8


def pack_ops(torch, ops: list[tuple]) -> object:
    """The Op table on the GPU: (w, x, nw, res, y, N, kind, delay_ns, eps) a matrix."""
    raw = b"".join(
        struct.pack(
            "<5Q4i4f",
            *(0 if p is None else p.data_ptr() for p in (w, x, nw, res, y)),
            N,
            kind,
            delay,
            0,
            eps,
            0.0,
            0.0,
            0.0,
        )  # fmt: skip
        for w, x, nw, res, y, N, kind, delay, eps in ops
    )
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).cuda()


def trace_report(torch, persistent, slots: int, kb: int, red: bool, c, names: list[str], sms: int) -> dict:
    """One run of the ring with in-kernel clocks: per matrix kind, the mean time a CTA waits at the
    grid counter, computes its rows, and the time between the grid's last arrivals."""
    probe = persistent(slots, kb, 0, None, red)
    b = c.bufs()
    probe(*b)
    table, n = next(iter(probe.ops().values()))
    kinds = table.view(-1, 72)[:, 44].cpu().tolist()  # each Op's kind (bytes 44-47, little-endian)
    trace = torch.zeros(n * sms * 4, dtype=torch.int64, device="cuda")
    timed = persistent(slots, kb, 0, trace, red)
    timed(*b)
    timed(*b)  # the second run: the first one's compile and page-in are behind
    torch.cuda.synchronize()
    tr = trace.view(n, sms, 4).double().cpu()
    start = tr[:, :, 0].min()
    done = tr[:, :, 2].max(dim=1).values  # the grid's last arrival at each matrix
    report: dict = {"total_us": float(done[-1] - start) / 1e3}
    for kind in sorted(set(kinds)):
        rows = [j for j in range(n) if kinds[j] == kind]
        wait = (tr[rows, :, 1] - tr[rows, :, 0]).mean().item() / 1e3
        work = (tr[rows, :, 2] - tr[rows, :, 1]).mean().item() / 1e3
        slowest = (tr[rows, :, 2] - tr[rows, :, 1]).max(dim=1).values.mean().item() / 1e3
        arrive = (tr[rows, :, 3] - tr[rows, :, 2]).mean().item() / 1e3
        span = [float(done[j] - (done[j - 1] if j else start)) / 1e3 for j in rows]
        name = names[kind] if kind < len(names) else str(kind)
        report[name] = {"wait_us": wait, "work_us": work, "slowest_work_us": slowest, "arrive_us": arrive}
        report[name]["span_us"] = sum(span) / len(span)
        print(f"  trace {name:8s} x{len(rows):3d}: wait {wait:5.2f} us, rows {work:5.2f} us (slowest CTA {slowest:5.2f}), arrive {arrive:5.2f} us, "
              f"grid done every {sum(span) / len(span):5.2f} us", flush=True)  # fmt: skip
    print(f"  trace total {report['total_us']:.1f} us", flush=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rings", default="6x32,4x48,3x64,12x16", help="slots x KB, comma-separated")
    ap.add_argument("--delay-us", default="0,4", help="attention stand-ins to try, comma-separated")
    ap.add_argument("--only", choices=["qkv", "o", "gate|up", "down"], help="that matrix kind's chain alone")
    ap.add_argument("--trace", action="store_true", help="where the first ring's CTAs wait, from in-kernel clocks")
    ap.add_argument("--json")
    a = ap.parse_args()

    import torch
    from bench_run_gpu import copy_rate
    from gemv_chain import Chain, graph_times

    c = Chain(torch, a.model)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    kinds = [
        (c.D, False, True, False),
        (c.Q, False, False, True),
        (c.D, True, True, False),
        (c.F, False, False, True),
        (c.D, False, True, False),
    ]
    delay_kernel = cuda_rtc.kernel(DELAY, "delay", 0, 32, 0)

    def stream_launches(delay_ns: int):
        def run(x, q, h, logits):
            for layer in range(c.L):
                if a.only in (None, "qkv"):
                    gs.launch(x, c.wqkv[layer], None, q, False, c.nw, 1e-5, None)
                if delay_ns:
                    delay_kernel.launch(1, [delay_ns], dependent=True)
                if a.only in (None, "o"):
                    gs.launch(q[:, : c.Q], c.wo[layer], None, x, False, None, 0.0, x)
                if a.only in (None, "gate|up"):
                    gs.launch(x, c.wgu[layer], None, h, True, c.nw, 1e-5, None)
                if a.only in (None, "down"):
                    gs.launch(h, c.wd[layer], None, x, False, None, 0.0, x)
            if a.only is None:
                gs.launch(x, c.whead, None, logits, False, c.nw, 1e-5, None)

        return run

    names = ["qkv", "o", "gate|up", "down", "head"]

    def persistent(slots: int, kb: int, delay_ns: int, trace=None, red: bool = False):
        k = cuda_rtc.kernel(
            step_source(kinds, slots, kb * 1024, red),
            "step_stream",
            0,
            CONSUMERS + 32,
            shared_bytes(slots, kb * 1024, max(k[0] for k in kinds)),
        )
        counter = torch.zeros(1, dtype=torch.int32, device="cuda")
        tables: dict = {}

        def run(x, q, h, logits):
            key = (x.data_ptr(), q.data_ptr(), h.data_ptr(), logits.data_ptr())
            if key not in tables:  # one table a buffer set (packed before capture)
                ops = []
                for layer in range(c.L):
                    ops += [
                        (c.wqkv[layer], x, c.nw, None, q, c.NQKV, 0, delay_ns, 1e-5),
                        (c.wo[layer], q, None, x, x, c.D, 1, 0, 0.0),
                        (c.wgu[layer], x, c.nw, None, h, c.F, 2, 0, 1e-5),
                        (c.wd[layer], h, None, x, x, c.D, 3, 0, 0.0),
                    ]
                if a.only:
                    ops = [o for o in ops if names[o[6]] == a.only]
                else:
                    ops.append((c.whead, x, c.nw, None, logits, c.V, 4, 0, 1e-5))
                tables[key] = (pack_ops(torch, ops), len(ops))
            table, n = tables[key]
            if red:
                counter.zero_()
            k.launch(sms, [table, n, counter, trace])

        run.ops = lambda: tables  # noqa: B023

        return run

    ref = c.bufs()
    stream_launches(0)(*ref)
    torch.cuda.synchronize()
    nbytes = c.kind_bytes[a.only] if a.only else c.bytes
    out: dict = {"model": a.model, "only": a.only, "bytes": nbytes, "rows": []}
    rate = copy_rate(torch)
    print(f"{a.model} ({a.only or 'whole chain'}): {nbytes / 1e9:.2f} GB of weights a step, copy rate "
          f"{rate / 1e12:.2f} TB/s, bound {nbytes / rate * 1e6:.0f} us, {sms} SMs; load {os.getloadavg()[0]:.1f}")  # fmt: skip
    for delay_us in (float(d) for d in a.delay_us.split(",")):
        ns = int(delay_us * 1000)
        variants = {"stream launches": stream_launches(ns)}
        if not ns:  # the Triton chain has no stand-in for the attention op
            variants["triton launches"] = c.launches
        for ring in a.rings.split(","):
            slots, kb = (int(v) for v in ring.rstrip("r").split("x"))
            red = ring.endswith("r")
            name = f"persistent {slots}x{kb} KB" + (" red" if red else "")
            try:
                fn = persistent(slots, kb, ns, None, red)
                b = c.bufs()
                fn(*b)
                torch.cuda.synchronize()
            except Exception as e:
                print(f"{name}: {type(e).__name__}: {str(e)[:600]}", flush=True)
                continue
            err, errx = c.errors(b, ref)
            same = bool(torch.equal(b[3], ref[3]))
            print(f"{name} (delay {delay_us} us): logits rel. error {err:.2e} (equal: {same}), x {errx:.2e} "
                  "against the stream launches", flush=True)  # fmt: skip
            out["rows"].append({"variant": name, "delay_us": delay_us, "rel_err_logits": err, "equal": same})
            if err < 0.05:
                variants[name] = fn
        timed = {n: (lambda b, fn=fn: fn(*b)) for n, fn in variants.items()}
        times = graph_times(torch, timed, c.bufs, a.rounds)
        base = statistics.median(times["stream launches"])
        for n in times:
            t = statistics.median(times[n])
            print(f"  delay {delay_us:3.1f} us {n:26s} {t * 1e6:7.1f} us, {100 * nbytes / rate / t:5.1f}% of bound, "
                  f"{base / t:.3f}x stream launches", flush=True)  # fmt: skip
            out["rows"].append(
                {"variant": n, "delay_us": delay_us, "us": t * 1e6, "samples_us": [v * 1e6 for v in times[n]]}
            )
    if a.trace:
        out["trace"] = {}
        for ring in a.rings.split(","):
            slots, kb = (int(v) for v in ring.rstrip("r").split("x"))
            print(f"  trace of {ring}:")
            out["trace"][ring] = trace_report(torch, persistent, slots, kb, ring.endswith("r"), c, names, sms)
    out["copy_rate"] = rate
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

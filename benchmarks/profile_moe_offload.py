"""Where a decode token's time goes with experts on the CPU (Qwen3-30B-A3B shapes, int4 experts):
the GPU segments replayed alone, the host round trip without the kernel, the kernel alone, and the
whole step. Run on the CUDA machine; prints one JSON line.

    python benchmarks/profile_moe_offload.py [--bits 4] [--small --device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    import torch
    from bench_moe_offload import QWEN3_30B_A3B, SMALL, build_llmarch, kernel_only, spec_of

    from llmarch.runtime.experts.decode import attach_decoder
    from llmarch.runtime.generate import Generator, Sampling

    torch.set_num_threads(os.cpu_count())
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec = spec_of(SMALL if args.small else QWEN3_30B_A3B)
    rt, _ = build_llmarch(spec, device, dtype, args.bits, 0)
    gen = Generator(rt, 64, cuda_graph=False, compile=args.compile)
    assert attach_decoder(gen)
    dec = gen._step_eager.__self__
    ids = list(range(3, 19))
    gen.generate(ids, 4, Sampling())  # captures the graphs
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run = [g.replay for g in dec.captured] if dec.graphs else dec.segs
    n = len(dec.cuts)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    mode = torch.inference_mode()
    mode.__enter__()  # the captured tensors are inference tensors
    gpu_t = None
    seg_t = [median([timed(run[i]) for _ in range(args.reps)]) for i in (1, n // 2, n)]
    host_t = median([timed(lambda: dec._host(n // 2)) for _ in range(args.reps)])
    if dec.graphs:  # GPU time alone: replays queued back to back
        gpu_t = timed(lambda: [run[n // 2]() for _ in range(args.reps)]) / args.reps
    tok = torch.tensor([[5]], device=device)
    step_t = median([timed(lambda: dec.step(tok, 20)) for _ in range(args.reps)])
    out = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "cpus": os.cpu_count(),
        "graphs": dec.graphs,
        "compiled": args.compile,
        "moe_layers": n,
        "segment_ms": [round(t * 1e3, 3) for t in seg_t],
        "segment_gpu_ms": gpu_t and round(gpu_t * 1e3, 3),
        "host_roundtrip_ms": round(host_t * 1e3, 3),
        "step_ms": round(step_t * 1e3, 2),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        **kernel_only(rt, spec, reps=args.reps * 3),
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

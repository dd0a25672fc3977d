"""Where a decode token's time goes with experts on the CPU (Qwen3-30B-A3B shapes, int4 experts):
the GPU segments replayed alone, the kernel alone (one layer again and again, its experts partly in
the CPU's cache, and every layer in turn as a step reads them), a step's timeline through the Python
loop (per layer: the replay call, the wait for the segment's copy to the host, the kernel inside the
step), and the whole step with each step loop. Run on the CUDA machine; prints one JSON line.
bench_moe_offload.py --profile runs the same on its own (compiled) model after its runs.

    python benchmarks/profile_moe_offload.py [--bits 4] [--compile] [--small --device cpu]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 1)


def c_loop_marks(dec, tok, reps: int, early: bool) -> dict:
    """moe_step's marks per layer (after each launch, event wait and kernel): launch to ready, the kernel,
    and from the kernel's end to the next segment's copy to the host (the GPU's whole turn: launch or
    flag, copy back, segment); without early launch also the kernel's end to the next launch returned."""
    n = len(dec.cuts)
    dec.step_loop, saved_loop, saved_early = "c", dec.step_loop, dec.early_launch
    dec.set_early_launch(early)
    marks = (ctypes.c_double * (3 * (n + 1)))()
    dec.plan.times = ctypes.addressof(marks)
    wait_c, kern_c, relaunch_c, turn_c = [], [], [], []
    for _ in range(reps):
        dec.step(tok, 20)
        t = list(marks)
        for i in range(n):
            wait_c.append(t[3 * i + 1] - t[3 * i])
            kern_c.append(t[3 * i + 2] - t[3 * i + 1])
            relaunch_c.append(t[3 * i + 3] - t[3 * i + 2])
            if i:
                turn_c.append(t[3 * i + 1] - t[3 * i - 1])
    dec.plan.times = None
    dec.step_loop = saved_loop
    dec.set_early_launch(saved_early)
    out = {
        "kernel_in_step": _us(statistics.median(kern_c)),
        "kernel_in_step_p90": _us(sorted(kern_c)[int(0.9 * len(kern_c))]),
        "kernel_end_to_next_ready": _us(statistics.median(turn_c)),
    }
    if not early:  # (early: the launch is queued before the wait, so these marks are out of order)
        out["launch_to_ready"] = _us(statistics.median(wait_c))
        out["kernel_end_to_next_launched"] = _us(statistics.median(relaunch_c))
    return out


def segment_kernels(dec, reps: int = 10, top: int = 12) -> dict:
    """The GPU kernels of one middle segment's graph replay (torch.profiler): per replay, how many, their
    summed GPU time, and the costliest by name."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    g = dec.captured[len(dec.cuts) // 2]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            g.replay()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = getattr(e, "cuda_time_total", 0)
        if t and e.count:
            rows.append((e.key, e.count / reps, t / reps))
    rows.sort(key=lambda r: -r[2])
    kernels = [r for r in rows if "Memcpy" not in r[0] and "Memset" not in r[0]]
    return {
        "kernels_per_replay": round(sum(r[1] for r in kernels), 1),
        "kernel_us_per_replay": round(sum(r[2] for r in kernels), 1),
        "copies_us_per_replay": round(sum(r[2] for r in rows if r not in kernels), 1),
        "top": [[name[:70], round(c, 1), round(us, 2)] for name, c, us in rows[:top]],
    }


def copy_beside_kernel(dec, gib: int = 1, passes: int = 3) -> dict:
    """Whether the GPU can pull host memory while the CPU kernel reads it: a pinned buffer copied to the
    GPU (the copy engine over PCIe) alone, the kernel over every layer in turn alone, then both at once
    (the copy queued on a side stream, the kernel run meanwhile), alternated. If the kernel keeps its
    rate while the copy moves its own, host DRAM serves more than the cores alone read, and a GPU
    share of each layer's experts (read over PCIe) would add to the CPU's."""
    import torch

    src = torch.ones(gib << 30, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(src.shape, dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    lib, ctx, n = dec.lib, dec.ctx_ptrs, len(dec.cuts)
    per_layer = sum(dec.bytes_per_step) / n
    rows: dict[str, list] = {
        "copy_alone_gb_s": [],
        "kernel_alone_us": [],
        "kernel_with_copy_us": [],
        "copy_with_kernel_gb_s": [],
    }

    def copy_started():
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(side):
            a.record()
            dst.copy_(src, non_blocking=True)
            b.record()
        return a, b

    for _ in range(passes):
        torch.cuda.synchronize()
        a, b = copy_started()
        b.synchronize()
        rows["copy_alone_gb_s"].append(src.numel() / (a.elapsed_time(b) / 1e3) / 1e9)
        t0 = time.perf_counter()
        for c in ctx:
            lib.moe_decode(c)
        rows["kernel_alone_us"].append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
        a, b = copy_started()
        time.sleep(0.001)  # the copy under way before the kernel starts
        t0 = time.perf_counter()
        for c in ctx:
            lib.moe_decode(c)
        t1 = time.perf_counter()
        b.synchronize()
        rows["kernel_with_copy_us"].append((t1 - t0) / n * 1e6)
        rows["copy_with_kernel_gb_s"].append(src.numel() / (a.elapsed_time(b) / 1e3) / 1e9)
    out = {name: round(statistics.median(v), 1) for name, v in rows.items()}
    out["rounds"] = {name: [round(x, 1) for x in v] for name, v in rows.items()}
    out["kernel_alone_gb_s"] = round(per_layer / (out["kernel_alone_us"] / 1e6) / 1e9, 1)
    out["kernel_with_copy_gb_s"] = round(per_layer / (out["kernel_with_copy_us"] / 1e6) / 1e9, 1)
    return out


def profile_step(gen, rt, spec, reps: int = 20, early: bool = True) -> dict:
    """The breakdown of a Generator's segmented decode step (attach_decoder done, graphs captured);
    early: also moe_step's early launch, where the driver has it."""
    import torch

    dec = gen._step_eager.__self__
    cuda = dec.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = len(dec.cuts)
    run = [g.replay for g in dec.captured] if dec.graphs else dec.segs
    clock = time.perf_counter

    def timed(fn):
        sync()
        t0 = clock()
        fn()
        sync()
        return clock() - t0

    out: dict = {"moe_layers": n, "graphs": dec.graphs, "native": dec.native, "reps": reps}
    out["load_1min_start"] = round(os.getloadavg()[0], 2)
    with torch.inference_mode():  # the captured tensors are inference tensors
        out["segment_alone_us"] = [_us(statistics.median(timed(run[i]) for _ in range(reps))) for i in (1, n // 2, n)]
        if dec.graphs:  # GPU time alone: replays queued back to back
            out["segment_gpu_us"] = _us(timed(lambda: [run[n // 2]() for _ in range(reps)]) / reps)
            try:
                out["segment_kernels"] = segment_kernels(dec)
            except Exception as e:  # the profiler is a diagnosis: its failure must not end the run
                out["segment_kernels"] = f"profiler failed: {type(e).__name__}: {e}"
        if dec.native:
            lib, ctx = dec.lib, dec.ctx_ptrs
            warm = []
            for _ in range(reps):
                t0 = clock()
                lib.moe_decode(ctx[n // 2])
                warm.append(clock() - t0)
            out["kernel_one_layer_again_us"] = _us(statistics.median(warm))
            per_layer = sum(dec.bytes_per_step) / n
            cold = []
            for _ in range(max(reps // 4, 3)):
                t0 = clock()
                for c in ctx:
                    lib.moe_decode(c)
                cold.append((clock() - t0) / n)
            out["kernel_layers_in_turn_us"] = _us(statistics.median(cold))
            out["kernel_layers_in_turn_us_rounds"] = [_us(t) for t in cold]
            out["kernel_layers_in_turn_gb_s"] = round(per_layer / statistics.median(cold) / 1e9, 1)
            if cuda:
                try:
                    out["copy_beside_kernel"] = copy_beside_kernel(dec)
                except Exception as e:  # a diagnosis: its failure must not end the run
                    out["copy_beside_kernel"] = f"failed: {type(e).__name__}: {e}"
        if dec.graphs and dec.copies_in_graph:  # the Python loop's step, timed per layer
            launch, wait, kern, whole = [], [], [], []
            for _ in range(reps):
                sync()
                t_start = clock()
                for i, g in enumerate(dec.captured):
                    a = clock()
                    g.replay()
                    b = clock()
                    launch.append(b - a)
                    if i < n:
                        dec.ready[i].synchronize()
                        c = clock()
                        dec.lib.moe_decode(dec.ctx_ptrs[i])
                        wait.append(c - b)
                        kern.append(clock() - c)
                sync()
                whole.append(clock() - t_start)
            out["timeline_per_layer_us"] = {
                "replay_call": _us(statistics.median(launch)),
                "replay_to_ready": _us(statistics.median(wait)),
                "kernel_in_step": _us(statistics.median(kern)),
                "kernel_in_step_p90": _us(sorted(kern)[int(0.9 * len(kern))]),
            }
            out["timeline_step_ms"] = round(statistics.median(whole) * 1e3, 3)
        tok = torch.tensor([[5]], device=dec.device)
        if dec.plan is not None:  # the C loop's own clock, with the next segment launched after the kernel or early
            for on in (False, True) if early and dec._early is not None else (False,):
                out["c_loop_per_layer_us" + ("_early_launch" if on else "")] = c_loop_marks(dec, tok, reps, on)
        # (loop, early launch) per variant
        loops = [("python", False), ("c", False)] if dec.plan is not None else [(dec.step_loop, False)]
        if early and dec.plan is not None and dec._early is not None:
            loops.append(("c", True))
        saved, saved_early, steps = dec.step_loop, dec.early_launch, {}
        for _ in range(3):  # alternated
            for loop, on in loops:
                dec.step_loop = loop
                if dec.plan is not None:
                    dec.set_early_launch(on)
                steps.setdefault(f"{loop}_loop{'+early_launch' if on else ''}", []).append(
                    statistics.median(timed(lambda: dec.step(tok, 20)) for _ in range(reps))
                )
        dec.step_loop = saved
        if dec.plan is not None:
            dec.set_early_launch(saved_early)
        out["step_ms"] = {name: round(statistics.median(v) * 1e3, 3) for name, v in steps.items()}
        out["step_ms_rounds"] = {name: [round(t * 1e3, 3) for t in v] for name, v in steps.items()}
    out["load_1min_end"] = round(os.getloadavg()[0], 2)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    import torch
    from bench_moe_offload import QWEN3_30B_A3B, build_llmarch, kernel_only, small_of, spec_of

    from llmarch.runtime.experts.decode import attach_decoder
    from llmarch.runtime.generate import Generator, Sampling

    torch.set_num_threads(os.cpu_count())
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec = spec_of(small_of(QWEN3_30B_A3B) if args.small else QWEN3_30B_A3B)
    rt, _ = build_llmarch(spec, device, dtype, args.bits, 0)
    gen = Generator(rt, 64, cuda_graph=False, compile=args.compile)
    assert attach_decoder(gen)
    gen.generate(list(range(3, 19)), 4, Sampling())  # captures the graphs
    out = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "cpus": os.cpu_count(),
        "load_1min": os.getloadavg()[0],
        "compiled": args.compile,
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        **profile_step(gen, rt, spec, args.reps),
        **kernel_only(rt, spec, reps=args.reps * 3),
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

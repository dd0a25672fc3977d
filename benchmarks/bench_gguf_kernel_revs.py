"""The stored-block matmul kernel (kernel_sources.GGUF_MATMUL) of an earlier git revision against
this tree's, on the embedded Gemma 3 270M's layer-0 matrices, one thread:

    python benchmarks/bench_gguf_kernel_revs.py --before REV [--tokens 1 6 128] [--rounds 7]

Both sources are built side by side; per matrix (fused q/k/v, o, gate/up, down: the model's Q5_0,
Q8_0, Q4_K and Q6_K tensors) and token count, alternating rounds time one gguf_linear call each
(averaged over a few repeats), and the line gives each side's median, the median of the per-round
ratios, whether the two outputs are equal bit for bit, and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from llmarch.runtime import kernel_sources
from llmarch.runtime.cbuild import build_avx2
from llmarch.runtime.load import load_runtime

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]  # gguf_matmul's


def source_at(rev: str) -> str:
    """GGUF_MATMUL as kernel_sources.py defined it at `rev` (the module run in an empty namespace)."""
    text = subprocess.run(
        ["git", "show", f"{rev}:llmarch/runtime/kernel_sources.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    space: dict = {}
    exec(compile(text, f"{rev}:kernel_sources.py", "exec"), space)  # our own file at an earlier commit
    return space["GGUF_MATMUL"]


def load(name: str, source: str):
    lib = build_avx2(name, source, FLAGS)
    if lib is None:
        raise SystemExit("no AVX2 or no C compiler")
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.gguf_linear.argtypes = [p, i, i, i, p, p, p, p, p, i]
    lib.gguf_linear.restype = i
    return lib


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="git revision whose kernel is the baseline")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 6, 128])
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    libs = {"before": load("bench_before", source_at(a.before)), "now": load("bench_now", kernel_sources.GGUF_MATMUL)}
    torch.set_num_threads(1)
    layer = load_runtime(None, "cpu", None, None, stored_blocks=True).model.layers[0]
    mats = {"qkv": layer.attn.qkv, "o": layer.attn.o, "gate_up": layer.mlp.gate_up, "down": layer.mlp.down}
    print(f"kernel at {a.before} vs this tree, one thread, {a.rounds} alternating rounds, {os.cpu_count()} cores")
    for T in a.tokens:
        repeats = max(1, 400 // T)
        for name, m in mats.items():
            x = torch.randn(T, m.in_features)
            ys, ms = {}, {"before": [], "now": []}
            for r in range(a.rounds):
                for k in ("before", "now") if r % 2 == 0 else ("now", "before"):
                    y = torch.empty(T, m.out_features)
                    t = time.perf_counter()
                    for _ in range(repeats):
                        libs[k].gguf_linear(x.data_ptr(), T, m.in_features, m.args.n, *m.args.args, y.data_ptr(), 1)
                    ms[k].append((time.perf_counter() - t) / repeats * 1000)
                    ys[k] = y
            ratio = statistics.median(b / n for b, n in zip(ms["before"], ms["now"], strict=True))
            print(
                f"T {T:4d} {name:8s} {'/'.join(dict.fromkeys(m.types)):10s} bit-equal {torch.equal(ys['before'], ys['now'])} "
                f"before {statistics.median(ms['before']):.3f} ms now {statistics.median(ms['now']):.3f} ms "
                f"speedup {ratio:.2f}x load {os.getloadavg()[0]:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

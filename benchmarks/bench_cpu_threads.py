"""Decode of the README's first command on 1 and 2 threads: llmarch trees side by side with llama.cpp.

    python benchmarks/bench_cpu_threads.py [--tree PATH ...] [--threads 1 2] [--rounds 5] [--tokens 64] [--json OUT]

Each round runs, per thread count (OMP_NUM_THREADS for llmarch, n_threads for llama.cpp), every
--tree's `llmarch run --prompt "Once upon a time" -n TOKENS --ignore-eos --json` (the embedded Gemma 3
270M, default CPU path) and llama-cpp-python on the same bytes with the same prompt, each in its own
process; the order alternates between rounds so that a busy machine slows each alike. Decode tok/s:
llmarch's own report, llama.cpp's perf counters. Reported: the median of the rounds, and the median
of each round's ratio to the llama.cpp run of the same thread count, with the 1-minute load average
of every round (on a shared machine a second thread helps or hurts depending on what else runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_gguf_blocks_cpu import LLAMA_SCRIPT  # noqa: E402
from bench_run_cpu import PROMPT  # noqa: E402


def llmarch_run(tree: Path, threads: int, tokens: int) -> float:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "llmarch", "run", "--prompt", PROMPT, "-n", str(tokens), "--ignore-eos", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/", timeout=900)
    if r.returncode:
        raise SystemExit(f"llmarch run failed ({tree}): {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["decode_tok_s"]


def llama_run(path: str, threads: int, tokens: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    r = subprocess.run(
        [sys.executable, "-c", LLAMA_SCRIPT, path, str(tokens), str(threads), PROMPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if r.returncode:
        raise SystemExit(f"llama.cpp failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["decode_tok_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", action="append", help="llmarch checkout (default: this one); repeat to compare")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json")
    a = ap.parse_args()
    from llmarch.default_model import default_model_path

    gguf = str(default_model_path())
    trees = [Path(t).resolve() for t in (a.tree or [str(ROOT)])]
    names = [str(t) for t in trees] + ["llama.cpp"]
    for tree in trees:  # warm-up: pages, kernels, the saved plan
        llmarch_run(tree, 1, 8)
    llama_run(gguf, 1, 8)
    runs: dict = {(n, k): [] for n in names for k in a.threads}
    loads = []
    for rnd in range(a.rounds):
        load = os.getloadavg()[0]
        loads.append(load)
        order = names if rnd % 2 == 0 else names[::-1]
        line = []
        for k in a.threads:
            for n in order:
                v = llama_run(gguf, k, a.tokens) if n == "llama.cpp" else llmarch_run(Path(n), k, a.tokens)
                runs[n, k].append(v)
                line.append(f"{Path(n).name} x{k} {v:.1f}")
        print(f"round {rnd} (load {load:.2f}): {'; '.join(line)}", flush=True)
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_1min": loads, "tokens": a.tokens}
    out["machine"] = f"{os.cpu_count()} cores, {os.uname().machine}"
    out["results"] = {}
    for n in names:
        for k in a.threads:
            vals, ref = runs[n, k], runs["llama.cpp", k]
            ratio = statistics.median(v / r for v, r in zip(vals, ref))
            print(
                f"{n} x{k}: median {statistics.median(vals):.1f} tok/s ({min(vals):.1f}-{max(vals):.1f}), per-round vs llama.cpp {ratio:.2f}x"
            )
            out["results"][f"{n} x{k}"] = {
                "tok_s": vals,
                "median": statistics.median(vals),
                "vs_llama_per_round": ratio,
            }
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

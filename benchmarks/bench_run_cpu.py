"""CPU decode speed and memory of `llmarch run` on Gemma 3 270M Q4_K_M vs transformers, one run.

    python benchmarks/bench_run_cpu.py [--tokens 64] [--rounds 2] [--threads N]

Each configuration runs in its own process (so peak RSS is its own), the rounds interleaved so
that a busy machine slows every configuration alike; the best round of each is reported.
transformers loads the same GGUF (dequantized to float32) and generates greedily; llmarch runs its
default (the GGUF's stored blocks), --dtype float32 and its own int8 / int4 blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"

HF_SCRIPT = r"""
import json, resource, sys, time, torch, transformers
path, n = sys.argv[1], int(sys.argv[2])
from pathlib import Path
p = Path(path)
tok = transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
model = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
ids = tok(sys.argv[3], return_tensors="pt")["input_ids"]
def gen(k):
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False)
    return time.perf_counter() - t, out
gen(2)
t1, _ = gen(1)
tn, out = gen(n)
print(json.dumps({"decode_tok_s": (n - 1) / (tn - t1), "prefill_tok_s": ids.shape[1] / t1,
                  "tokens": out[0, ids.shape[1]:].tolist(),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def env(threads: int | None) -> dict:
    e = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    if threads:
        e["OMP_NUM_THREADS"] = str(threads)
    return e


def run_llmarch(path: str, n: int, extra: list[str], threads) -> dict:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmarch",
            "run",
            path,
            "--prompt",
            PROMPT,
            "-n",
            str(n),
            "--ignore-eos",
            "--json",
            "--device",
            "cpu",
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env(threads),
        timeout=900,
    )
    if r.returncode:
        raise SystemExit(f"llmarch run failed: {r.stderr}")
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    m = re.search(r"peak RSS (\d+) MiB", r.stderr)
    doc["peak_rss_mib"] = float(m.group(1)) if m else None
    return doc


def run_script(script: str, args: list[str], threads, what: str, timeout: int) -> dict:
    """A peer engine's timing script in its own process (so its peak RSS is its own): the JSON
    object on its last line of output."""
    r = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env=env(threads),
        timeout=timeout,
    )
    if r.returncode:
        raise SystemExit(f"{what} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_hf(path: str, n: int, threads) -> dict:
    return run_script(HF_SCRIPT, [path, str(n), PROMPT], threads, "transformers", 1800)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every process")
    ap.add_argument("--json")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from llmarch.default_model import default_model_path

    path = str(default_model_path())
    configs = {
        "transformers fp32": lambda: run_hf(path, a.tokens, a.threads),
        "llmarch --dtype float32 (dequantized)": lambda: run_llmarch(path, a.tokens, ["--dtype", "float32"], a.threads),
        "llmarch default (stored GGUF blocks)": lambda: run_llmarch(path, a.tokens, [], a.threads),
        "llmarch --keep-quantized int8": lambda: run_llmarch(
            path, a.tokens, ["--keep-quantized", "--quant-bits", "8"], a.threads
        ),
        "llmarch --keep-quantized int4": lambda: run_llmarch(
            path, a.tokens, ["--keep-quantized", "--quant-bits", "4"], a.threads
        ),
    }
    best: dict[str, dict] = {}
    for rnd in range(a.rounds):
        for name, fn in configs.items():
            r = fn()
            print(
                f"round {rnd}: {name}: decode {r['decode_tok_s']:.2f} tok/s, peak RSS {r['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
            if name not in best or r["decode_tok_s"] > best[name]["decode_tok_s"]:
                best[name] = r
    hf = best["transformers fp32"]
    load = os.getloadavg()
    print(f"\nGemma 3 270M Q4_K_M, CPU ({os.cpu_count()} cores, load average {load[0]:.1f}), {a.tokens} tokens greedy")
    print(f"{'configuration':38s} {'decode tok/s':>12s} {'vs HF':>6s} {'peak RSS':>9s}  same tokens as HF")
    for name, r in best.items():
        same = r["tokens"] == hf["tokens"]
        print(
            f"{name:38s} {r['decode_tok_s']:12.2f} {r['decode_tok_s'] / hf['decode_tok_s']:5.2f}x "
            f"{r['peak_rss_mib']:7.0f}MiB  {same}"
        )
    if a.json:
        Path(a.json).write_text(json.dumps({"load_average": load, "results": best}, indent=2))


if __name__ == "__main__":
    main()

"""CPU decode of the embedded Gemma 3 270M Q4_K_M: llmarch's three weight paths and llama.cpp, one run.

    python benchmarks/bench_gguf_blocks_cpu.py [--tokens 64] [--rounds 3] [--threads 1 2] [--json OUT]
                                               [--only NAME ...] [--no-drift] [--prefill 128 512]

--prefill N ...: instead, prefill alone on prompts of N tokens (the same ids for both engines), the
stored-block model in one process per round: the C prefill (cpu_plan.prefill, chunks of 128 rows)
and the module path (the Generator's chunks of PREFILL_CHUNK; matmuls over more than 128 rows
dequantize for a float GEMM), each after a warm-up prefill; llama.cpp's evaluation of the same ids
(Llama.eval, batches of 512 as llama-bench's ppN, wall clock), after a warm-up. Rounds alternate; the median
of the rounds and of each round's ratio to llama.cpp are reported with the load average.

Per thread count, each round runs in turn (its own process, so peak RSS is its own): llmarch
--dtype float32 (dequantized float32), llmarch --keep-quantized --quant-bits 8 (every matrix
requantized to llmarch's own int8 blocks), llmarch's default (the GGUF's stored blocks,
gguf_matmul), and llama.cpp through llama-cpp-python on the same file, same prompt, same number of greedy tokens.
Decode tok/s: llmarch's own clock (steps after the prefill); llama.cpp's perf counters (t_eval_ms
over n_eval, its prompt evaluation apart). Rounds alternate so that a busy machine slows every
configuration alike; the median of the rounds is reported with its ratio to llama.cpp's median,
and the median of each round's own ratio to the llama.cpp run that follows it ("per round"); the
load average is recorded at each round.

Drift: greedy tokens of each llmarch path against the float32 path's and llama.cpp's (how many of
the first --tokens are equal), and top-1 agreement teacher-forced over the float32 continuation
(against the float32 forward) and over llama.cpp's continuation (against llama.cpp's own tokens),
which does not stop counting at the first near-tie.
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
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_run_cpu import PROMPT, run_llmarch, run_script  # noqa: E402

LLAMA_SCRIPT = r"""
import json, resource, sys
from llama_cpp import Llama, llama_perf_context, llama_perf_context_reset
path, n, threads, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
ids = llm.tokenize(prompt.encode(), add_bos=True)
def gen(k):
    llm.reset()  # no KV-cache reuse of the previous prompt: the prompt is evaluated every time
    llama_perf_context_reset(llm._ctx.ctx)
    out = []
    for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(t)
        if len(out) == k:
            break
    d = llama_perf_context(llm._ctx.ctx)
    return d, out
gen(8)  # warm-up
d, out = gen(n)
print(json.dumps({"decode_tok_s": d.n_eval / (d.t_eval_ms / 1000), "prefill_tok_s": d.n_p_eval / max(d.t_p_eval_ms / 1000, 1e-9),
                  "tokens": out, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

PREFILL_IDS = r"""
def prompt_ids(n):  # the same ids for both engines: BOS, then spread over the first 20k tokens
    return [2] + [100 + (i * 7919) % 20000 for i in range(n - 1)]
"""

LLAMA_PREFILL_SCRIPT = (
    PREFILL_IDS
    + r"""
import json, sys, time
from llama_cpp import Llama
path, threads, ns = sys.argv[1], int(sys.argv[2]), [int(n) for n in sys.argv[3:]]
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=max(ns) + 8, n_batch=512,
            verbose=False)
def pp(n):  # wall clock: after llm.eval alone its perf counters read 1 token in 0 ms (0.3.36)
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt_ids(n))  # decodes in batches of n_batch, the last token's logits out
    return n / (time.perf_counter() - t)
pp(8)  # warm-up
print(json.dumps({str(n): pp(n) for n in ns}))
"""
)

LLMARCH_PREFILL_SCRIPT = (
    PREFILL_IDS
    + r"""
import json, sys, time, torch
from llmarch.runtime.generate import PREFILL_CHUNK, Generator
from llmarch.runtime.load import load_runtime
path, ns = sys.argv[1], [int(n) for n in sys.argv[2:]]
rt = load_runtime(path, "cpu", None, None, stored_blocks=True)
gen = Generator(rt, max(ns) + 8)
assert gen.cpu_step is not None
def c_prefill(ids):
    gen.cpu_step.prefill(ids, 0)
def module(ids):
    for i in range(0, ids.shape[1], PREFILL_CHUNK):
        chunk = ids[:, i : i + PREFILL_CHUNK]
        gen.model(chunk, torch.arange(i, i + chunk.shape[1]), gen.cache, limit=i + chunk.shape[1])
def timed(f, n):
    ids = torch.tensor([prompt_ids(n)])
    gen.cache.reset()
    t = time.perf_counter()
    f(ids)
    return n / (time.perf_counter() - t)
out = {}
with torch.inference_mode():
    timed(c_prefill, 8), timed(module, 8)  # warm-up: every weight page touched
    for n in ns:
        out[str(n)] = {"C prefill": timed(c_prefill, n), "module path": timed(module, n)}
print(json.dumps(out))
"""
)


def prefill_rounds(path: str, ns: list[int], rounds: int, threads_list: list[int]) -> dict:
    """Prefill alone (see the module docstring): {threads_T: {load_average, table}}."""
    results = {}
    for threads in threads_list:
        runs: dict[str, list[dict]] = {"llmarch": [], "llama.cpp": []}
        loads = []
        for rnd in range(rounds):
            loads.append(os.getloadavg()[0])
            order = ["llmarch", "llama.cpp"] if rnd % 2 == 0 else ["llama.cpp", "llmarch"]
            for who in order:
                if who == "llmarch":
                    runs[who].append(run_script(LLMARCH_PREFILL_SCRIPT, [path, *map(str, ns)], threads, who, 900))
                else:
                    runs[who].append(
                        run_script(LLAMA_PREFILL_SCRIPT, [path, str(threads), *map(str, ns)], threads, who, 900)
                    )
            line = ", ".join(
                f"pp{n}: C {runs['llmarch'][-1][str(n)]['C prefill']:.1f} module "
                f"{runs['llmarch'][-1][str(n)]['module path']:.1f} llama.cpp {runs['llama.cpp'][-1][str(n)]:.1f}"
                for n in ns
            )
            print(f"threads {threads} round {rnd} (load {loads[-1]:.1f}): {line}", flush=True)
        loads.append(os.getloadavg()[0])
        print(f"\nprefill tok/s, threads {threads}, load average {min(loads):.1f}-{max(loads):.1f}, {rounds} rounds")
        print(f"{'prompt':>7s} {'configuration':24s} {'median':>8s} {'vs llama.cpp':>12s} {'per round':>9s}")
        table: dict = {}
        for n in ns:
            llama = [r[str(n)] for r in runs["llama.cpp"]]
            rows = {k: [r[str(n)][k] for r in runs["llmarch"]] for k in ("C prefill", "module path")}
            rows["llama.cpp"] = llama
            for name, vals in rows.items():
                per_round = [v / ll for v, ll in zip(vals, llama, strict=True)]
                med = statistics.median(vals)
                table[f"pp{n} {name}"] = {
                    "tok_s": vals,
                    "median": med,
                    "vs_llama": med / statistics.median(llama),
                    "vs_llama_per_round_median": statistics.median(per_round),
                }
                print(
                    f"{n:7d} {name:24s} {med:8.1f} {med / statistics.median(llama):11.2f}x "
                    f"{statistics.median(per_round):8.2f}x"
                )
        results[f"prefill_threads_{threads}"] = {"load_average": loads, "table": table}
    return results


CONFIGS = {
    "llmarch --dtype float32 (dequantized fp32)": ["--dtype", "float32"],
    "llmarch --keep-quantized --quant-bits 8 (requantized)": ["--keep-quantized", "--quant-bits", "8"],
    "llmarch default (stored blocks)": [],
}
FP32 = "llmarch --dtype float32 (dequantized fp32)"
LLAMA = "llama.cpp (llama-cpp-python 0.3.36)"


def run_llama(path: str, n: int, threads: int) -> dict:
    return run_script(LLAMA_SCRIPT, [path, str(n), str(threads), PROMPT], threads, "llama.cpp", 900)


def teacher_forced(float_tokens: list[int], llama_tokens: list[int], threads: int) -> dict:
    """Top-1 agreement, teacher-forced: (1) each quantized path's decode steps against the float32
    forward of the prompt plus the float32 path's greedy continuation (float32 logits from the
    stored-block model's dequantize + GEMM path, i.e. the float32 weights); (2) each path's top-1
    against llama.cpp's own next token over the prompt plus llama.cpp's greedy continuation."""
    import torch

    from llmarch.api import load_checkpoint_spec
    from llmarch.runtime.kv_cache import KVCache
    from llmarch.runtime.load import load_runtime
    from llmarch.runtime.tokenizer import load_tokenizer

    torch.set_num_threads(threads)
    ckpt, spec = load_checkpoint_spec(None)
    prompt = load_tokenizer(ckpt).encode(PROMPT)
    p = len(prompt)
    a = spec.attention

    from llmarch.runtime import gguf_matmul

    def forward(rt, cont: list[int], step: bool) -> torch.Tensor:
        ids = torch.tensor([prompt + cont[:-1]])
        n = ids.shape[1]
        c = KVCache(spec.schedule, n, a.kv_heads, a.head_dim, a.v_head_dim or a.head_dim, rt.dtype, rt.device)
        rt.model.setup(n, rt.device, rt.dtype)
        with torch.no_grad():
            if not step:  # MAX_ROWS 0: every stored-block matrix dequantized, float activations
                keep, gguf_matmul.MAX_ROWS = gguf_matmul.MAX_ROWS, 0
                try:
                    return rt.model(ids, torch.arange(n), c, limit=n, last_only=False)[0][p - 1 :]
                finally:
                    gguf_matmul.MAX_ROWS = keep
            out = [rt.model(ids[:, :p], torch.arange(p), c, limit=p)[0]]
            out += [rt.model(ids[:, i : i + 1], torch.tensor([i]), c, limit=i + 1)[0] for i in range(p, n)]
            return torch.cat(out)

    def score(got: torch.Tensor, want: torch.Tensor) -> str:
        return f"{int((got.argmax(-1) == want).sum())}/{len(want)}"

    llama = torch.tensor(llama_tokens)
    stored = load_runtime(None, "cpu", None, 8, stored_blocks=True)
    ref = forward(stored, float_tokens, False).argmax(-1)
    vs_fp32 = {"stored blocks": score(forward(stored, float_tokens, True), ref)}
    vs_llama = {"fp32": score(forward(stored, llama_tokens, False), llama)}
    vs_llama["stored blocks"] = score(forward(stored, llama_tokens, True), llama)
    del stored
    requant = load_runtime(None, "cpu", None, 8)
    vs_fp32["requantized int8"] = score(forward(requant, float_tokens, True), ref)
    vs_llama["requantized int8"] = score(forward(requant, llama_tokens, True), llama)
    return {"vs_fp32_continuation": vs_fp32, "vs_llama_cpp_continuation": vs_llama}


def same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-drift", action="store_true", help="skip the teacher-forced agreement")
    ap.add_argument("--only", nargs="+", help="run only the llmarch configurations whose name contains one of these")
    ap.add_argument("--json")
    ap.add_argument("--prefill", type=int, nargs="+", help="prefill alone on prompts of these lengths")
    a = ap.parse_args()
    from llmarch.default_model import default_model_path

    path = str(default_model_path())
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    results: dict = {
        "machine": f"{os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit.stdout.strip(),
    }
    if a.prefill:
        results.update(prefill_rounds(path, a.prefill, a.rounds, a.threads))
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=2))
        return
    configs = {k: v for k, v in CONFIGS.items() if not a.only or any(o in k for o in a.only)}
    for threads in a.threads:
        runs: dict[str, list[dict]] = {name: [] for name in [*configs, LLAMA]}
        loads = []
        for rnd in range(a.rounds):
            loads.append(os.getloadavg()[0])
            for name, extra in configs.items():
                runs[name].append(run_llmarch(path, a.tokens, extra, threads))
            runs[LLAMA].append(run_llama(path, a.tokens, threads))
            line = ", ".join(f"{k.split(' (')[0]} {v[-1]['decode_tok_s']:.1f}" for k, v in runs.items())
            print(f"threads {threads} round {rnd} (load {loads[-1]:.1f}): {line}", flush=True)
        loads.append(os.getloadavg()[0])
        llama = statistics.median(r["decode_tok_s"] for r in runs[LLAMA])
        fp32 = runs[FP32][0]["tokens"] if FP32 in runs else None  # not run under --only without float32
        print(f"\nthreads {threads}, load average {min(loads):.1f}-{max(loads):.1f}, {a.tokens} greedy tokens")
        print(
            f"{'configuration':55s} {'decode tok/s':>12s} {'vs llama.cpp':>12s} {'per round':>9s} {'peak RSS':>9s}"
            "  tokens = fp32 / llama.cpp"
        )
        table = {}
        for name, rs in runs.items():
            med = statistics.median(r["decode_tok_s"] for r in rs)
            rss = max(r["peak_rss_mib"] for r in rs)
            same = same_prefix(rs[0]["tokens"], fp32) if fp32 is not None else None
            same_llama = same_prefix(rs[0]["tokens"], runs[LLAMA][0]["tokens"])
            table[name] = {"decode_tok_s": [r["decode_tok_s"] for r in rs], "median": med, "peak_rss_mib": rss}
            table[name]["prefill_tok_s_median"] = statistics.median(r["prefill_tok_s"] for r in rs)
            table[name]["vs_llama"] = med / llama
            # each round's ratio to the llama.cpp run right after it: a busy machine's load drifts
            # less within a round than across rounds
            per_round = [r["decode_tok_s"] / l["decode_tok_s"] for r, l in zip(rs, runs[LLAMA], strict=True)]
            table[name]["vs_llama_per_round"] = per_round
            table[name]["vs_llama_per_round_median"] = statistics.median(per_round)
            table[name]["same_prefix_as_fp32"] = same
            table[name]["same_prefix_as_llama_cpp"] = same_llama
            print(
                f"{name:55s} {med:12.2f} {med / llama:11.2f}x {statistics.median(per_round):8.2f}x {rss:7.0f}MiB"
                f"  first {'-' if same is None else same:>2} / {same_llama:2d}"
            )
        results[f"threads_{threads}"] = {"load_average": loads, "table": table}
    if FP32 not in configs and not a.no_drift:
        print("teacher-forced agreement skipped: it needs the float32 configuration's tokens")
    elif not a.no_drift:
        tokens = runs[FP32][0]["tokens"]
        drift = teacher_forced(tokens, runs[LLAMA][0]["tokens"], min(a.threads))
        results["teacher_forced_top1"] = drift
        print(f"teacher-forced top-1 agreement over {len(tokens)} tokens: {drift}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

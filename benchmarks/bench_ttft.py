"""Time to first token and peak RSS of the README's first command, split by phase.

    python benchmarks/bench_ttft.py [--rounds 5] [--tree PATH ...] [--llama-cpp] [--first-run] [--json OUT]

Runs `llmarch run --prompt "Once upon a time" -n 40` (the embedded Gemma 3 270M, default CPU path)
in its own process, once as a warm-up (the model's pages and the caches warm), then --rounds times.
Time to first token is measured from outside: from just before the process is spawned to the
first byte of generated text on its stdout. Inside, the process is the real command with a few
functions wrapped to note the clock and /proc/self/status (VmRSS, VmHWM) where each phase ends:
python start-up, the CLI's imports, the run's imports (torch), the GGUF header, the tokenizer,
the weights, the model's set-up (KV cache), the prefill and first token, the decode. Peak RSS is
the kernel's (wait4's ru_maxrss). Each round also times a bare `python -c "import torch"`, the floor
that any torch-based run pays.

--first-run: every llmarch run (the warm-up's too) gets a LLMARCH_CACHE of its own with no saved
decode plan in it, so each is a first run of the GGUF; the C kernels the warm-up compiled and its
check of the embedded model's chunks (once per install, both) are copied in, so that what is timed
is the run with the model's pages warm, not a compiler.

With several --tree (checkouts of llmarch, e.g. a git worktree of an older commit), the rounds
alternate between them, so a busy machine slows each alike, and the medians are compared.
The 1-minute load average is recorded at every round.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA = "llama.cpp"
COMMAND = ["run", "--prompt", "Once upon a time", "-n", "40"]

# both children start by noting each phase boundary: the clock, VmRSS and VmHWM
MARKS = r"""
import sys, time
marks = []
def mark(name):
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                vals[k] = int(v.split()[0]) / 1024
    marks.append([name, time.monotonic(), vals["VmRSS"], vals["VmHWM"]])
mark("python started")
"""

# the child: the real `llmarch run`, with its phase boundaries noted
TRACE = (
    MARKS
    + r"""
out_path = sys.argv[1]
sys.argv = ["llmarch", *sys.argv[2:]]
import llmarch, llmarch.cli, llmarch.api, llmarch.runtime.tokenizer as tk
mark("cli imported")

def wrap(owner, name, before, after):
    fn = getattr(owner, name)
    def wrapped(*a, **k):
        if before:
            mark(before)
        r = fn(*a, **k)
        mark(after)
        return r
    setattr(owner, name, wrapped)

def traced_generate(first):
    # generate(self, prompt, max_tokens, *rest, on_token) with set-up, first-token and end marks
    def generate(self, prompt, max_tokens, *rest):
        mark("model set up")  # after the load's own trim of the freed heap
        *rest, on_token = rest
        seen = []
        def on(t):
            if not seen:
                seen.append(1)
                mark("first token")
            on_token(t)
        r = first(self, prompt, max_tokens, *rest, on if on_token else None)
        mark("decode done")
        return r
    return generate

def torch_phases():
    # the run has imported its runtime (torch) by now: wrap the later phases
    import llmarch.runtime.model as model, llmarch.runtime.generate as gen
    wrap(model, "build_model", "weights start", "model built")
    wrap(model, "load_weights", None, "weights loaded")
    gen.Generator.generate = traced_generate(gen.Generator.generate)

import llmarch.runtime.run as run_mod
if hasattr(run_mod, "_torch_device"):  # a tree whose run may decode from a saved plan without torch
    import llmarch.runtime.native_run as native
    chosen = run_mod._torch_device
    def torch_device(o):
        r = chosen(o)
        mark("torch imported")
        torch_phases()
        return r
    run_mod._torch_device = torch_device
    wrap(native, "open_decoder", "weights start", "weights loaded")  # the plan read, its buffers allocated
    try:  # a tree that builds a first run's plan without torch
        import llmarch.runtime.plan_build as plan_build
        wrap(plan_build, "build", "plan build start", "plan built")
    except ImportError:
        pass
    native.NativeDecoder.generate = traced_generate(native.NativeDecoder.generate)
    wrap(tk, "load_tokenizer", "tokenizer start", "tokenizer built")
else:  # older trees import torch before reading the header
    def tokenizer_called(fn):
        def wrapped(*a, **k):
            torch_phases()
            mark("tokenizer start")
            r = fn(*a, **k)
            mark("tokenizer built")
            return r
        return wrapped
    tk.load_tokenizer = tokenizer_called(tk.load_tokenizer)
wrap(llmarch.api, "load_checkpoint_spec", "run imports done", "header read")
code = 0
try:
    llmarch.cli.main()
except SystemExit as e:
    code = e.code or 0
finally:
    mark("exit")
    import json
    with open(out_path, "w") as f:
        json.dump({"marks": marks, "llmarch": llmarch.__file__, "modules": sorted(sys.modules)}, f)
sys.exit(code)
"""
)

# llama.cpp (llama-cpp-python) on the same bytes (the joined .gguf), the same prompt, greedy, its own
# process: the same phases where it has them (its tokenizer is part of the model load)
LLAMA_TRACE = (
    MARKS
    + r"""
mark("cli imported")
out_path, path, threads, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
from llama_cpp import Llama
mark("run imports done")
mark("weights start")
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
mark("weights loaded")
mark("tokenizer start")
ids = llm.tokenize(prompt.encode(), add_bos=True)
mark("tokenizer built")
mark("model set up")
out = []
for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
    if not out:
        mark("first token")
        sys.stdout.write(llm.detokenize([t]).decode(errors="replace"))
        sys.stdout.flush()
    out.append(t)
    if len(out) == n:
        break
mark("decode done")
sys.stdout.write(llm.detokenize(out[1:]).decode(errors="replace") + "\n")
import json
with open(out_path, "w") as f:
    json.dump({"marks": marks, "llmarch": "llama.cpp", "modules": sorted(sys.modules)}, f)
"""
)

PHASES = [  # (label, from mark, to mark)
    ("python start-up", "spawn", "python started"),
    ("CLI imports", "python started", "cli imported"),
    ("run imports (torch; llama_cpp)", "cli imported", "run imports done"),
    ("GGUF header", "run imports done", "header read"),
    ("tokenizer", "tokenizer start", "tokenizer built"),
    ("decode plan built (no torch)", "plan build start", "plan built"),
    ("weights", "weights start", "weights loaded"),
    ("model set-up (KV cache)", "weights loaded", "model set up"),
    ("prefill + first token", "model set up", "first token"),
    ("time to first token", "spawn", "first token"),
]
RSS_AT = ["cli imported", "run imports done", "header read", "tokenizer built", "weights start", "model built"]
RSS_AT += ["weights loaded", "model set up", "first token", "decode done"]


def child_env(tree: Path) -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(tree))
    e.pop("PYTHONDONTWRITEBYTECODE", None)  # compiled modules cached (the warm-up writes them), as an install has
    return e


def first_run_cache(warm: Path | None) -> Path:
    """A new LLMARCH_CACHE without plans: the compiled kernels and the embedded model's chunk check
    of `warm` (a cache a run has used) copied in."""
    import shutil

    cache = Path(tempfile.mkdtemp(prefix="llmarch-first-run-"))
    for kind in ("kernels", "default-model"):
        if warm is not None and (warm / kind).is_dir():
            shutil.copytree(warm / kind, cache / kind)
    return cache


def run_once(tree: Path, llama: tuple[str, int] | None = None, cache: Path | None = None) -> dict:
    """One traced run: marks (seconds from spawn, RSS MiB, HWM MiB), outside TTFT, peak RSS.
    llama: (the joined .gguf, threads) to run llama.cpp's instead of llmarch's; cache: its LLMARCH_CACHE."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "marks.json"
        prompt, n = COMMAND[2], COMMAND[4]
        args = [LLAMA_TRACE, str(out), llama[0], str(llama[1]), prompt, n] if llama else [TRACE, str(out), *COMMAND]
        t0 = time.monotonic()
        p = subprocess.Popen(
            [sys.executable, "-c", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**child_env(tree), **({"LLMARCH_CACHE": str(cache)} if cache else {})},
            cwd=tmp,  # not the checkout: `python -c` puts the working folder first on sys.path
        )
        assert p.stdout is not None and p.stderr is not None
        first = p.stdout.read(1)
        t_first = time.monotonic()
        text = first + p.stdout.read()
        err = p.stderr.read()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode:
            raise SystemExit(f"llmarch run failed ({tree}): {err.decode(errors='replace')[-2000:]}")
        doc = json.loads(out.read_text())
    marks = {name: {"s": t - t0, "rss": rss, "hwm": hwm} for name, t, rss, hwm in doc["marks"]}
    marks["spawn"] = {"s": 0.0, "rss": 0.0, "hwm": 0.0}
    heavy = [m for m in ("transformers", "jinja2", "rich", "huggingface_hub", "torch._dynamo", "torch._inductor")]
    return {
        "ttft_outside_s": t_first - t0,
        "marks": marks,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "text": text.decode(errors="replace").strip(),
        "summary": (err.decode(errors="replace").strip().splitlines() or [""])[-1],
        "threads": int(m.group(1)) if (m := re.search(r"(\d+) CPU thread", err.decode(errors="replace"))) else None,
        "llmarch": doc["llmarch"],
        "imported": [m for m in heavy if m in doc["modules"]],
    }


def torch_import_s(tree: Path) -> tuple[float, float]:
    """A bare `import torch`: (seconds, peak RSS MiB)."""
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-c", "import torch"], env=child_env(tree), cwd="/")
    _, _, usage = os.wait4(p.pid, 0)
    p.returncode = 0
    return time.monotonic() - t0, usage.ru_maxrss / 1024


def phases(r: dict) -> dict:
    m = r["marks"]
    got = {label: m[b]["s"] - m[a]["s"] for label, a, b in PHASES if a in m and b in m}
    got["time to first token, outside"] = r["ttft_outside_s"]
    return got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tree", action="append", help="llmarch checkout to run (default: this one); repeat to compare")
    ap.add_argument("--llama-cpp", action="store_true", help="also llama-cpp-python on the same bytes, each round")
    ap.add_argument("--first-run", action="store_true", help="no saved decode plan: each run a GGUF's first")
    ap.add_argument("--json")
    a = ap.parse_args()
    trees = [Path(t).resolve() for t in (a.tree or [str(ROOT)])]

    def commit(tree: Path) -> str:
        if (tree / "COMMIT").is_file():  # an exported tree (git archive) says which commit it is
            return (tree / "COMMIT").read_text().strip()
        r = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "llmarch"], capture_output=True)
        return r.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")

    results: dict = {
        "machine": f"{os.cpu_count()} cores, {os.uname().machine}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "llmarch " + " ".join(COMMAND),
        "first_run": a.first_run,
        "trees": {str(t): commit(t) for t in trees},
        "rounds": [],
    }
    names = [str(t) for t in trees]
    gguf = None
    if a.llama_cpp:
        from importlib.metadata import version

        from llmarch.default_model import default_model_path

        gguf = str(default_model_path())  # the same bytes as the package's chunks, joined
        names.append(LLAMA)
        results["trees"][LLAMA] = f"llama-cpp-python {version('llama-cpp-python')} on {gguf}"
    import shutil

    warm: Path | None = None
    caches: list[Path] = []

    def cache() -> Path | None:
        """--first-run: a plan-less LLMARCH_CACHE for the next run (removed at the end)."""
        if not a.first_run:
            return None
        caches.append(first_run_cache(warm))
        return caches[-1]

    for tree in trees:  # warm-up: pages, kernel and tokenizer caches
        w = run_once(tree, cache=cache())
        warm = warm or caches[-1] if caches else None
        print(f"warm-up {tree}: {w['llmarch']}; text: {w['text'][:60]!r}...", flush=True)
    if gguf:
        w = run_once(trees[0], (gguf, w["threads"] or 1))
        print(f"warm-up llama.cpp; text: {w['text'][:60]!r}...", flush=True)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    torch_s: list[float] = []
    torch_rss: list[float] = []
    for rnd in range(a.rounds):
        load = os.getloadavg()[0]
        order = trees if rnd % 2 == 0 else trees[::-1]
        line = []
        for tree in order:
            r = run_once(tree, cache=cache())
            r["load_1min"] = load
            runs[str(tree)].append(r)
            line.append(f"{tree.name}: ttft {r['ttft_outside_s']:.2f} s, peak RSS {r['peak_rss_mib']:.0f} MiB")
        if gguf:  # with the thread count llmarch's run chose in this round
            r = run_once(trees[0], (gguf, r["threads"] or 1))
            r["load_1min"] = load
            runs[LLAMA].append(r)
            line.append(f"llama.cpp: ttft {r['ttft_outside_s']:.2f} s, peak RSS {r['peak_rss_mib']:.0f} MiB")
        s, rss = torch_import_s(trees[0])
        torch_s.append(s)
        torch_rss.append(rss)
        results["rounds"].append({"load_1min": load, "import_torch_s": s})
        print(f"round {rnd} (load {load:.2f}): {'; '.join(line)}; bare import torch {s:.2f} s", flush=True)
    print(f"\nbare `import torch`: median {statistics.median(torch_s):.2f} s, {statistics.median(torch_rss):.0f} MiB")
    results["import_torch"] = {"median_s": statistics.median(torch_s), "peak_rss_mib": statistics.median(torch_rss)}
    results["results"] = {}
    for tree in names:
        rs = runs[tree]
        labels = list(phases(rs[0]))
        med = {k: statistics.median(phases(r)[k] for r in rs) for k in labels}
        rss = {k: statistics.median(r["marks"][k]["rss"] for r in rs) for k in RSS_AT if k in rs[0]["marks"]}
        hwm = {k: statistics.median(r["marks"][k]["hwm"] for r in rs) for k in RSS_AT if k in rs[0]["marks"]}
        peak = statistics.median(r["peak_rss_mib"] for r in rs)
        print(f"\n{tree} ({results['trees'][tree]}), median of {len(rs)}:")
        for k, v in med.items():
            print(f"  {k:32s} {v:6.2f} s")
        print(f"  {'after':32s} {'RSS MiB':>8s} {'peak so far':>12s}")
        for k in rss:
            print(f"  {k:32s} {rss[k]:8.0f} {hwm[k]:12.0f}")
        print(f"  peak RSS (wait4) {peak:.0f} MiB; imported: {rs[0]['imported'] or 'none of the heavy optional ones'}")
        print(f"  {rs[0]['summary']}")
        results["results"][tree] = {
            "commit": results["trees"][tree],
            "median_s": med,
            "rss_mib_after": rss,
            "peak_mib_after": hwm,
            "peak_rss_mib": peak,
            "ttft_outside_s": [r["ttft_outside_s"] for r in rs],
            "peak_rss_mib_each": [r["peak_rss_mib"] for r in rs],
            "load_1min": [r["load_1min"] for r in rs],
            "imported": rs[0]["imported"],
            "text": rs[0]["text"],
            "summary": rs[0]["summary"],
            "threads": [r["threads"] for r in rs],
        }
    if len(trees) > 1:
        base = runs[str(trees[0])]
        for tree in trees[1:]:
            other = runs[str(tree)]
            ratio = [o["ttft_outside_s"] / b["ttft_outside_s"] for b, o in zip(base, other)]
            print(
                f"\n{tree.name} / {trees[0].name} time to first token, paired by round: median {statistics.median(ratio):.2f}"
            )
            results["results"][str(tree)]["ttft_ratio_to_first_tree"] = ratio
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    for c in caches:
        shutil.rmtree(c, ignore_errors=True)


if __name__ == "__main__":
    main()

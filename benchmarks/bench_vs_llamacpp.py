"""llmarch vs llama.cpp (CUDA) on the same random weights, decode and prefill, in one run.

    python benchmarks/bench_vs_llamacpp.py --llama-src llama_cpp_python-0.3.36.tar.gz --json OUT.json
    python benchmarks/bench_vs_llamacpp.py --device cpu --tiny --dry-run    # every CPU-side step, small

One run does all of it, so both engines see the same machine in the same minutes:
1. builds llama.cpp's llama-bench with CUDA (sm_90) from source in the background: the
   llama-cpp-python sdist carries it under vendor/llama.cpp (a tarball of that folder, or the
   folder, works too); the build goes to --build-dir, outside anything a remote call replaces;
2. writes random-weight bf16 checkpoints with the real configs' shapes (bench_run_gpu's), gives
   them a byte-level BPE tokenizer (tests/test_convert's; `llmarch convert` pads the vocabulary to
   the embedding's rows, and llama.cpp loads no GGUF without one) and converts each with
   `llmarch convert --to gguf` to bf16 and q8_0;
3. loads every source in llmarch (safetensors, bf16 GGUF, q8_0 GGUF, the last dequantized to
   bf16) and warms it up (CUDA graph capture, torch.compile) while the build runs;
4. once the build is done, on a machine with nothing else running: llama-bench (-fa 1, -ngl 99,
   pp and tg tests, its own warm-up run, --reps repetitions) on each GGUF, then llmarch's timed
   runs (the warm-up excluded): decode of --tg tokens after a one-token prompt, prefill of a
   --pp-token prompt (llmarch's own prefill clock, eager, one chunk);
5. prints one table: median tok/s of each engine, llmarch / llama.cpp, and each engine's fraction
   of the copy-rate bound (bytes one decode step reads / the device-to-device copy rate measured
   in this run, reads + writes counted).

Bytes a decode step reads: llmarch, its weights as held (bf16: the q8_0 GGUF is dequantized, so
twice the file's bytes) plus every KV slot its captured step attends over; llama.cpp, the model
size llama-bench reports plus the f16 KV cache of the mean depth of a tg run. Token ids differ
(llama-bench draws its own); for dense models the speed does not depend on them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from bench_run_gpu import (  # noqa: E402
    SHAPES,
    copy_rate,
    decode_bytes,
    llmarch_prepare,
    llmarch_runs,
    make_checkpoint,
)

# a small model of each shape's family: every CPU-side step of the run in seconds
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
GGUF_TYPES = ("bf16", "q8_0")
CMAKE_FLAGS = [
    "-G",
    "Ninja",
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_CUDA=ON",
    "-DCMAKE_CUDA_ARCHITECTURES=90",
    "-DGGML_NATIVE=ON",
    "-DGGML_CUDA_NCCL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_OPENSSL=OFF",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- llama.cpp build


def llama_source(src: Path, into: Path) -> Path:
    """The llama.cpp source folder in src: a folder, the llama-cpp-python sdist, or a tarball of it."""
    if src.is_file():
        into.mkdir(parents=True, exist_ok=True)
        with tarfile.open(src) as tf:
            tf.extractall(into, filter="data")
        src = into
    for cand in (src, src / "vendor" / "llama.cpp", src / "llama.cpp", *src.glob("*/vendor/llama.cpp")):
        if (cand / "CMakeLists.txt").is_file() and (cand / "tools" / "llama-bench").is_dir():
            return cand
    raise SystemExit(f"bench_vs_llamacpp: no llama.cpp source (tools/llama-bench) in {src}")


def build_commands(source: Path, build: Path, jobs: int) -> list[list[str]]:
    return [
        ["cmake", "-S", str(source), "-B", str(build), *CMAKE_FLAGS],
        ["cmake", "--build", str(build), "--target", "llama-bench", "-j", str(jobs)],
    ]


def start_build(cmds: list[list[str]], log_path: Path) -> subprocess.Popen:
    """Configure + build in one background shell, niced so that the warm-ups beside it keep a core."""
    script = " && ".join(" ".join(map(str, c)) for c in cmds)
    out = open(log_path, "w")  # noqa: SIM115 (the build outlives this function; closed by the OS at exit)
    return subprocess.Popen(["nice", "-n", "10", "bash", "-c", script], stdout=out, stderr=subprocess.STDOUT)


def llama_bench_cmd(bench: str, gguf: Path, pp: int, tg: int, reps: int) -> list[str]:
    return [
        bench,
        "-m",
        str(gguf),
        "-p",
        str(pp),
        "-n",
        str(tg),
        "-fa",
        "1",
        "-ngl",
        "99",
        "-r",
        str(reps),
        "-o",
        "json",
    ]


def parse_llama_bench(text: str) -> dict:
    """llama-bench -o json -> {"pp": {...}, "tg": {...}} with the median of its per-repetition tok/s."""
    out = {}
    for t in json.loads(text):
        kind = (
            "pp" if t["n_prompt"] > 0 and t["n_gen"] == 0 else "tg" if t["n_gen"] > 0 and t["n_prompt"] == 0 else None
        )
        if kind is None:
            continue
        out[kind] = {
            "tok_s": statistics.median(t["samples_ts"]),
            "samples_ts": t["samples_ts"],
            "n_tokens": t["n_prompt"] or t["n_gen"],
            "model_size": t["model_size"],
            "build_commit": t.get("build_commit"),
            "gpu_info": t.get("gpu_info"),
            "flash_attn": t.get("flash_attn"),
        }
    return out


def wait_build(build, build_log, res: dict, t_start: float, timeout: float | None) -> bool:
    """Wait for the background build; False if it is still running after timeout seconds."""
    if build is None:
        return True
    log("waiting for the llama.cpp build")
    try:
        rc = build.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log("llama.cpp still building: llmarch's timed runs go beside it (recorded in the results)")
        return False
    res["llama_build_s"] = time.perf_counter() - t_start
    if rc:
        tail = build_log.read_text(errors="replace")[-3000:] if build_log else ""
        res["llama_build_error"] = f"exit {rc}: {tail}"
        log(f"llama.cpp build FAILED (exit {rc}):\n{tail}")
    else:
        log(f"llama.cpp built, {res['llama_build_s']:.0f} s after the start")
    return True


# ----------------------------------------------------------------------------- checkpoints


def make_sources(name: str, work: Path, device: str, tiny: bool, torch) -> dict[str, Path]:
    """The random checkpoint with a tokenizer, and its GGUFs written by `llmarch convert`."""
    from tests.test_convert import add_tokenizer

    hf = work / name
    overrides = TINY if tiny else None
    model = make_checkpoint(name, hf, torch, device=device, overrides=overrides)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    vocab = (overrides or SHAPES[name][1])["vocab_size"]
    add_tokenizer(hf, vocab)
    out = {"safetensors": hf}
    procs = {}
    for dt in GGUF_TYPES:  # both conversions at once: each is streamed and mostly numpy
        out[dt] = work / f"{name}-{dt}.gguf"
        cmd = [sys.executable, "-m", "llmarch", "convert", str(hf), "--to", "gguf", "-o", str(out[dt])]
        procs[dt] = subprocess.Popen(
            [*cmd, "--dtype", dt, "--force"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    for dt, p in procs.items():
        text, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"bench_vs_llamacpp: llmarch convert --dtype {dt} failed:\n{text[-2000:]}")
    return out


def kv_bytes_per_token(name: str, tiny: bool) -> int:
    """f16 K and V of one position across all layers (llama.cpp's default cache type)."""
    kw = {**SHAPES[name][1], **(TINY if tiny else {})}
    return 2 * kw["num_hidden_layers"] * kw["num_key_value_heads"] * kw["head_dim"] * 2


# ----------------------------------------------------------------------------- llmarch


def llmarch_prefill(rt, prompt: list[int], reps: int) -> list[float]:
    """Prefill tok/s of `prompt` (one chunk, eager), the first call a warm-up left out."""
    from llmarch.runtime.generate import Generator, Sampling

    g = Generator(rt, len(prompt) + 1, cuda_graph=False)
    g.generate(prompt, 1, Sampling())
    return [g.generate(prompt, 1, Sampling()).prefill_tok_s for _ in range(reps)]


def machine(torch, device: str) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "llmarch_commit": os.environ.get("LLMARCH_COMMIT"),
    }
    if device == "cuda":
        info["device"] = torch.cuda.get_device_name()
    return info


def ratio(a, b):
    return a / b if a and b else None


def fmt(x, spec=".0f", unit=""):
    return "—" if x is None else f"{x:{spec}}{unit}"


def table(res: dict) -> str:
    rate = res.get("copy_rate_Bps")
    lines = [
        f"{res['machine'].get('device', 'cpu')}, copy rate {fmt(rate and rate / 1e12, '.2f', ' TB/s')}, "
        f"tg{res['tg']} / pp{res['pp']}, median of {res['reps']} (warm-up excluded), {res['machine']['date']}",
        "| model | weights | llama.cpp tg | llmarch tg | llmarch/llama.cpp | llama.cpp % bound | "
        "llmarch % bound | llama.cpp pp | llmarch pp | llmarch/llama.cpp |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in res["models"].items():
        for src in ("safetensors", *GGUF_TYPES):
            ours = m["llmarch"].get(src, {})
            # the safetensors row is compared with llama.cpp on the bf16 GGUF of the same weights
            theirs = m["llama.cpp"].get("bf16" if src == "safetensors" else src, {})
            o_tg, o_pp = ours.get("decode_tok_s"), ours.get("prefill_tok_s")
            t_tg, t_pp = theirs.get("tg", {}).get("tok_s"), theirs.get("pp", {}).get("tok_s")
            label = {"safetensors": "bf16 safetensors (vs bf16 GGUF)", "bf16": "bf16 GGUF", "q8_0": "Q8_0 GGUF"}[src]
            lines.append(
                f"| {name} | {label} | {fmt(t_tg)} | {fmt(o_tg)} | {fmt(ratio(o_tg, t_tg), '.2f', 'x')} | "
                f"{fmt(theirs.get('fraction_of_bound') and theirs['fraction_of_bound'] * 100, '.0f', '%')} | "
                f"{fmt(ours.get('fraction_of_bound') and ours['fraction_of_bound'] * 100, '.0f', '%')} | "
                f"{fmt(t_pp)} | {fmt(o_pp)} | {fmt(ratio(o_pp, t_pp), '.2f', 'x')} |"
            )
    return "\n".join(lines)


def save(res: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(res, indent=2, default=str))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["llama-3.2-1b", "qwen3-1.7b"], choices=list(SHAPES))
    ap.add_argument("--llama-src", help="llama-cpp-python sdist, a tarball of llama.cpp, or its folder")
    ap.add_argument("--llama-bench", help="an llama-bench already built (skips the build)")
    ap.add_argument("--build-dir", default="/tmp/llama-build")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 4)
    ap.add_argument("--work", help="folder for checkpoints and GGUFs (default: a temporary one)")
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="small shapes of the same families (a CPU check)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="print the llama.cpp commands instead of running them")
    ap.add_argument("--json")
    ap.add_argument("--budget-s", type=float, help="seconds the whole run may take (a remote call's limit)")
    ap.add_argument("--log-dir", help="where the build log goes (default: --build-dir)")
    a = ap.parse_args()
    t_start = time.perf_counter()
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_vs_llamacpp: no CUDA GPU (--device cpu --tiny --dry-run checks the CPU-side steps)")
    try:  # one compiled decode step per loaded source, all alive at once
        torch._dynamo.config.recompile_limit = 64
    except AttributeError:
        torch._dynamo.config.cache_size_limit = 64

    build_dir = Path(a.build_dir)
    bench, build, build_log = a.llama_bench, None, None
    if not bench:
        if not a.llama_src:
            sys.exit("bench_vs_llamacpp: give --llama-src (to build llama-bench) or --llama-bench")
        source = llama_source(Path(a.llama_src), build_dir / "src")
        cmds = build_commands(source, build_dir / "build", a.jobs)
        bench = str(build_dir / "build" / "bin" / "llama-bench")
        if a.dry_run:
            for c in cmds:
                print("would run:", " ".join(c))
        else:
            build_log = Path(a.log_dir or build_dir) / "llama_build.log"
            build = start_build(cmds, build_log)
            log(f"llama.cpp build started ({source}), log {build_log}")

    res: dict = {
        "machine": machine(torch, a.device),
        "tg": a.tg,
        "pp": a.pp,
        "reps": a.reps,
        "compile": not a.no_compile and a.device == "cuda",
        "models": {},
    }
    res["copy_rate_Bps"] = copy_rate(torch) if a.device == "cuda" else None
    log(f"copy rate {fmt(res['copy_rate_Bps'] and res['copy_rate_Bps'] / 1e12, '.2f', ' TB/s')}")

    tmp = tempfile.TemporaryDirectory(prefix="vs_llamacpp_") if not a.work else None
    work = Path(a.work or tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    prepared = {}
    for name in a.models:
        vocab = (TINY if a.tiny else SHAPES[name][1])["vocab_size"]
        t = time.perf_counter()
        sources = make_sources(name, work, a.device, a.tiny, torch)
        m = res["models"][name] = {"sources_s": time.perf_counter() - t, "llmarch": {}, "llama.cpp": {}}
        m["prompt_decode"] = torch.randint(0, vocab, (1,), generator=gen).tolist()
        m["prompt_prefill"] = torch.randint(0, vocab, (a.pp,), generator=gen).tolist()
        m["gguf_bytes"] = {dt: sources[dt].stat().st_size for dt in GGUF_TYPES}
        log(f"{name}: checkpoint + tokenizer + 2 GGUFs in {m['sources_s']:.1f} s")
        for src, path in sources.items():
            try:  # load + warm-up (capture, compile) beside the build; timed later on a quiet machine
                rt, g, load_s, warm = llmarch_prepare(path, m["prompt_decode"], a.tg, res["compile"], a.device)
            except Exception as e:  # report and go on: the other sources still measure
                m["llmarch"][src] = {"error": f"{type(e).__name__}: {e}"[:500]}
                log(f"{name} {src}: llmarch failed: {m['llmarch'][src]['error']}")
                continue
            prepared[(name, src)] = (rt, g)
            m["llmarch"][src] = {"load_s": load_s, "capture_s": warm.extra.get("capture_s")}
            log(f"{name} {src}: llmarch loaded in {load_s:.1f} s, warm-up (capture/compile) done")
        m["sources"] = {k: str(v) for k, v in sources.items()}
    save(res, a.json)

    # the timed runs wait for the build (a quiet machine); with --budget-s, llmarch's do not wait
    # past the point where both engines' timed runs would no longer fit
    wait_s = max(a.budget_s - (time.perf_counter() - t_start) - 150, 1) if a.budget_s else None
    finished = wait_build(build, build_log, res, t_start, wait_s)
    res["llmarch_timed_beside_build"] = not finished
    res["loadavg_llmarch_timed"] = os.getloadavg()
    # llmarch: timed runs of each warmed-up source, then its prefill
    for name, src in list(prepared):
        rt, g = prepared.pop((name, src))
        m = res["models"][name]
        r = m["llmarch"][src]
        runs = llmarch_runs(g, m["prompt_decode"], a.tg, a.reps)
        r["decode_samples"] = [x.decode_tok_s for x in runs]
        r["decode_tok_s"] = statistics.median(r["decode_samples"])
        r["tokens"] = runs[0].tokens[:16]
        r["weight_bytes"], r["bytes_per_token"] = decode_bytes(rt, g)
        if res["copy_rate_Bps"]:
            r["fraction_of_bound"] = r["decode_tok_s"] * r["bytes_per_token"] / res["copy_rate_Bps"]
        del g  # the prefill generator rebuilds the RoPE tables the captured step read
        r["prefill_samples"] = llmarch_prefill(rt, m["prompt_prefill"], a.reps)
        r["prefill_tok_s"] = statistics.median(r["prefill_samples"])
        del rt
        if a.device == "cuda":
            torch.cuda.empty_cache()
        log(f"{name} {src}: llmarch tg {r['decode_tok_s']:.0f} pp {r['prefill_tok_s']:.0f}")
    save(res, a.json)
    if not finished:
        wait_build(build, build_log, res, t_start, None)
    res["loadavg_llamacpp_timed"] = os.getloadavg()
    # llama.cpp: one llama-bench per GGUF (pp and tg tests, each after its own warm-up run)
    for name, m in res["models"].items():
        for dt in GGUF_TYPES:
            cmd = llama_bench_cmd(bench, Path(m["sources"][dt]), a.pp, a.tg, a.reps)
            if a.dry_run:
                print("would run:", " ".join(cmd))
                continue
            if "llama_build_error" in res or not Path(bench).is_file():
                m["llama.cpp"][dt] = {"error": "no llama-bench"}
                continue
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except subprocess.TimeoutExpired:
                m["llama.cpp"][dt] = {"error": "llama-bench ran past 300 s"}
                continue
            if p.returncode:
                m["llama.cpp"][dt] = {"error": f"exit {p.returncode}: {p.stderr[-1500:]}"}
                log(f"{name} {dt}: llama-bench failed: {p.stderr[-1500:]}")
                continue
            r = parse_llama_bench(p.stdout)
            if "tg" in r:
                kv = kv_bytes_per_token(name, a.tiny) * a.tg // 2  # mean depth of a tg run from an empty cache
                r["bytes_per_token"] = r["tg"]["model_size"] + kv
                if res["copy_rate_Bps"]:
                    r["fraction_of_bound"] = r["tg"]["tok_s"] * r["bytes_per_token"] / res["copy_rate_Bps"]
            m["llama.cpp"][dt] = r
            save(res, a.json)
            log(f"{name} {dt}: llama.cpp tg {fmt(r.get('tg', {}).get('tok_s'))} pp {fmt(r.get('pp', {}).get('tok_s'))}")

    res["total_s"] = time.perf_counter() - t_start
    save(res, a.json)
    print()
    print(table(res))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

"""llmarch vs llama.cpp (CUDA) on the same random weights, decode and prefill, in one run.

    python benchmarks/bench_vs_llamacpp.py --llama-src llama_cpp_python-0.3.36.tar.gz --json OUT.json
    python benchmarks/bench_vs_llamacpp.py --device cpu --tiny --dry-run    # every CPU-side step, small

One run does all of it, so both engines see the same machine in the same minutes:
1. builds llama.cpp's llama-bench with CUDA (sm_90) from source in the background, and beside it
   a CPU-only llama-quantize (done in about a minute): the llama-cpp-python sdist carries it under
   vendor/llama.cpp (a tarball of that folder, or the folder, works too); the builds go to
   --build-dir, outside anything a remote call replaces;
2. writes random-weight bf16 checkpoints with the real configs' shapes (bench_run_gpu's), gives
   them a byte-level BPE tokenizer (tests/test_convert's; `llmarch convert` pads the vocabulary to
   the embedding's rows, and llama.cpp loads no GGUF without one) and converts each with
   `llmarch convert --to gguf` to bf16 and q8_0 (gguf-py writes no K-quants: the Q4_K_M file is
   made from the bf16 GGUF by the CPU llama-quantize, once it is built);
   the MoE row (--moe-layers > 0): a Qwen3-30B-A3B-shaped checkpoint cut to that many layers,
   converted to q4_0 (every matrix, the experts included: a type llmarch's CPU expert kernel
   reads as stored, 4.5 bits per weight for both engines);
3. loads every source in llmarch (safetensors, bf16 GGUF, q8_0 GGUF, dequantized to bf16 on
   CUDA unless the runtime has its own kernels for the type) and warms it up (CUDA graph capture,
   torch.compile) while the build runs;
4. once the build is done, on a machine with nothing else running: llmarch's timed runs (the
   warm-up excluded): decode of --tg tokens after a one-token prompt, prefill of a --pp-token
   prompt (llmarch's own prefill clock, one chunk, repeated: replayed from the CUDA graph of its
   length after the warm-up prefills that captured it; and, in alternating rounds, the eager
   prefill a one-off prompt such as `llmarch run`'s takes), and a profile of the captured decode step (kernels per step and per layer, GPU busy
   time against the step's wall time: the rest is gaps between kernels); then llama-bench
   (-fa 1, -ngl 99, pp and tg tests, its own warm-up run, --reps repetitions) on each GGUF;
   the MoE row: llmarch `--experts cpu` (the experts' Q4_0 blocks in host RAM, read by its CPU
   kernel; GPU segments between host round trips as CUDA graphs, as `llmarch run` does) against
   llama-bench with `-ot exps=CPU` (expert tensors in host RAM, the rest on the GPU), same file;
5. prints one table: median tok/s of each engine, llmarch / llama.cpp, and each engine's fraction
   of the copy-rate bound (bytes one decode step reads / the device-to-device copy rate measured
   in this run, reads + writes counted); for the MoE row, of the host-read bound (expert bytes a
   token reads / the host read rate measured in this run).

Bytes a decode step reads: llmarch, its weights as held (bf16: a quantized GGUF dequantized on
load reads more than the file holds) plus every KV slot its captured step attends over;
llama.cpp, the model size llama-bench reports plus the f16 KV cache of the mean depth of a tg
run. Token ids differ (llama-bench draws its own); for dense models the speed does not depend on
them.
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
    decode_profile,
    llmarch_prepare,
    llmarch_runs,
    make_checkpoint,
    profile_text,
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
GGUF_TYPES = ("bf16", "q8_0")  # written by `llmarch convert`
QUANTIZED = {"q4_k_m": "Q4_K_M"}  # written by llama-quantize from the bf16 GGUF
SOURCES = ("safetensors", *GGUF_TYPES, *QUANTIZED)
LABELS = {
    "safetensors": "bf16 safetensors (vs bf16 GGUF)",
    "bf16": "bf16 GGUF",
    "q8_0": "Q8_0 GGUF",
    "q4_k_m": "Q4_K_M GGUF (llama-quantize)",
}
MOE_SHAPE = "qwen3-30b-a3b"
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
    "-DLLAMA_BUILD_APP=OFF",
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
        ["cmake", "--build", str(build), "--target", "llama-bench", "llama-quantize", "-j", str(jobs)],
    ]


def quantize_build_commands(source: Path, build: Path, jobs: int) -> list[list[str]]:
    """llama-quantize alone, CPU-only: built in a minute beside the CUDA build, so the Q4_K_M files
    exist (and llmarch warms them up) while llama-bench is still compiling."""
    flags = [f for f in CMAKE_FLAGS if not f.startswith(("-DGGML_CUDA", "-DCMAKE_CUDA"))] + ["-DGGML_CUDA=OFF"]
    return [
        ["cmake", "-S", str(source), "-B", str(build), *flags],
        ["cmake", "--build", str(build), "--target", "llama-quantize", "-j", str(jobs)],
    ]


def start_build(cmds: list[list[str]], log_path: Path) -> subprocess.Popen:
    """Configure + build in one background shell, niced so that the warm-ups beside it keep a core."""
    script = " && ".join(" ".join(map(str, c)) for c in cmds)
    out = open(log_path, "w")  # noqa: SIM115 (the build outlives this function; closed by the OS at exit)
    return subprocess.Popen(["nice", "-n", "10", "bash", "-c", script], stdout=out, stderr=subprocess.STDOUT)


def llama_bench_cmd(bench: str, gguf: Path, pp: int, tg: int, reps: int, extra: tuple = ()) -> list[str]:
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
        *extra,
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
            "n_threads": t.get("n_threads"),
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


def start_convert(hf: Path, out: Path, dtype: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llmarch", "convert", str(hf), "--to", "gguf", "-o", str(out), "--dtype", dtype]
    return subprocess.Popen([*cmd, "--force"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_converts(procs: dict) -> None:
    for dt, p in procs.items():
        text, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"bench_vs_llamacpp: llmarch convert --dtype {dt} failed:\n{text[-2000:]}")


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
    out = {"safetensors": hf, **{dt: work / f"{name}-{dt}.gguf" for dt in GGUF_TYPES}}
    # both conversions at once: each is streamed and mostly numpy
    finish_converts({dt: start_convert(hf, out[dt], dt) for dt in GGUF_TYPES})
    return out


def moe_config(layers: int, tiny: bool) -> tuple[str, dict]:
    """The MoE row's (model type, config): bench_moe_offload's Qwen3-30B-A3B shape, `layers` deep."""
    from bench_moe_offload import SHAPES as MOE_SHAPES
    from bench_moe_offload import small_of

    family, cfg = MOE_SHAPES[MOE_SHAPE]
    return family, {**(small_of(cfg) if tiny else cfg), "num_hidden_layers": layers}


def make_moe_source(work: Path, layers: int, device: str, tiny: bool, torch) -> Path:
    """The MoE checkpoint as one q4_0 GGUF (the bf16 checkpoint, ~1.4 GB per layer, is removed after)."""
    import shutil

    from tests.test_convert import add_tokenizer

    family, cfg = moe_config(layers, tiny)
    hf = work / "moe"
    model = make_checkpoint("moe", hf, torch, device=device, shape=(family, cfg))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    add_tokenizer(hf, cfg["vocab_size"])
    out = work / "moe-q4_0.gguf"
    finish_converts({"q4_0": start_convert(hf, out, "q4_0")})
    shutil.rmtree(hf)
    return out


def llama_quantize(quantize: str, src: Path, out: Path, kind: str, jobs: int) -> str | None:
    """llama-quantize src -> out of `kind`; an error message, or None."""
    p = subprocess.run([quantize, str(src), str(out), kind, str(jobs)], capture_output=True, text=True, timeout=300)
    return None if p.returncode == 0 else f"exit {p.returncode}: {(p.stderr or p.stdout)[-1500:]}"


def kv_bytes_per_token(name: str, tiny: bool) -> int:
    """f16 K and V of one position across all layers (llama.cpp's default cache type)."""
    kw = {**SHAPES[name][1], **(TINY if tiny else {})}
    return 2 * kw["num_hidden_layers"] * kw["num_key_value_heads"] * kw["head_dim"] * 2


# ----------------------------------------------------------------------------- llmarch


def llmarch_prefill(rt, prompt: list[int], reps: int, eager_too: bool = False) -> tuple[list[float], list[float], dict]:
    """Prefill tok/s of `prompt` (one chunk), repeated as a session would: on CUDA a prompt of up
    to 512 tokens replays a CUDA graph of its length's bucket (runtime/prefill_graph.py); its first
    two uses (an eager prefill; a padded eager prefill, then the capture) are warm-ups left out. With
    eager_too, also the eager prefill (no graph: a one-off prompt's) of the same generator in
    alternating rounds. Returns both sample lists and the capturing call's extra (its time)."""
    from llmarch.runtime.generate import Generator, Sampling

    g = Generator(rt, len(prompt) + 1)
    g.generate(prompt, 1, Sampling())
    first = g.generate(prompt, 1, Sampling()).extra
    graphs = g.prefill_graphs
    samples: list[float] = []
    eager: list[float] = []
    for _ in range(reps):
        samples.append(g.generate(prompt, 1, Sampling()).prefill_tok_s)
        if eager_too and graphs is not None:
            g.prefill_graphs = None
            eager.append(g.generate(prompt, 1, Sampling()).prefill_tok_s)
            g.prefill_graphs = graphs
    return samples, eager, first


# the MoE row's llmarch variants (result key: LLMARCH_MOE_GPU_SLOTS, None for the default, and the
# table's note): as `llmarch run` loads the GGUF (the GPU reads its share of each token's experts
# over PCIe, the CPU the rest), and with the CPU reading them all (as llama.cpp's cores do)
MOE_VARIANTS = {"llmarch": (None, ""), "llmarch_cpu_reads_all": ("0", " (llmarch: no GPU share of the experts)")}


def llmarch_moe_prepare(
    path: Path, prompt: list[int], tg: int, device: str, max_seq: int, stored: bool = True, gpu_slots: str | None = None
):
    """Load the MoE GGUF with its experts in host RAM (`--experts cpu`) and warm it up, as
    `llmarch run` sets it up: one CUDA graph per GPU segment between host round trips. stored: the
    other matrices run from the file's Q4_0 blocks too (`llmarch run`'s default for a GGUF, and
    the bytes llama.cpp reads), else dequantized to bf16. gpu_slots: LLMARCH_MOE_GPU_SLOTS for the
    decoder (None: its default)."""
    from llmarch.runtime.experts.decode import attach_decoder, whole_step_capturable
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime

    t = time.perf_counter()
    dtype = "bfloat16" if device == "cuda" else "float32"
    rt = load_runtime(str(path), device, dtype, experts="cpu", stored_blocks=stored)
    load_s = time.perf_counter() - t
    graph = None if device == "cuda" and whole_step_capturable(rt.model) else False
    g = Generator(rt, max_seq, cuda_graph=graph)
    from bench_moe_offload import moe_gpu_slots

    with moe_gpu_slots(gpu_slots):
        segmented = graph is False and device == "cuda" and attach_decoder(g)
    g.generate(prompt, tg, Sampling())
    return rt, g, load_s, bool(segmented)


def llmarch_moe_timed(rt, g, prompt: list[int], prompt_prefill: list[int], tg: int, reps: int, bw: float) -> dict:
    """Median decode tok/s of `reps` runs, the host-read bound (expert bytes per token / bw), and
    prefill tok/s of `prompt_prefill` (the median of 3 after one warm-up, or one if that took 5 s)."""
    from llmarch.runtime.experts.report import report, reset_counters
    from llmarch.runtime.generate import Sampling

    reset_counters(rt.model)
    runs = [g.generate(prompt, tg, Sampling()) for _ in range(reps)]
    steps = sum(len(r.tokens) - 1 for r in runs)
    r = report(rt.model, steps, sum(x.decode_s for x in runs), rt.device, bw)
    r["decode_samples"] = [x.decode_tok_s for x in runs]
    r["decode_tok_s"] = statistics.median(r["decode_samples"])
    warm = g.generate(prompt_prefill, 1, Sampling())
    # a slow one (experts on the host over a long prompt) is timed once more, not three times
    n = 3 if warm.prefill_s < 5 else 1
    r["prefill_samples"] = [g.generate(prompt_prefill, 1, Sampling()).prefill_tok_s for _ in range(n)]
    r["prefill_tok_s"] = statistics.median(r["prefill_samples"])
    return r


def moe_expert_bytes_per_token(path: Path) -> int:
    """Bytes of the routed experts one token reads in the GGUF as stored (top-k of every layer)."""
    from llmarch.api import load_checkpoint_spec

    ckpt, spec = load_checkpoint_spec(str(path))
    per_layer = (
        sum(t.nbytes for n, t in ckpt.tensors.items() if "_exps." in n and n.startswith("blk.0.")) // spec.moe.experts
    )
    return per_layer * spec.moe.experts_per_token * sum(1 for la in spec.schedule if la.ffn == "moe")


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


def pct(x):
    return fmt(x and x * 100, ".0f", "%")


def row(head: str, ours: dict, theirs: dict, tg_spec: str = ".0f", bound: str = "") -> str:
    """One table row: decode, its ratio and each engine's fraction of the bound (`bound` names
    which), then prefill and its ratio."""
    o_tg, o_pp = ours.get("decode_tok_s"), ours.get("prefill_tok_s")
    t_tg, t_pp = theirs.get("tg", {}).get("tok_s"), theirs.get("pp", {}).get("tok_s")
    return (
        f"| {head} | {fmt(t_tg, tg_spec)} | {fmt(o_tg, tg_spec)} | {fmt(ratio(o_tg, t_tg), '.2f', 'x')} | "
        f"{pct(theirs.get('fraction_of_bound'))}{bound} | {pct(ours.get('fraction_of_bound'))}{bound} | "
        f"{fmt(t_pp)} | {fmt(o_pp)} | {fmt(ratio(o_pp, t_pp), '.2f', 'x')} | {fmt(ours.get('prefill_eager_tok_s'))} |"
    )


def table(res: dict) -> str:
    rate = res.get("copy_rate_Bps")
    lines = [
        f"{res['machine'].get('device', 'cpu')}, copy rate {fmt(rate and rate / 1e12, '.2f', ' TB/s')}, "
        f"tg{res['tg']} / pp{res['pp']}, median of {res['reps']} (warm-up excluded), {res['machine']['date']}",
        "| model | weights | llama.cpp tg | llmarch tg | llmarch/llama.cpp | llama.cpp % bound | "
        "llmarch % bound | llama.cpp pp | llmarch pp | llmarch/llama.cpp | llmarch pp, eager (a one-off prompt) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in res["models"].items():
        for src in SOURCES:
            ours = m["llmarch"].get(src)
            # the safetensors row is compared with llama.cpp on the bf16 GGUF of the same weights
            theirs = m["llama.cpp"].get("bf16" if src == "safetensors" else src, {})
            if ours is None and (src == "safetensors" or not theirs):
                continue
            ours = ours or {}
            label = LABELS[src] + ("" if ours.get("compiled", True) else " (llmarch: graph, no compile)")
            if any("stored blocks on CUDA" in n for n in ours.get("run_notes", [])):
                label += " (llmarch: stored blocks)"
            lines.append(row(f"{name} | {label}", ours, theirs))
    moe = res.get("moe")
    if moe:
        head = (
            f"{MOE_SHAPE} shape, {moe['layers']} layers | Q4_0 GGUF, experts in host RAM "
            "(llama.cpp -ot exps=CPU; llmarch --experts cpu)"
        )
        for key, (_, note) in MOE_VARIANTS.items():
            label = head + note
            lines.append(row(label, moe.get(key, {}), moe.get("llama.cpp", {}), tg_spec=".1f", bound=" (host)"))
    for name, m in res["models"].items():
        for src, r in m["llmarch"].items():
            if r.get("decode_profile"):
                lines.append(profile_text(f"{name} {src}", r["decode_profile"]))
    return "\n".join(lines)


def save(res: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(res, indent=2, default=str))


def run_llama_bench(cmd: list[str]) -> dict:
    """llama-bench's parsed result, or {"error": ...}."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {"error": "llama-bench ran past 300 s"}
    if p.returncode:
        return {"error": f"exit {p.returncode}: {p.stderr[-1500:]}"}
    return parse_llama_bench(p.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--models",
        nargs="*",
        default=["llama-3.2-1b", "qwen3-1.7b"],
        choices=list(SHAPES),
        help="dense rows (none: the MoE row alone, e.g. in a call of its own with --llama-bench)",
    )
    ap.add_argument(
        "--sources",
        nargs="+",
        default=[s for s in SOURCES if s != "safetensors"],
        choices=SOURCES,
        help="llmarch's sources (safetensors: the bf16 GGUF's weights again, one more compile)",
    )
    ap.add_argument(
        "--compile-after-build-s",
        type=float,
        default=330,
        help="compile the sources made after the build (Q4_K_M) only with this many budget seconds left",
    )
    ap.add_argument("--llama-src", help="llama-cpp-python sdist, a tarball of llama.cpp, or its folder")
    ap.add_argument("--llama-bench", help="an llama-bench already built (skips the build; llama-quantize beside it)")
    ap.add_argument("--build-dir", default="/tmp/llama-build")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 4)
    ap.add_argument("--work", help="folder for checkpoints and GGUFs (default: a temporary one)")
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--moe-layers", type=int, default=8, help="layers of the MoE row's model (0: no MoE row)")
    ap.add_argument("--moe-tg", type=int, default=64)
    ap.add_argument("--profile-steps", type=int, default=20, help="graph replays profiled per model (0: none)")
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

    def left() -> float:
        return a.budget_s - (time.perf_counter() - t_start) if a.budget_s else float("inf")

    build_dir = Path(a.build_dir)
    bench, build, build_log = a.llama_bench, None, None
    qbuild = qbuild_log = None
    quantize = str(Path(bench).with_name("llama-quantize")) if bench else ""
    if not bench:
        if not a.llama_src:
            sys.exit("bench_vs_llamacpp: give --llama-src (to build llama-bench) or --llama-bench")
        source = llama_source(Path(a.llama_src), build_dir / "src")
        cmds = build_commands(source, build_dir / "build", a.jobs)
        qcmds = quantize_build_commands(source, build_dir / "build-cpu", a.jobs)
        bench = str(build_dir / "build" / "bin" / "llama-bench")
        quantize = str(build_dir / "build-cpu" / "bin" / "llama-quantize")
        if a.dry_run:
            for c in qcmds + cmds:
                print("would run:", " ".join(c))
        else:
            qbuild_log = Path(a.log_dir or build_dir) / "llama_quantize_build.log"
            qbuild = start_build(qcmds, qbuild_log)
            build_log = Path(a.log_dir or build_dir) / "llama_build.log"
            build = start_build(cmds, build_log)
            log(f"llama.cpp builds started ({source}): CPU llama-quantize, log {qbuild_log}; CUDA, log {build_log}")

    res: dict = {
        "machine": machine(torch, a.device),
        "tg": a.tg,
        "pp": a.pp,
        "reps": a.reps,
        "compile": not a.no_compile and a.device == "cuda",
        "models": {},
        "skipped": [],
    }
    res["copy_rate_Bps"] = copy_rate(torch) if a.device == "cuda" else None
    log(f"copy rate {fmt(res['copy_rate_Bps'] and res['copy_rate_Bps'] / 1e12, '.2f', ' TB/s')}")

    tmp = tempfile.TemporaryDirectory(prefix="vs_llamacpp_") if not a.work else None
    work = Path(a.work or tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    prepared: dict = {}
    # one runtime per model kept for its decode profile, taken after every timed run: torch's
    # profiler leaves CUPTI attached to the process, which slows each later kernel launch (an eager
    # prefill's hundreds of launches, not a graph replay's one)
    to_profile: dict = {}

    def prepare(name: str, src: str, path: Path, compile: bool) -> None:
        m = res["models"][name]
        try:  # load + warm-up (capture, compile); timed later on a quiet machine
            rt, g, load_s, warm = llmarch_prepare(path, m["prompt_decode"], a.tg, compile, a.device)
        except Exception as e:  # report and go on: the other sources still measure
            m["llmarch"][src] = {"error": f"{type(e).__name__}: {e}"[:500]}
            log(f"{name} {src}: llmarch failed: {m['llmarch'][src]['error']}")
            return
        prepared[(name, src)] = (rt, g)
        m["llmarch"][src] = {"load_s": load_s, "capture_s": warm.extra.get("capture_s"), "compiled": compile}
        m["llmarch"][src]["run_notes"] = list(getattr(rt, "notes", []))
        log(f"{name} {src}: llmarch loaded in {load_s:.1f} s, warm-up (capture/compile) done")

    for name in a.models:
        vocab = (TINY if a.tiny else SHAPES[name][1])["vocab_size"]
        t = time.perf_counter()
        sources = make_sources(name, work, a.device, a.tiny, torch)
        m = res["models"][name] = {"sources_s": time.perf_counter() - t, "llmarch": {}, "llama.cpp": {}}
        m["prompt_decode"] = torch.randint(0, vocab, (1,), generator=gen).tolist()
        m["prompt_prefill"] = torch.randint(0, vocab, (a.pp,), generator=gen).tolist()
        m["gguf_bytes"] = {dt: sources[dt].stat().st_size for dt in GGUF_TYPES}
        m["sources"] = {k: str(v) for k, v in sources.items()}
        log(f"{name}: checkpoint + tokenizer + 2 GGUFs in {m['sources_s']:.1f} s")
        for src, path in sources.items():
            if src in a.sources:
                prepare(name, src, path, res["compile"])
    save(res, a.json)

    moe_prepared: dict = {}
    if a.moe_layers > 0:  # made and warmed up beside the build too
        t = time.perf_counter()
        moe = res["moe"] = {"layers": a.moe_layers, "shape": MOE_SHAPE, "llama.cpp": {}}
        try:
            family, cfg = moe_config(a.moe_layers, a.tiny)
            path = make_moe_source(work, a.moe_layers, a.device, a.tiny, torch)
            moe.update(gguf=str(path), gguf_bytes=path.stat().st_size, sources_s=time.perf_counter() - t)
            moe["expert_bytes_per_token"] = moe_expert_bytes_per_token(path)
            moe["prompt_decode"] = torch.randint(0, cfg["vocab_size"], (1,), generator=gen).tolist()
            moe["prompt_prefill"] = torch.randint(0, cfg["vocab_size"], (a.pp,), generator=gen).tolist()
            log(f"moe: {a.moe_layers}-layer {MOE_SHAPE} q4_0 GGUF in {moe['sources_s']:.1f} s")
        except Exception as e:  # report and go on: the dense rows still measure
            moe["llmarch"] = {"error": f"{type(e).__name__}: {e}"[:500]}
            log(f"moe: source failed: {moe['llmarch']['error']}")
        for key, (slots, _) in MOE_VARIANTS.items():
            if "gguf" not in moe:
                break
            try:
                rt, g, load_s, seg = llmarch_moe_prepare(
                    path, moe["prompt_decode"], a.moe_tg, a.device, max(a.pp, a.moe_tg + 1) + 1, gpu_slots=slots
                )
                moe_prepared[key] = (rt, g)
                moe[key] = {"load_s": load_s, "segmented_graphs": seg, "run_notes": list(getattr(rt, "notes", []))}
                log(f"moe {key}: llmarch loaded in {load_s:.1f} s (experts in host RAM), warm-up done")
            except Exception as e:  # report and go on: the other variant and the dense rows still measure
                moe[key] = {"error": f"{type(e).__name__}: {e}"[:500]}
                log(f"moe {key}: llmarch failed: {moe[key]['error']}")
        save(res, a.json)

    def add_quantized() -> None:
        """Q4_K_M GGUFs from the bf16 ones (llama-quantize), each loaded and warmed up in llmarch."""
        for name, m in res["models"].items():
            for q, kind in QUANTIZED.items():
                out = work / f"{name}-{q}.gguf"
                cmd = [quantize, m["sources"]["bf16"], str(out), kind, str(a.jobs)]
                if a.dry_run:
                    print("would run:", " ".join(cmd))
                    continue
                if not Path(quantize).is_file() or left() < 60:
                    res["skipped"].append(f"{name} {q}: " + ("no llama-quantize" if left() >= 60 else "time"))
                    continue
                err = llama_quantize(quantize, Path(m["sources"]["bf16"]), out, kind, a.jobs)
                if err:
                    m["llama.cpp"][q] = {"error": f"llama-quantize {err}"}
                    log(f"{name} {q}: llama-quantize failed: {err}")
                    continue
                m["sources"][q] = str(out)
                m["gguf_bytes"][q] = out.stat().st_size
                if q in a.sources:
                    # beside the CUDA build a compile costs the run nothing; after it (a prebuilt or
                    # failed CPU llama-quantize) a fresh compile (~60 s) is on the run's critical
                    # path: only where the budget leaves room, else the captured graph alone (said
                    # in the table)
                    building = build is not None and build.poll() is None
                    prepare(name, q, out, res["compile"] and (building or left() > a.compile_after_build_s))

    def time_prepared() -> None:
        """llmarch's timed runs of each warmed-up source: decode, then prefill."""
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
            if a.profile_steps and g.graph is not None and name not in to_profile:
                to_profile[name] = (src, rt)
            del g  # the prefill generator rebuilds the RoPE tables the captured step read
            try:
                r["prefill_samples"], eager, first = llmarch_prefill(rt, m["prompt_prefill"], a.reps, True)
                r["prefill_first_call"] = {k: v for k, v in first.items() if k.startswith("prefill_")}
            except Exception as e:  # report and go on: decode is measured, the other sources still run
                r["prefill_error"] = f"{type(e).__name__}: {e}"[:500]
                r["prefill_samples"], eager = [0.0], []
            r["prefill_tok_s"] = statistics.median(r["prefill_samples"]) or None
            if eager:
                r["prefill_eager_samples"] = eager
                r["prefill_eager_tok_s"] = statistics.median(eager)
                log(f"{name} {src}: prefill without the graph (eager) {statistics.median(eager):.0f}")
            del rt
            if a.device == "cuda":
                torch.cuda.empty_cache()
            log(f"{name} {src}: llmarch tg {r['decode_tok_s']:.0f} pp {fmt(r['prefill_tok_s'])}")

    def profile_kept() -> None:
        """The decode profile of each kept runtime, on a newly captured step (the prefill
        generator rebuilt the tables the timed one read)."""
        from llmarch.runtime.generate import Generator, Sampling

        for name, (src, rt) in list(to_profile.items()):
            del to_profile[name]
            m = res["models"][name]
            r = m["llmarch"][src]
            if left() < 60:
                res["skipped"].append(f"{name} {src} decode profile: time")
                continue
            g = None
            try:  # inductor's caches hold the compiled step already: a second compile is quick
                g = Generator(rt, len(m["prompt_decode"]) + a.tg, compile=r["compiled"])
                g.generate(m["prompt_decode"], a.tg, Sampling())
                r["decode_profile"] = decode_profile(g, torch, len(rt.spec.schedule), a.profile_steps)
                print(profile_text(f"{name} {src}", r["decode_profile"]), flush=True)
            except Exception as e:
                r["decode_profile_error"] = f"{type(e).__name__}: {e}"[:500]
            del g, rt
            save(res, a.json)
            save(res, a.json)

    # the timed runs wait for the build (a quiet machine); with --budget-s, llmarch's do not wait
    # past the point where both engines' timed runs would no longer fit
    def bench_llamacpp(types) -> None:
        """llama-bench on each model's GGUF of `types` (pp and tg tests, each after its own warm-up run)."""
        for name, m in res["models"].items():
            for dt in types:
                if dt not in m["sources"]:
                    continue
                cmd = llama_bench_cmd(bench, Path(m["sources"][dt]), a.pp, a.tg, a.reps)
                if a.dry_run:
                    print("would run:", " ".join(cmd))
                    continue
                if "llama_build_error" in res or not Path(bench).is_file():
                    m["llama.cpp"][dt] = {"error": "no llama-bench"}
                    continue
                r = run_llama_bench(cmd)
                if "error" in r:
                    log(f"{name} {dt}: llama-bench failed: {r['error']}")
                elif "tg" in r:
                    kv = kv_bytes_per_token(name, a.tiny) * a.tg // 2  # mean depth of a tg run from an empty cache
                    r["bytes_per_token"] = r["tg"]["model_size"] + kv
                    if res["copy_rate_Bps"]:
                        r["fraction_of_bound"] = r["tg"]["tok_s"] * r["bytes_per_token"] / res["copy_rate_Bps"]
                m["llama.cpp"][dt] = r
                save(res, a.json)
                log(
                    f"{name} {dt}: llama.cpp tg {fmt(r.get('tg', {}).get('tok_s'))} pp {fmt(r.get('pp', {}).get('tok_s'))}"
                )

    def moe_row() -> None:
        """Both engines on the MoE file, llmarch first, each on a quiet machine."""
        moe = res.get("moe")
        if not moe or "gguf" not in moe:
            return
        from llmarch.runtime.experts.report import host_read_bandwidth

        bw = res["host_read_Bps"] = host_read_bandwidth()
        moe["threads"] = {"llmarch (torch)": torch.get_num_threads(), "cpus": os.cpu_count()}
        res["loadavg_moe_llmarch_timed"] = os.getloadavg()
        for key, (rt, g) in list(moe_prepared.items()):
            del moe_prepared[key]
            if left() < 60:
                res["skipped"].append(f"moe {key}: time")
                continue
            t = moe[key]
            try:
                t.update(llmarch_moe_timed(rt, g, moe["prompt_decode"], moe["prompt_prefill"], a.moe_tg, a.reps, bw))
                # one definition for both engines: the file's expert bytes a token reads (report()'s
                # counters also count the one-token prompt's reads: tg / (tg - 1) more)
                t["fraction_of_bound"] = t["decode_tok_s"] * moe["expert_bytes_per_token"] / bw
                log(f"moe {key}: llmarch tg {t['decode_tok_s']:.1f} pp {t['prefill_tok_s']:.0f}")
            except Exception as e:
                t["error"] = f"{type(e).__name__}: {e}"[:500]
                log(f"moe {key}: llmarch failed: {t['error']}")
            del rt, g
        if a.device == "cuda":
            torch.cuda.empty_cache()
        save(res, a.json)
        cmd = llama_bench_cmd(bench, Path(moe["gguf"]), a.pp, a.moe_tg, a.reps, ("-ot", "exps=CPU"))
        if a.dry_run:
            print("would run:", " ".join(cmd))
        elif "llama_build_error" in res or not Path(bench).is_file():
            moe["llama.cpp"] = {"error": "no llama-bench"}
        elif left() > 45:
            res["loadavg_moe_llamacpp_timed"] = os.getloadavg()
            r = moe["llama.cpp"] = run_llama_bench(cmd)
            if "tg" in r:
                r["fraction_of_bound"] = r["tg"]["tok_s"] * moe["expert_bytes_per_token"] / bw
            log(f"moe: llama.cpp tg {fmt(r.get('tg', {}).get('tok_s'), '.1f')} pp {fmt(r.get('pp', {}).get('tok_s'))}")
        else:
            res["skipped"].append("moe llama.cpp: time")
        save(res, a.json)

    # the timed runs wait for the build (a quiet machine); with --budget-s, llmarch's do not wait
    # past the point where both engines' timed runs would no longer fit. Order of what follows:
    # the converted GGUFs' rows, the MoE row, then the Q4_K_M rows (made after the build), so that
    # a tight budget drops the last first
    early = qbuild is not None and qbuild.wait() == 0 and Path(quantize).is_file()
    if early:  # the Q4_K_M files and their warm-ups beside the CUDA build too
        log("CPU llama-quantize built")
        add_quantized()
    elif qbuild is not None:
        log(f"CPU llama-quantize build failed (log {qbuild_log}): the CUDA build's, after it")
        quantize = str(Path(bench).with_name("llama-quantize"))
    wait_s = max(left() - 100, 1) if a.budget_s else None
    finished = wait_build(build, build_log, res, t_start, wait_s)
    res["llmarch_timed_beside_build"] = not finished
    res["loadavg_llmarch_timed"] = os.getloadavg()
    time_prepared()
    if not finished:
        wait_build(build, build_log, res, t_start, None)
    res["loadavg_llamacpp_timed"] = os.getloadavg()
    bench_llamacpp(GGUF_TYPES + (tuple(QUANTIZED) if early else ()))
    moe_row()
    if not early:
        add_quantized()
        time_prepared()
        bench_llamacpp(tuple(QUANTIZED))
    profile_kept()

    res["total_s"] = time.perf_counter() - t_start
    save(res, a.json)
    print()
    print(table(res))
    if res["skipped"]:
        print("skipped:", "; ".join(res["skipped"]))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

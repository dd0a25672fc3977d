"""--ple cpu vs --ple disk on the CPU: time per decode token and memory, warm and cold page cache.

    python benchmarks/bench_ple.py [--layers 4] [--steps 300] [--compute-mb 96] [--dir /var/tmp/llmarch-bench-ple]
    python benchmarks/bench_ple.py --real [--layers 4] [--tokens 16] [--rounds 4]   # llmarch run, Gemma 3n E2B shape

A per-layer embedding table of Gemma 3n's real vocabulary (262144) x (layers x 256) in bf16 is
written once as a safetensors file on local disk (--layers 4: 512 MiB). Each configuration runs in
its own process (so VmHWM is its own), in a decode-like loop: per step one random token id (uniform
over the vocabulary: no repeats to help a cache), prefetch(id), a fixed float32 mat-vec over
--compute-mb of weights standing in for the work that does not need the row (embedding,
per-layer projection), gather(id), then the same again using the row (the layers). Time per token is
the median step. Memory is /proc/self/status VmRSS / VmHWM.

Cold cache: the file's pages are evicted with posix_fadvise(DONTNEED) (no root needed, unlike
drop_caches; fincore checks that it worked), then the first steps of --ple disk are timed, and the
--ple cpu load (which reads the whole table) is timed the same way.

--gpu: Gemma 3n E2B and E4B at full size on a CUDA machine, against llama.cpp in the same run:

    python benchmarks/bench_ple.py --gpu --llama-src llama.cpp-0.3.36-vendor.tar.gz --json OUT.json --budget-s 480
    python benchmarks/bench_ple.py --gpu --tiny --device cpu --dry-run     # every step, small, on a CPU

1. builds llama.cpp's llama-bench with CUDA in the background (bench_vs_llamacpp's build) on all
   cores but --measure-cores (4), which everything else runs on, so the two proceed side by side;
2. writes each model's random bf16 checkpoint with the real config's shapes (fixtures/hub_shapes.py)
   on the GPU, with a byte-level BPE tokenizer;
3. per --ple mode (--modes), one process loads the checkpoint as `llmarch run` does (the same
   CUDA-graph rule: a graph in every mode, cpu / disk staging each step's row into the graph's
   static buffer), generates --tokens after a short prompt twice (the first a warm-up) and reports decode
   tok/s, the PLE store's rows read and wait per token, peak GPU memory (allocated and reserved)
   and host VmHWM / VmRSS. --ple gpu also decodes eagerly in the same process (the graph's gain);
4. converts each checkpoint with `llmarch convert --to gguf` (bf16), and once the build is done
   runs llama-bench tg --tokens (-fa 1 -ngl 99) on all cores, its lazy mode off and on (on: the
   per-layer table's rows read on demand through mmap instead of resident in host RAM);
5. prints one table. With --budget-s, what would not fit is skipped and said so (E2B first).

--gpu-rounds N runs step 3's processes N times (modes in turn each round) and prints each round's
ratios to --ple gpu; --skip-eager leaves out the eager --ple gpu decode. --cold adds one --ple disk
process per model whose page cache is dropped after the load (`echo 3 > /proc/sys/vm/drop_caches`
where permitted, else posix_fadvise DONTNEED on the checkpoint's files, checked with fincore), then
times its first generation token by token.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB, PER_LAYER = 262144, 256
NAME = "model.language_model.embed_tokens_per_layer.weight"


def status_mib() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) // 1024
    return out


def write_table(path: Path, layers: int) -> None:
    import torch
    from safetensors.torch import save_file

    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    table = torch.randn(VOCAB, layers * PER_LAYER, generator=g, dtype=torch.float32).to(torch.bfloat16)
    tmp = path.with_suffix(".part")
    save_file({NAME: table}, str(tmp))
    os.replace(tmp, path)


def evict(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    return _resident(path)


def worker(a) -> dict:
    import torch

    from llmarch.checkpoint.open import open_checkpoint
    from llmarch.runtime.ple import TableLayout, open_store

    torch.set_num_threads(a.threads)
    path = Path(a.table)
    n = a.compute_mb * 2**20 // 4 // 2048
    w1 = torch.randn(n // 2, 2048) * 0.01  # the work before the row is needed
    w2 = torch.randn(2048, n // 2) * 0.01  # the work after
    x = torch.randn(2048)
    before = status_mib()
    out: dict = {"mode": a.mode, "cache_mib": a.cache_mib, "base_rss_mib": before["VmRSS"]}
    if a.cold:
        out["fincore_after_evict_bytes"] = evict(path)
    t0 = time.perf_counter()
    lay = TableLayout.of(open_checkpoint(path).tensors[NAME], a.layers, PER_LAYER, VOCAB)
    store = None
    if a.mode not in ("none", "ab"):
        store = open_store(lay, a.mode, torch.device("cpu"), torch.bfloat16, cache_bytes=a.cache_mib * 2**20)
    out["open_s"] = round(time.perf_counter() - t0, 3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (a.steps,), generator=g)

    def step(st, tid):
        nonlocal x
        t = time.perf_counter()
        if st is not None:
            st.prefetch(tid)
        h = w1 @ x
        if st is not None:
            rows = st.gather(tid).float().view(-1)
            h[: rows.numel()] += rows
        y = w2 @ h
        x = y / (y.norm() + 1e-6)
        return time.perf_counter() - t

    with torch.inference_mode():
        if a.mode == "ab":  # resident and disk stores in one process, steps alternating: machine noise hits both
            stores = {"cpu": open_store(lay, "cpu", torch.device("cpu"), torch.bfloat16)}
            stores["disk"] = open_store(lay, "disk", torch.device("cpu"), torch.bfloat16)
            stores["none"] = None
            per: dict = {k: [] for k in stores}
            for i in range(a.steps):
                order = list(stores) if i % 2 else list(reversed(stores))
                for k in order:
                    per[k].append(step(stores[k], ids[i : i + 1].view(1, 1)))
            for k, ts in per.items():
                out[f"{k}_median_ms"] = round(1e3 * sorted(ts)[len(ts) // 2], 3)
            diffs = sorted(d - c for d, c in zip(per["disk"], per["cpu"]))
            out["disk_minus_cpu_median_ms"] = round(1e3 * diffs[len(diffs) // 2], 4)
            r = stores["disk"].report()
            out["disk_read_ms_per_token"] = round(1e3 * r["read_s"] / max(r["tokens"], 1), 4)
            out["disk_wait_ms_per_token"] = round(1e3 * r["read_wait_s"] / max(r["tokens"], 1), 4)
            return out
        times = [step(store, ids[i : i + 1].view(1, 1)) for i in range(a.steps)]
    s = sorted(times)
    out["first_steps_ms"] = [round(1e3 * t, 3) for t in times[:8]]
    out["median_ms"] = round(1e3 * s[len(s) // 2], 3)
    out["mean_ms"] = round(1e3 * sum(times) / len(times), 3)
    out["p90_ms"] = round(1e3 * s[int(0.9 * len(s))], 3)
    out.update({k.lower() + "_mib": v for k, v in status_mib().items()})
    if store is not None:
        r = store.report()
        out["ple"] = {k: r[k] for k in ("table_bytes", "where", "resident_bytes", "rows_read_per_token", "reads")}
        out["ple"]["read_wait_ms_per_token"] = round(1e3 * r["read_wait_s"] / max(r["tokens"], 1), 4)
        out["ple"]["read_ms_per_token"] = round(1e3 * r["read_s"] / max(r["tokens"], 1), 4)
    return out


def run(a, mode: str, cold: bool = False, cache_mib: int = 0, steps: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--table", str(a.table), "--layers", str(a.layers)]
    cmd += ["--steps", str(steps or a.steps), "--compute-mb", str(a.compute_mb), "--threads", str(a.threads)]
    cmd += ["--cache-mib", str(cache_mib)] + (["--cold"] if cold else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


# Gemma 3n E2B's text config (google/gemma-3n-E2B) at reduced depth: the real vocabularies, widths
# and per-layer row width; 4 layers (3 sliding + 1 global, the first two sparse as E2B's early layers)
E2B_REDUCED = dict(
    vocab_size=262400,
    vocab_size_per_layer_input=262144,
    hidden_size=2048,
    hidden_size_per_layer_input=256,
    intermediate_size=8192,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=256,
    sliding_window=512,
    max_position_embeddings=32768,
    laurel_rank=64,
    altup_num_inputs=4,
    num_kv_shared_layers=0,
)


def real_folder(a) -> Path:
    import torch

    layers = a.layers
    folder = Path(a.dir) / f"gemma3n-e2b-{layers}layers"
    if not (folder / "config.json").is_file():
        sys.path.insert(0, str(ROOT))
        from fixtures.make import make_tiny

        types = (["sliding_attention"] * 4 + ["full_attention"]) * (layers // 5 + 1)
        types = types[: layers - 1] + ["full_attention"]
        make_tiny(
            "gemma3n",
            folder,
            dtype=torch.bfloat16,
            num_hidden_layers=layers,
            layer_types=types,
            activation_sparsity_pattern=[0.95 if i < 2 else 0.0 for i in range(layers)],
            **E2B_REDUCED,
        )
    return folder


PROMPT_IDS = [7 + 1009 * i % 262000 for i in range(32)]


def real_worker(a) -> dict:
    """One process: load with --ple MODE; memory after load and after generating. Mode "ab": load
    with the table in host RAM, open a disk store over the same table too, and alternate whole
    generations between the two stores (same weights, same process: machine noise hits both)."""
    import torch

    from llmarch.runtime import generate as g
    from llmarch.runtime.load import load_runtime
    from llmarch.runtime.ple import find_store, open_store

    torch.set_num_threads(a.threads)
    rt = load_runtime(str(a.table), "cpu", None, ple="cpu" if a.mode == "ab" else a.mode)
    out: dict = {"mode": a.mode, "after_load": status_mib()}
    gen = g.Generator(rt, len(PROMPT_IDS) + a.tokens, cuda_graph=False)
    if a.mode != "ab":
        res = gen.generate(PROMPT_IDS, a.tokens, g.Sampling())
        out.update(after_generate=status_mib(), decode_tok_s=res.decode_tok_s, tokens=res.tokens)
        out["ple"] = find_store(rt.model).report()
        return out
    resident = find_store(rt.model)
    disk = open_store(resident.layout, "disk", rt.device, rt.dtype)
    pli = rt.model.per_layer_inputs
    rt.model.register_forward_pre_hook(lambda _m, args: pli.rows.prefetch(args[0]))
    times: dict = {"cpu": [], "disk": []}
    prefill: dict = {"cpu": [], "disk": []}
    tokens: dict = {}
    for i in range(a.rounds):
        for mode in ("cpu", "disk") if i % 2 else ("disk", "cpu"):
            pli.set_rows(resident if mode == "cpu" else disk)
            res = gen.generate(PROMPT_IDS, a.tokens, g.Sampling())
            times[mode].append(res.decode_s / max(len(res.tokens) - 1, 1))
            prefill[mode].append(res.prefill_s)
            tokens[mode] = res.tokens
    for mode, ts in times.items():
        out[f"{mode}_s_per_token"] = [round(t, 4) for t in ts]
        out[f"{mode}_median_ms"] = round(1e3 * sorted(ts)[len(ts) // 2], 2)
        out[f"{mode}_prefill_s"] = [round(t, 3) for t in prefill[mode]]
    out["same_tokens"] = tokens["cpu"] == tokens["disk"]
    r = disk.report()
    out["disk_read_ms_per_token"] = round(1e3 * r["read_s"] / max(r["tokens"], 1), 4)
    out["disk_wait_ms_per_token"] = round(1e3 * r["read_wait_s"] / max(r["tokens"], 1), 4)
    return out


def real_model(a) -> None:
    """`llmarch run`'s runtime on a Gemma 3n E2B-shaped checkpoint of --layers layers (random bf16
    weights written once by transformers): memory per mode in its own process, time per token
    in one process alternating the two stores."""
    folder = real_folder(a)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    print(f"# real model: {folder} ({size:.0f} MiB), prompt {len(PROMPT_IDS)} ids, {a.tokens} tokens")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    docs = {}
    for mode in ("cpu", "disk", "ab"):
        cmd = [sys.executable, __file__, "--real-worker", "--mode", mode, "--table", str(folder)]
        cmd += ["--tokens", str(a.tokens), "--rounds", str(a.rounds), "--threads", str(a.threads)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode:
            sys.exit(r.stderr)
        docs[mode] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"real {mode}: {json.dumps(docs[mode])}")
    c, d, ab = docs["cpu"], docs["disk"], docs["ab"]
    print(
        f"# real: VmRSS after generating {d['after_generate']['VmRSS']} (disk) vs {c['after_generate']['VmRSS']} "
        f"(cpu) MiB, VmHWM {d['after_generate']['VmHWM']} vs {c['after_generate']['VmHWM']} MiB; table "
        f"{c['ple']['table_bytes'] / 2**20:.0f} MiB in the compute dtype; same tokens: {c['tokens'] == d['tokens']}; "
        f"time per token (one process, alternating): disk {ab['disk_median_ms']} vs cpu {ab['cpu_median_ms']} ms "
        f"({100 * (ab['disk_median_ms'] / ab['cpu_median_ms'] - 1):+.1f}%)"
    )


# ----------------------------------------------------------------------------- --loop-ab

# a stand-in Gemma 3n of 5 layers with the real vocabularies and per-layer row width (its table
# 262144 x (5 x 256), 671 MB in bf16) but narrow layers, so a decode step takes milliseconds here
LOOP_STANDIN = dict(
    E2B_REDUCED,
    hidden_size=256,
    intermediate_size=1024,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=128,
    num_hidden_layers=5,
    layer_types=["sliding_attention"] * 4 + ["full_attention"],
    activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.0],
)


def loop_ab(a) -> None:
    """--ple disk with the decode loop's prefetch right after sampling (now) against the forward
    pre-hook's alone (before), in one process over the same weights, generations alternating;
    the table's pages evicted before each generation (--cold) or left in the page cache."""
    import torch

    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime
    from llmarch.runtime.ple import Counters, find_store

    torch.set_num_threads(a.threads)
    folder = Path(a.dir) / "gemma3n-standin-5layers"
    if not (folder / "config.json").is_file():
        sys.path.insert(0, str(ROOT))
        from fixtures.make import make_tiny

        make_tiny("gemma3n", folder, dtype=torch.bfloat16, **LOOP_STANDIN)
    table = next(folder.glob("*.safetensors"))
    rt = load_runtime(str(folder), "cpu", "float32", ple="disk")
    store, model = find_store(rt.model), rt.model
    loop_prefetch = model.prefetch_next
    gen = Generator(rt, len(PROMPT_IDS) + a.tokens, cuda_graph=False)
    sink = open(os.devnull, "w")  # noqa: SIM115 (the token stream's stand-in, for the process's life)
    gen.generate(PROMPT_IDS, 4, Sampling())  # first-call costs outside the rounds
    per: dict = {"after sampling": [], "pre-hook only": []}
    for i in range(2 * a.rounds):
        label = list(per)[(i + (i // 2)) % 2]  # ABBA...: drift hits both
        if label == "pre-hook only":
            del model.prefetch_next
        if a.cold:
            evict(table)
        store.stats = Counters()
        res = gen.generate(PROMPT_IDS, a.tokens, Sampling(), on_token=lambda t: sink.write(f"{t} "))
        model.prefetch_next = loop_prefetch
        steps = len(res.tokens) - 1
        s = store.stats
        per[label].append(
            {
                "ms_per_token": round(1e3 * res.decode_s / steps, 3),
                "wait_ms_per_token": round(1e3 * s.wait_s / s.tokens, 4),
                "read_ms_per_token": round(1e3 * s.read_s / s.tokens, 4),
                "tokens": res.tokens,
            }
        )
    same = len({tuple(r["tokens"]) for rs in per.values() for r in rs}) == 1
    print(
        f"# {platform.node()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"stand-in {folder} (table {table.stat().st_size / 2**20:.0f} MiB file), float32 compute, "
        f"{a.tokens} tokens x {a.rounds} rounds each, {'cold' if a.cold else 'warm'} page cache; same tokens: {same}"
    )
    for label, rs in per.items():
        med = {
            k: sorted(r[k] for r in rs)[len(rs) // 2]
            for k in ("ms_per_token", "wait_ms_per_token", "read_ms_per_token")
        }
        print(f"{label}: median of rounds {med}; rounds {[{k: v for k, v in r.items() if k != 'tokens'} for r in rs]}")


# ----------------------------------------------------------------------------- --gpu: E2B / E4B

GPU_MODELS = {"e2b": "GEMMA3N_E2B", "e4b": "GEMMA3N_E4B"}  # fixtures/hub_shapes.py names
# the same family at toy size for --tiny; as llama.cpp's gemma3n hard-codes (LAuReL rank 64,
# KV in the first 20 layers, 0.95 sparsity on the first 10, 256-wide per-layer rows)
GPU_TINY = dict(
    vocab_size=1024,
    vocab_size_per_layer_input=1024,
    hidden_size=64,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    sliding_window=16,
)
GPU_PROMPT = [2, 651, 603, 576, 962, 110, 727, 235]  # 8 ids below every vocabulary here (--tiny: 1024)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gpu_shape(name: str, tiny: bool) -> dict:
    sys.path.insert(0, str(ROOT))
    import fixtures.hub_shapes as hub

    cfg = dict(getattr(hub, GPU_MODELS[name]))
    if tiny:
        cfg.update(GPU_TINY, intermediate_size=[128] * cfg["num_hidden_layers"])
    return cfg


def gpu_worker(a) -> dict:
    """One process, one --ple mode, as `llmarch run` loads and decodes (see the docstring, step 3)."""
    import torch

    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime
    from llmarch.runtime.ple import Counters, find_store

    cuda = a.device == "cuda"
    t = time.perf_counter()
    rt = load_runtime(str(a.table), a.device, "bfloat16", ple=a.mode)
    out: dict = {"mode": a.mode, "load_s": round(time.perf_counter() - t, 2), "after_load": status_mib()}
    store = find_store(rt.model)
    n = len(GPU_PROMPT) + a.tokens
    if a.cold:
        out["cold"] = gpu_cold(a, rt, store, n)
    variants: list[tuple[str, bool | None]] = [("run", None)]  # run.py's rule: a graph on CUDA
    if store.mode == "gpu" and cuda and not a.skip_eager:
        variants.append(("eager", False))
    for label, graph in variants:
        gen = Generator(rt, n, cuda_graph=graph)
        warm = gen.generate(GPU_PROMPT, a.tokens, Sampling())
        store.stats = Counters()  # the timed run's reads and waits alone
        res = gen.generate(GPU_PROMPT, a.tokens, Sampling())
        r = store.report()
        steps = max(len(res.tokens) - 1, 1)
        out[label] = {
            "graph": gen.graph is not None,
            "decode_tok_s": round(res.decode_tok_s, 2),
            "warmup_decode_tok_s": round(warm.decode_tok_s, 2),
            "prefill_s": round(res.prefill_s, 4),
            "tokens": res.tokens,
            "rows_read_per_token": r["rows_read_per_token"],
            "read_wait_ms_per_token": round(1e3 * r["read_wait_s"] / steps, 4),
            "read_ms_per_token": round(1e3 * r["read_s"] / steps, 4),
        }
        del gen
    out["ple"] = {k: v for k, v in store.report().items() if k not in ("tokens", "rows_read", "reads")}
    out["after_generate"] = status_mib()
    if cuda:
        out["gpu_peak_allocated_mib"] = torch.cuda.max_memory_allocated() // 2**20
        out["gpu_peak_reserved_mib"] = torch.cuda.max_memory_reserved() // 2**20
    return out


def drop_page_cache(folder: Path) -> str:
    """Drop the checkpoint's pages: the whole page cache where permitted, and each of its files'
    pages by posix_fadvise DONTNEED; says which worked and what fincore still finds resident."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        how = "drop_caches written"
    except OSError as e:
        how = f"drop_caches refused ({e.strerror})"
    left = [evict(f) for f in sorted(folder.glob("*.safetensors"))]
    return f"{how}, then posix_fadvise DONTNEED; bytes resident after: {left}"


def _resident(path: Path) -> str:
    """fincore's count of the file's bytes in the page cache (util-linux; absent on some machines)."""
    try:
        r = subprocess.run(["fincore", "-b", "-n", "-o", "RES", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        return "not checked (no fincore)"
    return r.stdout.strip() or r.stderr.strip()


def gpu_cold(a, rt, store, n: int) -> dict:
    """The first generation after the checkpoint's pages were dropped (after the load: the weights
    are on the GPU, the table's rows on disk), each token's time from the start of decode."""
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.ple import Counters

    gen = Generator(rt, n)
    gen.generate(GPU_PROMPT, 2, Sampling())  # capture the graph while the pages are still warm
    how = drop_page_cache(Path(a.table))
    store.stats = Counters()
    stamps: list[float] = []
    t0 = time.perf_counter()
    res = gen.generate(GPU_PROMPT, a.tokens, Sampling(), on_token=lambda _t: stamps.append(time.perf_counter()))
    r = store.report()
    steps = max(len(res.tokens) - 1, 1)
    gaps = [1e3 * (b - a_) for a_, b in zip(stamps, stamps[1:])]
    return {
        "evicted": how,
        "first_token_ms": round(1e3 * (stamps[0] - t0), 2),
        "step_ms_first_8": [round(g, 3) for g in gaps[:8]],
        "step_ms_median_rest": round(sorted(gaps[8:])[len(gaps[8:]) // 2], 3) if len(gaps) > 8 else None,
        "decode_tok_s": round(res.decode_tok_s, 2),
        "prefill_s": round(res.prefill_s, 4),
        "rows_read": r["rows_read"],
        "read_wait_ms_per_token": round(1e3 * r["read_wait_s"] / steps, 4),
        "read_ms_per_token": round(1e3 * r["read_s"] / steps, 4),
        "tokens": res.tokens,
    }


def gpu_model(a, name: str, work: Path, torch) -> dict:
    """The random checkpoint (with a tokenizer) written on the device."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_run_gpu import SHAPES, make_checkpoint

    from tests.test_convert import add_tokenizer

    cfg = gpu_shape(name, a.tiny)
    key = f"gemma-3n-{name}" + ("-tiny" if a.tiny else "")
    SHAPES[key] = ("gemma3n_text", cfg)
    hf = work / key
    t = time.perf_counter()
    model = make_checkpoint(key, hf, torch, device=a.device)
    del model
    if a.device == "cuda":
        torch.cuda.empty_cache()
    add_tokenizer(hf, cfg["vocab_size"])
    m: dict = {"folder": str(hf), "checkpoint_s": round(time.perf_counter() - t, 1)}
    m["checkpoint_bytes"] = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    m["gguf"] = str(work / f"{key}-bf16.gguf")
    log(f"{name}: checkpoint {m['checkpoint_bytes'] / 1e9:.2f} GB in {m['checkpoint_s']} s")
    return m


def start_convert(m: dict) -> subprocess.Popen:
    """`llmarch convert SRC --to gguf -o OUT --dtype bf16 --force`, through the function the command
    calls: the device's Python lacks the CLI's own dependencies (typer's pydantic) but has these."""
    code = "import sys; from llmarch.convert.to_gguf import convert_to_gguf as c; c(sys.argv[1], sys.argv[2], 'bf16', True)"
    return subprocess.Popen(
        [sys.executable, "-c", code, m["folder"], m["gguf"]],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def llama_bench_lazy(bench: str, gguf: str, tg: int, reps: int, timeout: float) -> dict:
    """llama-bench tg only, lazy mode off and on: {"off": {...}, "on": {...}} (median tok/s)."""
    import statistics

    cmd = [bench, "-m", gguf, "-p", "0", "-n", str(tg), "-fa", "1", "-ngl", "99", "-r", str(reps)]
    cmd += ["-lzm", "off,on", "-o", "json"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"llama-bench ran past {timeout:.0f} s"}
    if p.returncode:
        return {"error": f"exit {p.returncode}: {p.stderr[-1500:]}"}
    out = {}
    for t in json.loads(p.stdout):
        out[str(t.get("lazy_mode"))] = {
            "tok_s": round(statistics.median(t["samples_ts"]), 2),
            "samples_ts": t["samples_ts"],
            "model_size": t["model_size"],
            "build_commit": t.get("build_commit"),
        }
    return out


def gpu_table(res: dict) -> str:
    m0 = res["machine"]
    lines = [
        f"{m0.get('device', 'cpu')}, {m0['cpus']} CPU cores, {m0['date']}, torch {m0['torch']}; decode of "
        f"{res['tokens']} tokens after an {len(GPU_PROMPT)}-token prompt, bf16, batch 1 (llmarch: the second of two "
        f"runs; llama.cpp: llama-bench tg{res['tokens']}, median of {res['reps']})",
        "| model | engine, table | decode tok/s | vs resident | PLE rows / token | wait ms / token | "
        "GPU peak MiB (alloc / reserved) | host VmHWM MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in res["models"].items():
        runs = m.get("llmarch", {})
        gpu = runs.get("gpu", {})
        ref = {"run": gpu.get("run", {}).get("decode_tok_s"), "eager": gpu.get("eager", {}).get("decode_tok_s")}
        for mode in ("gpu", "cpu", "disk"):
            w = runs.get(mode)
            if not w:
                continue
            if "error" in w:
                lines.append(
                    f"| {name} | llmarch --ple {mode} | {w['error'].strip().splitlines()[-1][:160]} | | | | | |"
                )
                continue
            for label in ("run", "eager"):
                r = w.get(label)
                if not r:
                    continue
                base = ref["eager"] if not r["graph"] else ref["run"]
                vs = f"{100 * (r['decode_tok_s'] / base - 1):+.1f}%" if base and mode != "gpu" else ""
                kind = "CUDA graph" if r["graph"] else "eager"
                lines.append(
                    f"| {name} | llmarch --ple {mode} ({kind}) | {r['decode_tok_s']:.1f} | {vs} | "
                    f"{r['rows_read_per_token']} | {r['read_wait_ms_per_token']} | {w.get('gpu_peak_allocated_mib', '-')}"
                    f" / {w.get('gpu_peak_reserved_mib', '-')} | {w['after_generate']['VmHWM']} |"
                )
        lc = m.get("llama.cpp", {})
        if "error" in lc or "skipped" in lc:
            lines.append(f"| {name} | llama.cpp | {lc.get('error', lc.get('skipped'))[:160]} | | | | | |")
        off = lc.get("off", {}).get("tok_s")
        for mode, label in (("off", "table resident (lazy off)"), ("on", "rows read on demand (lazy on)")):
            if mode in lc:
                t = lc[mode]["tok_s"]
                vs = f"{100 * (t / off - 1):+.1f}%" if mode == "on" and off else ""
                lines.append(f"| {name} | llama.cpp CUDA, {label} | {t:.1f} | {vs} | | | | |")
        for k in ("skipped",):
            if k in m:
                lines.append(f"| {name} | {m[k]} | | | | | | |")
    return "\n".join(lines)


def gpu_rounds(res: dict) -> str:
    """Each round's decode tok/s per mode and its ratio to --ple gpu (same process order, same run)."""
    lines = []
    for name, m in res["models"].items():
        for i, rd in enumerate(m.get("rounds", [])):
            tok = {k: w["run"]["decode_tok_s"] for k, w in rd.items() if "run" in w}
            base = tok.get("gpu")
            parts = [
                f"{k} {v:.1f}" + (f" ({100 * (v / base - 1):+.1f}%)" if base and k != "gpu" else "")
                for k, v in tok.items()
            ]
            lines.append(f"{name} round {i + 1}: " + ", ".join(parts))
        lines.append(f"{name}: every mode and round gave the same tokens: {m.get('same_tokens')}")
        c = m.get("cold_disk", {}).get("cold")
        if c:
            lines.append(
                f"{name} --ple disk, cold ({c['evicted'][:120]}): first token {c['first_token_ms']} ms (prefill included),"
                f" steps 1-8 {c['step_ms_first_8']} ms, later median {c['step_ms_median_rest']} ms, "
                f"{c['decode_tok_s']} tok/s, wait {c['read_wait_ms_per_token']} ms/token, same tokens as warm: "
                f"{c['tokens'] == m['llmarch'].get('disk', {}).get('run', {}).get('tokens')}"
            )
    return "\n".join(lines)


def gpu_main(a) -> None:
    t_start = time.perf_counter()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from bench_vs_llamacpp import build_commands, llama_source, machine, start_build, wait_build

    def left() -> float:
        return a.budget_s - (time.perf_counter() - t_start) if a.budget_s else 86400.0

    def save() -> None:
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2, default=str))

    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_ple --gpu: no CUDA GPU (--tiny --device cpu --dry-run checks every step on a CPU)")
    res: dict = {"machine": machine(torch, a.device), "tokens": a.tokens, "reps": a.reps, "budget_s": a.budget_s}
    models: dict = {}
    res["models"] = models
    # the build runs on its own cores, llmarch's timed runs (and everything else) on --measure-cores
    # others: both at once, neither slowing the other's CPU side
    cores = sorted(os.sched_getaffinity(0))
    measure = set(cores[: a.measure_cores]) if a.measure_cores and len(cores) > 2 * a.measure_cores else set(cores)
    build_cores = set(cores) - measure or set(cores)
    res["cores"] = {"llmarch": sorted(measure), "llama_build": sorted(build_cores)}
    build = build_log = None
    bench = a.llama_bench
    if not bench and a.llama_src:
        build_dir = Path(a.build_dir)
        source = llama_source(Path(a.llama_src), build_dir / "src")
        cmds = build_commands(source, build_dir / "build", len(build_cores))
        bench = str(build_dir / "build" / "bin" / "llama-bench")
        if a.dry_run:
            for c in cmds:
                print("would run:", " ".join(c))
        else:
            build_log = Path(a.log_dir or build_dir) / "llama_build.log"
            os.sched_setaffinity(0, build_cores)  # inherited by the build
            build = start_build(cmds, build_log)
            log(f"llama.cpp build started ({source}) on {len(build_cores)} cores, log {build_log}")
    os.sched_setaffinity(0, measure)
    work = Path(a.dir) / "gpu"
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in a.models:  # llmarch: checkpoint, then one process per --ple mode
        st = os.statvfs(work)
        free = st.f_bavail * st.f_frsize
        need = 0 if a.tiny else 2.1 * (8.9e9 if name == "e2b" else 13.7e9)  # checkpoint + GGUF, bf16
        if free < need or left() < a.model_s:
            models[name] = {"skipped": f"not made: {free / 1e9:.0f} GB free, {left():.0f} s of the budget left"}
            log(f"{name}: {models[name]['skipped']}")
            continue
        m = models[name] = gpu_model(a, name, work, torch)
        m["rounds"] = []
        runs = [(mode, False) for mode in a.modes if a.device == "cuda" or mode != "gpu"]
        for rnd in range(max(1, a.gpu_rounds)):
            m["rounds"].append({})
            for mode, cold in runs + ([("disk", True)] if a.cold and rnd == 0 else []):
                cmd = [sys.executable, __file__, "--gpu-worker", "--mode", mode, "--table", m["folder"]]
                cmd += ["--tokens", str(a.tokens), "--device", a.device]
                cmd += (["--skip-eager"] if a.skip_eager or rnd else []) + (["--cold"] if cold else [])
                try:
                    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max(left() - 10, 10))
                    if r.returncode:
                        raise RuntimeError(r.stderr[-1500:])
                    w = json.loads(r.stdout.strip().splitlines()[-1])
                except Exception as e:  # report and go on: the other modes still measure
                    w = {"error": f"{type(e).__name__}: {e}"[-1500:]}
                if cold:
                    m["cold_disk"] = w
                else:
                    m["rounds"][rnd][mode] = w
                shown = w.get("cold") if cold else w.get("run")
                log(
                    f"{name} round {rnd + 1} --ple {mode}{' cold' if cold else ''}: "
                    + (w["error"][-300:] if "error" in w else json.dumps(shown)[:300])
                )
                save()
        m["llmarch"] = m["rounds"][0]
        toks = {(i, k): w["run"]["tokens"] for i, rd in enumerate(m["rounds"]) for k, w in rd.items() if "run" in w}
        m["same_tokens"] = len({tuple(v) for v in toks.values()}) == 1 if toks else None
        m["llmarch_timed_beside_build"] = build is not None and build.poll() is None
    # llama.cpp: the GGUFs (all cores once the build is done), then llama-bench on a quiet machine
    convs = {n: start_convert(m) for n, m in models.items() if "folder" in m and bench}
    finished = wait_build(build, build_log, res, t_start, max(left() - 30, 1) if a.budget_s else None)
    os.sched_setaffinity(0, set(cores))
    for name, conv in convs.items():
        m = models[name]
        try:
            text, _ = conv.communicate(timeout=max(left() - 10, 1))
        except subprocess.TimeoutExpired:
            conv.kill()
            m["llama.cpp"] = {"skipped": "llmarch convert still running when the budget ran out"}
            continue
        if conv.returncode:
            m["llama.cpp"] = {"error": f"llmarch convert failed: {text[-1000:]}"}
        elif a.dry_run:
            m["llama.cpp"] = {"skipped": "dry run"}
        elif not finished:
            m["llama.cpp"] = {"skipped": "llama.cpp still building when the budget ran out"}
        elif "llama_build_error" in res:
            m["llama.cpp"] = {"error": "llama.cpp build failed"}
        elif left() < 25:
            m["llama.cpp"] = {"skipped": f"{left():.0f} s of the budget left"}
        else:
            m["gguf_bytes"] = Path(m["gguf"]).stat().st_size
            m["llama.cpp"] = llama_bench_lazy(bench, m["gguf"], a.tokens, a.reps, max(left() - 5, 5))
        log(f"{name} llama.cpp: {json.dumps(m['llama.cpp'])[:400]}")
        save()
    if build is not None and build.poll() is None:
        build.kill()
    res["total_s"] = round(time.perf_counter() - t_start, 1)
    save()
    print()
    print(gpu_table(res))
    print(gpu_rounds(res))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--compute-mb", type=int, default=96)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dir", default="/var/tmp/llmarch-bench-ple")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--mode", default="cpu")
    p.add_argument("--table")
    p.add_argument("--cold", action="store_true")
    p.add_argument("--cache-mib", type=int, default=0)
    p.add_argument("--real", action="store_true", help="llmarch run on a Gemma 3n E2B-shaped model of --layers layers")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--real-worker", action="store_true")
    p.add_argument("--loop-ab", action="store_true", help="--ple disk: the decode loop's prefetch vs the pre-hook's")
    p.add_argument("--gpu", action="store_true", help="Gemma 3n E2B / E4B at full size on CUDA, with llama.cpp")
    p.add_argument("--gpu-worker", action="store_true")
    p.add_argument("--models", nargs="+", default=list(GPU_MODELS), choices=list(GPU_MODELS))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--modes", nargs="+", default=["gpu", "cpu", "disk"], choices=["gpu", "cpu", "disk"])
    p.add_argument("--tiny", action="store_true", help="--gpu with toy widths (a CPU check of every step)")
    p.add_argument("--llama-src", help="llama-cpp-python sdist, a tarball of llama.cpp, or its folder")
    p.add_argument("--llama-bench", help="an llama-bench already built (skips the build)")
    p.add_argument("--build-dir", default="/tmp/llama-build")
    p.add_argument("--log-dir")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--budget-s", type=float)
    p.add_argument("--model-s", type=float, default=150, help="--budget-s left that a model's llmarch runs need")
    p.add_argument("--measure-cores", type=int, default=4, help="cores for llmarch while llama.cpp builds")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--json")
    p.add_argument("--gpu-rounds", type=int, default=1, help="--gpu: run the modes' processes this many times")
    p.add_argument("--skip-eager", action="store_true", help="--gpu: no eager --ple gpu decode")
    a = p.parse_args()
    if a.gpu_worker:
        print(json.dumps(gpu_worker(a)))
        return
    if a.loop_ab:
        loop_ab(a)
        return
    if a.gpu:
        if "--tokens" not in sys.argv:
            a.tokens = 128
        gpu_main(a)
        return
    if a.real_worker:
        print(json.dumps(real_worker(a)))
        return
    if a.worker:
        print(json.dumps(worker(a)))
        return
    if a.real:
        real_model(a)
        return
    a.table = Path(a.dir) / f"ple_{a.layers}x{PER_LAYER}_bf16.safetensors"
    write_table(a.table, a.layers)
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; table {a.table} "
        f"({a.table.stat().st_size / 2**20:.0f} MiB); {a.steps} steps, stand-in compute {a.compute_mb} MB fp32"
    )
    # warm: the table's pages are in the page cache (just written or read); rounds interleaved
    configs = [("none", 0), ("cpu", 0), ("disk", 0), ("disk", 16)]
    best: dict = {}
    for _ in range(a.rounds):
        for mode, cache in configs:
            r = run(a, mode, cache_mib=cache)
            key = f"{mode}{f'+cache{cache}MiB' if cache else ''}"
            if key not in best or r["median_ms"] < best[key]["median_ms"]:
                best[key] = r
    for key, r in best.items():
        print(f"warm {key}: {json.dumps(r)}")
    base = best["cpu"]["median_ms"]
    for key in ("disk", "disk+cache16MiB"):
        d = best[key]
        print(
            f"# {key} vs cpu: {d['median_ms']:.3f} vs {base:.3f} ms/token ({100 * (d['median_ms'] / base - 1):+.1f}%), "
            f"VmHWM {d['vmhwm_mib']} vs {best['cpu']['vmhwm_mib']} MiB"
        )
    ab = run(a, "ab")
    print(f"warm ab (one process, steps alternating): {json.dumps(ab)}")
    print(
        f"# ab: disk {ab['disk_median_ms']:.3f} vs cpu {ab['cpu_median_ms']:.3f} ms/token "
        f"({100 * (ab['disk_median_ms'] / ab['cpu_median_ms'] - 1):+.1f}%); median paired difference "
        f"{ab['disk_minus_cpu_median_ms']:+.4f} ms; stand-in compute alone {ab['none_median_ms']:.3f} ms"
    )
    # cold: the file's pages evicted before the store opens
    for mode in ("disk", "cpu"):
        r = run(a, mode, cold=True, steps=32)
        print(f"cold {mode}: {json.dumps(r)}")


if __name__ == "__main__":
    main()

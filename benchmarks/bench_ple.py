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
    r = subprocess.run(["fincore", "-b", "-n", "-o", "RES", str(path)], capture_output=True, text=True)
    return r.stdout.strip() or r.stderr.strip()


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
    a = p.parse_args()
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

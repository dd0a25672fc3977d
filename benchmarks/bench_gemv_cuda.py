"""The decode GEMV kernel (llmarch/runtime/gemv_cuda.py) on a GPU: per matrix shape, and end to end.

    python benchmarks/bench_gemv_cuda.py kernels [--sweep] [--json OUT.json]
    python benchmarks/bench_gemv_cuda.py decode --model llama-3.2-1b [--variants fused,gemv] [--rounds 5]
        [--profile] [--attention] [--lock FILE --barrier DIR:N] [--json OUT.json]

kernels: for every matrix of a Llama-3.2-1B and a Qwen3-1.7B decode step (q|k|v, o, gate|up, down,
the tied head), bf16, one activation row (and four): the kernel's time with the tile pick_tile gives (with
--sweep, every tile of a wider sweep too), and torch's F.linear (cuBLAS), each as bytes of weights read per second
against the device-to-device copy rate measured in the same run. Each time is one launch's share
of a CUDA graph of many launches that cycle over enough copies of the matrix to miss the 60 MB L2,
as in a decode step, where ~2.5 GB of other weights pass between two uses of one matrix. Before
timing, each shape's output is checked against a float64 matmul (fresh random data, output
poisoned with NaN first).

decode: a random-weight checkpoint of the model's real shapes (bench_run_gpu.make_checkpoint),
loaded once per variant (VARIANTS: which of the GEMV kernel, the decode attention op, the gated
epilogue, the q/k norm + RoPE attention step and the norm prologue / residual-add epilogue are on;
by default the kernel against torch's matmuls, inductor's under --compile), each --compile + CUDA graph; timed generations alternate between the variants, the order reversed every
round; the ratio per round is each variant's over the last one's; % of bound as bench_run_gpu
counts it (every weight once + the KV slots a step reads, over the copy rate). --attention adds the
attention op alone over 160-32768 slots. Processes that share the GPU compile at once and time one
by one with --lock (and --barrier: nobody times before all have compiled).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_run_gpu import (  # noqa: E402
    SHAPES,
    copy_rate,
    decode_bytes,
    decode_profile,
    environ,
    llmarch_prepare,
    make_checkpoint,
    profile_text,  # noqa: E402
)


def matrices(cfg: dict) -> list[tuple[str, int, int, int]]:
    """(name, N, K, uses per token) of one decode step's matrices, from the config's sizes."""
    d, hd = cfg["hidden_size"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    q, kv, L = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd, cfg["num_hidden_layers"]
    f = cfg["intermediate_size"]
    return [
        ("qkv", q + 2 * kv, d, L),
        ("o", d, q, L),
        ("gate_up", 2 * f, d, L),
        ("down", d, f, L),
        ("head", cfg["vocab_size"], d, 1),
    ]


def sweep_tiles(gv) -> list[tuple[int, int, int]]:
    out = []
    for bn in (1, 2, 4, 8, 16, 32):
        for bk in (256, 512, 1024, 2048):
            for warps in (2, 4, 8):
                if gv.fits((bn, bk, warps), 1) and bn * bk >= 256 * warps and bn * bk <= 16384:
                    out.append((bn, bk, warps))
    return out


def graph_time(torch, fn, copies: int, min_calls: int = 24) -> float:
    """Seconds per call of fn(i) (i cycles over the copies), from replays of one CUDA graph."""
    calls = max(min_calls, 2 * copies)
    for i in range(copies):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in range(calls):
            fn(c % copies)
    for _ in range(2):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / calls)
    return statistics.median(times)


def precompile(gv, tiles, widths, torch, modes=("plain",)) -> str:
    """Compile every (tile, K, mode) the sweep launches, in threads (Triton's compile is most of the
    cost), with the arguments launch() passes (the same specialization)."""
    from concurrent.futures import ThreadPoolExecutor

    k = gv._kernels()
    x = torch.zeros(1, 16, dtype=torch.bfloat16, device="cuda")  # N below: a multiple of 16, as every N here

    def one(args):
        (bn, bk, warps), K, mode = args
        ahead, pdl = (v == "0" for v in MODES[mode])
        k.gemv.warmup(
            x, x, x, x, 1, 2048, K, MP=1, BN=bn, BK=bk, EVEN_K=K % bk == 0, HAS_BIAS=False, GLU=False, nw=x, res=x,
            eps=0.0, NORM=False, RES=False, ONE=K == bk, PDL=pdl, AHEAD=ahead, num_warps=warps, grid=(1,),
            **({"launch_pdl": True} if pdl else {}),
        )  # fmt: skip

    jobs = [(t, K, mode) for t in tiles for K in widths for mode in modes]
    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(12) as ex:
            list(ex.map(one, jobs))
    except Exception as e:  # compile on first launch instead
        return f"precompile failed ({type(e).__name__}: {str(e)[:200]}), compiling on first launch"
    return f"precompiled {len(jobs)} kernels in {time.perf_counter() - t0:.1f} s"


def mode_times(torch, gv, N: int, K: int, ws, modes, tiles, copies) -> dict:
    """Per launch mode (MODES): the kernel's time on one row with pick_tile's tile and with each of
    tiles (those that fit), and its error against float64 in that mode, microseconds."""
    out = {}
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(1, N, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ ws[0].double().T
    picked = gv.pick_tile(1, N, K)
    for mode in modes:
        with launch_mode(mode):
            row = {}
            for t in [picked] + [t for t in tiles if t != picked and gv.fits(t, 1) and t[1] <= max(K, 256)]:
                try:
                    y.fill_(float("nan"))
                    gv.launch(x, ws[0], None, y, tile=t)
                    err = ((y.double() - ref).norm() / ref.norm()).item()
                    us = graph_time(torch, lambda i, t=t: gv.launch(x, ws[i], None, y, tile=t), copies) * 1e6
                    row["picked" if t == picked else str(t)] = {"us": us, "rel_err": err}
                except Exception as e:
                    print(f"  {mode} tile {t}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            out[mode] = row
    return out


def measure(torch, gv, N: int, K: int, tiles) -> dict:
    """One matrix shape: correctness (M = 1 and 4), then times of cuBLAS, the kernel with pick_tile's tile and every tile."""
    import torch.nn.functional as F

    nbytes = N * K * 2
    copies = max(2, -(-400_000_000 // nbytes))
    ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5 for _ in range(copies)]
    row: dict = {"N": N, "K": K, "MB": nbytes / 1e6}
    for M in (1, 4):  # correctness first: fresh data, poisoned output
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        y = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
        gv.launch(x, ws[0], None, y)
        ref = x.double() @ ws[0].double().T
        row[f"rel_err_M{M}"] = ((y.double() - ref).norm() / ref.norm()).item()
        row[f"unwritten_M{M}"] = int(y.isnan().sum().item())
    xs = {M: torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for M in (1, 4)}
    ys = {M: torch.empty(M, N, device="cuda", dtype=torch.bfloat16) for M in (1, 4)}
    t_cublas = graph_time(torch, lambda i: F.linear(xs[1], ws[i]), copies)
    t_picked = graph_time(torch, lambda i: gv.launch(xs[1], ws[i], None, ys[1]), copies)
    t_picked4 = graph_time(torch, lambda i: gv.launch(xs[4], ws[i], None, ys[4]), copies)
    t_cublas4 = graph_time(torch, lambda i: F.linear(xs[4], ws[i]), copies)
    sweep = {}
    for t in tiles:
        try:
            sweep[t] = graph_time(torch, lambda i, t=t: gv.launch(xs[1], ws[i], None, ys[1], tile=t), copies)
        except Exception as e:
            print(f"  tile {t}: {type(e).__name__}: {str(e)[:120]}")
    best = min(sweep, key=sweep.get)
    chosen = gv.pick_tile(1, N, K)
    row.update(
        cublas_us=t_cublas * 1e6,
        picked_us=t_picked * 1e6,
        picked_M4_us=t_picked4 * 1e6,
        cublas_M4_us=t_cublas4 * 1e6,
        best_tile=best,
        best_us=sweep[best] * 1e6,
        picked_tile=chosen,
        sweep_us={str(t): v * 1e6 for t, v in sorted(sweep.items(), key=lambda kv: kv[1])[:8]},
    )
    return row


def kernels(a) -> dict:
    import torch

    from llmarch.runtime import gemv_cuda as gv

    rate = copy_rate(torch)
    out: dict = {"device": torch.cuda.get_device_name(), "copy_rate_Bps": rate, "shapes": {}, "totals": {}}
    if a.modes:
        return kernel_modes(a, torch, gv, rate, out)
    tiles = sweep_tiles(gv) if a.sweep else [(2, 2048, 4)]  # without --sweep one tile, for the table's column
    widths = sorted({K for _, (mt, cfg) in SHAPES.items() for _, _, K, _ in matrices(cfg)})
    print(precompile(gv, tiles, widths, torch), f"({len(tiles)} tiles x widths {widths})", flush=True)
    for model, (_, cfg) in SHAPES.items():
        tot = {"cublas_us": 0.0, "picked_us": 0.0, "best_us": 0.0, "bytes": 0}
        for name, N, K, uses in matrices(cfg):
            nbytes = N * K * 2
            row = measure(torch, gv, N, K, tiles)
            row["uses"] = uses
            for key in ("cublas", "picked", "best"):
                row[f"{key}_pct_copy"] = 100 * nbytes / (row[f"{key}_us"] * 1e-6) / rate
                tot[f"{key}_us"] += uses * row[f"{key}_us"]
            tot["bytes"] += uses * nbytes
            out["shapes"][f"{model} {name}"] = row
            t_cublas, t_picked, t_picked4, t_cublas4 = (
                row[k] * 1e-6 for k in ("cublas_us", "picked_us", "picked_M4_us", "cublas_M4_us")
            )
            best, chosen = row["best_tile"], row["picked_tile"]
            print(
                f"{model:13s} {name:8s} {N:6d}x{K:<5d} {nbytes / 1e6:7.1f} MB  cuBLAS {t_cublas * 1e6:7.1f} us "
                f"({row['cublas_pct_copy']:3.0f}%)  ours {t_picked * 1e6:7.1f} us ({row['picked_pct_copy']:3.0f}%)  "
                f"best tile {best} {row['best_us']:7.1f} us ({row['best_pct_copy']:3.0f}%)  M=4 ours "
                f"{t_picked4 * 1e6:6.1f} cuBLAS {t_cublas4 * 1e6:6.1f} us  err {row['rel_err_M1']:.1e}/"
                f"{row['rel_err_M4']:.1e} unwritten {row['unwritten_M1']}/{row['unwritten_M4']}  pick_tile {chosen}",
                flush=True,
            )
            torch.cuda.empty_cache()
        for key in ("cublas", "picked", "best"):
            tot[f"{key}_pct_copy"] = 100 * tot["bytes"] / (tot[f"{key}_us"] * 1e-6) / rate
        out["totals"][model] = tot
        print(
            f"{model}: a token's matrices {tot['bytes'] / 1e9:.2f} GB: cuBLAS {tot['cublas_us']:.0f} us "
            f"({tot['cublas_pct_copy']:.0f}% of copy), ours {tot['picked_us']:.0f} us ({tot['picked_pct_copy']:.0f}%), "
            f"best tiles {tot['best_us']:.0f} us ({tot['best_pct_copy']:.0f}%); copy rate {rate / 1e12:.2f} TB/s",
            flush=True,
        )
    return out


def kernel_modes(a, torch, gv, rate: float, out: dict) -> dict:
    """kernels --modes: every matrix of both shapes, one row, timed per launch mode (plain, weights a
    step ahead, programmatic dependent launches: in a graph of many launches each then overlaps the
    one before), with pick_tile's tile and --tiles; a token's matrices summed per mode."""
    t0 = time.perf_counter()
    modes = a.modes.split(",")
    tiles = [tuple(int(v) for v in t.split(",")) for t in a.tiles.split(";")] if a.tiles else []
    widths = sorted({K for _, (mt, cfg) in SHAPES.items() for _, _, K, _ in matrices(cfg)})
    picked = {gv.pick_tile(1, N, K) for _, (mt, cfg) in SHAPES.items() for _, N, K, _ in matrices(cfg)}
    print(precompile(gv, sorted(picked | set(tiles)), widths, torch, modes), flush=True)
    out["modes"] = {m: dict(zip(("LLMARCH_NO_GEMV_AHEAD", "LLMARCH_NO_PDL"), MODES[m], strict=True)) for m in modes}
    with gpu_turn(a):  # compiled beside other processes, timed alone (--lock)
        return _kernel_modes_timed(a, torch, gv, rate, out, modes, tiles, t0)


def _kernel_modes_timed(a, torch, gv, rate: float, out: dict, modes, tiles, t0: float) -> dict:
    for model, (_, cfg) in SHAPES.items():
        tot = {m: 0.0 for m in modes}
        nbytes_tok = 0
        for name, N, K, uses in matrices(cfg):
            if a.budget_s and time.perf_counter() - t0 > a.budget_s:
                print(f"budget of {a.budget_s} s spent: {model} {name} and after not timed", flush=True)
                out["budget_cut"] = f"{model} {name}"
                return out
            nbytes = N * K * 2
            copies = max(2, -(-400_000_000 // nbytes))
            ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5 for _ in range(copies)]
            row = mode_times(torch, gv, N, K, ws, modes, tiles, copies)
            del ws
            torch.cuda.empty_cache()
            out["shapes"][f"{model} {name}"] = {"N": N, "K": K, "MB": nbytes / 1e6, "uses": uses, "times": row}
            nbytes_tok += uses * nbytes
            for m in modes:
                tot[m] += uses * row[m]["picked"]["us"]
                best = min(row[m], key=lambda t: row[m][t]["us"])
                others = "  ".join(
                    f"{t} {v['us']:.1f}" for t, v in sorted(row[m].items(), key=lambda kv: kv[1]["us"])[:4]
                )
                print(
                    f"{model:13s} {name:8s} {N:6d}x{K:<5d} {m:8s} picked {row[m]['picked']['us']:6.1f} us "
                    f"({100 * nbytes / (row[m]['picked']['us'] * 1e-6) / rate:3.0f}% of copy, err "
                    f"{row[m]['picked']['rel_err']:.1e})  best {best}; fastest: {others}",
                    flush=True,
                )
        out["totals"][model] = {m: {"us": tot[m], "pct_copy": 100 * nbytes_tok / (tot[m] * 1e-6) / rate} for m in modes}
        print(
            f"{model}: a token's matrices {nbytes_tok / 1e9:.2f} GB, pick_tile's tiles: "
            + ", ".join(f"{m} {tot[m]:.0f} us ({out['totals'][model][m]['pct_copy']:.0f}%)" for m in modes)
            + f"; copy rate {rate / 1e12:.2f} TB/s, load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
    return out


# what each decode variant switches: the GEMV kernel, the fused decode attention op, the gated
# epilogue (silu(gate) * up in the gate|up GEMV), the attention op that also norms and rotates q/k
# and writes the cache, the pre-norms in the GEMVs' prologue and the residual adds in their
# epilogue, the GEMVs' weight tiles a step ahead, PDL for the Triton kernels, and the one-row GEMVs by
# the CUDA kernel that streams weights through shared memory, the attention op's late PDL trigger; "1" = off, as the runtime reads them
SWITCHES = (
    "LLMARCH_NO_GEMV",
    "LLMARCH_NO_DECODE_ATTN",
    "LLMARCH_NO_FUSED_GLU",
    "LLMARCH_NO_DECODE_ROPE",
    "LLMARCH_NO_FUSED_NORM",
    "LLMARCH_NO_GEMV_AHEAD",
    "LLMARCH_NO_PDL",
    "LLMARCH_NO_GEMV_STREAM",
    "LLMARCH_NO_ATTN_LATE_PDL",
)
VARIANTS = {
    "torch": (
        "1",
        "1",
        "1",
        "1",
        "1",
        "1",
        "1",
        "1",
        "1",
    ),  # torch's matmuls (inductor's under --compile) and attention
    "gemv": ("0", "1", "1", "1", "1", "1", "1", "1", "1"),  # the GEMV kernel alone
    "attn": ("0", "0", "1", "1", "1", "1", "1", "1", "1"),  # + the decode attention op
    "glu": ("0", "1", "0", "1", "1", "1", "1", "1", "1"),  # + the gated epilogue
    "fused": ("0", "0", "0", "1", "1", "1", "1", "1", "1"),  # + both
    "full": ("0", "0", "0", "0", "1", "1", "1", "1", "1"),  # + q/k norm, RoPE and the cache write in the attention op
    "norm": ("0", "0", "0", "0", "0", "1", "1", "1", "1"),  # + the norm prologues and residual-add epilogues
    "ahead": ("0", "0", "0", "0", "0", "0", "1", "1", "1"),  # + the GEMVs' weight tiles loaded a step ahead
    "pdlonly": ("0", "0", "0", "0", "0", "1", "0", "1", "1"),  # norm + programmatic dependent launches
    "pdl": ("0", "0", "0", "0", "0", "0", "0", "1", "1"),  # + both: the first tile's loads before the PDL wait
    "stream": ("0", "0", "0", "0", "0", "1", "1", "0", "1"),  # norm, one-row GEMVs by gemv_stream_cuda's kernel
    "streampdl": ("0", "0", "0", "0", "0", "1", "0", "0", "1"),  # + the attention op a PDL launch too
    "streamlate": ("0", "0", "0", "0", "0", "1", "1", "0", "0"),  # stream + the attention op's PDL trigger at its end
}
# kernels --modes: (LLMARCH_NO_GEMV_AHEAD, LLMARCH_NO_PDL) of each way a matrix's launches are timed
MODES = {"plain": ("1", "1"), "ahead": ("0", "1"), "pdl": ("0", "0"), "pdlonly": ("1", "0")}


def launch_mode(mode: str):
    """The GEMV's launch switches of one --modes entry, set while its launches are made (and captured)."""
    return environ(dict(zip(("LLMARCH_NO_GEMV_AHEAD", "LLMARCH_NO_PDL"), MODES[mode], strict=True)))


@contextlib.contextmanager
def gpu_turn(a):
    """Wait until every process of a --barrier group has prepared, then hold --lock's file while timing:
    parallel processes compile at once but never time at once (nor beside a test run holding the lock)."""
    if a.barrier:
        d, n = a.barrier.rsplit(":", 1)
        Path(d).mkdir(parents=True, exist_ok=True)
        (Path(d) / f"ready.{os.getpid()}").touch()
        t = time.perf_counter()
        while len(list(Path(d).glob("ready.*"))) < int(n) and time.perf_counter() - t < 150:
            time.sleep(0.5)  # a process that failed never comes: time without it after 150 s
    if not a.lock:
        yield
        return
    import fcntl

    with open(a.lock, "a") as f:
        t = time.perf_counter()
        fcntl.flock(f, fcntl.LOCK_EX)
        print(f"waited {time.perf_counter() - t:.0f} s for the GPU", flush=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def attention_kernel_times(torch, cfg: dict, rate: float) -> dict:
    """The decode attention op alone, per layer call, over caches of several lengths (every slot
    visible), cycling over enough copies of K/V to miss the L2: microseconds and the K/V bytes it
    reads per second against the copy rate."""
    from llmarch.runtime import decode_attention_cuda as da

    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or cfg["hidden_size"] // H
    out = {}
    for S in (160, 1024, 4096, 32768):
        nbytes = 2 * KV * S * D * 2
        copies = max(2, -(-200_000_000 // nbytes))
        ks = [torch.randn(1, KV, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        vs = [torch.randn(1, KV, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        q = torch.randn(1, H, 1, D, device="cuda", dtype=torch.bfloat16)
        mask = torch.ones(1, S, dtype=torch.bool, device="cuda")
        t = graph_time(torch, lambda i, q=q, ks=ks, vs=vs, m=mask: da.attend(q, ks[i], vs[i], m, D**-0.5), copies)
        out[S] = {"us": t * 1e6, "pct_copy": 100 * nbytes / t / rate, "splits": da.plan(S, D)[2]}
        print(
            f"  attention op, {S:6d} slots: {t * 1e6:6.1f} us, {out[S]['pct_copy']:3.0f}% of copy rate, "
            f"{out[S]['splits']} splits",
            flush=True,
        )
        torch.cuda.empty_cache()
    return out


def decode(a) -> dict:
    import torch

    from llmarch.runtime.gemv_cuda import DecodeLinear
    from llmarch.runtime.generate import Sampling

    t_start = time.perf_counter()

    def spent() -> bool:
        return bool(a.budget_s) and time.perf_counter() - t_start > a.budget_s

    rate = copy_rate(torch)
    out: dict = {"model": a.model, "device": torch.cuda.get_device_name(), "copy_rate_Bps": rate}
    labels = a.variants.split(",")
    out["variants"] = {label: dict(zip(SWITCHES, VARIANTS[label], strict=True)) for label in labels}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / a.model
        hf = make_checkpoint(a.model, path, torch)
        del hf
        torch.cuda.empty_cache()
        vocab = SHAPES[a.model][1]["vocab_size"]
        prompt = torch.randint(0, vocab, (a.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
        gens = {}
        for label in list(labels):
            os.environ.update(out["variants"][label])
            t = time.perf_counter()
            try:
                rt, g, load_s, warm = llmarch_prepare(path, prompt, a.tokens, compile=True)
            except Exception as e:  # the other variants are still timed
                out[label] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                print(f"{label}: failed to prepare: {out[label]['error'][:400]}", flush=True)
                labels.remove(label)
                continue
            swapped = sum(isinstance(m, DecodeLinear) for m in rt.model.modules())
            weights, per_token = decode_bytes(rt, g)
            gens[label] = (rt, g)
            out[label] = {
                "swapped_linears": swapped,
                "prepare_s": time.perf_counter() - t,
                "bytes_per_token": per_token,
                "bound_tok_s": rate / per_token,
                "tokens": warm.tokens[:16],
                "runs": [],
            }
            print(f"{label}: {swapped} DecodeLinear, prepared in {out[label]['prepare_s']:.0f} s", flush=True)
        for k in SWITCHES:
            os.environ.pop(k)
        with gpu_turn(a):
            loads = []
            for r in range(a.rounds):  # alternating, the order reversed every round
                if r >= 2 and spent():
                    print(f"budget of {a.budget_s} s spent: {r} rounds of {a.rounds}", flush=True)
                    out["budget_cut_rounds"] = r
                    break
                for label in labels if r % 2 == 0 else labels[::-1]:
                    res = gens[label][1].generate(prompt, a.tokens, Sampling())
                    out[label]["runs"].append(res.decode_tok_s)
                loads.append(os.getloadavg()[0])
                print(
                    f"round {r}: " + ", ".join(f"{label} {out[label]['runs'][-1]:.1f}" for label in labels),
                    f"tok/s, load {loads[-1]:.2f}",
                    flush=True,
                )
            out["load_1min"] = loads
            if a.json:  # the rounds kept, should the profile below outlast the call
                Path(a.json).write_text(json.dumps(out, indent=2, default=str))
            try:  # the timed rounds above are kept whatever fails here
                if a.profile:
                    for label in labels:
                        if spent():
                            print(f"budget of {a.budget_s} s spent: no profile of {label}", flush=True)
                            continue
                        rt, g = gens[label]
                        prof = decode_profile(g, torch, len(rt.spec.schedule), pos=len(prompt))
                        out[label]["profile"] = prof
                        print(profile_text(f"{a.model} {label}", prof), flush=True)
                if a.attention:
                    out["attention_op"] = attention_kernel_times(torch, SHAPES[a.model][1], rate)
            except Exception as e:
                out["error"] = f"{type(e).__name__}: {e}"
                print("profile / attention op failed:", out["error"], flush=True)
    for label in labels:
        o = out[label]
        o["decode_tok_s"] = statistics.median(o["runs"])
        o["fraction_of_bound"] = o["decode_tok_s"] / o["bound_tok_s"]
    base = labels[-1]  # every other variant against the last one, round by round
    out["ratio_per_round"] = {
        label: [x / y for x, y in zip(out[label]["runs"], out[base]["runs"])] for label in labels[:-1]
    }
    out["tokens_equal"] = all(out[label]["tokens"] == out[base]["tokens"] for label in labels)
    for label in labels:
        o = out[label]
        print(
            f"{a.model} {label:5s}: {o['decode_tok_s']:7.1f} tok/s median of {len(o['runs'])} "
            f"({', '.join(f'{x:.0f}' for x in o['runs'])}) = {100 * o['fraction_of_bound']:.1f}% of "
            f"{o['bound_tok_s']:.0f} tok/s bound ({o['bytes_per_token'] / 1e9:.2f} GB/token)"
        )
    for label, ratios in out["ratio_per_round"].items():
        print(
            f"{label}/{base} per round: {', '.join(f'{x:.3f}' for x in ratios)}; median {statistics.median(ratios):.3f}"
        )
    print(f"first 16 tokens equal: {out['tokens_equal']}; load {loads}; copy {rate / 1e12:.2f} TB/s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("kernels", "decode"))
    ap.add_argument("--model", default="llama-3.2-1b", choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="decode: where a step's time goes, every variant")
    ap.add_argument("--variants", default="gemv,torch", help=f"decode: of {', '.join(VARIANTS)}; the last is the base")
    ap.add_argument("--attention", action="store_true", help="decode: also the attention op alone, 160-32768 slots")
    ap.add_argument("--lock", help="decode, kernels --modes: a file to hold while timing (processes sharing the GPU)")
    ap.add_argument("--barrier", help="decode: DIR:N, wait until N processes have prepared before timing")
    ap.add_argument("--sweep", action="store_true", help="kernels: time 43 tiles per shape, not only pick_tile's")
    ap.add_argument("--modes", help=f"kernels: launch modes of {', '.join(MODES)} instead of the cuBLAS table")
    ap.add_argument("--tiles", help="kernels --modes: more tiles, 'BN,BK,WARPS;...'")
    ap.add_argument("--budget-s", type=float, help="stop timing (rounds, shapes) once this many seconds have passed")
    ap.add_argument("--json")
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_gemv_cuda: no CUDA GPU")
    out = kernels(a) if a.what == "kernels" else decode(a)
    out["load_1min_end"] = os.getloadavg()[0]
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()

"""GPU decode of a quantized GGUF from its stored blocks (gguf_cuda's Triton kernels) against the
same file dequantized to bf16 on load (`--dtype bfloat16`), same run, same weights.

    python benchmarks/bench_gguf_cuda.py [--tokens 256] [--compile] [--json OUT.json]

A random-weight bf16 checkpoint with the Llama-3.2-1B config's shapes (bench_run_gpu's) is
converted by `llmarch convert --dtype q8_0`. gguf-py has no K-quant quantizer, so the Q4_K_M file
is that Q8_0 file with every matrix replaced by random blocks in the documented ggml layouts
(finite fp16 super-block scales of weights' size), typed as llama.cpp's Q4_K_M picks them: Q6_K for
the (tied) token embedding / output and for attn_v and ffn_down in the layers use_more_bits picks,
Q4_K elsewhere. Speed does not depend on the values.

Each (file, path) pair: load, warm up (CUDA graph capture, with --compile torch.compile), then
--reps greedy generations of --tokens after a --prompt-token prompt; the median decode tok/s and
prefill tok/s (llmarch's own clocks), the bytes one decode step reads (weights as held + the KV
slots the step attends over) and that against the device-to-device copy rate measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from bench_run_gpu import SHAPES, copy_rate, make_checkpoint  # noqa: E402

K_OFFSETS = {"Q4_K": (0, 2), "Q6_K": (208,)}  # the fp16 super-block scales in each block


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's rule for which layers' attn_v / ffn_down get Q6_K in a Q4_K_M file."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def q4_k_m_type(name: str, n_layers: int) -> str | None:
    parts = name.split(".")
    stem = parts[-2]
    if stem in ("token_embd", "output"):
        return "Q6_K"
    if stem in ("attn_v", "ffn_down"):
        return "Q6_K" if use_more_bits(int(parts[1]), n_layers) else "Q4_K"
    if stem in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        return "Q4_K"
    return None


def random_kquant(qtype: str, rows: int, cols: int, torch):
    """Random block bytes (drawn on the GPU) with finite fp16 scales so d * scale * q is ~0.02."""
    import numpy as np

    from llmarch.runtime.quant import BLOCKS

    per, nbytes = BLOCKS[qtype]
    b = torch.randint(0, 256, (rows, cols // per, nbytes), dtype=torch.uint8, device="cuda")
    top = 63 * 15 if qtype == "Q4_K" else 127 * 32
    for o in K_OFFSETS[qtype]:
        d = ((torch.rand(rows, cols // per, device="cuda") - 0.5) * 0.04 / top).half()
        b[..., o : o + 2] = d[..., None].view(torch.uint8)
    return np.ascontiguousarray(b.reshape(rows, -1).cpu().numpy())


def make_q4_k_m(q8: Path, out: Path, torch) -> Path:
    import gguf

    from fixtures.gguf_edit import rewrite_gguf

    r = gguf.GGUFReader(q8)
    n_layers = 1 + max(int(t.name.split(".")[1]) for t in r.tensors if t.name.startswith("blk."))
    add = {}
    for t in r.tensors:
        kind = q4_k_m_type(t.name, n_layers) if len(t.shape) == 2 else None
        if kind:
            rows, cols = (int(n) for n in reversed(t.shape))
            add[t.name] = (random_kquant(kind, rows, cols, torch), gguf.GGMLQuantizationType[kind])
    del r
    return rewrite_gguf(q8, out, drop=list(add), add=add)


def measure(
    path: Path, stored: bool, prompt: list[int], n: int, reps: int, compile: bool, torch, mode="auto", profile=False
) -> dict:
    """mode: the Q4_K / Q6_K decode path (gguf_cuda.DP4A, read when the step is first run and
    captured; auto's choices are timed afresh); profile: where a captured step's time goes."""
    from llmarch.runtime import gguf_cuda
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime

    gguf_cuda.DP4A = mode
    gguf_cuda.CHOSEN.clear()
    t = time.perf_counter()
    rt = load_runtime(str(path), "cuda", None if stored else "bfloat16", stored_blocks=stored)
    load_s = time.perf_counter() - t
    g = Generator(rt, len(prompt) + n, compile=compile)
    t = time.perf_counter()
    g.generate(prompt, n, Sampling())  # warm-up: capture, compile, kernel tuning
    warm_s = time.perf_counter() - t
    runs = [g.generate(prompt, n, Sampling()) for _ in range(reps)]
    weights = sum(p.numel() * p.element_size() for p in rt.model.parameters())
    weights += sum(
        b.numel() * b.element_size()
        for m in rt.model.modules()
        if isinstance(m, gguf_cuda.CudaStoredLinear)
        for b in m.buffers()
    )
    out = {
        "decode_tok_s": statistics.median(r.decode_tok_s for r in runs),
        "decode_samples": [round(r.decode_tok_s, 1) for r in runs],
        "prefill_tok_s": statistics.median(r.prefill_tok_s for r in runs),
        "load_s": load_s,
        "warmup_s": warm_s,
        "weight_bytes": weights,
        "bytes_per_token": weights + g.cache.nbytes(),
        "tokens": runs[0].tokens[:16],
        "note": gguf_cuda.summary(rt.model),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    if profile:
        from bench_run_gpu import decode_profile, profile_text

        out["profile"] = decode_profile(g, torch, len(rt.spec.schedule), pos=len(prompt))
        print(profile_text(f"{path.name} {mode}", out["profile"]), flush=True)
    if mode == "auto":
        out["auto_paths"] = {" ".join(map(str, k[:4])): v for k, v in gguf_cuda.CHOSEN.items()}
    gguf_cuda.DP4A = "auto"
    del g, rt
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return out


def rel_err(lin, x, ref, torch) -> float:
    """max |lin(x) - ref| / max |ref|."""
    with torch.inference_mode():
        return ((lin(x).float() - ref).abs().max() / ref.abs().max()).item()


def kernel_times(
    torch, reps: int = 200, types=("Q8_0", "Q4_K", "Q6_K"), prefill: int = 512, ways_too: bool = True
) -> list[dict]:
    """One decode row (M = 1, bf16) through each Llama-3.2-1B matrix shape and stored type: the
    stored-block op against torch's bf16 matmul of the dequantized weight, each timed as one CUDA
    graph of `reps` calls (launch gaps removed); bytes each reads per call / its time; the config
    the autotuner picked. With `prefill` > 0, a prefill of that many rows too: the op (Triton
    dequantization into one bf16 buffer, then torch's matmul) against torch's dequantize() slabs
    (the path before) and a bf16 matmul alone."""
    from llmarch.runtime import gguf_cuda
    from llmarch.runtime.quant import BLOCKS

    shapes = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)}
    shapes["head"] = (128256, 2048)
    out = []

    def timed(fn, reps=reps) -> float:
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                fn()
        g.replay()
        torch.cuda.synchronize()
        t = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / reps

    def slabs(lin, x, qtype):  # the prefill path before the Triton dequantization
        arrays, k = lin.arrays(0), x.shape[1]
        step = max(1, gguf_cuda.SLAB // k)
        for i in range(0, lin.out_features, step):
            w = gguf_cuda.dequantize(tuple(a[i : i + step] for a in arrays), qtype, k).to(x.dtype)
            x @ w.t()

    for qtype in types:
        for name, (n, k) in shapes.items():
            per, nbytes = BLOCKS[qtype]
            raw = torch.randint(0, 256, (n, k // per, nbytes), dtype=torch.uint8, device="cuda")
            for o in {"Q8_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}[qtype]:
                raw[..., o : o + 2] = torch.full((n, k // per, 1), 1e-3, device="cuda").half().view(torch.uint8)
            lin = gguf_cuda.CudaStoredLinear([(qtype, gguf_cuda.repack(raw.reshape(-1), qtype, n, k, "cuda"))], k)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            with torch.inference_mode():
                ts, tb = timed(partial(lin, x)), timed(partial(torch.nn.functional.linear, x, w))
                dp4a = qtype in gguf_cuda.DP4A_TYPES
                if dp4a:  # "stored" above is auto's pick; each path alone (warm L2: one matrix repeated)
                    modes = {}
                    for mode in ("float", "dp4a", "pre"):
                        gguf_cuda.DP4A = mode
                        modes[mode] = timed(partial(lin, x))
                    gguf_cuda.DP4A = "auto"
                    tf, tpre = modes["float"], modes["pre"]
                # a float32 input with a bf16 output (tried for compiled steps: slower, not used)
                flat, x32 = list(lin.arrays(0)), x.float()
                t32 = timed(partial(gguf_cuda.stored_linear, x32, flat, lin.codes, lin.rows, torch.bfloat16))
            if dp4a:
                dt = gguf_cuda._dp4a_launcher(qtype, k)[0]
                best_dp4a = next((c for key, c in dt.cache.items() if n in key), None)
            tuner = gguf_cuda._launcher(qtype)[0]
            best = next(iter(tuner.cache.values()), None) if getattr(tuner, "cache", None) else None
            tuner.cache = {}  # the next shape's tuning must not find this one's
            sb = lin.stored_bytes()
            row = {
                "type": qtype,
                "matrix": name,
                "N": n,
                "K": k,
                "stored_us": ts * 1e6,
                "stored_f32_input_us": t32 * 1e6,
                "bf16_us": tb * 1e6,
                "stored_GBps": sb / ts / 1e9,
                "bf16_GBps": w.numel() * 2 / tb / 1e9,
                "config": str(best),
            }
            line = (
                f"  {qtype} {name:8s} [{n}, {k}]: stored {ts * 1e6:7.1f} us {sb / ts / 1e9:6.0f} GB/s, "
                f"bf16 {tb * 1e6:7.1f} us {w.numel() * 2 / tb / 1e9:6.0f} GB/s  [{best}]"
                f"\n      float32 input: {t32 * 1e6:7.1f} us {sb / t32 / 1e9:6.0f} GB/s"
            )
            if dp4a:
                row.update(float_us=tf * 1e6, float_GBps=sb / tf / 1e9, dp4a_config=str(best_dp4a))
                row.update(dp4a_pre_us=tpre * 1e6, dp4a_us=modes["dp4a"] * 1e6)
                row["auto_path"] = next((v for key, v in gguf_cuda.CHOSEN.items() if key[1] == n and key[2] == k), None)
                line += f"\n      float kernels: {tf * 1e6:7.1f} us {sb / tf / 1e9:6.0f} GB/s (dp4a: {best_dp4a})"
                line += f"\n      dp4a {modes['dp4a'] * 1e6:7.1f} us, row quantized by its own launch first {tpre * 1e6:7.1f} us"
                line += f" (auto picked {row['auto_path']})"
            # each result against the float32 product with dequantize()'s weights: a wrong unpacking
            # misses by the size of y itself, bf16 rounding by ~1e-2 of it at most
            ref = x.float() @ gguf_cuda.dequantize(lin.arrays(0), qtype, k).t()
            row["max_rel_err"] = {"tuned": rel_err(lin, x, ref, torch)}
            per_way = {}
            for way in gguf_cuda.ways(qtype) if ways_too else ():  # each way alone on one fixed tile (4 rows, 4 warps)
                gguf_cuda.FORCE_WAY = way
                try:
                    with torch.inference_mode():
                        per_way[way] = timed(partial(lin, x)) * 1e6
                    row["max_rel_err"][way] = rel_err(lin, x, ref, torch)
                finally:
                    gguf_cuda.FORCE_WAY = None
            if per_way:
                row["way_us"] = per_way
                line += "\n      ways on 4 rows x 4 warps: " + ", ".join(f"{w}: {t:.1f} us" for w, t in per_way.items())
            if prefill and name != "head":  # the prefill path (Triton dequantization + matmul) too
                xp = torch.randn(prefill, k, device="cuda", dtype=torch.bfloat16)
                ref = xp.float() @ gguf_cuda.dequantize(lin.arrays(0), qtype, k).t()
                row["max_rel_err"]["prefill"] = rel_err(lin, xp, ref, torch)
            del ref
            line += "\n      max error / max |y|: " + ", ".join(f"{w}: {e:.1e}" for w, e in row["max_rel_err"].items())
            if prefill and name != "head":
                with torch.inference_mode():
                    tp = timed(partial(lin, xp), 20)
                    told = timed(partial(slabs, lin, xp, qtype), 20)
                    tmm = timed(partial(torch.nn.functional.linear, xp, w), 20)
                row.update(prefill_us=tp * 1e6, prefill_torch_slabs_us=told * 1e6, prefill_bf16_us=tmm * 1e6)
                line += f"\n      prefill {prefill}: op {tp * 1e6:7.1f} us, torch slabs {told * 1e6:7.1f}, bf16 mm {tmm * 1e6:7.1f}"
            out.append(row)
            print(line, flush=True)
            del lin, w, raw
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--types", default="q8_0,q4_k_m")
    ap.add_argument(
        "--dequantized", default="q8_0", help="files also run dequantized (bf16 weights: the same for every file)"
    )
    ap.add_argument("--kernels", action="store_true", help="also time each matrix shape's kernel alone")
    ap.add_argument("--kernels-only", action="store_true", help="only the per-matrix kernel times (no models)")
    ap.add_argument("--kernel-types", default="Q8_0,Q4_K,Q6_K", help="stored types of the per-matrix kernel times")
    ap.add_argument("--modes", default="float", help="K-quant decode paths also run besides auto (gguf_cuda.DP4A)")
    ap.add_argument("--profile", action="store_true", help="where each stored-block decode step's time goes")
    ap.add_argument("--no-prefill", action="store_true", help="kernel times: decode rows only")
    ap.add_argument("--no-ways", action="store_true", help="kernel times: not each float way alone")
    ap.add_argument("--json")
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_gguf_cuda: no CUDA GPU")
    rate = copy_rate(torch)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_rate_Bps": rate}
    res.update(
        compile=a.compile, tokens=a.tokens, prompt=a.prompt, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    )
    if a.kernels or a.kernels_only:
        res["kernels"] = kernel_times(
            torch, types=a.kernel_types.split(","), prefill=0 if a.no_prefill else 512, ways_too=not a.no_ways
        )
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2))
        if a.kernels_only:
            return
    vocab = SHAPES["llama-3.2-1b"][1]["vocab_size"]
    prompt = torch.randint(0, vocab, (a.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        hf = work / "llama-3.2-1b"
        del_model = make_checkpoint("llama-3.2-1b", hf, torch)  # written to disk; the model itself is not needed
        del del_model
        torch.cuda.empty_cache()
        files = {"q8_0": work / "q8_0.gguf"}
        cmd = [sys.executable, "-m", "llmarch", "convert", str(hf), "--to", "gguf", "-o", str(files["q8_0"])]
        subprocess.run([*cmd, "--dtype", "q8_0"], check=True, capture_output=True)
        if "q4_k_m" in a.types:
            files["q4_k_m"] = make_q4_k_m(files["q8_0"], work / "q4_k_m.gguf", torch)
        res["sources_s"] = time.perf_counter() - t
        res["file_bytes"] = {k: p.stat().st_size for k, p in files.items()}
        print(f"sources in {res['sources_s']:.1f} s: {res['file_bytes']}", flush=True)
        torch.cuda.reset_peak_memory_stats()  # the checkpoint was drawn on the GPU: not the first run's peak
        for kind in a.types.split(","):
            runs = []
            if kind != "q8_0":  # Q8_0 has no dp4a kernel: its runs do not depend on the mode
                runs += [(f"stored {m}", True, m) for m in a.modes.split(",") if m]
            runs += [("stored", True, "auto"), ("dequantized", False, "auto")]
            for label, stored, mode in runs:
                if not stored and kind not in a.dequantized.split(","):
                    continue
                try:
                    r = measure(files[kind], stored, prompt, a.tokens, a.reps, a.compile, torch, mode, a.profile)
                except Exception as e:  # report and go on
                    r = {"error": f"{type(e).__name__}: {e}"[:800]}
                else:
                    r["bound_tok_s"] = rate / r["bytes_per_token"]
                    r["fraction_of_bound"] = r["decode_tok_s"] / r["bound_tok_s"]
                res[f"{kind} {label}"] = r
                print(f"{kind} {label}: {json.dumps(r)}", flush=True)
                if a.json:  # after each run: a run cut short by a time limit keeps what it measured
                    Path(a.json).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    print(f"\n{res['device']} Llama-3.2-1B shape, copy {rate / 1e12:.2f} TB/s, compile={a.compile}")
    for kind in a.types.split(","):
        for label in ["stored"] + [f"stored {m}" for m in a.modes.split(",") if m] + ["dequantized"]:
            r = res.get(f"{kind} {label}")
            if r is None:
                continue
            if "error" in r:
                print(f"  {kind:7s} {label:12s} error: {r['error']}")
                continue
            print(
                f"  {kind:7s} {label:12s} decode {r['decode_tok_s']:7.1f} tok/s = {100 * r['fraction_of_bound']:.0f}% of "
                f"{r['bound_tok_s']:.0f} ({r['bytes_per_token'] / 1e9:.2f} GB/token), prefill {r['prefill_tok_s']:.0f} tok/s"
            )


if __name__ == "__main__":
    main()

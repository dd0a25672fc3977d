"""GPU decode speed of `llmarch run` vs transformers' generate, and the fraction of the HBM bound.

    python benchmarks/bench_run_gpu.py --model qwen3-1.7b --tokens 256 [--json OUT.json]

A random-weight bf16 checkpoint with the real config's shapes is written by transformers
(save_pretrained), then both runtimes load it from disk. Bound: decode reads every weight once
per token (the tied embedding once, as the head) plus the KV cache slots the captured step
attends over; tok/s bound = copy rate / bytes per token, the copy rate measured here
(device-to-device copy, reads + writes counted, ~3.0 TB/s on an H100).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from fixtures.hub_shapes import LLAMA_3_2_1B, QWEN3_1_7B  # noqa: E402

SHAPES = {  # the Hub config.json values (sizes only)
    "qwen3-1.7b": ("qwen3", QWEN3_1_7B),
    "llama-3.2-1b": ("llama", LLAMA_3_2_1B),
}


@contextlib.contextmanager
def environ(values: dict[str, str]):
    """os.environ with `values` set while the block runs (the runtime's switches, read at each
    launch), then each key as it was before (unset where it was unset)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def copy_rate(torch) -> float:
    """Bytes moved per second by a 2 GiB device-to-device copy (read + write)."""
    a = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return 2 * a.numel() * a.element_size() / times[len(times) // 2]


def make_checkpoint(
    name: str, out: Path, torch, device: str = "cuda", overrides: dict | None = None, shape: tuple | None = None
):
    """overrides: config values replacing the shape's (a smaller model for a CPU dry run); shape:
    (model_type, config values) of a model not in SHAPES."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kw = shape or SHAPES[name]
    cfg = AutoConfig.for_model(model_type, **{**kw, **(overrides or {})})
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():  # random weights, drawn on the GPU (cheap); norms near 1
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.02 * torch.randn_like(p))
            else:
                p.copy_(0.02 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(out)
    return model


def hf_decode_tok_s(model, prompt, n: int, torch) -> float:
    def gen(k):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    gen(4)  # warm-up
    t1, tn = gen(1), gen(n)
    return (n - 1) / (tn - t1)


def llmarch_prepare(path: Path, prompt: list[int], n: int, compile: bool, device: str = "cuda"):
    """Load and warm up (capture + compile): returns (runtime, generator, load seconds, warm-up Result)."""
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime

    t = time.perf_counter()
    # a GGUF's matrices from its stored blocks, as `llmarch run model.gguf` does by default (where
    # the runtime has kernels for the type; the others are dequantized to bf16)
    rt = load_runtime(str(path), device, "bfloat16", stored_blocks=str(path).endswith(".gguf"))
    load_s = time.perf_counter() - t
    g = Generator(rt, len(prompt) + n, compile=compile)
    warm = g.generate(prompt, n, Sampling())
    return rt, g, load_s, warm


def llmarch_runs(g, prompt: list[int], n: int, reps: int) -> list:
    """reps timed greedy generations after the warm-up (llmarch's own prefill/decode clocks)."""
    from llmarch.runtime.generate import Sampling

    return [g.generate(prompt, n, Sampling()) for _ in range(reps)]


def decode_bytes(rt, g) -> tuple[int, int]:
    """(weight bytes, bytes one decode step reads): every weight once + every cache slot the graph reads.
    Weights held as buffers count too (a GGUF's stored blocks on CUDA)."""
    weights = sum(t.numel() * t.element_size() for t in (*rt.model.parameters(), *rt.model.buffers()))
    return weights, weights + g.cache.nbytes()


# kernel name fragments -> what the kernel does (cuBLAS/CUTLASS GEMMs, SDPA, inductor's fused ops)
KERNEL_KINDS = (
    ("matmul", ("gemm", "gemv", "cutlass", "nvjet", "xmma", "splitk", "cublas")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("fused elementwise/norm (triton)", ("triton",)),
    ("copy/memset", ("memcpy", "memset", "copy")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def decode_profile(g, torch, layers: int, steps: int = 20, pos: int = 1) -> dict:
    """Where a captured decode step's time goes: kernels per step and per layer, their summed GPU
    time by kind, against the step's wall time between back-to-back replays (wall - busy = the
    gaps between kernels, launch latency inside the graph). Replays write K/V at slot `pos` only,
    which the next generate() resets. Falls back to the compiled step run outside the graph when
    the profiler sees no kernels inside graph replays."""
    with torch.inference_mode():  # the graph's static buffers are inference tensors
        return _decode_profile(g, torch, layers, steps, pos)


def _decode_profile(g, torch, layers: int, steps: int, pos: int) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    g.g_ids.zero_()
    g.g_pos.fill_(pos)
    for _ in range(3):
        g.graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        g.graph.replay()
    torch.cuda.synchronize()
    wall_us = (time.perf_counter() - t) / steps * 1e6

    def trace(fn) -> list:
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(steps):
                fn()
            torch.cuda.synchronize()
        return [
            (e.time_range.start, e.time_range.end, e.name)
            for e in p.events()
            if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start
        ]

    source = "graph replays"
    ev = trace(g.graph.replay)
    if not ev:
        source = "the compiled step outside the graph (no kernels seen inside replays)"
        ids = torch.zeros(1, 1, dtype=torch.long, device="cuda")
        p_ = torch.full((1,), pos, dtype=torch.long, device="cuda")
        ev = trace(lambda: g.fn(ids, p_, g.cache, limit=None))
    ev.sort()
    busy, end = 0.0, float("-inf")
    for s, e, _ in ev:  # union of the kernels' intervals (overlapping kernels counted once)
        if e > end:
            busy += e - max(s, end)
            end = e
    kinds: dict = {}
    names: dict = {}
    for s, e, n in ev:
        k = kinds.setdefault(kernel_kind(n), [0, 0.0])
        k[0] += 1
        k[1] += e - s
        m = names.setdefault(n[:90], [0, 0.0])
        m[0] += 1
        m[1] += e - s
    total = sum(e - s for s, e, _ in ev)
    top = sorted(names.items(), key=lambda kv: -kv[1][1])[:12]
    return {
        "source": source,
        "steps": steps,
        "wall_us_per_step": round(wall_us, 1),
        "kernel_us_per_step": round(total / steps, 1),
        "busy_us_per_step": round(busy / steps, 1),
        "gaps_us_per_step": round(wall_us - busy / steps, 1),
        "kernels_per_step": len(ev) / steps,
        "kernels_per_layer": round(len(ev) / steps / max(layers, 1), 1),
        "by_kind": {k: {"per_step": n / steps, "us_per_step": round(us / steps, 1)} for k, (n, us) in kinds.items()},
        "top": [{"kernel": n, "per_step": c / steps, "us_per_step": round(us / steps, 1)} for n, (c, us) in top],
    }


def profile_text(name: str, prof: dict) -> str:
    """decode_profile's figures as a few lines."""
    lines = [
        f"{name}: decode step {prof['wall_us_per_step']:.0f} us wall, GPU busy {prof['busy_us_per_step']:.0f} us "
        f"(kernels {prof['kernel_us_per_step']:.0f} us), gaps {prof['gaps_us_per_step']:.0f} us; "
        f"{prof['kernels_per_step']:.0f} kernels/step = {prof['kernels_per_layer']} per layer ({prof['source']})"
    ]
    for k, v in sorted(prof["by_kind"].items(), key=lambda kv: -kv[1]["us_per_step"]):
        lines.append(f"  {k:34s} {v['per_step']:6.0f} kernels {v['us_per_step']:8.1f} us")
    for t in prof["top"][:6]:
        lines.append(f"    {t['us_per_step']:8.1f} us {t['per_step']:5.0f}x {t['kernel']}")
    return "\n".join(lines)


def llmarch_decode(path: Path, prompt: list[int], n: int, compile: bool, torch, profile: bool = False) -> dict:
    rt, g, load_s, warm = llmarch_prepare(path, prompt, n, compile)
    runs = [warm] + llmarch_runs(g, prompt, n, 3)
    best = max(runs[1:], key=lambda r: r.decode_tok_s)
    if profile:  # where the time of one captured decode step goes
        print(profile_text(path.name, decode_profile(g, torch, len(rt.spec.schedule), pos=len(prompt))))
    weights, bytes_per_token = decode_bytes(rt, g)
    return {
        "decode_tok_s": best.decode_tok_s,
        "prefill_tok_s": best.prefill_tok_s,
        "load_s": load_s,
        "weight_bytes": weights,
        "kv_bytes": g.cache.nbytes(),
        "bytes_per_token": bytes_per_token,
        "tokens": best.tokens,
        "capture_s": runs[0].extra.get("capture_s"),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-1.7b", choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--profile", action="store_true", help="print the kernels of one decode step")
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_run_gpu: no CUDA GPU")
    dev = torch.cuda.get_device_name()
    rate = copy_rate(torch)
    out = {"model": a.model, "device": dev, "torch": torch.__version__, "copy_rate_Bps": rate}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / a.model
        hf = make_checkpoint(a.model, path, torch)
        prompt_t = torch.randint(
            0, SHAPES[a.model][1]["vocab_size"], (1, a.prompt), generator=torch.Generator().manual_seed(0)
        ).cuda()
        out["transformers_tok_s"] = hf_decode_tok_s(hf, prompt_t, min(a.tokens, 128), torch)
        hf_tokens = hf.generate(prompt_t, max_new_tokens=16, do_sample=False)[0, a.prompt :].tolist()
        del hf
        torch.cuda.empty_cache()
        prompt = prompt_t[0].tolist()
        variants = [("graph", False)] + ([] if a.no_compile else [("compile+graph", True)])
        for label, comp in variants:
            try:
                r = llmarch_decode(path, prompt, a.tokens, comp, torch, a.profile)
            except Exception as e:  # report and go on: the other variant still measures
                out[label] = {"error": f"{type(e).__name__}: {e}"[:500]}
                continue
            r["bound_tok_s"] = rate / r["bytes_per_token"]
            r["fraction_of_bound"] = r["decode_tok_s"] / r["bound_tok_s"]
            r["vs_transformers"] = r["decode_tok_s"] / out["transformers_tok_s"]
            r["first16_match_transformers"] = r.pop("tokens")[:16] == hf_tokens
            out[label] = r
            torch.cuda.empty_cache()
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    print(f"\n{dev} {a.model} bf16: copy {rate / 1e12:.2f} TB/s, transformers {out['transformers_tok_s']:.1f} tok/s")
    for label, _ in [("graph", 0), ("compile+graph", 0)]:
        r = out.get(label)
        if r and "error" not in r:
            print(
                f"  llmarch {label:14s} {r['decode_tok_s']:7.1f} tok/s = {r['fraction_of_bound'] * 100:.0f}% of "
                f"{r['bound_tok_s']:.0f} tok/s bound ({r['bytes_per_token'] / 1e9:.2f} GB/token), "
                f"{r['vs_transformers']:.1f}x transformers, greedy match {r['first16_match_transformers']}"
            )
        elif r:
            print(f"  llmarch {label}: {r['error']}")


if __name__ == "__main__":
    main()

"""Probe: does asking the L2 for the next kernel's weights shorten a bf16 decode step's chain of GEMVs?

    python benchmarks/probe_l2_prefetch.py [--model llama-3.2-1b] [--caps 0,4,8,16,32] [--at end,start]

A decode step's matrices run as one GEMV launch each, and every launch pays a ramp (its first loads
wait on memory) and a tail (its last programs drain while the rest of the GPU idles), about 2-4 us
a launch next to the 2-20 us its bytes take at the copy rate; the attention op between q|k|v and o
reads a few hundred kilobytes, so memory idles through it. Here each GEMV (gemv_cuda.launch's
prefetch) asks the L2 for the first CAP bytes of the matrix the step reads next (bulk prefetches,
sm90+), after its own store (`end`) or before its own loads (`start`), so those bytes come in during
the ramps, tails and the attention gap, and the next kernel finds them in the L2.

The chain is a step's real GEMVs in order (bench_gemv_cuda.matrices' shapes: q|k|v with the norm
prologue, o with the residual epilogue, gate|up gated with the norm, down with the residual, the
head) with a stand-in for the attention op between q|k|v and o (one program a KV head sleeping
ATTN_NS and copying q's row: the real op's 4.9 us a layer at 160 slots is latency, not bytes),
captured in one CUDA graph per variant, variants alternated over rounds, median step time; % of
bound = the weights' bytes at the copy rate measured in the same run. Prints one line a variant.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

ATTN_NS = 3500


def stand_in_kernel():
    import triton
    import triton.language as tl

    from llmarch.runtime.gemv_cuda_kernels import prefetch_l2

    @triton.jit
    def attention_stand_in(q, o, pf, pf_bytes, D: tl.constexpr, NS: tl.constexpr, PF: tl.constexpr):
        if PF:
            prefetch_l2(pf, pf_bytes, 32)
        tl.inline_asm_elementwise(
            asm=f"nanosleep.u32 {NS}; mov.u32 $0, $1;",
            constraints="=r,r",
            args=[tl.zeros([1], tl.int32)],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )
        cols = tl.program_id(0) * D + tl.arange(0, D)
        tl.store(o + cols, tl.load(q + cols))

    return attention_stand_in


def build(torch, cfg: dict):
    """The step's weights (random, bf16) and buffers, in the order the step reads them."""
    from bench_gemv_cuda import matrices

    dims = {name: (N, K) for name, N, K, _ in matrices(cfg)}
    L = cfg["num_hidden_layers"]
    dev, bf = "cuda", torch.bfloat16

    def w(name):
        N, K = dims[name]
        return torch.randn(N, K, device=dev, dtype=bf) / K**0.5

    layers = [{name: w(name) for name in ("qkv", "o", "gate_up", "down")} for _ in range(L)]
    head = w("head")
    d = cfg["hidden_size"]
    bufs = {
        "x": torch.randn(1, d, device=dev, dtype=bf),
        "nw": torch.ones(d, device=dev, dtype=bf),
        "qkv": torch.empty(1, dims["qkv"][0], device=dev, dtype=bf),
        "attn": torch.empty(1, dims["o"][1], device=dev, dtype=bf),
        "h": torch.empty(1, dims["down"][1], device=dev, dtype=bf),
        "logits": torch.empty(1, dims["head"][0], device=dev, dtype=bf),
    }
    return layers, head, bufs


def step(torch, gv, stand_in, cfg, layers, head, b, cap: int, at: str, attn_pf: bool) -> None:
    """One decode step's launches; each GEMV prefetches min(cap, next matrix) of the next one."""
    order = [m for layer in layers for m in (layer["qkv"], layer["o"], layer["gate_up"], layer["down"])] + [head]
    nxt = {id(m): order[(i + 1) % len(order)] for i, m in enumerate(order)}
    pos = {"start": 1, "end": 2, "lines": 3}.get(at, 0)

    def pf(m):
        n = nxt[id(m)]
        return {"prefetch": n, "prefetch_bytes": min(cap, n.numel() * 2), "prefetch_at": pos} if cap else {}

    x, nw, eps = b["x"], b["nw"], 1e-5
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    q_heads = cfg["num_attention_heads"]
    for layer in layers:
        gv.launch(x, layer["qkv"], None, b["qkv"], norm_w=nw, eps=eps, **pf(layer["qkv"]))
        # the stand-in: one program per KV head's share of q; with attn_pf it asks for gate|up (o's
        # bytes come from q|k|v's prefetch)
        nheads = cfg["num_key_value_heads"]
        gu = layer["gate_up"]
        stand_in[(nheads,)](
            b["qkv"], b["attn"], gu, min(cap, gu.numel() * 2) // 16 * 16 if attn_pf else 0,
            D=q_heads * hd // nheads, NS=ATTN_NS, PF=attn_pf and cap > 0,
        )  # fmt: skip
        gv.launch(b["attn"], layer["o"], None, x, residual=x, **pf(layer["o"]))
        gv.launch(x, layer["gate_up"], None, b["h"], glu=True, norm_w=nw, eps=eps, **pf(layer["gate_up"]))
        gv.launch(b["h"], layer["down"], None, x, residual=x, **pf(layer["down"]))
    gv.launch(x, head, None, b["logits"], norm_w=nw, eps=eps, **pf(head))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--caps", default="0,4,8,16,32", help="MB of the next matrix each GEMV asks the L2 for")
    ap.add_argument("--at", default="end,start")
    ap.add_argument("--attn-pf", action="store_true", help="the attention stand-in also asks for gate|up")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--pdl", action="store_true", help="also the chain as programmatic dependent launches (+ weights ahead)"
    )
    ap.add_argument("--json")
    a = ap.parse_args()

    import torch
    from bench_run_gpu import SHAPES, copy_rate

    from llmarch.runtime import gemv_cuda as gv

    cfg = SHAPES[a.model][1]
    layers, head, bufs = build(torch, cfg)
    stand_in = stand_in_kernel()
    nbytes = sum(m.numel() * 2 for layer in layers for m in layer.values()) + head.numel() * 2
    variants = [(0, "end", False)]
    for at in a.at.split(","):
        for mb in (int(c) for c in a.caps.split(",") if int(c)):
            variants.append((mb << 20, at, False))
            if a.attn_pf and at == "end":
                variants.append((mb << 20, at, True))
    if a.pdl:
        variants += [(0, "pdl", False), (0, "pdl+ahead", False)]
    graphs = {}
    for v in variants:
        switches = {"pdl": ("1", "0"), "pdl+ahead": ("0", "0")}.get(v[1], ("1", "1"))
        os.environ.update({"LLMARCH_NO_GEMV_AHEAD": switches[0], "LLMARCH_NO_PDL": switches[1]})
        for _ in range(2):  # compile, then settle
            step(torch, gv, stand_in, cfg, layers, head, bufs, *v)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(10):
                step(torch, gv, stand_in, cfg, layers, head, bufs, *v)
        graphs[v] = g
    rate = copy_rate(torch)
    times: dict = {v: [] for v in variants}
    for r in range(a.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            g = graphs[v]
            g.replay()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(3):
                g.replay()
            e.record()
            torch.cuda.synchronize()
            times[v].append(s.elapsed_time(e) / 1e3 / 30)
    out = {"model": a.model, "copy_rate": rate, "bytes": nbytes, "attn_ns": ATTN_NS, "rows": []}
    base = statistics.median(times[variants[0]])
    print(f"{a.model}: {nbytes / 1e9:.2f} GB of weights a step, copy rate {rate / 1e12:.2f} TB/s, "
          f"bound {nbytes / rate * 1e6:.0f} us; load {os.getloadavg()[0]:.1f}")  # fmt: skip
    for v in variants:
        t = statistics.median(times[v])
        label = (
            v[1]
            if v[1].startswith("pdl")
            else "none"
            if not v[0]
            else f"{v[1]}:{v[0] >> 20}MB" + (" +attn" if v[2] else "")
        )
        print(
            f"  {label:16s} {t * 1e6:7.1f} us a step ({min(times[v]) * 1e6:.1f}-{max(times[v]) * 1e6:.1f}), "
            f"{100 * nbytes / rate / t:5.1f}% of bound, {base / t:.3f}x none"
        )
        out["rows"].append({"variant": label, "step_us": t * 1e6, "samples_us": [x * 1e6 for x in times[v]]})
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

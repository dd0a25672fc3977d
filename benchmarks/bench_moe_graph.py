"""Resident-experts MoE decode on a GPU: eager (the grouped loop, one host sync per layer) vs the
sync-free path (stores.routed_static) eager and captured as one CUDA graph, gathered weights + bmm
vs torch._grouped_mm.

    python benchmarks/bench_moe_graph.py                      # H200: Qwen3-30B-A3B shape, 8 layers
    python benchmarks/bench_moe_graph.py --small --device cpu  # smoke test (no graphs on the CPU)

Two parts, one JSON line each and a table:
- one layer's routed experts, one token (T=1): microseconds per call for each form, eager and (the
  sync-free forms) replayed from a graph of 50 calls; Qwen3-30B-A3B's layer (E=128, top-8, d=2048,
  expert width 768, bf16) and a small one (E=16, top-4, d=256, width 128);
- decode tok/s of a Qwen3-30B-A3B-shaped model cut to --layers layers (random bf16 weights drawn on
  the device), the Generator's greedy decode, median of --reps runs after a warm-up; bound = the
  measured device copy rate (reads + writes) / the bytes one step must read (every weight but the
  routed experts, k experts per MoE layer, the KV cache the captured step attends over).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_moe_offload import SMALL, spec_of  # noqa: E402
from bench_run_gpu import copy_rate  # noqa: E402

from fixtures.hub_shapes import QWEN3_30B_A3B  # noqa: E402

LAYER_SHAPES = {"qwen3-30b-a3b": (128, 8, 2048, 768), "small": (16, 4, 256, 128)}  # E, k, d, I


def _time(fn, torch, device, reps: int = 50) -> float:
    """Median microseconds per call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times)


def layer_bench(name: str, device, torch) -> dict:
    import torch.nn.functional as F

    from llmarch.runtime.experts.stores import ExpertStore, ResidentExperts, grouped_mm_fits

    E, k, d, inter = LAYER_SHAPES[name]
    dt = torch.bfloat16
    st = ResidentExperts(E, d, inter, False).load(
        0.02 * torch.randn(E, 2 * inter, d, device=device),
        0.02 * torch.randn(E, d, inter, device=device),
        (None, None),
        dt,
        device,
    )
    act = lambda gu: F.silu(gu[..., :inter]) * gu[..., inter:]  # noqa: E731
    x = torch.randn(1, d, device=device, dtype=dt)
    idx = torch.randperm(E, device=device)[:k].view(1, k)
    w = torch.softmax(torch.randn(1, k, device=device), -1)
    forms = {
        "grouped_loop": lambda: ExpertStore.forward(st, x, idx, w, act),
        "gather_bmm": lambda: st.static(x, idx, w, act, grouped=False),
    }
    if grouped_mm_fits(x, st.gate_up, st.down):
        forms["grouped_mm"] = lambda: st.static(x, idx, w, act, grouped=True)
    ref = forms["grouped_loop"]().float()
    row = {"layer": name, "E": E, "k": k, "d": d, "inter": inter, "bytes_read": k * 3 * d * inter * 2}
    with torch.inference_mode():
        for form, fn in forms.items():
            row[f"{form}_max_abs_vs_loop"] = float((fn().float() - ref).abs().max())
            row[f"{form}_eager_us"] = round(_time(fn, torch, device), 1)
            if device.type == "cuda" and form != "grouped_loop":
                g = torch.cuda.CUDAGraph()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    fn()
                torch.cuda.current_stream().wait_stream(side)
                with torch.cuda.graph(g):
                    for _ in range(50):
                        fn()
                us = _time(g.replay, torch, device, reps=10) / 50
                row[f"{form}_graph_us"] = round(us, 2)
                row[f"{form}_graph_gb_s"] = round(row["bytes_read"] / us / 1e3, 1)
    return row


def build_model(config: dict, device, torch):
    from torch import nn

    from llmarch.runtime.load import Runtime
    from llmarch.runtime.model import build_model as build

    spec = spec_of(config)
    model = build(spec)
    gen = torch.Generator(device=device).manual_seed(0)
    for mod in model.modules():
        for pname, p in list(mod._parameters.items()):
            if p is None or not p.is_meta:
                continue
            t = torch.empty(p.shape, device=device, dtype=torch.bfloat16)
            if pname == "weight" and p.ndim == 1:
                t.fill_(1.0)  # norms
            else:
                t.normal_(0, 0.02, generator=gen)
            mod._parameters[pname] = nn.Parameter(t, requires_grad=False)
    model.eval()
    return Runtime(spec, model, None, device, torch.bfloat16)


def decode_bench(rt, args, device, torch) -> list[dict]:
    from unittest.mock import patch

    from llmarch.runtime.experts import stores
    from llmarch.runtime.generate import Generator, Sampling

    prompt = torch.randint(3, rt.spec.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    configs = [  # (name, CUDA graph, rows taking routed_static, grouped_mm allowed)
        ("eager, grouped loop (before)", False, 0, True),
        ("eager, gather+bmm", False, stores.STATIC_ROWS, False),
        ("eager, grouped_mm", False, stores.STATIC_ROWS, True),
        ("graph, gather+bmm", True, stores.STATIC_ROWS, False),
        ("graph, grouped_mm", True, stores.STATIC_ROWS, True),
    ]
    if device.type != "cuda":
        configs = [c for c in configs if not c[1]]
    if args.configs:
        configs = [c for i, c in enumerate(configs) if str(i) in args.configs.split(",")]
    rows, first = [], None
    for name, graph, static_rows, grouped in configs:
        with patch.object(stores, "STATIC_ROWS", static_rows), patch.object(stores, "GROUPED_MM", grouped):
            if device.type != "cuda" and static_rows:  # the CPU keeps the grouped loop; force the path
                continue
            g = Generator(rt, args.prompt + args.tokens, cuda_graph=graph)
            warm = g.generate(prompt, args.tokens, Sampling())
            runs = [g.generate(prompt, args.tokens, Sampling()) for _ in range(args.reps)]
        tok_s = statistics.median(r.decode_tok_s for r in runs)
        step_bytes = read_per_step(rt, g)
        first = first or warm.tokens
        same = sum(a == b for a, b in zip(warm.tokens, first))
        rows.append(
            {
                "config": name,
                "decode_tok_s": round(tok_s, 1),
                "ms_per_token": round(1e3 / tok_s, 3),
                "runs_tok_s": [round(r.decode_tok_s, 1) for r in runs],
                "prefill_tok_s": round(statistics.median(r.prefill_tok_s for r in runs), 1),
                "capture_s": warm.extra.get("capture_s"),
                "tokens_equal_to_first_config": f"{same}/{len(first)}",
                "bytes_per_step": step_bytes,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del g
    return rows


def read_per_step(rt, g) -> int:
    """Bytes one decode step must read: every parameter except the routed experts, k of each MoE
    layer's experts, and the KV cache."""
    from llmarch.runtime.experts.stores import ResidentExperts

    stores = [m for m in rt.model.modules() if isinstance(m, ResidentExperts)]
    skip = {id(p) for st in stores for p in st.parameters()}
    dense = sum(p.numel() * p.element_size() for p in rt.model.parameters() if id(p) not in skip)
    k = rt.spec.moe.experts_per_token
    experts = sum(k * sum(p[0].numel() * p.element_size() for p in st.parameters()) for st in stores)
    return dense + experts + g.cache.nbytes()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="a small model (CPU smoke test)")
    ap.add_argument("--out", help="write the results JSON here")
    ap.add_argument("--configs", help="comma-separated indices of the decode configurations to run (default all)")
    ap.add_argument("--skip-layer-bench", action="store_true")
    args = ap.parse_args()
    import torch

    device = torch.device(args.device)
    meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    meta["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(json.dumps(meta), flush=True)
    if device.type == "cuda":
        meta["copy_rate_gb_s"] = round(copy_rate(torch) / 1e9, 1)
    names = [] if args.skip_layer_bench else ["small"] if args.small else list(LAYER_SHAPES)
    layers = [layer_bench(n, device, torch) for n in names]
    for row in layers:
        print(json.dumps(row), flush=True)
    config = dict(SMALL if args.small else QWEN3_30B_A3B, num_hidden_layers=args.layers)
    rt = build_model(config, device, torch)
    decode = decode_bench(rt, args, device, torch)
    rate = meta.get("copy_rate_gb_s")
    for r in decode:
        if rate:
            r["bound_tok_s"] = round(rate * 1e9 / r["bytes_per_step"], 1)
            r["fraction_of_bound"] = round(r["decode_tok_s"] / r["bound_tok_s"], 3)
    print(f"\n{'config':32} {'tok/s':>8} {'ms/token':>9} {'of bound':>9}  ({args.layers} layers, {meta['device']})")
    for r in decode:
        frac = f"{100 * r['fraction_of_bound']:.0f}%" if "fraction_of_bound" in r else "-"
        print(f"{r['config']:32} {r['decode_tok_s']:8.1f} {r['ms_per_token']:9.3f} {frac:>9}")
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "layers": layers, "decode": decode}, indent=1))


if __name__ == "__main__":
    main()

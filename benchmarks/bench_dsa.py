"""Decode speed of a DeepSeek-V3.2-shaped slice at a long context: sparse attention (the lightning
indexer picks index_topk cached tokens per step) against the same model attending densely.

    python benchmarks/bench_dsa.py                          # the real layer shapes, on a CUDA machine
    python benchmarks/bench_dsa.py --small --device cpu     # smoke test of the same path

DeepSeek-V3.2's config (transformers' DeepseekV32Config defaults: hidden 7168, 128 heads,
kv_lora_rank 512, rope 64, nope 128, v 128, q_lora 1536, indexer 64 heads of 128, top-k 2048,
256 routed experts top-8 of width 2048, 1 shared, vocab 129280) with --layers layers, every one
MoE. Random weights: attention, router, shared expert, embedding and head in bf16 on the GPU;
routed experts as random int4 bytes and fp16 scales on the host, computed by the CPU kernel
(`--experts cpu`'s store and segmented decoder: GPU segments replayed as CUDA graphs between host
round trips), as bench_moe_offload.py builds them.
The cache: a 16-token prefill makes it, then its first --context slots are overwritten with random
latents, rope keys and indexer keys (unit scale, as after their norms) instead of a 32k-token
prefill, which would run 32k tokens through the host experts. Decode starts at --context.
Both modes decode from the same cache with the same weights: "indexer" with index_topk 2048,
"dense" with index_topk above the cache size (the indexer then scores nothing and MLA reads every
cached token; the logits are dense MLA's exactly).
Per mode: decode tok/s; the GPU segments alone (the graphs replayed back to back, no host experts);
one layer's attention alone (its graph replayed); and the bandwidth bound: host expert bytes per
step / the host's read rate (a float32 sum over 1 GiB, all cores) + GPU bytes per step (weights
other than the embedding, one embedding row, latent and rope-key bytes of the tokens attention
reads, indexer keys scanned) / the GPU's copy rate (bytes read + written per second by a 1 GiB
device-to-device copy). --rounds N runs the two modes N times, alternated (the host experts' time
drifts from run to run); then the parts of one layer's sparse step are timed alone (the indexer,
its top-k sorted and unsorted, the selected latents' gather). Prints one JSON line per run and a
table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_moe_offload import build_llmarch  # noqa: E402

SMALL = dict(  # the same structure, small enough for a CPU
    vocab_size=1024,
    hidden_size=256,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=128,
    kv_lora_rank=64,
    qk_rope_head_dim=32,
    qk_nope_head_dim=32,
    v_head_dim=32,
    index_n_heads=8,
    index_head_dim=64,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    moe_intermediate_size=128,
)


def spec_of(layers: int, small: bool, topk: int):
    from fixtures.make import make_skeleton
    from llmarch.arch.fingerprint import fingerprint
    from llmarch.checkpoint import open_checkpoint

    config = dict(SMALL if small else {}, index_topk=topk, num_hidden_layers=layers, first_k_dense_replace=0)
    config["mlp_layer_types"] = ["sparse"] * layers
    d = make_skeleton("deepseek_v32", tempfile.mkdtemp(prefix="bench-dsa-"), config, mtp=False)  # headers only
    return fingerprint(open_checkpoint(str(d)))


def fill_cache(rt, cache, context: int, device) -> None:
    """Make the latent caches with a short prefill, then write random entries into slots [0, context)."""
    import torch

    ids = torch.randint(0, rt.spec.vocab_size, (1, 16), device=device)
    rt.model(ids, torch.arange(16, device=device), cache, limit=16)
    g = torch.Generator(device=device).manual_seed(0)
    for lc in cache.layers.values():
        for t in (lc.k, lc.v, lc.index_k):
            if t is not None:
                t[:, :context].normal_(generator=g)


def set_topk(model, k: int) -> None:
    for b in model.layers:
        ix = getattr(b.attn, "indexer", None)
        if ix is not None:
            ix.topk = k


def copy_rate(device) -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy (best of 5)."""
    import torch

    a = torch.empty(1 << 29, dtype=torch.int16, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    best = 0.0
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        best = max(best, 2 * a.numel() * 2 / (s.elapsed_time(e) / 1e3))
    return best


def gpu_bytes(rt, cache, topk: int) -> dict:
    """GPU bytes one decode step reads: weights (one embedding row) and the cache entries attention reads."""
    m = rt.model
    emb = m.embed.weight if hasattr(m, "embed") else None
    weights = 0
    for p in m.parameters():
        if p.device.type == rt.device.type and p is not emb:
            weights += p.numel() * p.element_size()
    if emb is not None:
        weights += emb.shape[1] * emb.element_size()
    latent = index = 0
    for lc in cache.layers.values():
        S, el = lc.k.shape[1], lc.k.element_size()
        per_tok = (lc.k.shape[-1] + lc.v.shape[-1]) * el
        sparse = lc.index_k is not None and topk < S
        latent += (topk if sparse else S) * per_tok  # the selected tokens, or every slot of the static cache
        if sparse:  # every slot's indexer key is scored
            index += S * lc.index_k.shape[-1] * lc.index_k.element_size()
    return {"weights": weights, "latent": latent, "index_keys": index}


def time_graphs(fn, reps: int, device) -> float:
    """Median seconds of fn() (CUDA: timed by events, after a sync)."""
    import torch

    times = []
    for _ in range(reps):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def attention_only(rt, cache, pos: int, device, reps: int) -> float:
    """Seconds of one layer's attention step (norm, MLA, indexer where sparse), captured as a graph on a GPU."""
    import torch

    b = rt.model.layers[0]
    x = torch.randn(1, 1, rt.spec.hidden_size, device=device, dtype=rt.dtype)
    p = torch.full((1,), pos, dtype=torch.long, device=device)
    return graph_time(lambda: b.attn(b.attn_norm(x), p, cache), device, reps)


def indexer_pieces(rt, cache, pos: int, device, reps: int = 50) -> dict:
    """Milliseconds of the parts of layer 0's sparse step at the cache's size, each captured alone."""
    import torch

    attn = rt.model.layers[0].attn
    ix, lc = attn.indexer, cache.layers[0]
    S = lc.k.shape[1]
    x = torch.randn(1, 1, rt.spec.hidden_size, device=device, dtype=rt.dtype)
    qr = torch.randn(1, 1, rt.spec.attention.q_lora_rank, device=device, dtype=rt.dtype)
    p = torch.full((1,), pos, dtype=torch.long, device=device)
    visible = torch.arange(S, device=device)[None, :] <= p[:, None]
    score = torch.randn(1, 1, S, device=device)
    sel = ix(x, qr, p, attn.rope, lc.index_k, visible)
    pieces = {
        "indexer": lambda: ix(x, qr, p, attn.rope, lc.index_k, visible),
        "topk_sorted": lambda: score.topk(ix.topk, dim=-1),
        "topk_unsorted": lambda: score.topk(ix.topk, dim=-1, sorted=False),
        "index_keys_to_float": lambda: lc.index_k.float(),
        "gather_selected": lambda: (sel.gather(lc.k), sel.gather(lc.v)),
    }
    return {k: round(graph_time(fn, device, reps) * 1e3, 4) for k, fn in pieces.items()}


def graph_time(fn, device, reps: int) -> float:
    """Median seconds of fn, captured as a CUDA graph on a GPU (eager on a CPU)."""
    import torch

    if device.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return time_graphs(g.replay, reps, device)
    return time_graphs(fn, reps, device)


def run_mode(args, rt, gen, mode: str, topk: int, bw_host: float, bw_gpu: float) -> dict:
    import torch

    from llmarch.runtime.experts.decode import SegmentedDecoder
    from llmarch.runtime.experts.report import offloaded, reset_counters

    device = rt.device
    set_topk(rt.model, topk)
    dec = SegmentedDecoder(rt.model, gen.cache, device)
    assert dec.ok and dec.native, "the int4 host experts' segmented decoder"
    pos = args.context
    nxt = torch.zeros(1, 1, dtype=torch.long, device=device)
    for _ in range(3):  # capture and warm-up: the slots written here are rewritten below
        dec.step(nxt, pos)
    reset_counters(rt.model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    toks = []
    t0 = time.perf_counter()
    for i in range(args.tokens):
        logits = dec.step(nxt, pos + i)
        nxt = logits.argmax(-1, keepdim=True).view(1, 1)
        toks.append(int(nxt))  # the host needs each token before the next step (as run's loop does)
    sync()
    dt = time.perf_counter() - t0
    host_per_step = sum(s.bytes_read for s in offloaded(rt.model)) / args.tokens
    gb = gpu_bytes(rt, gen.cache, topk)
    gpu_per_step = sum(gb.values())
    if dec.graphs:  # the GPU segments back to back, the host experts left out
        seg_s = time_graphs(lambda: [g.replay() for g in dec.captured], 20, device)
    else:
        seg_s = 0.0
    attn_s = attention_only(rt, gen.cache, pos + args.tokens, device, 50)
    bound_s = host_per_step / bw_host + (gpu_per_step / bw_gpu if bw_gpu else 0.0)
    step_s = dt / args.tokens
    return {
        "mode": mode,
        "index_topk": topk,
        "context": args.context,
        "cache_slots": gen.cache.max_seq,
        "decode_tok_s": round(args.tokens / dt, 2),
        "step_ms": round(step_s * 1e3, 3),
        "gpu_segments_ms": round(seg_s * 1e3, 3),
        "attention_layer_ms": round(attn_s * 1e3, 4),
        "host_expert_bytes_per_step": int(host_per_step),
        "gpu_bytes_per_step": gb,
        "bound_ms": round(bound_s * 1e3, 3),
        "host_bound_ms": round(host_per_step / bw_host * 1e3, 3),
        "gpu_bound_ms": round(gpu_per_step / bw_gpu * 1e3, 3) if bw_gpu else None,
        "fraction_of_bound": round(bound_s / step_s, 3),
        "tokens": toks[:8],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="small shapes (CPU smoke test)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="indexer then dense, this many times")
    ap.add_argument("--topk", type=int, default=2048, help="index_topk of the sparse mode (DeepSeek-V3.2: 2048)")
    args = ap.parse_args()
    import torch

    from llmarch.runtime.experts.decode import attach_decoder
    from llmarch.runtime.experts.report import host_read_bandwidth
    from llmarch.runtime.generate import Generator

    torch.set_num_threads(os.cpu_count())
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec = spec_of(args.layers, args.small, args.topk)
    bw_host = host_read_bandwidth()
    bw_gpu = copy_rate(device) if device.type == "cuda" else bw_host  # on a CPU, "GPU" bytes come from RAM too
    machine = {
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "host_read_gb_s": round(bw_host / 1e9, 1),
        "gpu_copy_gb_s": round(bw_gpu / 1e9, 1),
        "torch": torch.__version__,
    }
    print(json.dumps({"machine": machine}), flush=True)
    rt, build_s = build_llmarch(spec, device, dtype, 4, 0)
    slots = args.context + args.tokens + 8
    gen = Generator(rt, slots, cuda_graph=False)
    assert attach_decoder(gen)
    with torch.inference_mode():
        fill_cache(rt, gen.cache, args.context, device)
        rows = []
        for _ in range(args.rounds):  # alternated: the host experts' time drifts between runs
            for mode, k in (("indexer", args.topk), ("dense", slots + 1)):
                rows.append(run_mode(args, rt, gen, mode, k, bw_host, bw_gpu))
                rows[-1].update(layers=args.layers, build_s=round(build_s, 1))
                print(json.dumps(rows[-1]), flush=True)
        set_topk(rt.model, args.topk)
        print(json.dumps({"indexer_pieces_ms": indexer_pieces(rt, gen.cache, args.context, device)}), flush=True)
    print(
        f"\n{'mode':<9}{'topk':>7}{'tok/s':>8}{'step ms':>9}{'GPU seg ms':>11}{'attn ms':>9}"
        f"{'host MiB':>10}{'GPU MiB':>9}{'bound ms':>10}{'frac':>7}"
    )
    for r in rows:
        g = sum(r["gpu_bytes_per_step"].values()) / 2**20
        print(
            f"{r['mode']:<9}{r['index_topk']:>7}{r['decode_tok_s']:>8}{r['step_ms']:>9}{r['gpu_segments_ms']:>11}"
            f"{r['attention_layer_ms']:>9}{r['host_expert_bytes_per_step'] / 2**20:>10.1f}{g:>9.1f}"
            f"{r['bound_ms']:>10}{r['fraction_of_bound']:>7}"
        )
    med = {m: sorted(r["decode_tok_s"] for r in rows if r["mode"] == m) for m in ("indexer", "dense")}
    med = {m: v[len(v) // 2] for m, v in med.items()}
    print(f"median tok/s: indexer {med['indexer']}, dense {med['dense']}: {med['indexer'] / med['dense']:.3f}x")


if __name__ == "__main__":
    main()

"""Gated DeltaNet speed on the CPU: the chunked prefill form vs the token-by-token recurrence, and
decode tok/s of `llmarch run`'s model beside transformers' torch path, in one run.

    python benchmarks/bench_linear_attention.py [--tokens 2048] [--decode 32] [--threads N]

Shape: a small Qwen3-Next (random float32 weights made by transformers from the config below:
hidden 1024, Gated DeltaNet with 8 key / 16 value heads of 128, the real model's head widths;
8 layers, 3:1 linear : gated full attention, MoE 16 experts top-4 + gated shared expert).
1. Prefill of --tokens tokens through one linear layer's core: `chunked` (chunks of 32, the WY
   form) vs `recurrent_step` called once per token, same inputs; outputs compared.
2. Decode: the whole model, a 64-token prompt then --decode greedy tokens, llmarch's Generator vs
   transformers' generate (its torch fallbacks: the fast kernels are not installed); the greedy
   tokens must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SHAPE = dict(
    vocab_size=4096,
    hidden_size=1024,
    intermediate_size=2048,
    moe_intermediate_size=256,
    shared_expert_intermediate_size=256,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=128,
    linear_num_key_heads=8,
    linear_num_value_heads=16,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    num_experts=16,
    num_experts_per_tok=4,
    max_position_embeddings=4096,
)


def best(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_prefill(T: int, rounds: int) -> dict:
    import torch

    from llmarch.runtime.ops.gated_deltanet import chunked, l2norm, recurrent_step

    g = torch.Generator().manual_seed(0)
    H, Dk, Dv = SHAPE["linear_num_value_heads"], SHAPE["linear_key_head_dim"], SHAPE["linear_value_head_dim"]
    q = l2norm(torch.randn(1, H, T, Dk, generator=g)) * Dk**-0.5
    k = l2norm(torch.randn(1, H, T, Dk, generator=g))
    v = torch.randn(1, H, T, Dv, generator=g)
    decay = -torch.rand(1, H, T, generator=g) * 0.1
    beta = torch.rand(1, H, T, generator=g)
    out = {}

    def run_chunked():
        s = torch.zeros(1, H, Dk, Dv)
        out["chunked"] = chunked(q, k, v, decay, beta, s)

    def run_recurrent():
        s = torch.zeros(1, H, Dk, Dv)
        o = torch.empty(1, H, T, Dv)
        for t in range(T):
            o[:, :, t] = recurrent_step(q[:, :, t], k[:, :, t], v[:, :, t], decay[:, :, t], beta[:, :, t], s)
        out["recurrent"] = o

    with torch.inference_mode():
        tc, tr = best(run_chunked, rounds), best(run_recurrent, rounds)
    err = (out["chunked"] - out["recurrent"]).abs().max().item()
    return {
        "tokens": T,
        "chunked_s": round(tc, 4),
        "recurrent_s": round(tr, 4),
        "chunked_tok_s": round(T / tc, 1),
        "recurrent_tok_s": round(T / tr, 1),
        "speedup": round(tr / tc, 2),
        "max_abs_diff": err,
    }


def bench_decode(n: int, rounds: int) -> dict:
    import torch
    import transformers

    from fixtures.make import make_tiny
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime

    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny("qwen3_next", Path(tmp) / "m", **SHAPE)
        prompt = torch.randint(3, SHAPE["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(1))
        rt = load_runtime(str(path), "cpu", "float32")
        gen = Generator(rt, 64 + n)
        res = None
        times = []
        for _ in range(rounds):
            res = gen.generate(prompt[0].tolist(), n, Sampling())
            times.append(res.decode_tok_s)
        ours = max(times)
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

        def hf(k):
            t = time.perf_counter()
            with torch.inference_mode():
                o = ref.generate(prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False)
            return time.perf_counter() - t, o

        hf(2)
        theirs = []
        for _ in range(rounds):
            t1, _ = hf(1)
            tn, o = hf(n)
            theirs.append((n - 1) / (tn - t1))
        same = o[0, 64:].tolist() == res.tokens
    return {
        "prompt": 64,
        "tokens": n,
        "llmarch_decode_tok_s": round(ours, 1),
        "transformers_decode_tok_s": round(max(theirs), 1),
        "speedup": round(ours / max(theirs), 2),
        "same_greedy_tokens": same,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-decode", action="store_true")
    a = ap.parse_args()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    doc = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
        "prefill": bench_prefill(a.tokens, a.rounds),
    }
    print(json.dumps(doc), flush=True)
    if not a.skip_decode:
        doc["decode"] = bench_decode(a.decode, a.rounds)
        print(json.dumps(doc["decode"]))


if __name__ == "__main__":
    main()

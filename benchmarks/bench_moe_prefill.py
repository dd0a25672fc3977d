"""A long prompt through host experts on a GPU: the experts uploaded (experts/upload.py, the
default from 32 tokens) against the CPU kernel computing them (upload.UPLOAD_TOKENS raised past
the prompt), alternated on the same model in one process; plus the decode tok/s of the same model.

    python benchmarks/bench_moe_prefill.py [--layers 4] [--pp 512] [--rounds 3] [--json OUT]

The model is bench_vs_llamacpp's MoE row: Qwen3-30B-A3B's shapes cut to --layers layers, random
weights, converted to a Q4_0 GGUF by `llmarch convert`, loaded with --experts cpu (the experts'
Q4_0 blocks in host RAM as stored).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    import torch
    from bench_vs_llamacpp import llmarch_moe_prepare, make_moe_source, moe_config

    from llmarch.runtime.experts import upload
    from llmarch.runtime.generate import Sampling

    _, cfg = moe_config(a.layers, False)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg["vocab_size"], (a.pp,), generator=gen).tolist()
    with tempfile.TemporaryDirectory() as work:
        t = time.perf_counter()
        path = make_moe_source(Path(work), a.layers, "cuda", False, torch)
        made_s = time.perf_counter() - t
        # the other matrices dequantized to bf16, the form its figures were measured with
        rt, g, load_s, segmented = llmarch_moe_prepare(path, prompt[:1], 8, "cuda", a.pp + a.tg + 2, False)
        res: dict = {"layers": a.layers, "pp": a.pp, "made_s": made_s, "load_s": load_s, "segmented": segmented}
        res["decode_tok_s"] = statistics.median(
            [g.generate(prompt[:1], a.tg, Sampling()).decode_tok_s for _ in range(a.rounds)]
        )
        on = upload.UPLOAD_TOKENS
        samples: dict = {"gpu upload": [], "cpu kernel": []}
        for label, tokens in (("gpu upload", on), ("cpu kernel", 1 << 30)) * (a.rounds + 1):
            upload.UPLOAD_TOKENS = tokens
            samples[label].append(g.generate(prompt, 1, Sampling()).prefill_tok_s)
        upload.UPLOAD_TOKENS = on
        res["prefill_samples"] = {k: v[1:] for k, v in samples.items()}  # the first of each: warm-up
        res["prefill_tok_s"] = {k: statistics.median(v[1:]) for k, v in samples.items()}
        res["loadavg"] = os.getloadavg()
    print(json.dumps(res), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

"""The one-C-call CPU decode step (llmarch/runtime/cpu_decode.py) against the module path it replaces,
on the embedded Gemma 3 270M Q4_K_M (stored blocks), several prompts:

    python benchmarks/check_cpu_decode.py [--tokens 64] [--threads 1] [--json OUT]

Per prompt: greedy tokens of both paths (Generator.generate, the step's own argmax against torch's
over the module path's logits), then the module path's continuation teacher-forced through both
steps on one cache, the largest absolute logit difference over every step. Both paths call the same
C kernels, so the logits are expected equal bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime
    from llmarch.runtime.tokenizer import load_tokenizer

    rt = load_runtime(None, "cpu", None, None, stored_blocks=True)
    tok = load_tokenizer(rt.ckpt)
    out: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": a.threads, "prompts": []}
    ok = True
    for text in PROMPTS:
        prompt = tok.encode(text)
        gen = Generator(rt, len(prompt) + a.tokens)
        step = gen.cpu_step
        if step is None:
            sys.exit("the C decode step does not take this model")
        c = gen.generate(prompt, a.tokens, Sampling())
        gen.cpu_step = None
        m = gen.generate(prompt, a.tokens, Sampling())
        worst = 0.0
        with torch.inference_mode():
            gen.cache.reset()
            gen.model(torch.tensor([prompt]), torch.arange(len(prompt)), gen.cache, limit=len(prompt))
            for i, t in enumerate(m.tokens[:-1]):
                pos, ids = len(prompt) + i, torch.tensor([[t]])
                from_c = step(ids, pos).clone()  # writes the cache slot the module step then rewrites
                from_modules = gen._step_eager(ids, pos)
                worst = max(worst, (from_c - from_modules).abs().max().item())
        same = c.tokens == m.tokens
        ok &= same and worst == 0.0
        row = {
            "prompt": text,
            "tokens_equal": same,
            "tokens": len(m.tokens),
            "max_abs_logit_diff": worst,
            "decode_tok_s": {"c_step": c.decode_tok_s, "module_path": m.decode_tok_s},
            "load_average": os.getloadavg()[0],
        }
        out["prompts"].append(row)
        print(json.dumps(row), flush=True)
    out["all_equal"] = ok
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

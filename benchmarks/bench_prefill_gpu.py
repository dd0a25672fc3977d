"""GPU prefill of one 512-token chunk: eager (a one-off prompt, `llmarch run`) against replayed from
its CUDA graph (runtime/prefill_graph.py: a repeated prompt length), in alternating rounds, on a
fresh process and again after a compiled, captured decode step of the same model ran in it (the
order llama.cpp yardstick runs use: decode first, then prefill).

    python benchmarks/bench_prefill_gpu.py --model llama-3.2-1b [--tokens 512] [--json OUT.json]

Random bf16 weights with the real config's shapes (bench_run_gpu.make_checkpoint). Each figure is
llmarch's own prefill clock (host clock around the prefill and the first token's argmax, synced).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_run_gpu import SHAPES, make_checkpoint  # noqa: E402


def rounds(rt, prompt: list[int], reps: int) -> dict:
    """Eager and replayed prefill tok/s of `prompt`, alternating, after the warm-ups (an eager one;
    the padded one that captures)."""
    from llmarch.runtime.generate import Generator, Sampling

    g = Generator(rt, len(prompt) + 1)
    graphs = g.prefill_graphs
    g.generate(prompt, 1, Sampling())
    capture = g.generate(prompt, 1, Sampling()).extra
    eager, replay = [], []
    for _ in range(reps):
        g.prefill_graphs = None
        eager.append(g.generate(prompt, 1, Sampling()).prefill_tok_s)
        g.prefill_graphs = graphs
        replay.append(g.generate(prompt, 1, Sampling()).prefill_tok_s)
    return {
        "eager_tok_s": statistics.median(eager),
        "replay_tok_s": statistics.median(replay),
        "eager_samples": eager,
        "replay_samples": replay,
        "capture": capture,
        "loadavg": os.getloadavg(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SHAPES), default="llama-3.2-1b")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip the phase after a compiled decode")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    import torch

    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime

    res: dict = {"model": a.model, "tokens": a.tokens, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    res["device"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(a.model, Path(tmp), torch)
        torch.cuda.empty_cache()
        rt = load_runtime(tmp, "cuda", "bfloat16")
        vocab = rt.spec.vocab_size
        prompt = torch.randint(0, vocab, (a.tokens,), generator=torch.Generator().manual_seed(0)).tolist()
        res["fresh"] = rounds(rt, prompt, a.reps)
        print("fresh:", {k: v for k, v in res["fresh"].items() if not k.endswith("samples")}, flush=True)
        if not a.no_compile:
            t = time.perf_counter()
            g = Generator(rt, 64, compile=True)
            dec = g.generate([1], 32, Sampling())
            res["compiled_decode"] = {"tok_s": dec.decode_tok_s, "seconds_with_compile": time.perf_counter() - t}
            del g
            res["after_compiled_decode"] = rounds(rt, prompt, a.reps)
            print(
                "after a compiled decode:",
                {k: v for k, v in res["after_compiled_decode"].items() if not k.endswith("samples")},
                flush=True,
            )
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

"""bench_vs_llamacpp's MoE row on its own: the 4-layer Qwen3-30B-A3B-shaped Q4_0 GGUF loaded as
`llmarch run` loads it (experts in host RAM, the rest from the file's blocks on CUDA), decode tok/s
with the GPU reading 0, 1, 2, 3 (--slots) of each token's experts over PCIe, alternated round by
round, then where a token's time goes (profile_moe_offload.profile_step) with the default share.
Run on the CUDA machine; prints JSON lines.

    python benchmarks/profile_moe_gguf.py [--layers 4] [--slots 0 2 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch
    from bench_vs_llamacpp import llmarch_moe_prepare, make_moe_source
    from profile_moe_offload import profile_step

    from llmarch.runtime.generate import Sampling

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--slots", nargs="+", default=["0", "1", "2", "3"])
    ap.add_argument("--no-profile", action="store_true")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moe_gguf_"))
    t = time.perf_counter()
    path = make_moe_source(work, a.layers, "cuda", False, torch)
    print(json.dumps({"gguf_s": round(time.perf_counter() - t, 1)}), flush=True)
    prepared = {}
    for n in [None, *a.slots]:
        rt, g, _, seg = llmarch_moe_prepare(path, [940], a.tg, "cuda", 1024, gpu_slots=n)
        dec = g._step_eager.__self__
        prepared[f"slots_{dec.slots}" + ("_default" if n is None else "")] = (rt, g)
        print(json.dumps({"variant": n, "slots": dec.slots, "notes": rt.notes[-1:]}), flush=True)
    rates: dict[str, list] = {k: [] for k in prepared}
    for rnd in range(a.rounds):
        for name, (_, g) in prepared.items():
            r = g.generate([940], a.tg, Sampling())
            rates[name].append(round((len(r.tokens) - 1) / r.decode_s, 1))
        print(json.dumps({"round": rnd, **{k: v[-1] for k, v in rates.items()}}), flush=True)
    print(json.dumps({"median_tok_s": {k: statistics.median(v) for k, v in rates.items()}}), flush=True)
    if not a.no_profile:
        name = next(k for k in prepared if k.endswith("_default"))
        rt, g = prepared[name]
        print(json.dumps({"profile": name, **profile_step(g, rt, rt.model.spec, reps=20, early=False)}))


if __name__ == "__main__":
    main()

"""Probe: a bf16 decode step's chain of GEMVs by gemv_stream_cuda's kernel (CUDA C++ through NVRTC,
weights streamed through shared memory by bulk copies asked for before the PDL wait), with rings
other than the runtime's, against the Triton kernel's launches.

    python benchmarks/probe_tma_gemv.py [--model llama-3.2-1b] [--rounds 5] [--stages 2,3] \
        [--stage-kb 16,32,64] [--unchained] [--json OUT]

A decode step of a 1-2B model is ~65-115 GEMV launches of 2-20 us of bytes each; each launch of the
runtime's Triton kernel pays ~2.5 us of ramp (its first loads wait on memory) and tail. The stream
kernel has one CTA a SM own a contiguous range of weight rows (a contiguous range of bytes) and ask
the copy engine for it, --stages copies of ~--stage-kb KB at a time into a shared-memory ring, the
first ones before `griddepcontrol.wait`, so that as a programmatic dependent launch its bytes
arrive while the kernel before drains. Each ring here may take up to 227 KB a CTA (the runtime's
takes at most half a SM: 3 x 32 KB); --unchained also times each ring launched without PDL.

The chain is bench_gemv_cuda.matrices' shapes without attention, as probe_persistent_gemv: per
layer q|k|v from rms_norm(x), x += (q's first rows) @ o^T, gate|up gated from rms_norm(x),
x += h @ down^T; then the head from rms_norm(x). The same chain by gemv_cuda.launch (the runtime's
Triton kernel, one launch each) gives the reference output and the time to beat. Also times each
matrix kind alone (its 16+ layers back to back) both ways. Prints step times, % of the copy-rate
bound and the error against the launches' logits.
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

from llmarch.runtime import gemv_stream_cuda as gs  # noqa: E402


class Kernel:
    """gemv_stream_cuda's kernel for one matrix kind with a ring of `stages` stages of ~stage_kb KB
    (up to 227 KB a CTA), launched as a programmatic dependent launch or not."""

    def __init__(self, torch, K: int, glu: bool, norm: bool, res: bool, stages: int, pdl: bool, stage_kb: int):
        ring = gs.plan(K, glu, stage_kb * 1024, stages, 227 * 1024)
        assert ring is not None, (K, glu, stage_kb, stages)
        self.k = gs.kernel(0, K, *ring, False, glu, "16" if norm else "", res, False)
        self.pdl, self.sms = pdl, torch.cuda.get_device_properties(0).multi_processor_count

    def __call__(self, x, w, y, N, nw=None, res=None, eps=0.0):
        self.k.launch(min(self.sms, N), [w, x, None, nw, res, y, N, float(eps)], dependent=self.pdl)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--stages", default="3", help="ring depths to try, comma-separated")
    ap.add_argument("--stage-kb", default="32", help="KB a stage aims at, comma-separated")
    ap.add_argument("--unchained", action="store_true", help="also as plain launches (no PDL)")
    ap.add_argument("--json")
    a = ap.parse_args()

    import torch
    from bench_run_gpu import copy_rate
    from gemv_chain import Chain, graph_times

    c = Chain(torch, a.model)

    def tma_chain(stages: int, pdl: bool, stage_kb: int):
        kq = Kernel(torch, c.D, False, True, False, stages, pdl, stage_kb)
        ko = Kernel(torch, c.Q, False, False, True, stages, pdl, stage_kb)
        kg = Kernel(torch, c.D, True, True, False, stages, pdl, stage_kb)
        kd = Kernel(torch, c.F, False, False, True, stages, pdl, stage_kb)

        def run(x, q, h, logits, only=None):
            for layer in range(c.L):
                if only in (None, "qkv"):
                    kq(x, c.wqkv[layer], q, c.NQKV, nw=c.nw, eps=1e-5)
                if only in (None, "o"):
                    ko(q, c.wo[layer], x, c.D, res=x)
                if only in (None, "gate|up"):
                    kg(x, c.wgu[layer], h, c.F, nw=c.nw, eps=1e-5)
                if only in (None, "down"):
                    kd(h, c.wd[layer], x, c.D, res=x)
            if only is None:
                kq(x, c.whead, logits, c.V, nw=c.nw, eps=1e-5)

        return run

    ref = c.bufs()
    c.launches(*ref)
    torch.cuda.synchronize()
    variants = {"launches (Triton)": c.launches}
    out: dict = {"model": a.model, "bytes": c.bytes, "rows": []}
    configs = [
        (int(st), int(kb), pdl) for kb in a.stage_kb.split(",") for st in a.stages.split(",") for pdl in (True, False)
    ]
    for st, kb, pdl in configs:
        if not pdl and not a.unchained:
            continue
        name = f"tma {st}x{kb} KB" + (" pdl" if pdl else "")
        try:
            fn = tma_chain(st, pdl, kb)
            b = c.bufs()
            fn(*b)
            torch.cuda.synchronize()
        except Exception as e:
            print(f"{name}: {type(e).__name__}: {str(e)[:400]}", flush=True)
            continue
        if c.admit(name, b, ref, out["rows"]):
            variants[name] = fn
    rate = copy_rate(torch)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{a.model}: {c.bytes / 1e9:.2f} GB of weights a step, copy rate {rate / 1e12:.2f} TB/s, "
          f"bound {c.bytes / rate * 1e6:.0f} us, {sms} SMs; load {os.getloadavg()[0]:.1f}")  # fmt: skip
    for only, nb in [(None, c.bytes), *c.kind_bytes.items()]:
        timed = {n: (lambda b, fn=fn, only=only: fn(*b, only=only)) for n, fn in variants.items()}
        times = graph_times(torch, timed, c.bufs, a.rounds)
        names = list(times)
        base = statistics.median(times[names[0]])
        label = only or "whole chain"
        for n in names:
            t = statistics.median(times[n])
            print(f"  {label:11s} {n:32s} {t * 1e6:7.1f} us, {100 * nb / rate / t:5.1f}% of bound, "
                  f"{base / t:.3f}x launches", flush=True)  # fmt: skip
            out["rows"].append({"kind": label, "variant": n, "us": t * 1e6, "samples_us": [v * 1e6 for v in times[n]]})
    out["copy_rate"] = rate
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

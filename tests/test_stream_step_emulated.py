"""benchmarks/probe_stream_step.py's one-kernel decode step, run on the CPU by
benchmarks/stream_step_emu.py (its CUDA C++ compiled by the host's C++ compiler, an OS thread a GPU
thread, the GPU's primitives stood in for), against a torch reference of the same chain (float32
sums, bf16 where the kernel rounds: the normed row, each product, the residual adds, RoPE'd q and k,
the probabilities before V, the attention's output; the chunked online softmax and the splits'
merge as the kernel does them). What it checks that the GPU runs could not cheaply: the protocol
(stage descriptors, mbarrier phases, flagged words, the epoch moving on between launches: a second
launch must give the same logits), the attention's indexing, its cache slots through the ring in
several stages, a head's slots split over several CTAs (one split empty) and the cache write,
fixed shares against claimed rows (bit for bit: the same arithmetic a row), and that the kernel's
shared scratch fits (the attention's once overflowed into the ring's barriers here).

Each case runs in a child process: a protocol bug would hang the kernel's threads or abort.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, sys, torch
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/benchmarks"]
import probe_stream_step as pss
import stream_step_emu as e
attention = sys.argv[2] != "0"
splits, pos = int(sys.argv[3]), int(sys.argv[4])
heads = (4, 2, 128) if sys.argv[2] == "128" else (8, 2, 64)
c = e.tiny_chain(torch, attention=attention, heads=heads, pos=pos)
# with attention, 8 KB slots: a head's cached keys and values take several stages (32 slots a stage of
# width 64; 16 of width 128, and at pos 32 a last stage with only this step's slot)
kb = 8 if attention else 32
ref, kc, vc = e.reference(torch, c, chunk=pss.attn_chunk(kb * 1024, heads[2]), splits=splits)
fixed = e.emulated(torch, c, claims=False, runs=2, grid=3, slot_kb=kb, splits=splits)  # shares not whole stages
claimed = e.emulated(torch, c, claims=True, runs=1, grid=2, slot_kb=kb, splits=splits)
rel = lambda a: ((a.float() - ref).norm() / ref.norm()).item()
print(json.dumps({
    "rel": [rel(lg) for lg, _, _ in fixed],
    "second_equal_first": torch.equal(fixed[0][0], fixed[1][0]),
    "claimed_equal_fixed": torch.equal(claimed[0][0], fixed[0][0]),
    "cache_err": max((k.float() - kc.float()).abs().max().item() + (v.float() - vc.float()).abs().max().item()
                     for _, k, v in fixed),
    "logits_spread": ref.std().item(),
}))
"""


def _cxx() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


# (attention, splits of a head's slots, pos): 37 slots + this step's in three splits of 13; 32 + 1 in
# four of 9; 4 + 1 in four of 2, the last empty (its partial must weigh nothing in o's merge)
CASES = [("0", 1, 37), ("64", 1, 37), ("128", 1, 32), ("64", 3, 37), ("128", 4, 32), ("64", 4, 4)]


@pytest.mark.skipif(_cxx() is None, reason="no C++ compiler")
@pytest.mark.parametrize(
    ("attention", "splits", "pos"),
    CASES,
    ids=[f"{'attention-' + a if a != '0' else 'gemvs'}-s{n}-p{p}" for a, n, p in CASES],
)
def test_emulated_step_matches_the_torch_chain(attention, splits, pos):
    """attention: none, or query heads a KV head x head width of 4 x 64 (Llama-3.2-1B's) or 2 x 128
    (Qwen3-1.7B's), each KV head's slots in `splits` items whose partial softmaxes o merges."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT), attention, str(splits), str(pos)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["logits_spread"] > 0.1  # the reference is not degenerate
    # float32 sums in another order, rounded to bf16 at the same points: equal or a rounding apart
    assert all(r < 1e-2 for r in got["rel"]), got
    assert got["second_equal_first"], "the second launch (epoch moved on) gave other logits"
    assert got["claimed_equal_fixed"], "claimed rows gave other logits than fixed shares"
    assert got["cache_err"] == 0.0, "the cache slot written differs from RoPE'd k / v"

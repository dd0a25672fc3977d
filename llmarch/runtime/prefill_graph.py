"""A one-chunk prompt's prefill on CUDA replayed from a CUDA graph, one graph per bucket of lengths.

Why: an eager prefill of a small model is bound by op dispatch, not by the GPU. A 512-token prompt
on a Llama-3.2-1B shape is ~600 torch ops at ~12 us each on the host (more on a loaded host) for
~3 ms of GPU work; replayed from a graph it is one launch.

A prompt is padded at its end to its bucket's length (token 0 at the following positions). Causal
attention keeps the real tokens' rows exact, the logits are taken at the last real token (the
model's `last` row), and the pads' keys and values land in cache slots past the prompt, which each
decode step overwrites before anything reads them. That holds only where every cached layer
writes its slot by position into a plain buffer and carries nothing forward: attention caches
that are not rings (a pad written into a ring could overwrite a live entry), no recurrent state
(linear attention would absorb the pads), no MoE layer (its many-token expert dispatch is data
dependent), no input staged from the host. Any other model prefills eagerly.

The first prompt of a bucket prefills eagerly and unpadded, as without graphs (so a one-off prompt,
a `llmarch run`, pays nothing for them). The second runs eagerly on the padded input (also the
warm-up that builds and tunes the kernels for those shapes) and then its graph is captured:
captured launches are recorded, not run, so the cache keeps what the eager run wrote. Later prompts
of that bucket replay. `LLMARCH_NO_GRAPH_PREFILL=1` keeps every prefill eager.
"""

from __future__ import annotations

import os
import time

import torch

BUCKETS = (16, 32, 64, 128, 192, 256, 384, 512)  # prompt lengths a graph is captured for


def usable(spec, cache, model, device) -> bool:
    """Whether prefills on `device` replay from graphs: CUDA, not turned off, padding exact."""
    if torch.device(device).type != "cuda" or os.environ.get("LLMARCH_NO_GRAPH_PREFILL") == "1":
        return False
    return padding_exact(spec, cache, model)


def padding_exact(spec, cache, model) -> bool:
    """Whether a prompt padded at its end prefills this model exactly (see the module docstring)."""
    if getattr(model, "graph_inputs", None) is not None or cache.linear or cache.compressed:
        return False
    if any(g.ring for g in cache.groups.values()):
        return False
    return all(l.mixer in ("full", "sliding") and l.ffn in ("dense", "none") for l in spec.schedule)


def bucket(n: int, room: int) -> int | None:
    """The captured length a prompt of n tokens is padded to, at most `room` (the cache's and the
    RoPE tables' positions); None: longer than every bucket."""
    b = next((b for b in BUCKETS if b >= n), None)
    return None if b is None or n > room else min(b, room)


class PrefillGraphs:
    """Prefills of prompts up to BUCKETS[-1] tokens from position 0 (a fresh cache)."""

    def __init__(self, model, cache, device, capture: bool = True):
        """capture=False: the padded eager prefill alone (the CPU tests check the padding with it)."""
        self.model, self.cache, self.capture = model, cache, capture
        longest = BUCKETS[-1]
        self.ids = torch.zeros(1, longest, dtype=torch.long, device=device)
        self.pos = torch.arange(longest, device=device)
        self.last = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.seen: set[int] = set()  # buckets whose first prompt ran (eagerly, unpadded)
        self.failed: str | None = None  # why a capture failed: the later prompts prefill eagerly

    def fits(self, n: int) -> bool:
        return self.failed is None and bucket(n, self.cache.max_seq) is not None

    def _forward(self, b: int) -> torch.Tensor:
        return self.model(self.ids[:, :b], self.pos[:b], self.cache, limit=b, last=self.last)[:, -1]

    def run(self, prompt: list[int]) -> tuple[torch.Tensor | None, bool]:
        """The prompt's last logits [1, V] (None: its bucket's first prompt, to prefill as without
        graphs); and whether its bucket is to be captured (capture_bucket) once these are read."""
        n = len(prompt)
        b = bucket(n, self.cache.max_seq)
        assert b is not None and n > 0
        if b not in self.seen:
            self.seen.add(b)
            return None, False
        self.ids[0, :n].copy_(torch.tensor(prompt, dtype=torch.long))
        self.ids[0, n:b].zero_()
        self.last.fill_(n - 1)
        if b in self.graphs:
            graph, out = self.graphs[b]
            graph.replay()
            return out.clone(), False  # the clone: another bucket's replay may reuse the pool's memory
        return self._forward(b), self.capture

    def capture_bucket(self, n: int) -> float:
        """Capture the graph of the bucket of an n-token prompt just run eagerly; returns the seconds
        it took. A failed capture is remembered (self.failed) and later prompts prefill eagerly."""
        b = bucket(n, self.cache.max_seq)
        assert b is not None
        t = time.perf_counter()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._forward(b)
            self.graphs[b] = (graph, out)
        except Exception as e:  # noqa: BLE001 - the eager prefill stays correct; say why in the result
            self.failed = f"{type(e).__name__}: {e}"[:300]
        torch.cuda.synchronize()
        return time.perf_counter() - t

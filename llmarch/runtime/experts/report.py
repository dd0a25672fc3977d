"""The offload report: decode tok/s against the bound that the host's read bandwidth and the expert
bytes read per token set."""

from __future__ import annotations

import time

import torch

from llmarch.runtime.experts.host import OffloadedExperts


def offloaded(model) -> list[OffloadedExperts]:
    return [m for m in model.modules() if isinstance(m, OffloadedExperts)]


def host_read_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Bytes/s that all cores read from host RAM: a float32 sum over a buffer far larger than caches."""
    t = torch.ones(nbytes // 4, dtype=torch.float32)
    t.sum()
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        t.sum()
        best = max(best, nbytes / (time.perf_counter() - t0))
    return best


def report(model, steps: int, decode_s: float, device, bandwidth: float | None = None) -> dict:
    """tok/s, host expert bytes read per decode token, the bandwidth bound and the fraction reached."""
    import resource

    stores = offloaded(model)
    per_tok = sum(s.bytes_read for s in stores) / max(steps, 1)
    tok_s = steps / decode_s if decode_s > 0 else 0.0
    out = {
        "decode_tok_s": round(tok_s, 2),
        "expert_format": ", ".join(dict.fromkeys(s.format_name for s in stores)) if stores else None,
        "expert_bytes_per_token": int(per_tok),
        "host_rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }
    if device.type == "cuda":
        out["gpu_peak_mib"] = torch.cuda.max_memory_allocated(device) // 2**20
    if stores and per_tok:
        bw = bandwidth or host_read_bandwidth()
        out["host_read_gb_s"] = round(bw / 1e9, 1)
        out["bound_tok_s"] = round(bw / per_tok, 2)
        out["fraction_of_bound"] = round(tok_s / (bw / per_tok), 3)
    return out


def reset_counters(model) -> None:
    for s in offloaded(model):
        s.bytes_read = 0

"""Kimi Delta Attention's core at Kimi-Linear-48B's layer shape (32 heads of 128, per-channel
decays): the chunked prefill form vs the one-token recurrence over the same inputs, outputs
compared, on the CPU (all threads torch uses) and on CUDA when there is a GPU.

    python benchmarks/bench_kda.py [--tokens 2048] [--repeats 2]

Random inputs: L2-normed q (scaled) and k, log-decays uniform in [-0.5, 0] per channel, beta
uniform in [0, 1], a zero start state. Times are wall-clock, the chunked form's best of --repeats.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llmarch.runtime.ops.delta_rule import chunked, l2norm, recurrent_step  # noqa: E402

HEADS, WIDTH = 32, 128  # Kimi-Linear-48B-A3B's linear_attn_config


def inputs(tokens: int, device: str):
    g = torch.Generator().manual_seed(0)
    q = l2norm(torch.randn(1, HEADS, tokens, WIDTH, generator=g)) * WIDTH**-0.5
    k = l2norm(torch.randn(1, HEADS, tokens, WIDTH, generator=g))
    v = torch.randn(1, HEADS, tokens, WIDTH, generator=g)
    decay = -torch.rand(1, HEADS, tokens, WIDTH, generator=g) * 0.5
    beta = torch.rand(1, HEADS, tokens, generator=g)
    return [x.to(device) for x in (q, k, v, decay, beta)]


def timed(fn, device: str) -> tuple[float, torch.Tensor]:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def measure(device: str, tokens: int, repeats: int) -> str:
    q, k, v, decay, beta = inputs(tokens, device)

    def state() -> torch.Tensor:
        return torch.zeros(1, HEADS, WIDTH, WIDTH, device=device)

    def recurrence() -> torch.Tensor:
        s = state()
        steps = [
            recurrent_step(q[:, :, i], k[:, :, i], v[:, :, i], decay[:, :, i], beta[:, :, i], s) for i in range(tokens)
        ]
        return torch.stack(steps, dim=2)

    with torch.inference_mode():
        runs = [timed(lambda: chunked(q, k, v, decay, beta, state()), device) for _ in range(repeats)]
        t_chunk, out_chunk = min(runs, key=lambda r: r[0])
        t_rec, out_rec = timed(recurrence, device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    diff = (out_chunk - out_rec).abs().max().item()
    return (
        f"{name}: {tokens} tokens, chunked {t_chunk:.3f} s, recurrence {t_rec:.3f} s, "
        f"ratio {t_rec / t_chunk:.1f}x, max difference {diff:.1e}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for device in (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]:
        print(measure(device, args.tokens, args.repeats), flush=True)


if __name__ == "__main__":
    main()

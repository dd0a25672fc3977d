"""Llama 3 RoPE scaling as per-frequency divisors, the form llama.cpp keeps it in (the rope_freqs
tensor: one divisor per rotated pair), both ways: from the config's parameters to the divisors
(convert writes them), and from a file's divisors back to the parameters (a GGUF llama.cpp wrote
carries nothing else, and a RoPE run without them is silently wrong)."""

from __future__ import annotations

import math

# the scaling kind of divisors that fit no known form: run refuses it, convert cannot write it back
UNKNOWN_DIVISORS = "rope_freqs (per-frequency divisors of no known scaling)"
TOLERANCE = 1e-3  # relative: the divisors are stored as float32 and computed in float32 by converters


def llama3_divisors(dim: int, base: float, sc: dict):
    """Per-frequency divisors (float32 numpy array) of Llama 3.1 RoPE scaling for `dim` rotated
    dims, computed in float32 as llama.cpp's converter computes them (its bytes, not just its values)."""
    import numpy as np  # here: inspect reaches this only for a GGUF with unexplained divisors

    factor = sc.get("factor", 8.0)
    low, high = sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
    old_ctx = sc.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    out = np.where(
        wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, 1 / ((1 - smooth) / factor + smooth))
    )
    return out.astype(np.float32)


def llama3_from_divisors(divisors: list[float], base: float) -> dict | None:
    """Llama 3 parameters whose divisors these are, or None. The divisors fix the factor (the
    largest); the band edges show only through the frequencies between the unscaled and the fully
    scaled ones, and there low_freq_factor and the original context appear only as a ratio, so
    low_freq_factor is taken as 1 (every Llama 3.x release). The released values (high_freq_factor
    4, original context 8192) are tried first; else the band's points give the rest (two or more:
    a line; one: with high_freq_factor 4; none: any edges between the last unscaled and the first
    fully scaled frequency, which rotate identically). Whatever is chosen must reproduce every divisor."""
    factor = max(divisors)
    if factor <= 1.0 or min(divisors) < 1.0 - TOLERANCE:
        return None
    dim = 2 * len(divisors)
    wavelens = [2 * math.pi * base ** (2 * i / dim) for i in range(len(divisors))]
    candidates = [(4.0, 8192.0)]
    band = [
        (1 / w, (1 / d - 1 / factor) / (1 - 1 / factor))
        for w, d in zip(wavelens, divisors)
        if 1.0 + TOLERANCE < d < factor * (1 - TOLERANCE)
    ]
    # smooth = old_ctx / ((high - 1) * wavelen) - 1 / (high - 1): a line in 1 / wavelen
    if len(band) >= 2 and band[-1][0] != band[0][0]:
        (x0, s0), (x1, s1) = band[0], band[-1]
        slope = (s1 - s0) / (x1 - x0)
        intercept = s0 - slope * x0
        if intercept < 0 < slope:
            high = round(1 - 1 / intercept, 4)
            candidates.append((high, slope * (high - 1)))
    elif len(band) == 1:
        x, smooth = band[0]
        candidates.append((4.0, (3 * smooth + 1) / x))
    else:
        unscaled = [w for w, d in zip(wavelens, divisors) if d < 1.0 + TOLERANCE]
        scaled = [w for w, d in zip(wavelens, divisors) if d >= factor * (1 - TOLERANCE)]
        if unscaled and scaled and 4 * max(unscaled) < min(scaled):
            candidates.append(
                (4.0, math.floor(min(scaled)) if math.floor(min(scaled)) > 4 * max(unscaled) else min(scaled))
            )
    for high, old_ctx in candidates:
        params = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": high,
            "original_max_position_embeddings": round(old_ctx)
            if abs(old_ctx - round(old_ctx)) < 1e-3 * old_ctx
            else old_ctx,
        }
        if all(abs(float(a) - b) <= TOLERANCE * b for a, b in zip(llama3_divisors(dim, base, params), divisors)):
            return params
    return None

"""RoPE facts and CPU cos/sin tables without torch: which rotation a layer gets (its key, shared by
the layers that rotate alike), the inverse frequencies of the plain kinds, and the tables.

Why here: the torch model (ops/rope.py) on the CPU and the torch-free decode-plan builder
(plan_build.py) must hold the very same table bits, since a plan built without torch and a torch
run must give the same tokens. Both call these functions; GPU tables are computed on the device.
"""

from __future__ import annotations

import math

import numpy as np


def scaling_kind(scaling: dict | None) -> str:
    """The RoPE scaling type of a config's rope_scaling / rope_parameters ("type" in older configs)."""
    return (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"


def rotated_dims(head_dim: int, partial: float, scaling: dict | None) -> int:
    """How many leading dims of a head the rotate-half pairs span: proportional RoPE spans the whole
    head (its unrotated pairs have frequency 0); partial rotation the first partial * head_dim."""
    if scaling_kind(scaling) == "proportional":
        return head_dim
    return int(head_dim * partial) // 2 * 2


def rope_key(spec, layer):
    """((theta, scaling as text, rotated dims, head width), scaling or None for the default kind) of
    a layer's RoPE, or None for a NoPE layer or learned absolute positions: layers with one key
    share one table."""
    if not layer.rope or spec.rope.learned_positions:
        return None
    theta = layer.rope_theta or spec.rope.theta or 10000.0
    scaling = layer.rope_scaling if layer.rope_scaling is not None else spec.rope.scaling
    if scaling_kind(scaling) == "default":
        scaling = None
    partial = layer.rope_partial if layer.rope_partial is not None else spec.rope.partial
    head_dim = layer.head_dim or spec.attention.head_dim
    rot = rotated_dims(head_dim, partial, scaling)
    return (float(theta), repr(sorted((scaling or {}).items())), rot, head_dim), scaling


def default_inv_freq(dim: int, theta: float) -> np.ndarray:
    """theta^(-2i/dim) for the dim // 2 pairs, float32 (as transformers' default RoPE)."""
    return (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(np.float32)


def llama3_inv_freq(inv: np.ndarray, p: dict) -> np.ndarray:
    """Llama 3's scaling of the default frequencies: long wavelengths divided by factor, short ones
    kept, those between blended (float32, as transformers' _compute_llama3_parameters)."""
    factor, low, high = p["factor"], p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
    old = p["original_max_position_embeddings"]
    low_wl, high_wl = old / low, old / high
    wavelen = np.float32(2 * math.pi) / inv
    out = np.where(wavelen > low_wl, inv / np.float32(factor), inv)
    smooth = (np.float32(old) / wavelen - np.float32(low)) / np.float32(high - low)
    smoothed = (np.float32(1) - smooth) * out / np.float32(factor) + smooth * out
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return np.where(medium, smoothed, out).astype(np.float32)


def plain_inv_freq(dim: int, theta: float, scaling: dict | None) -> np.ndarray | None:
    """The inverse frequencies of the kinds without an attention factor (default, linear, llama3),
    or None for the others (ops/rope.py computes those in torch)."""
    kind = scaling_kind(scaling)
    if kind == "default":
        return default_inv_freq(dim, theta)
    if kind == "linear" and scaling is not None:
        return (default_inv_freq(dim, theta) / np.float32(scaling["factor"])).astype(np.float32)
    if kind == "llama3" and scaling is not None:
        return llama3_inv_freq(default_inv_freq(dim, theta), scaling)
    return None


def tables(inv: np.ndarray, attn_factor: float, max_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [max_pos, 2 * len(inv)] float32 for positions < max_pos (row p does not depend on
    max_pos), rotate-half layout: each half the same angles, so each is computed once."""
    freqs = np.outer(np.arange(max_pos, dtype=np.float32), inv.astype(np.float32))
    cos, sin = np.cos(freqs) * np.float32(attn_factor), np.sin(freqs) * np.float32(attn_factor)
    return np.concatenate([cos, cos], axis=-1), np.concatenate([sin, sin], axis=-1)

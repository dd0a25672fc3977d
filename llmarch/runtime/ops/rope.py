"""Rotary position embeddings: default, linear, llama3, yarn, proportional; partial rotation; NoPE is `None`.

Tables of cos/sin are precomputed for the positions the KV cache can hold (not the model's whole
context: Gemma's 32k x 256 table would cost 64 MB per base), then gathered by position.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llmarch.errors import LlmarchError
from llmarch.runtime import cpu_kernels, rope_tables
from llmarch.runtime.rope_tables import default_inv_freq, plain_inv_freq, rotated_dims, scaling_kind  # noqa: F401


def _default(dim: int, theta: float) -> torch.Tensor:
    return torch.from_numpy(default_inv_freq(dim, theta))


def mscale(scale: float, m: float = 1.0) -> float:
    """YaRN's attention magnitude factor (also DeepSeek MLA's softmax scale, squared)."""
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def _yarn(dim: int, theta: float, p: dict, context: int | None) -> tuple[torch.Tensor, float]:
    factor = p.get("factor")
    orig = p["original_max_position_embeddings"]
    if factor is None:
        factor = context / orig
    attn = p.get("attention_factor")
    if attn is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attn = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def corr_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(theta))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos = theta ** (torch.arange(0, dim, 2).float() / dim)
    extra = 1 - ramp
    inv = (1.0 / (factor * pos)) * (1 - extra) + (1.0 / pos) * extra
    return inv, attn


def _proportional(dim: int, theta: float, p: dict) -> torch.Tensor:
    """Gemma 4's global layers: the first partial_rotary_factor of the dim // 2 frequencies are
    theta^(-2i/dim) over the WHOLE head width, the rest 0 (those pairs do not rotate); divided by factor."""
    angles = int(float(p.get("partial_rotary_factor", 1.0)) * dim // 2)
    rotated = 1.0 / (theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / dim))
    inv = torch.cat([rotated, torch.zeros(dim // 2 - angles)])
    return inv / float(p.get("factor", 1.0))


def inv_freq(dim: int, theta: float, scaling: dict | None, context: int | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies for `dim` rotated dims, attention factor applied to cos/sin)."""
    kind = scaling_kind(scaling)
    plain = plain_inv_freq(dim, theta, scaling)  # default, linear, llama3: the torch-free plan builder's own
    if plain is not None:
        return torch.from_numpy(plain), 1.0
    if kind == "yarn":
        return _yarn(dim, theta, scaling, context)
    if kind == "proportional":
        return _proportional(dim, theta, scaling), 1.0
    raise LlmarchError(f"RoPE scaling type {kind!r} is not supported by llmarch run")


def fast_cpu_rope(x: torch.Tensor, pos: torch.Tensor, table: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == table.dtype == torch.float32
        and pos.dtype == torch.int64
        and x.dim() == 4
        and pos.dim() == 1
        and pos.shape[0] == x.shape[2]
        and not x.requires_grad
        and table.is_contiguous()
        and cpu_kernels.available()
    )


class Rope(nn.Module):
    """cos/sin tables for one (theta, scaling, rotated dims); shared by the layers that use them."""

    def __init__(
        self, head_dim: int, rot_dim: int, theta: float, scaling: dict | None, context: int | None, freq_scale=None
    ):
        """freq_scale: a callable giving per-pair factors on the inverse frequencies, read when the
        tables are built (learned_rope.py: known once the weights are loaded)."""
        super().__init__()
        self.head_dim, self.rot_dim = head_dim, rot_dim
        self.params = (theta, scaling, context)
        self.freq_scale = freq_scale
        with torch.device("cpu"):  # on the meta device arange runs torch's Python refs, which import sympy and dynamo
            inv_freq(rot_dim, theta, scaling, context)  # fail early on an unsupported scaling type
        self.cos = self.sin = self.sin_rot = None

    def tables(self, max_pos: int, device="cpu", dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [max_pos, rot_dim] for positions < max_pos (row p does not depend on max_pos)."""
        with torch.device("cpu"):  # the model is built on meta: computed here, on the CPU
            inv, self.attn_factor = inv_freq(self.rot_dim, *self.params)
            if self.freq_scale is not None:
                inv = inv * self.freq_scale()
            pos = torch.arange(max_pos, dtype=torch.float32)
        if torch.device(device).type == "cpu":  # the bits the torch-free plan builder computes too
            cos, sin = rope_tables.tables(inv.detach().numpy(), self.attn_factor, max_pos)
            return torch.from_numpy(cos).to(dtype), torch.from_numpy(sin).to(dtype)
        freqs = torch.outer(pos, inv).to(device)
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.attn_factor).to(dtype), (emb.sin() * self.attn_factor).to(dtype)

    def build(self, max_pos: int, device, dtype) -> None:
        """Tables for positions < max_pos."""
        self.cos, self.sin = self.tables(max_pos, device, dtype)
        # sin with its first half negated: rotate_half(x) * sin == roll(x, half) * sin_rot exactly
        # (negation is exact), so the torch path is one roll instead of two slices, a neg and a cat
        half = self.rot_dim // 2
        self.sin_rot = torch.cat([-self.sin[:, :half], self.sin[:, half:]], dim=-1)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x: [B, H, T, D]; pos: [T] absolute positions. Rotate-half convention (HF layout)."""
        if fast_cpu_rope(x, pos, self.cos) and self.sin.is_contiguous():  # one C call instead of ~10 small torch ops
            return cpu_kernels.rope_rotate_half(x, self.cos, self.sin, pos)
        cos, sin = self.cos[pos], self.sin_rot[pos]  # [T, rot]
        r = self.rot_dim
        if r == x.shape[-1]:
            return x * cos + x.roll(r // 2, -1) * sin
        xr = x[..., :r]
        return torch.cat([xr * cos + xr.roll(r // 2, -1) * sin, x[..., r:]], dim=-1)

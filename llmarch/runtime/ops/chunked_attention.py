"""Llama 4's chunked local attention (iRoPE's RoPE layers).

A query sees the keys of its own chunk only (attention_chunk_size), causally. RoPE is Meta's
complex form over interleaved pairs; q and k get the same dim permutation (evens, then odds), which
leaves q.k unchanged, so the shared rotate-half Rope applies. QK L2-norm (no weight) comes after
RoPE, then a NoPE layer's temperature, the output gate last (all as in ops/attention.py). The layer
keeps its own full-length K/V (KVCache only plans full/sliding layers); a ring of one chunk would
do, at the price of a second cache layout.
"""

from __future__ import annotations

import torch

from llmarch.runtime.ops.attention import Attention, attend


class _KV:
    def __init__(self, B, H, S, D, Dv, dtype, device):
        self.k = torch.zeros(B, H, S, D, dtype=dtype, device=device)
        self.v = torch.zeros(B, H, S, Dv, dtype=dtype, device=device)


class ChunkedAttention(Attention):
    def __init__(self, spec, layer, rope):
        super().__init__(spec, layer, rope)
        self.chunk = layer.window
        self.takes_prenorm = False  # its forward takes no pre-norm or residual (Attention.forward's)

    def forward(self, x, pos, cache):
        B, T, _ = x.shape
        q, k, v, gate = self.project(x)
        q = q.view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.kv_heads, self.v_dim).transpose(1, 2)
        if self.rope is not None:
            q = self.rope(torch.cat([q[..., 0::2], q[..., 1::2]], -1), pos)
            k = self.rope(torch.cat([k[..., 0::2], k[..., 1::2]], -1), pos)
        if self.l2:
            q, k = self.l2_norm(q), self.l2_norm(k)
        if self.temperature is not None:  # a NoPE layer with temperature tuning
            q = self.temper(q, pos)
        lc = cache.layers.get(self.index)
        if lc is None:
            lc = cache.layers[self.index] = _KV(
                B, self.kv_heads, cache.max_seq, self.head_dim, self.v_dim, x.dtype, x.device
            )
        lc.k.index_copy_(2, pos, k.to(lc.k.dtype))
        lc.v.index_copy_(2, pos, v.to(lc.v.dtype))
        n = int(pos[-1]) + 1
        kpos = torch.arange(n, device=x.device)
        mask = kpos[None, :] <= pos[:, None]
        if self.chunk:
            mask &= (kpos[None, :] // self.chunk) == (pos[:, None] // self.chunk)
        out = attend(q, lc.k[:, :, :n].to(q.dtype), lc.v[:, :, :n].to(q.dtype), mask, self.scale)
        out = out.transpose(1, 2).reshape(B, T, self.heads * self.v_dim)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o(out)

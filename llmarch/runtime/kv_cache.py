"""Static, preallocated KV cache. Full-attention layers hold every position; sliding layers hold a
ring buffer of their window, so memory follows inspect's KV figure.

Layers with the same (slots, window) share one slot->position table, from which the attention
mask is built once per step: a key is visible when its slot is filled, not in the future, and
inside the window. Decode (one token) writes first and attends over the buffer (static shapes:
CUDA-graph friendly); a multi-token step on a ring attends over ring + new keys, then writes.
"""

from __future__ import annotations

import torch

from llmarch.arch.spec import LayerSpec, LinearAttentionSpec


class SlotGroup:
    def __init__(self, size: int, window: int | None, ring: bool, device):
        self.size, self.window, self.ring = size, window, ring
        self.slot_pos = torch.full((size,), -1, dtype=torch.long, device=device)
        self.mask = None
        self.concat = False
        self.write_slots = None
        self.write_from = 0
        self.limit = size
        self.causal = False

    def prepare(self, pos: torch.Tensor, limit: int | None) -> None:
        T = pos.shape[0]
        if self.ring and T > 1:
            key_pos = torch.cat([self.slot_pos, pos])
            n = min(T, self.size)
            self.write_slots, self.write_from = pos[T - n :] % self.size, T - n
            self.slot_pos.index_copy_(0, self.write_slots, pos[T - n :])
            self.concat, self.limit = True, None
        else:
            self.write_slots, self.write_from = (pos % self.size) if self.ring else pos, 0
            self.slot_pos.index_copy_(0, self.write_slots, pos)
            self.concat = False
            # eager full layers attend only over the filled prefix; graphs pass limit=None (all)
            self.limit = None if (self.ring or limit is None) else min(limit, self.size)
            key_pos = self.slot_pos if self.limit is None else self.slot_pos[: self.limit]
        # a chunk from position 0 (limit == T: its positions are 0..T-1, in slots 0..T-1 of a
        # non-ring buffer) sees exactly the causal triangle: attention may skip the mask (flash)
        self.causal = T > 1 and not self.ring and limit == T
        q = pos[:, None]
        visible = (key_pos[None, :] >= 0) & (key_pos[None, :] <= q)
        if self.window is not None:
            visible &= key_pos[None, :] > q - self.window
        self.mask = visible
        self._bias = {}

    def bias(self, rep: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The mask as an additive bias in the queries' dtype, rows repeated for `rep` query heads per
        KV head (built once per step and group, not once per layer)."""
        if (rep, dtype) not in self._bias:
            m = self.mask if rep == 1 else self.mask.repeat(rep, 1)
            self._bias[rep, dtype] = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, float("-inf"))
        return self._bias[rep, dtype]

    def reset(self) -> None:
        self.slot_pos.fill_(-1)


class LayerCache:
    def __init__(self, group: SlotGroup, batch: int, kv_heads: int, k_dim: int, v_dim: int, dtype, device):
        self.group = group
        self.k = torch.zeros(batch, kv_heads, group.size, k_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, kv_heads, group.size, v_dim, dtype=dtype, device=device)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k/v [B, H, T, D]; return the keys/values the step attends over."""
        g = self.group
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)  # no-op when the model runs in the cache dtype
        if g.concat:
            keys, values = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
            self.k.index_copy_(2, g.write_slots, k[:, :, g.write_from :])
            self.v.index_copy_(2, g.write_slots, v[:, :, g.write_from :])
        else:
            self.k.index_copy_(2, g.write_slots, k)
            self.v.index_copy_(2, g.write_slots, v)
            keys, values = (self.k, self.v) if g.limit is None else (self.k[:, :, : g.limit], self.v[:, :, : g.limit])
        # what this step attends over, for the KV-shared layers that read this layer's cache later in the step
        self.last = keys, values
        return keys, values


class LinearState:
    """A linear-attention layer's fixed state: the conv window (the last kernel - 1 conv inputs,
    in the cache dtype) and the recurrent matrix per value head (float32, as the references keep
    it). Both are updated in place, so a captured decode step reads and writes the same memory."""

    def __init__(self, lin: LinearAttentionSpec, batch: int, dtype, device):
        self.conv = torch.zeros(batch, lin.conv_channels, lin.conv_kernel - 1, dtype=dtype, device=device)
        self.recurrent = torch.zeros(
            batch, lin.value_heads, lin.key_head_dim, lin.value_head_dim, dtype=torch.float32, device=device
        )

    def reset(self) -> None:
        self.conv.zero_()
        self.recurrent.zero_()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv, self.recurrent))


class KVCache:
    def __init__(
        self,
        schedule: list[LayerSpec],
        max_seq: int,
        kv_heads: int,
        k_dim: int,
        v_dim: int,
        dtype,
        device,
        batch: int = 1,
        linear: LinearAttentionSpec | None = None,
    ):
        """linear: the linear layers' sizes (spec.linear); each linear layer gets its LinearState."""
        self.max_seq = max_seq
        self.linear: dict[int, LinearState] = {}
        for layer in schedule:
            if layer.mixer in ("linear", "mamba") and linear is not None:
                self.linear[layer.index] = LinearState(linear, batch, dtype, device)
        self.groups: dict[tuple, SlotGroup] = {}
        self.layers: dict[int, LayerCache] = {}
        # shared-KV layers (one K=V head, window and compressed entries: DeepSeek V4) keep their own
        from llmarch.runtime.ops.compressed_attention import CompressedKV

        self.compressed = {layer.index: CompressedKV(layer) for layer in schedule if layer.kv_single}
        for layer in schedule:
            if layer.kv_single or layer.mixer not in ("full", "sliding"):
                continue  # chunked / MLA layers keep their own cache (ops/chunked_attention.py, ops/mla.py)
            if layer.kv_shared_from is not None:
                continue  # attends over its owner layer's cache: only owners allocate
            window = layer.window if layer.mixer == "sliding" else None
            ring = window is not None and window < max_seq
            size = window if ring else max_seq
            key = (size, window, ring)
            if key not in self.groups:
                self.groups[key] = SlotGroup(size, window, ring, device)
            # kv_heads: the model's count, unless the layer has its own (MiMo-V2-Flash sliding layers)
            # head widths: the model's, unless the layer has its own (Gemma 4's global layers)
            self.layers[layer.index] = LayerCache(
                self.groups[key],
                batch,
                layer.kv_heads or kv_heads,
                layer.head_dim or k_dim,
                layer.head_dim or v_dim,
                dtype,
                device,
            )

    def prepare(self, pos: torch.Tensor, limit: int | None = None) -> None:
        for g in self.groups.values():
            g.prepare(pos, limit)

    def reset(self) -> None:
        for g in self.groups.values():
            g.reset()
        for st in self.linear.values():
            st.reset()
        for c in self.compressed.values():
            c.reset()

    def save_linear(self) -> list[torch.Tensor]:
        """A copy of every linear state (a CUDA-graph capture runs warm-up steps that advance them)."""
        return [t.clone() for st in self.linear.values() for t in (st.conv, st.recurrent)]

    def restore_linear(self, saved: list[torch.Tensor]) -> None:
        for dst, src in zip([t for st in self.linear.values() for t in (st.conv, st.recurrent)], saved, strict=True):
            dst.copy_(src)

    def nbytes(self) -> int:
        # k, v and, in a sparse-attention MLA layer, the indexer's keys (index_k)
        tensors = [t for c in self.layers.values() for t in (c.k, c.v, getattr(c, "index_k", None)) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors) + sum(c.nbytes() for c in self.compressed.values())

    def state_nbytes(self) -> int:
        """Bytes of the linear layers' fixed state (inspect's kv_cache.state_bytes)."""
        return sum(st.nbytes() for st in self.linear.values())

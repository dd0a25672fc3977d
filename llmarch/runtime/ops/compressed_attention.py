"""Shared-KV attention with compressed KV (DeepSeek V4; semantics from transformers 5.24's
modeling_deepseek_v4.py).

Every layer: a low-rank query (q_a, a weighted RMS norm, q_b, then a weightless RMS norm per head)
and ONE projected KV head (kv, RMS norm) read as key and value, over a sliding window; RoPE rotates
adjacent channel pairs of each head's trailing rotated slice, and the attention output's slice is
rotated back by the query's position (values carried the keys' rotation). A learned sink logit
per head; the output projection is grouped: heads split into groups, each projected on its own
(o_a, block-diagonal) before one projection mixes them (o_b).

A layer with compress_ratio m also keeps one compressed entry per m tokens for the whole context,
appended to the window's keys: entry w pools tokens [w*m, (w+1)*m) by a softmax over a gate (plus a
learned bias per slot), then an RMS norm and RoPE at position w*m; query t sees entries w with
w < (t + 1) // m. An indexed layer (compressed_index) pools overlapping windows instead (entry w
mixes the previous window's first half-width series with its own second one, 2m slots), and a
lightning indexer with its own pooled keys scores entries per query (sum over its heads of
relu(q . k) weighted per token) and lets each query see only its top index_topk entries.

The state (window keys, pooled entries, the tokens of the window not yet closed and the last
window's overlap series) lives in the KV cache as a CompressedKV per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmarch.arch.spec import ArchSpec, LayerSpec
from llmarch.errors import LlmarchError
from llmarch.runtime.ops.norms import RMSNorm
from llmarch.runtime.ops.rope import inv_freq, scaling_kind


def _unweighted_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class PairRope:
    """cos/sin per position for RoPE on adjacent pairs of the trailing `rot` channels of a head."""

    def __init__(self, rot: int, theta: float, scaling: dict | None, context: int | None):
        if scaling_kind(scaling) == "default":
            scaling = None
        self.rot = rot
        with torch.device("cpu"):  # the model is built on the meta device; the frequencies are real
            self.inv, self.factor = inv_freq(rot, theta, scaling, context)  # fails early on an unsupported type

    def angles(self, pos: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv.device != pos.device:
            self.inv = self.inv.to(pos.device)
        inv, factor = self.inv, self.factor
        freqs = pos.float()[:, None] * inv[None, :]
        cos = (freqs.cos() * factor).to(dtype).repeat_interleave(2, -1)
        sin = (freqs.sin() * factor).to(dtype).repeat_interleave(2, -1)
        return cos, sin

    def __call__(self, x: torch.Tensor, pos: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """x [..., T, D] rotated at positions pos [T] (inverse: by minus the angle)."""
        cos, sin = self.angles(pos, torch.float32)
        if inverse:
            sin = -sin
        r = self.rot
        head, tail = x[..., :-r], x[..., -r:].float()
        turned = torch.stack((-tail[..., 1::2], tail[..., 0::2]), dim=-1).flatten(-2)
        return torch.cat([head, (tail * cos + turned * sin).to(x.dtype)], dim=-1)


class Series:
    """One pooled series' state: projected tokens of the window not yet closed, the last closed
    window's first-half series (overlapping pooling) and the entries pooled so far."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.buf_kv = self.buf_gate = None
        self.prev_kv = self.prev_gate = None
        self.entries: torch.Tensor | None = None
        self.count = 0


class CompressedKV:
    """A shared-KV layer's cache: the last window - 1 keys with their positions, and the pooled series
    (the layer's entries and, where indexed, the indexer's keys)."""

    def __init__(self, layer: LayerSpec):
        self.window = layer.window
        self.series = {"kv": Series(), "index": Series()}
        self.reset()

    def reset(self) -> None:
        self.keys: torch.Tensor | None = None
        self.key_pos: torch.Tensor | None = None
        for s in self.series.values():
            s.reset()

    def attend_window(self, kv: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys of this step (the kept ones, then the new) and their positions; keeps the last window - 1."""
        keys = kv if self.keys is None else torch.cat([self.keys, kv], dim=2)
        key_pos = pos if self.key_pos is None else torch.cat([self.key_pos, pos])
        keep = (self.window - 1) if self.window else keys.shape[2]
        self.keys, self.key_pos = keys[:, :, -keep:] if keep else keys[:, :, :0], key_pos[-keep:] if keep else pos[:0]
        return keys, key_pos

    def nbytes(self) -> int:
        ts = [self.keys] + [s.entries for s in self.series.values()]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


class Pool(nn.Module):
    """Softmax-gated pooling of `ratio` tokens into one entry: one series (width dim), or two
    overlapping ones (width 2 * dim: entry w pools the previous window's first series and its own
    second one)."""

    def __init__(self, d: int, dim: int, ratio: int, overlap: bool, eps: float, rope: PairRope):
        super().__init__()
        width = 2 * dim if overlap else dim
        self.dim, self.ratio, self.overlap, self.rope = dim, ratio, overlap, rope
        self.wkv = nn.Linear(d, width, bias=False)
        self.wgate = nn.Linear(d, width, bias=False)
        self.ape = nn.Parameter(torch.empty(ratio, width))
        self.norm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, s: Series) -> torch.Tensor:
        """Pool the windows x completes (with what s holds); returns every entry so far [B, n, dim]."""
        kv, gate = self.wkv(x), self.wgate(x)
        if s.buf_kv is not None:
            kv, gate = torch.cat([s.buf_kv, kv], dim=1), torch.cat([s.buf_gate, gate], dim=1)
        B, m, D = kv.shape[0], self.ratio, self.dim
        n = kv.shape[1] // m
        s.buf_kv, s.buf_gate = kv[:, n * m :], gate[:, n * m :]
        if n:
            kv = kv[:, : n * m].view(B, n, m, -1)
            gate = gate[:, : n * m].view(B, n, m, -1) + self.ape.to(gate.dtype)
            if self.overlap:
                prev_kv = kv.new_zeros(B, n, m, D)
                prev_gate = gate.new_full((B, n, m, D), float("-inf"))
                prev_kv[:, 1:], prev_gate[:, 1:] = kv[:, :-1, :, :D], gate[:, :-1, :, :D]
                if s.prev_kv is not None:
                    prev_kv[:, 0], prev_gate[:, 0] = s.prev_kv, s.prev_gate
                s.prev_kv, s.prev_gate = kv[:, -1, :, :D], gate[:, -1, :, :D]
                kv = torch.cat([prev_kv, kv[..., D:]], dim=2)
                gate = torch.cat([prev_gate, gate[..., D:]], dim=2)
            pooled = self.norm((kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2))
            first = torch.arange(s.count, s.count + n, device=x.device) * m
            pooled = self.rope(pooled, first)
            s.entries = pooled if s.entries is None else torch.cat([s.entries, pooled], dim=1)
            s.count += n
        return s.entries if s.entries is not None else kv.new_zeros(B, 0, D)


class Indexer(nn.Module):
    """Scores each query against the indexer's pooled keys and keeps its top-k visible entries."""

    def __init__(self, spec: ArchSpec, layer: LayerSpec, rope: PairRope):
        super().__init__()
        a, d = spec.attention, spec.hidden_size
        self.heads, self.dim, self.topk = a.index_heads, a.index_head_dim, a.index_topk
        self.ratio = layer.compress_ratio
        self.compressor = Pool(d, self.dim, self.ratio, True, spec.norm.eps or 1e-6, rope)
        self.wq_b = nn.Linear(a.q_lora_rank, self.heads * self.dim, bias=False)
        self.weights_proj = nn.Linear(d, self.heads, bias=False)
        self.rope = rope

    def forward(self, x, q_low, pos, s: Series) -> torch.Tensor:
        """-> visible [B, T, n] (bool): the entries each query attends."""
        keys = self.compressor(x, s)  # [B, n, dim]
        B, T = x.shape[:2]
        n = keys.shape[1]
        causal = torch.arange(n, device=x.device)[None, :] < ((pos + 1) // self.ratio)[:, None]  # [T, n]
        if n == 0:
            return causal[None].expand(B, T, n)
        q = self.wq_b(q_low).view(B, T, self.heads, self.dim).transpose(1, 2)
        q = self.rope(q, pos).transpose(1, 2)  # [B, T, h, dim]
        scores = F.relu(torch.matmul(q.float(), keys.float().transpose(-1, -2).unsqueeze(1))) * self.dim**-0.5
        weights = self.weights_proj(x).float() * self.heads**-0.5
        score = (scores * weights.unsqueeze(-1)).sum(dim=2).masked_fill(~causal, float("-inf"))  # [B, T, n]
        top = score.topk(min(self.topk, n), dim=-1).indices
        visible = torch.zeros(B, T, n, dtype=torch.bool, device=x.device).scatter_(-1, top, True)
        return visible & causal


class SharedKVAttention(nn.Module):
    """Low-rank queries over one shared K=V head: window plus, where the layer has them, compressed entries."""

    def __init__(self, spec: ArchSpec, layer: LayerSpec, rope=None):
        super().__init__()
        a, d = spec.attention, spec.hidden_size
        self.index = layer.index
        self.H, self.D = a.heads, layer.head_dim or a.head_dim
        eps = spec.norm.eps or 1e-6
        self.eps = eps
        if not (a.q_lora_rank and a.out_groups and a.out_rank):
            raise LlmarchError(
                "shared-KV attention needs q_lora_rank, o_groups and o_lora_rank in the config", spec.source
            )
        self.groups = a.out_groups
        self.wq_a = nn.Linear(d, a.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(a.q_lora_rank, eps)
        self.wq_b = nn.Linear(a.q_lora_rank, self.H * self.D, bias=False)
        self.wkv = nn.Linear(d, self.D, bias=False)
        self.norm = RMSNorm(self.D, eps)
        self.wo_a = nn.Linear(self.H * self.D // self.groups, self.groups * a.out_rank, bias=False)
        self.wo_b = nn.Linear(self.groups * a.out_rank, d, bias=False)
        self.attn_sink = nn.Parameter(torch.empty(self.H))
        theta = layer.rope_theta or spec.rope.theta or 10000.0
        scaling = layer.rope_scaling if layer.rope_scaling is not None else spec.rope.scaling
        rot = int(self.D * spec.rope.partial) // 2 * 2
        self.rope = PairRope(rot, theta, scaling, spec.context_length)
        self.ratio = layer.compress_ratio
        self.compressor = Pool(d, self.D, self.ratio, layer.compressed_index, eps, self.rope) if self.ratio else None
        self.indexer = Indexer(spec, layer, self.rope) if self.ratio and layer.compressed_index else None

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        B, T, _ = x.shape
        state: CompressedKV = cache.compressed[self.index]
        q_low = self.q_norm(self.wq_a(x))
        q = _unweighted_rms(self.wq_b(q_low).view(B, T, self.H, self.D).transpose(1, 2), self.eps)
        q = self.rope(q, pos)
        kv = self.rope(self.norm(self.wkv(x)).view(B, T, 1, self.D).transpose(1, 2), pos)
        keys, key_pos = state.attend_window(kv, pos)
        q_at = pos[:, None]
        visible = (key_pos[None, :] <= q_at) & (key_pos[None, :] > q_at - state.window)
        visible = visible[None].expand(B, T, -1)
        if self.compressor is not None:
            entries = self.compressor(x, state.series["kv"])  # [B, n, D]
            n = entries.shape[1]
            if self.indexer is not None:
                seen = self.indexer(x, q_low, pos, state.series["index"])
            else:
                seen = (torch.arange(n, device=x.device)[None, :] < ((pos + 1) // self.ratio)[:, None])[None]
                seen = seen.expand(B, T, n)
            keys = torch.cat([keys, entries.unsqueeze(1)], dim=2)
            visible = torch.cat([visible, seen], dim=-1)
        scores = torch.matmul(q, keys.transpose(-1, -2)) * self.D**-0.5  # [B, H, T, S]
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        sink = self.attn_sink.float().view(1, -1, 1, 1).expand(B, -1, T, 1)
        logits = torch.cat([scores.float(), sink], dim=-1)
        probs = torch.softmax(logits - logits.amax(-1, keepdim=True), dim=-1)[..., :-1].to(q.dtype)
        out = self.rope(torch.matmul(probs, keys), pos, inverse=True)  # [B, H, T, D]
        grouped = out.transpose(1, 2).reshape(B, T, self.groups, -1)
        w = self.wo_a.weight.view(self.groups, -1, grouped.shape[-1])  # [G, rank, H*D/G]
        mixed = torch.einsum("btgi,gri->btgr", grouped, w).reshape(B, T, -1)
        return self.wo_b(mixed)

    def load_from(self, source, prefix: str, dtype, device) -> None:
        """Reads the layer's tensors by their names in the checkpoint ({layers.i}.attn.*)."""
        names = source.ckpt.tensors
        base = f"{getattr(source, 'prefix', '')}layers.{self.index}.attn."
        for mname, mod in self.named_modules():
            for pname, p in list(mod._parameters.items()):
                if p is None:
                    continue
                key = f"{base}{mname + '.' if mname else ''}{pname}"
                info = names.get(key)
                if info is None:
                    raise LlmarchError(f"weight missing: {key} (layer {self.index})", str(source.ckpt.path))
                t = source.read(info)
                if tuple(t.shape) != tuple(p.shape):
                    raise LlmarchError(
                        f"weight {key} has shape {tuple(t.shape)}, the spec needs {tuple(p.shape)}",
                        str(source.ckpt.path),
                    )
                mod._parameters[pname] = nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)

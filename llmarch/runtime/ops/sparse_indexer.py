"""DeepSeek Sparse Attention's lightning indexer (DeepSeek V3.2, GLM-5): which cached tokens a
query attends.

Per token it caches one key k = RoPE(LayerNorm(wk(x))) of index_head_dim (beside the MLA latent,
as inspect counts). Per query it forms index_heads queries q = RoPE(wq_b(q_resid)) from the MLA
query latent q_resid = q_a_norm(q_a(x)) and per-head weights w = weights_proj(x) / sqrt(heads);
a key's score is sum_h w_h * relu(q_h . k / sqrt(index_head_dim)). The top index_topk keys among
those the query may see are kept: a Selection of static size (k = min(index_topk, slots) indices
per query, with whether each is visible), which prefill turns into a mask over the cache that MLA
ands into its causal mask (as transformers' eager path does) and decode gathers the selected
latents with, so a step reads k cached tokens, not all of them. Nothing in a decode step depends
on the position on the host (the whole static cache is scored, slots past the position masked,
picks among those masked out), so the step can be captured as a CUDA graph. Where index_topk
covers every slot the selection is every visible key: no scores are taken (None), which is dense
MLA exactly. RoPE covers each key's and query's first
qk_rope_head_dim dims (the rest pass through), half-split or interleaved as the spec says;
transformers skips the reference's Hadamard rotation (orthogonal, dot products unchanged) and
its FP8 scoring, and so does this.
Without a query low-rank (Mistral Large 4) the queries come from LayerNorm(x), scaled per head
by the log of the position where the model learned that, and a NoPE layer's indexer rotates nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from llmarch.arch.spec import ArchSpec
from llmarch.errors import LlmarchError
from llmarch.runtime.ops.query_scaling import LogPositionQueryScale

HEAD_GROUP_ELEMS = 1 << 26  # per-head scores held at once (256 MiB of float32)


class Selection(NamedTuple):
    """The keys each query attends: top [B, T, k] slot indices, ok [B, T, k] whether each is visible
    (a query that sees fewer than k keys picks hidden ones too)."""

    top: torch.Tensor
    ok: torch.Tensor

    def mask(self, visible: torch.Tensor) -> torch.Tensor:
        """[B, T, S]: visible and selected."""
        B, T, _ = self.top.shape
        chosen = torch.zeros(B, T, visible.shape[-1], dtype=torch.bool, device=visible.device)
        return chosen.scatter_(-1, self.top, True) & visible

    def gather(self, cached: torch.Tensor) -> torch.Tensor:
        """cached [B, S, n] -> the selected rows of one query [B, k, n] (decode: T is 1)."""
        return cached.gather(1, self.top[:, 0, :, None].expand(-1, -1, cached.shape[-1]))


class LightningIndexer(nn.Module):
    def __init__(self, spec: ArchSpec, index: int):
        super().__init__()
        a = spec.attention
        if not (a.index_heads and a.index_head_dim and a.index_topk):
            raise LlmarchError(
                f"layer {index}: the sparse-attention indexer needs index_n_heads, index_head_dim and index_topk "
                "in the config"
            )
        self.H, self.D, self.topk, self.rdim = a.index_heads, a.index_head_dim, a.index_topk, a.qk_rope_head_dim
        self.interleave = bool(a.index_rope_interleave)
        # without a query low-rank the queries come from LayerNorm(x) (transformers' MistralLarge4TextIndexer)
        self.q_input_norm = None if a.q_lora_rank else nn.LayerNorm(spec.hidden_size, eps=1e-6)
        self.wq_b = nn.Linear(a.q_lora_rank or spec.hidden_size, self.H * self.D, bias=False)
        self.q_scale = LogPositionQueryScale(self.H) if a.query_log_scale else None
        self.rotate = spec.schedule[index].rope if index < len(spec.schedule) else True  # unrotated on NoPE layers
        self.wk = nn.Linear(spec.hidden_size, self.D, bias=False)
        self.k_norm = nn.LayerNorm(self.D, eps=1e-6)  # transformers' indexer: a LayerNorm with bias, eps 1e-6
        self.weights_proj = nn.Linear(spec.hidden_size, self.H, bias=False)

    def _rot(self, x, pos, rope):
        """RoPE over the first rdim dims; interleaved pairs are de-interleaved first (the same rotation)."""
        if not self.rotate:
            return x
        r, rest = x.split([self.rdim, self.D - self.rdim], dim=-1)
        if self.interleave:
            r = torch.cat([r[..., 0::2], r[..., 1::2]], dim=-1)
        return torch.cat([rope(r, pos), rest], dim=-1)

    def new_cache(self, batch: int, size: int, dtype, device) -> torch.Tensor:
        return torch.zeros(batch, size, self.D, dtype=dtype, device=device)

    def forward(self, x, q_resid, pos, rope, keys: torch.Tensor, visible: torch.Tensor) -> Selection | None:
        """x [B, T, hidden], q_resid [B, T, q_lora_rank]; keys: this layer's key cache [B, S_max, D],
        written at pos; visible: [T, S] the causal mask over the S cached slots attention reads.
        Returns each query's top-k among the S slots, or None where k covers them all."""
        B, T, _ = x.shape
        S = visible.shape[-1]
        k = self._rot(self.k_norm(self.wk(x))[:, None], pos, rope)[:, 0]  # [B, T, D]
        keys.index_copy_(1, pos, k.to(keys.dtype))  # always: a later, longer cache may select among them
        if self.topk >= S:  # top-k of every slot, anded with the causal mask, is the causal mask
            return None
        q = self._rot(self._queries(x, q_resid, pos), pos, rope)  # [B, H, T, D]
        w = self.weights_proj(x).float() * self.H**-0.5  # [B, T, H]
        q, k_all = q.float(), keys[:, :S].float()
        # heads summed a group at a time: a 512-token prefill chunk over a 32k cache with 64 heads
        # would otherwise hold 4 GiB of per-head scores; a group stays near HEAD_GROUP_ELEMS floats
        group = max(1, min(self.H, HEAD_GROUP_ELEMS // max(B * T * S, 1)))
        index = torch.zeros(B, T, S, dtype=torch.float32, device=x.device)
        for h in range(0, self.H, group):
            scores = F.relu(torch.einsum("bhtd,bsd->bhts", q[:, h : h + group], k_all) * self.D**-0.5)
            index += torch.einsum("bth,bhts->bts", w[..., h : h + group], scores)
        index = index.masked_fill(~visible, float("-inf"))
        # k beyond the visible keys picks some hidden ones too; `ok` (and the causal mask) hide them.
        # Unsorted: the same set (torch selects before it sorts), and the order matters to neither use
        top = index.topk(self.topk, dim=-1, sorted=False).indices
        return Selection(top, visible.expand(B, T, S).gather(-1, top))

    def _queries(self, x, q_resid, pos) -> torch.Tensor:
        """[B, H, T, D] before RoPE: from the MLA query latent, else from LayerNorm(x); scaled by
        the log of the position where the model learned that."""
        B, T, _ = x.shape
        q = self.wq_b(q_resid if self.q_input_norm is None else self.q_input_norm(x))
        q = q.view(B, T, self.H, self.D).transpose(1, 2)
        return q if self.q_scale is None else self.q_scale(q, pos)

    # Hub names under self_attn.indexer.
    HF = {
        "wq_b": "wq_b",
        "wk": "wk",
        "k_norm": "k_norm",
        "weights_proj": "weights_proj",
        "q_input_norm": "q_input_norm",
        "q_scale": "softmax_scaling",
    }

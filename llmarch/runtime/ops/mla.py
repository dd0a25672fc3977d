"""DeepSeek Multi-head Latent Attention (V2/V3/R1, Kimi K2).

q = q_b(norm(q_a(x))) (or q_proj without q low-rank), split per head into nope + rope dims;
kv_a(x) = [latent c (kv_lora_rank) | shared k_rot (rope dims)], c normalised. The cache keeps only
c and k_rot per token (kv_lora_rank + rope dims per layer, as inspect counts), never expanded K/V.
Prefill expands c through kv_b into per-head K/V (cheap for many queries); decode uses the
absorbed form: q_nope is pulled into latent space through kv_b's K half, scores are taken against
c directly, and the latent context is pushed out through kv_b's V half.
RoPE: DeepSeek's rope dims are interleaved pairs (rope_interleave); de-interleaving then rotating
half is the same rotation; a NoPE layer (LayerSpec.rope false) leaves them as they are.
Softmax scale carries YaRN's mscale(factor, mscale_all_dim)^2.
Mistral Large 4: NoPE layers may fold the rope dims into the nope dims (AttentionSpec.nope_folds_rope:
no k_rot cached); a layer may attend an earlier layer's latent (LayerSpec.kv_shared_from: no kv_a,
nothing cached but its indexer keys); queries may carry a learned log-position scale (query_scaling.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmarch.arch.spec import ArchSpec, LayerSpec
from llmarch.errors import LlmarchError
from llmarch.runtime.ops.attention import query_temperature, temper_queries
from llmarch.runtime.ops.norms import RMSNorm
from llmarch.runtime.ops.query_scaling import LogPositionQueryScale
from llmarch.runtime.ops.rope import Rope, mscale, scaling_kind
from llmarch.runtime.ops.sparse_indexer import LightningIndexer


class LatentCache:
    """Per-layer compressed cache; `k`/`v` names keep KVCache.nbytes() counting it."""

    def __init__(self, batch: int, size: int, rank: int, rope: int, dtype, device, indexer=None):
        self.k = torch.zeros(batch, size, rank, dtype=dtype, device=device)  # latent c
        self.v = torch.zeros(batch, size, rope, dtype=dtype, device=device)  # k_rot
        # the sparse-attention indexer's own key per token, where the layer has one
        self.index_k = indexer.new_cache(batch, size, dtype, device) if indexer is not None else None
        self.selection = None  # this step's Selection (sparse_indexer.py), for layers sharing it

    def update(self, c, k_rot, pos):
        self.k.index_copy_(1, pos, c.to(self.k.dtype))
        self.v.index_copy_(1, pos, k_rot.to(self.v.dtype))
        if c.shape[1] == 1:  # decode: the whole static cache, the mask hides what is not filled yet;
            self.last = self.k, self.v  # no host read of pos, so the step can be a CUDA graph
        else:
            n = int(pos[-1]) + 1  # prefill: slots are positions, attend over the filled prefix
            self.last = self.k[:, :n], self.v[:, :n]
        return self.last  # also what layers sharing this latent attend this step (as LayerCache.last)


class MLAttention(nn.Module):
    def __init__(self, spec: ArchSpec, layer: LayerSpec, rope: Rope | None):
        super().__init__()
        a = spec.attention
        d = spec.hidden_size
        self.index, self.H = layer.index, a.heads
        self.nope, self.rdim, self.vdim = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        if a.nope_folds_rope and not layer.rope:  # the rope dims join the nope dims: no k_rot at all
            self.nope, self.rdim = self.nope + self.rdim, 0
        self.rank, self.qrank = a.kv_lora_rank, a.q_lora_rank
        qdim = self.H * (self.nope + self.rdim)
        if self.qrank:
            self.q_a = nn.Linear(d, self.qrank, bias=a.bias)
            self.q_a_norm = RMSNorm(self.qrank, 1e-6)  # transformers' DeepseekV3RMSNorm default eps
            self.q_b = nn.Linear(self.qrank, qdim, bias=False)
        else:
            self.q = nn.Linear(d, qdim, bias=False)
        # a layer reading another layer's latent (kv_shared_from) has no kv_a of its own
        self.kv_from = layer.kv_shared_from
        own = self.kv_from is None
        self.kv_a = nn.Linear(d, self.rank + self.rdim, bias=a.bias) if own else None
        self.kv_a_norm = RMSNorm(self.rank, a.latent_norm_eps or 1e-6) if own else None  # transformers' default
        self.kv_b = nn.Linear(self.rank, self.H * (self.nope + self.vdim), bias=False)
        self.o = nn.Linear(self.H * self.vdim, d, bias=a.bias)
        scaling = spec.rope.scaling or {}
        theta = rope.params[0] if rope is not None else (spec.rope.theta or 10000.0)
        # own tables over exactly the rope dims (the spec's partial fraction may not divide evenly)
        freq_scale = getattr(rope, "freq_scale", None)  # learned_rope.py's factors, where the model has them
        self.rope = Rope(self.rdim, self.rdim, theta, scaling or None, spec.context_length, freq_scale)
        self.scale = (self.nope + self.rdim) ** -0.5
        if scaling_kind(scaling) != "default" and scaling.get("mscale_all_dim"):
            self.scale *= mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
        self.interleave = a.rope_interleave is not False
        self.temperature = query_temperature(a, layer)
        self.q_scale = LogPositionQueryScale(self.H) if a.query_log_scale else None
        # a NoPE layer (Kimi Linear's MLA) keeps the rope dims, shared k_rot included, unrotated
        self.rotate = layer.rope
        # a layer sharing an earlier layer's selection (index_from) has no indexer of its own
        self.index_from = layer.index_from
        self.indexer = LightningIndexer(spec, layer.index) if a.indexer and self.index_from is None else None

    def _rot(self, x, pos):
        if not self.rotate:
            return x
        if self.interleave:
            x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
        return self.rope(x, pos)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        B, T, _ = x.shape
        lc = cache.layers.get(self.index)
        if lc is None:  # a layer sharing another's latent keeps none (its indexer keys, where it has one)
            rank, rdim = (self.rank, self.rdim) if self.kv_from is None else (0, 0)
            lc = cache.layers[self.index] = LatentCache(B, cache.max_seq, rank, rdim, x.dtype, x.device, self.indexer)
        if self.rope.cos is None or self.rope.cos.device != x.device:
            self.rope.build(cache.max_seq, x.device, x.dtype)
        q_resid = self.q_a_norm(self.q_a(x)) if self.qrank else None
        q = self.q_b(q_resid) if self.qrank else self.q(x)
        q = q.view(B, T, self.H, self.nope + self.rdim).transpose(1, 2)
        q_nope, q_rot = q.split([self.nope, self.rdim], dim=-1)
        q_rot = self._rot(q_rot, pos)
        if self.temperature is not None:  # after RoPE, on the whole query
            q_nope, q_rot = temper_queries(q_nope, pos, self.temperature), temper_queries(q_rot, pos, self.temperature)
        if self.q_scale is not None:
            q_nope, q_rot = self.q_scale(q_nope, pos), self.q_scale(q_rot, pos)
        if self.kv_from is not None:  # the source layer's latent, written (normed, rotated) earlier this step
            cs, ks = cache.layers[self.kv_from].last
        else:
            c, k_rot = self.kv_a(x).split([self.rank, self.rdim], dim=-1)
            c = self.kv_a_norm(c)
            k_rot = self._rot(k_rot[:, None], pos)[:, 0]
            cs, ks = lc.update(c, k_rot, pos)  # [B, S, rank], [B, S, rope]
        S = cs.shape[1]
        mask = torch.arange(S, device=x.device)[None, :] <= pos[:, None]  # [T, S]
        sel = None  # sparse attention: the keys the indexer selects per query (None: every visible key)
        if self.indexer is not None:
            sel = lc.selection = self.indexer(x, q_resid, pos, self.rope, lc.index_k, mask)
        elif self.index_from is not None:
            sel = cache.layers[self.index_from].selection
        w = self.kv_b.weight.view(self.H, self.nope + self.vdim, self.rank)
        w_k, w_v = w[:, : self.nope], w[:, self.nope :]
        if sel is not None and T > 1:
            mask = sel.mask(mask)[:, None]  # [B, 1, T, S]
        elif sel is not None:  # decode reads the k selected latents only: a gather of static size
            cs, ks, mask = sel.gather(cs), sel.gather(ks), sel.ok[:, None]  # [B, k, rank], [B, k, rope], [B, 1, 1, k]
        if T > 1:  # expanded: per-head K/V for all keys, then SDPA
            kv = torch.einsum("bsr,hnr->bhsn", cs, w)
            k_nope, v = kv.split([self.nope, self.vdim], dim=-1)
            k = torch.cat([k_nope, ks[:, None].expand(-1, self.H, -1, -1)], dim=-1)
            qf = torch.cat([q_nope, q_rot], dim=-1)
            out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=self.scale)
        else:  # absorbed: scores against the latent itself, no per-head K/V materialised
            q_lat = torch.einsum("bhtn,hnr->bhtr", q_nope, w_k)
            scores = (
                torch.einsum("bhtr,bsr->bhts", q_lat, cs) + torch.einsum("bhtd,bsd->bhts", q_rot, ks)
            ) * self.scale
            probs = torch.softmax(scores.float().masked_fill(~mask, float("-inf")), dim=-1).to(x.dtype)
            ctx = torch.einsum("bhts,bsr->bhtr", probs, cs)
            out = torch.einsum("bhtr,hvr->bhtv", ctx, w_v)
        return self.o(out.transpose(1, 2).reshape(B, T, self.H * self.vdim))

    # Hub names (self_attn.*) -> our modules; read here so model.py's table stays llama-shaped
    HF = {
        "q_a": "q_a_proj",
        "q_a_norm": "q_a_layernorm",
        "q_b": "q_b_proj",
        "q": "q_proj",
        "kv_a": "kv_a_proj_with_mqa",
        "kv_a_norm": "kv_a_layernorm",
        "kv_b": "kv_b_proj",
        "o": "o_proj",
        "q_scale": "softmax_scaling",
    }

    def load_from(self, source, prefix: str, dtype, device) -> None:
        names = source.ckpt.tensors
        base = f"{getattr(source, 'prefix', '')}layers.{self.index}.self_attn."
        # a GGUF names these through the source's canonical table (llama.cpp's attn_q_a, ...; kv_b
        # rebuilt from its split k_b / v_b)
        gguf = source.ckpt.format == "gguf"
        parts = [(getattr(self, m, None), hf, m) for m, hf in self.HF.items()]
        if self.indexer is not None:
            parts += [
                (getattr(self.indexer, m, None), f"indexer.{hf}", f"indexer.{m}") for m, hf in self.indexer.HF.items()
            ]
        for mod, hf, canonical in parts:
            if mod is None:
                continue
            for pname, p in list(mod._parameters.items()):
                if p is None:
                    continue
                if gguf and canonical is not None:
                    cname = f"layers.{self.index}.attn.{canonical}.{pname}"
                    where, t = source.name_of(cname) or cname, source.get(cname)
                else:
                    info = names.get(f"{base}{hf}.{pname}")
                    # the file's own name (the recipe's tensor_renames may have read it under another)
                    where = info.name if info is not None else f"{base}{hf}.{pname}"
                    t = source.read(info) if info is not None else None
                if t is None:
                    raise LlmarchError(f"weight missing: {where} (MLA layer {self.index})", str(source.ckpt.path))
                if tuple(t.shape) != tuple(p.shape):
                    raise LlmarchError(
                        f"weight {where} has shape {tuple(t.shape)}, the spec needs {tuple(p.shape)}",
                        str(source.ckpt.path),
                    )
                mod._parameters[pname] = nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)

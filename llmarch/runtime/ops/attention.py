"""Softmax attention over a KV cache: MHA/GQA/MQA, sliding window (through the cache's mask),
QK-norm (per head or over the whole projection), a weightless V norm, soft-capping, attention
sinks, a V scale, a sigmoid output gate (its own projection, per channel or per head, or rows of
q_proj), and the NoPE
layers' query temperature (temperature tuning).

KV sharing (Gemma 3n / 4): a layer with kv_shared_from projects only queries and attends over the
keys/values its owner layer attended over earlier in the same step (LayerCache.last); it has no
cache of its own. Values may be the key projection itself (v_from_k), and the head width may be
the layer's own (Gemma 4's wider global layers).

KV head count and sinks are per layer (LayerSpec), since MiMo-V2-Flash's sliding layers have twice
the KV heads of its full layers, and sinks only there.

q, k and v are one fused matmul (`qkv`). The score computation uses SDPA unless soft-capping or
sinks need the explicit form. A multi-token step on a GPU (prefill), which is bound by op dispatch,
takes q and k heads through their per-head norms and RoPE as one tensor where nothing else lies
between the projection and attention (forward_fused_qk).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmarch.arch.spec import ArchSpec, LayerSpec
from llmarch.runtime import cpu_kernels, gemv_cuda
from llmarch.runtime import decode_attention_cuda as da_cuda
from llmarch.runtime.ops.norms import make_norm
from llmarch.runtime.ops.rope import Rope

# where a multi-token step takes forward_fused_qk: off the CPU, whose float32 path has its own
# C kernels for the norm and RoPE (tests add "cpu" to check the fused path against transformers)
FUSED_QK_DEVICES = ("cuda",)


def attend(
    q,
    k,
    v,
    mask,
    scale: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    group=None,
    decode_kernel: bool = False,
):
    """q [B,H,T,D], k/v [B,KV,S,D], mask bool [T,S] (True = visible) -> [B,H,T,Dv].

    group: the cache's SlotGroup, whose per-step additive bias the CPU path reuses across layers.
    decode_kernel: a CUDA decode step may take decode_attention_cuda's kernel (see its takes())."""
    B, H, T, D = q.shape
    KV = k.shape[1]
    if softcap is None and sinks is None and cpu_kernels.attend_one_ok(q, k, v, mask):
        return cpu_kernels.attend_one(q, k, v, mask, scale)  # a CPU decode step: one C call, not ~8 ops
    if decode_kernel and softcap is None and sinks is None and q.device.type == "cuda" and da_cuda.takes(q, k, v, mask):
        return da_cuda.attend(q, k, v, mask, scale)  # a CUDA decode step: one Triton kernel
    if softcap is None and sinks is None and q.device.type == "cuda" and T > 1:
        if group is not None and group.causal and k.shape[2] == T:  # no mask: SDPA may take flash attention
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    # explicit form, grouped: the `rep` query heads sharing a KV head become extra rows of one
    # matmul (no K/V copies; CPU SDPA is slow for one query against a long masked cache)
    rep = H // KV
    qg = q.reshape(B, KV, rep * T, D)
    if group is not None and B == 1 and softcap is None and sinks is None and q.device.type == "cpu":
        # one fused scale + bias + matmul (the mask as a bias shared by all layers of the step)
        scores = torch.baddbmm(group.bias(rep, q.dtype), qg[0], k[0].transpose(-1, -2), alpha=scale)
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        return torch.matmul(probs, v[0].to(q.dtype)).reshape(B, H, T, -1)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [B, KV, rep*T, S]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    m = mask if rep == 1 else mask.repeat(rep, 1)
    scores = scores.masked_fill(~m, float("-inf"))
    if sinks is not None:  # a learned per-head logit that takes probability mass but adds no value
        sink = sinks.reshape(1, KV, rep, 1, 1).expand(B, KV, rep, T, 1).reshape(B, KV, rep * T, 1).to(scores.dtype)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1).float(), dim=-1)[..., :-1].to(q.dtype)
    else:
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v).reshape(B, H, T, -1)


def query_temperature(a, layer) -> tuple[float, float, float] | None:
    """(floor_scale, attn_scale, position_offset) where this layer's queries are tempered: every
    layer when the spec says all_layers (Mistral 4), else the NoPE layers only (Llama 4)."""
    tt = a.temperature_tuning
    if not tt or (layer.rope and not tt.get("all_layers")):
        return None
    return float(tt["floor_scale"]), float(tt["attn_scale"]), float(tt.get("position_offset", 1))


def temper_queries(q: torch.Tensor, pos: torch.Tensor, temperature: tuple[float, float, float]) -> torch.Tensor:
    """q [B,H,T,D] scaled per position by log1p(floor((pos + offset) / floor_scale)) * attn_scale + 1,
    as transformers' Llama 4 (NoPE layers, offset 1) and Mistral 4 (get_llama_4_attn_scale, offset 0)
    scale their queries. The factor comes from the position tensor on the device, so a captured
    decode step stays right at every position."""
    floor_scale, attn_scale, offset = temperature
    t = torch.log1p(torch.floor((pos.float() + offset) / floor_scale)) * attn_scale + 1.0
    return (q * t[:, None]).to(q.dtype)


class Attention(nn.Module):
    fused = {"qkv": ("q", "k", "v")}

    def __init__(self, spec: ArchSpec, layer: LayerSpec, rope: Rope | None):
        super().__init__()
        a = spec.attention
        d = spec.hidden_size
        # the head width is per layer where it differs (Gemma 4's wider global layers)
        self.heads, self.kv_heads, self.head_dim = a.heads, layer.kv_heads or a.kv_heads, layer.head_dim or a.head_dim
        self.v_dim = layer.head_dim or a.v_head_dim or a.head_dim
        # output gate: o(attn * sigmoid(gate)), the gate from its own projection of x or, when
        # q_proj holds [q | gate] per head, from those rows of the fused matmul
        self.gate_in_q = a.gated and a.gate_layout == "in_q"
        q_width = a.heads * self.head_dim
        # a KV-shared layer projects only q: it attends over the keys/values its owner layer wrote
        # this step; with v_from_k the values are the raw key projection (no v rows)
        self.kv_source = layer.kv_shared_from
        self.v_from_k = layer.v_from_k
        k_width = 0 if self.kv_source is not None else self.kv_heads * self.head_dim
        v_width = 0 if self.kv_source is not None or self.v_from_k else self.kv_heads * self.v_dim
        self.sizes = [q_width * (2 if self.gate_in_q else 1), k_width, v_width]
        if self.kv_source is not None or self.v_from_k:
            self.fused = {"qkv": ("q", "k")[: 1 if self.kv_source is not None else 2]}
        self.qkv = nn.Linear(d, sum(self.sizes), bias=a.bias)
        self.o = nn.Linear(a.heads * self.v_dim, d, bias=a.out_bias)
        self.qk_norm = a.qk_norm
        eps = spec.norm.eps
        # "l2": a weightless RMS norm after RoPE, on RoPE layers only (Llama 4's NoPE layers skip it)
        self.l2 = a.qk_norm == "l2" and rope is not None
        self.l2_eps = eps or 1e-5
        if a.qk_norm == "per_head":
            self.q_norm = make_norm("rms", self.head_dim, eps, spec.norm.unit_offset)
            self.k_norm = make_norm("rms", self.head_dim, eps, spec.norm.unit_offset) if k_width else None
        elif a.qk_norm == "whole":
            self.q_norm = make_norm("rms", q_width, eps, spec.norm.unit_offset)
            self.k_norm = make_norm("rms", self.sizes[1], eps, spec.norm.unit_offset)
        sinks = layer.sinks if layer.sinks is not None else a.sinks
        self.sinks = nn.Parameter(torch.zeros(a.heads)) if sinks else None
        self.v_scale = a.value_scale
        self.v_norm_eps = (eps or 1e-6) if a.v_norm else None  # weightless RMS norm per value head
        self.scale = a.scale if a.scale is not None else self.head_dim**-0.5
        self.softcap = a.softcap
        self.rope = rope
        self.index = layer.index
        # one gate per channel, or one per head (LFM3's g_proj: hidden -> heads)
        self.gate_per_head = a.gate_per_head and not self.gate_in_q
        gate_width = a.heads * (1 if self.gate_per_head else self.v_dim)
        self.gate = nn.Linear(d, gate_width, bias=False) if a.gated and not self.gate_in_q else None
        self.temperature = query_temperature(a, layer)
        # an eager multi-token step on a GPU is bound by op dispatch: where nothing but a per-head
        # norm and RoPE lies between the projection and attention, q and k heads take them as one
        # [B, H + KV, T, D] tensor (half the ops)
        self.fuse_qk = (
            self.kv_source is None
            and not self.v_from_k
            and not self.gate_in_q
            and a.qk_norm in (None, "per_head")
            and self.temperature is None
            and rope is not None
        )
        # qkv is the only projection of the input (no output gate of its own): a pre-norm layer's
        # norm may be handed to it (forward's norm) and the residual add to o (Block)
        self.takes_prenorm = self.gate is None
        self.qk_norm_weight = None  # [H + KV, D]: q_norm's weight for the q heads, k_norm's for the k heads
        # read once here, so a compiled step's choice is guarded as a module attribute
        self.decode_kernel = da_cuda.enabled()
        # a one-token step where only a per-head norm and RoPE lie between the projection and the
        # cache: q/k norm, RoPE, the cache write and attention in one kernel (forward_decode_new)
        self.decode_new = (
            self.decode_kernel
            and da_cuda.new_step_enabled()
            and self.fuse_qk
            and self.v_norm_eps is None
            and self.v_scale is None
            and self.softcap is None
            and self.sinks is None
        )

    def project(self, x: torch.Tensor, norm: nn.Module | None = None):
        """x [B,T,d] -> q, k, v [B,T,width] and the output gate before its sigmoid (or None).
        norm: x is the residual stream and qkv reads norm(x) (in the GEMV's prologue where it can;
        only where takes_prenorm: no other projection reads the input)."""
        qkv = self.qkv(x) if norm is None else gemv_cuda.normed_linear(x, self.qkv, norm)
        q, k, v = qkv.split(self.sizes, dim=-1)
        if self.v_from_k:
            v = k
        if self.gate_in_q:
            B, T, _ = x.shape
            q, gate = q.view(B, T, self.heads, 2 * self.head_dim).chunk(2, dim=-1)
            return q.reshape(B, T, -1), k, v, gate.reshape(B, T, -1)
        return q, k, v, (self.gate(x) if self.gate is not None else None)

    def l2_norm(self, x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + (eps or self.l2_eps))).to(x.dtype)

    def temper(self, q: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return temper_queries(q, pos, self.temperature)

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, cache, norm: nn.Module | None = None, residual=None
    ) -> torch.Tensor:
        """norm, residual (a pre-norm layer's one-token step, only where takes_prenorm): x is the
        residual stream, the layer attends over norm(x) and returns residual + its output, the norm
        and the add in the q|k|v and o GEMVs where the kernel takes them."""
        B, T, _ = x.shape
        if norm is None and self.fuse_qk and T > 1 and x.device.type in FUSED_QK_DEVICES:
            return self.forward_fused_qk(x, pos, cache)
        if self.decode_new and T == 1 and self.takes_decode_new(x, cache):
            return self.forward_decode_new(x, pos, cache, norm, residual)
        q, k, v, gate = self.project(x, norm)
        if self.kv_source is not None:
            owner = cache.layers[self.kv_source]
            return self.finish(self.queries(q, pos), owner, *owner.last, gate, residual)
        if self.qk_norm == "whole":
            k = self.k_norm(k)
        k = k.view(B, T, self.kv_heads, self.head_dim)
        if self.qk_norm == "per_head":
            k = self.k_norm(k)
        k = k.transpose(1, 2)
        v = v.view(B, T, self.kv_heads, self.v_dim)
        if self.v_norm_eps is not None:
            v = self.l2_norm(v, self.v_norm_eps)
        v = v.transpose(1, 2)
        if self.v_scale is not None:  # on V itself (as transformers), so the cache holds scaled values
            v = v * self.v_scale
        if self.rope is not None:
            k = self.rope(k, pos)
        if self.l2:
            k = self.l2_norm(k)
        lc = cache.layers[self.index]
        keys, values = lc.update(k, v)
        return self.finish(self.queries(q, pos), lc, keys, values, gate, residual)

    def forward_fused_qk(self, x: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        """forward() with q and k heads normed and rotated as one tensor (see fuse_qk)."""
        B, T, _ = x.shape
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        qk, v = self.qkv(x).split([(H + KV) * D, self.sizes[2]], dim=-1)
        qk = qk.view(B, T, H + KV, D)
        if self.qk_norm == "per_head":
            qk = self.per_head_norm(qk)
        q, k = self.rope(qk.transpose(1, 2), pos).split([H, KV], dim=1)
        v = v.view(B, T, KV, self.v_dim)
        if self.v_norm_eps is not None:
            v = self.l2_norm(v, self.v_norm_eps)
        v = v.transpose(1, 2)
        if self.v_scale is not None:
            v = v * self.v_scale
        lc = cache.layers[self.index]
        keys, values = lc.update(k, v)
        return self.finish(q, lc, keys, values, self.gate(x) if self.gate is not None else None)

    def takes_decode_new(self, x: torch.Tensor, cache) -> bool:
        lc = cache.layers[self.index]
        norms = self.qk_norm is None or (self.q_norm.weight_f32 is not None and self.k_norm.weight_f32 is not None)
        return (
            da_cuda.on_device(x)
            and x.dtype in da_cuda.DTYPES
            and lc.k.dtype == x.dtype
            and not lc.group.concat
            and self.rope.cos is not None
            and self.rope.cos.device == x.device
            and norms
        )

    def forward_decode_new(self, x: torch.Tensor, pos: torch.Tensor, cache, norm=None, residual=None) -> torch.Tensor:
        """forward() of a one-token step with q/k norm, RoPE, the cache write and attention in one
        kernel (decode_attention_cuda.decode_attention_new)."""
        B = x.shape[0]
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        q, k, v, gate = self.project(x, norm)
        lc = cache.layers[self.index]
        g = lc.group
        per_head = self.qk_norm == "per_head"
        out = da_cuda.decode_attention_new(
            q.view(B, H, D),
            k.view(B, KV, D),
            v.view(B, KV, self.v_dim),
            lc.k,
            lc.v,
            g.mask,
            pos,
            g.write_slots,
            self.q_norm.weight_f32 if per_head else None,
            self.k_norm.weight_f32 if per_head else None,
            self.rope.cos,
            self.rope.sin_rot,
            float(self.q_norm.eps) if per_head else 0.0,
            float(self.scale),
        )
        # what this step attended over, for KV-shared layers later in the step (as lc.update keeps it)
        lc.last = (lc.k, lc.v) if g.limit is None else (lc.k[:, :, : g.limit], lc.v[:, :, : g.limit])
        return self.output(out[:, :, None], gate, residual)

    def per_head_norm(self, qk: torch.Tensor) -> torch.Tensor:
        """q_norm on the q heads and k_norm on the k heads of qk [B, T, H + KV, D], in one pass."""
        if self.qk_norm_weight is None:  # the loaded weights, gathered once
            H, KV, D = self.heads, self.kv_heads, self.head_dim
            w = [n.weight.float() + (1.0 if n.unit_offset else 0.0) for n in (self.q_norm, self.k_norm)]
            self.qk_norm_weight = torch.cat([w[0].expand(H, D), w[1].expand(KV, D)])
        eps = self.q_norm.eps
        return (F.rms_norm(qk.float(), qk.shape[-1:], None, eps) * self.qk_norm_weight).to(qk.dtype)

    def queries(self, q: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """q [B,T,width] -> normed, rotated, tempered [B,H,T,D]."""
        B, T, _ = q.shape
        if self.qk_norm == "whole":
            q = self.q_norm(q)
        q = q.view(B, T, self.heads, self.head_dim)
        if self.qk_norm == "per_head":
            q = self.q_norm(q)
        q = q.transpose(1, 2)
        if self.rope is not None:
            q = self.rope(q, pos)
        if self.l2:
            q = self.l2_norm(q)
        if self.temperature is not None:
            q = self.temper(q, pos)
        return q

    def finish(self, q, lc, keys, values, gate, residual=None) -> torch.Tensor:
        """Attend over the cache's keys/values, gate, project out (added to residual, if given)."""
        out = attend(
            q,
            keys.to(q.dtype),
            values.to(q.dtype),
            lc.group.mask,
            self.scale,
            self.softcap,
            self.sinks,
            lc.group,
            self.decode_kernel,
        )
        return self.output(out, gate, residual)

    def output(self, out: torch.Tensor, gate, residual=None) -> torch.Tensor:
        """Attention's output [B, H, T, Dv] -> gated, projected out [B, T, d] (+ residual: in the o
        GEMV's epilogue where the kernel takes it)."""
        B, _, T, _ = out.shape
        out = out.transpose(1, 2)
        if gate is not None and self.gate_per_head:
            out = out * torch.sigmoid(gate)[..., None]
        out = out.reshape(B, T, self.heads * self.v_dim)
        if gate is not None and not self.gate_per_head:
            out = out * torch.sigmoid(gate)
        return self.o(out) if residual is None else gemv_cuda.linear_add(out, self.o, residual)

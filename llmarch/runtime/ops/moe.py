"""Mixture-of-experts FFN: router variants, routed experts (stacked), shared expert.

Routers, from the spec's MoE facts (semantics from each transformers modeling file):
  softmax, then top-k   softmax over all experts, top-k, optional renormalisation (Qwen3-MoE);
                        with n_group > 1, group-limited as the sigmoid router (Mistral 4), or with
                        groups ranked by their best score (DeepSeek-V2)
  sigmoid, then top-k   sigmoid scores, + correction bias for the choice only, group-limited top-k,
                        weights from the plain scores, optional renormalisation (DeepSeek V3 / Kimi K2,
                        GLM-4.5, MiniMax-M2, MiMo-V2-Flash, AfMoE)
  top-k, then softmax   top-k over the logits (+ router bias), softmax over those k (gpt-oss)
  top-k, then sigmoid   top-k over the logits, sigmoid of those (Llama 4, whose weights scale the
                        expert INPUT: moe.weights_on_input)
Every router's weights are then multiplied by routed_scaling_factor.
Experts are held stacked, [E, 2I, d] (gate rows then up rows) and [E, d, I], whatever the disk
layout (per-expert tensors or fused, gpt-oss's interleaved gate/up), in an expert store
(llmarch/runtime/experts/): on the device by default, or where the placement puts them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmarch.arch.spec import ArchSpec, LayerSpec
from llmarch.errors import LlmarchError
from llmarch.runtime.experts.stores import ResidentExperts
from llmarch.runtime.ops.mlp import GatedMLP, PlainMLP, activation

# score functions whose scores get the correction bias for the choice only, then the top-k
BIASED_CHOICE = {"sigmoid": torch.sigmoid, "sqrtsoftplus": lambda x: F.softplus(x).sqrt()}


class Router(nn.Module):
    def __init__(self, spec: ArchSpec, index: int | None = None):
        super().__init__()
        m = spec.moe
        self.score = m.router or "softmax"
        self.topk_first = m.topk_before_score
        self.E, self.k = m.experts, m.experts_per_token
        self.weight = nn.Parameter(torch.empty(m.experts, spec.hidden_size))
        # a hash-routed layer picks its experts from a token-id table (tid2eid [vocab, k], loaded);
        # its scores only weigh them, so it has no correction bias
        self.hashed = index is not None and index in m.hash_layers
        self.tid2eid: torch.Tensor | None = None
        # sigmoid-then-top-k routers add a correction bias to the choice only; the others, to the logits
        self.bias = nn.Parameter(torch.empty(m.experts)) if m.router_bias and not self.hashed else None
        self.norm = bool(m.norm_topk_prob)
        self.norm_eps = m.norm_topk_eps
        self.groups, self.topk_group = m.n_group or 1, m.topk_group or 1
        self.group_by_max = m.group_score == "max"
        self.scale = m.routed_scaling_factor or 1.0
        d = spec.hidden_size
        self.input_scale = nn.Parameter(torch.ones(d)) if m.router_input_scale else None
        self.input_root = d**-0.5
        self.eps = spec.norm.eps or 1e-6
        self.expert_scale = nn.Parameter(torch.ones(m.experts)) if m.per_expert_scale else None

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, d] -> (expert ids [N, k], weights [N, k] float32); ids: the N tokens' ids (hash routing)."""
        if self.input_scale is not None:  # rms_norm(x) * scale * d^-0.5 (Gemma 4's router input)
            xf = x.float()
            xf = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
            x = (xf.to(x.dtype) * self.input_scale * self.input_root).to(x.dtype)
        idx, w = self._route(x, ids)
        if self.expert_scale is not None:
            w = w * self.expert_scale[idx]
        return idx, (w * self.scale if self.scale != 1.0 else w)

    def _route(self, x: torch.Tensor, ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # group-limited choice (a group ranks by the sum of its two best scores, or by its best one
        # where group_score says "max": DeepSeek-V2): sigmoid routers (DeepSeek V3), sqrt-softplus
        # ones (DeepSeek V4) and softmax ones with groups (Mistral 4, DeepSeek-V2)
        if not self.topk_first and (self.score in BIASED_CHOICE or self.groups > 1):
            logits = F.linear(x.float(), self.weight.float())
            if self.score in BIASED_CHOICE:
                scores = BIASED_CHOICE[self.score](logits)
                choice = scores + self.bias.float() if self.bias is not None else scores
            else:
                scores = choice = torch.softmax(logits + self.bias.float() if self.bias is not None else logits, -1)
            if self.groups > 1:
                g = choice.view(-1, self.groups, self.E // self.groups)
                rank = g.amax(-1) if self.group_by_max else g.topk(2, dim=-1)[0].sum(-1)
                best = rank.topk(self.topk_group, dim=-1, sorted=False)[1]
                keep = torch.zeros_like(g[..., 0]).scatter_(1, best, 1.0).bool()
                choice = g.masked_fill(~keep[..., None], float("-inf")).view(-1, self.E)
            if self.hashed:
                if ids is None or self.tid2eid is None:
                    raise LlmarchError("a hash-routed MoE layer needs the token ids and its tid2eid table")
                idx = self.tid2eid[ids.reshape(-1)].long()
            else:
                idx = choice.topk(self.k, dim=-1, sorted=False)[1]
            w = scores.gather(1, idx)
            if self.norm:
                w = w / (w.sum(-1, keepdim=True) + self.norm_eps)
            return idx, w
        logits = F.linear(x, self.weight, self.bias)
        if not self.topk_first:  # softmax over every expert, then top-k
            probs = torch.softmax(logits.float(), dim=-1)
            w, idx = probs.topk(self.k, dim=-1)
            if self.norm:
                w = w / w.sum(-1, keepdim=True)
            return idx, w
        top, idx = logits.topk(self.k, dim=-1)
        return idx, (torch.softmax(top.float(), dim=-1) if self.score == "softmax" else torch.sigmoid(top.float()))


class ExpertAct:
    """SwiGLU, or gpt-oss's clamped variant: (clamp(up) + 1) * g * sigmoid(alpha * g), g = clamp(gate),
    or without alpha (DeepSeek V4) act(min(gate, limit)) * clamp(up, -limit, limit); for non-gated
    experts (spec.ffn_gated false: Nemotron-H's relu2) the activation of up alone."""

    def __init__(self, spec: ArchSpec, inter: int):
        self.inter = inter
        self.gated = getattr(spec, "ffn_gated", True)  # kernel tests pass a bare namespace of MoE facts
        self.clamped = spec.moe.swiglu_limit is not None
        # clamped gate and up around the model's own activation, no alpha (DeepSeek V4)
        self.clamp_only = self.clamped and spec.moe.swiglu_alpha is None
        self.alpha = float(spec.moe.swiglu_alpha or 0.0)  # floats either way: the CPU kernel takes both
        self.limit = float(spec.moe.swiglu_limit or 0.0)
        # (GGUF names gpt-oss's "swiglu_clamped")
        self.act = None if self.clamped and not self.clamp_only else activation(spec.activation)
        self.name = spec.activation or "silu"  # for the CPU expert kernel's own activation code

    def __call__(self, gu: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.act(gu)
        gate, up = gu[..., : self.inter], gu[..., self.inter :]
        if self.clamped:
            gate = gate.clamp(max=self.limit)
            up = up.clamp(-self.limit, self.limit)
            if self.clamp_only:
                return self.act(gate) * up
            return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
        return self.act(gate) * up


class MoE(nn.Module):
    def __init__(self, spec: ArchSpec, layer: LayerSpec):
        super().__init__()
        m = spec.moe
        self.spec, self.index = spec, layer.index
        self.E, self.d = m.experts, spec.hidden_size
        self.inter = m.expert_ffn or spec.intermediate_size
        self.bias = m.expert_bias
        self.router = Router(spec, layer.index)
        self.gated = spec.ffn_gated
        self.experts: nn.Module = ResidentExperts(self.E, self.d, self.inter, self.bias, self.gated)
        self.act = ExpertAct(spec, self.inter)
        self.weight_input = m.weights_on_input
        self.shared = None
        if m.shared_experts:
            width = m.shared_ffn or self.inter * m.shared_experts
            self.shared = (
                # DeepSeek V4 clamps its shared expert as its routed ones
                GatedMLP(self.d, width, spec.activation, limit=m.swiglu_limit if self.act.clamp_only else None)
                if self.gated
                else PlainMLP(self.d, width, spec.activation, bias=False)
            )
        self.shared_gate = nn.Linear(self.d, 1, bias=False) if m.shared_gated else None
        self.store_factory = None  # experts/placement.py: (moe, gate_up, down, biases, stored) -> expert store

    def forward(
        self, x: torch.Tensor, route_on: torch.Tensor | None = None, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """route_on: what the router reads where it is not the experts' input (Gemma 4 routes on
        the residual stream, its experts read a normed copy); ids: the tokens (hash routing)."""
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        idx, w = self.router(flat if route_on is None else route_on.reshape(-1, d), ids)
        # shared expert first: on the GPU it runs while an offloaded store computes on the CPU
        shared = None
        if self.shared is not None:
            shared = self.shared(flat)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(flat)) * shared
        out = self.experts(flat, idx, w, self.act, self.weight_input)
        if shared is not None:
            out = out + shared
        return out.view(B, T, d)

    def load_from(self, source, prefix: str, dtype, device) -> None:
        """Read this layer's router/experts/shared tensors (names from moe_names.py) and place them."""
        from llmarch.runtime.moe_names import read_moe

        t = read_moe(source, self, keep_stored=getattr(self.store_factory, "keeps_stored", None))
        put = lambda x: nn.Parameter(x.to(device=device, dtype=dtype), requires_grad=False)  # noqa: E731
        self.router.weight = put(t["router"])
        for key, attr in (("router_input_scale", "input_scale"), ("per_expert_scale", "expert_scale")):
            if getattr(self.router, attr) is not None:
                if t.get(key) is None:
                    raise LlmarchError(f"layer {self.index}: the router's {key} is missing", str(source.ckpt.path))
                setattr(self.router, attr, put(t[key]))
        if self.router.hashed:
            if t.get("tid2eid") is None:
                raise LlmarchError(f"layer {self.index}: the hash router's tid2eid is missing", str(source.ckpt.path))
            table = t["tid2eid"]
            if table.ndim != 2 or table.shape[1] != self.router.k or not bool(((table >= 0) & (table < self.E)).all()):
                raise LlmarchError(
                    f"layer {self.index}: tid2eid {tuple(table.shape)} must hold {self.router.k} expert ids < {self.E}"
                    " per token",
                    str(source.ckpt.path),
                )
            self.router.tid2eid = table.to(device=device, dtype=torch.long)
        if self.router.bias is not None:
            if t.get("router_bias") is None:
                raise LlmarchError(
                    f"layer {self.index}: the router bias / correction bias is missing", str(source.ckpt.path)
                )
            # the correction bias decides the choice in float32 (transformers keeps it a float32 buffer)
            self.router.bias = nn.Parameter(
                t["router_bias"].to(device=device, dtype=torch.float32), requires_grad=False
            )
        if isinstance(self.shared, PlainMLP):
            self.shared.up = _linear(t["shared_up"], None, dtype, device)
            self.shared.down = _linear(t["shared_down"], None, dtype, device)
        elif self.shared is not None:
            self.shared.gate_up = _linear(torch.cat([t["shared_gate"], t["shared_up"]]), None, dtype, device)
            self.shared.down = _linear(t["shared_down"], None, dtype, device)
        if self.shared_gate is not None:
            self.shared_gate = _linear(t["shared_gate_w"], None, dtype, device)
        biases = (t.get("gate_up_bias"), t.get("down_bias"))
        if self.store_factory is not None:
            stored = t.get("mxfp4") or t.get("gguf_blocks")
            self.experts = self.store_factory(self, t["gate_up"], t["down"], biases, stored)
            from llmarch.runtime.experts.host import OffloadedExperts

            if self.act.clamp_only and isinstance(self.experts, OffloadedExperts):
                raise LlmarchError(
                    "--experts cpu/disk: the CPU expert kernel computes gpt-oss's clamped SwiGLU, not this "
                    "model's (gate and up clamped around its activation); run with the experts resident",
                    str(source.ckpt.path),
                )
        else:
            self.experts.load(t["gate_up"], t["down"], biases, dtype, device)


def _linear(w: torch.Tensor, b, dtype, device) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    lin.weight = nn.Parameter(w.to(device=device, dtype=dtype), requires_grad=False)
    if b is not None:
        lin.bias = nn.Parameter(b.to(device=device, dtype=dtype), requires_grad=False)
    return lin


class DenseBesideMoE(nn.Module):
    """A dense MLP and routed experts side by side (Gemma 4): the MLP reads the block's FFN-normed
    input, the router the residual stream, the experts their own normed copy of it; each output
    gets its own post-norm and the two are summed."""

    wants_residual = True

    def __init__(self, spec: ArchSpec, layer: LayerSpec):
        super().__init__()
        from llmarch.runtime.ops.norms import make_norm

        d = spec.hidden_size
        self.dense = GatedMLP(d, layer.ffn_width or spec.intermediate_size, spec.activation)
        self.moe = MoE(spec, layer)
        self.dense_post_norm = make_norm(spec.norm.kind, d, spec.norm.eps, spec.norm.unit_offset)
        self.moe_norm = make_norm(spec.norm.kind, d, spec.norm.eps, spec.norm.unit_offset)
        self.moe_post_norm = make_norm(spec.norm.kind, d, spec.norm.eps, spec.norm.unit_offset)

    def forward(self, normed: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        dense = self.dense_post_norm(self.dense(normed))
        return dense + self.moe_post_norm(self.moe(self.moe_norm(residual), route_on=residual))


def moe_ffn(spec: ArchSpec, layer: LayerSpec) -> nn.Module:
    return DenseBesideMoE(spec, layer) if spec.moe.dense_beside else MoE(spec, layer)

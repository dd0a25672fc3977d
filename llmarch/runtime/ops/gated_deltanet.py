"""Gated DeltaNet (Qwen3-Next, Qwen3.5, Olmo hybrid): a linear-attention mixer with a fixed-size state.

Per layer: x -> in_proj -> [q k v | z | b | a]; q, k, v pass a causal depthwise conv (kernel K)
and the activation; q and k are L2-normalised per head (q also scaled by 1/sqrt(dk)); each value
head h keeps a dk x dv matrix S that, token by token, decays by exp(g) and takes a delta-rule write:

    g = -exp(A_log) * softplus(a + dt_bias)       beta = beta_scale * sigmoid(b)
    S <- exp(g) S;   S <- S + k (beta (v - k^T S))^T;   o = q^T S

then o passes an RMS norm gated by silu(z) and out_proj. Several value heads may share one q/k head
(consecutive value heads per key head, as transformers repeats them). beta_scale is 2 where the
model lets the write's eigenvalues go negative (Olmo hybrid), else 1. The stored input projections
are fused, split or separate (spec.linear.projection); each layout names its tensors (LAYOUTS).

The rule's two forms, `recurrent_step` (one token, decode) and `chunked` (prefill, the chunk/WY
form), live in delta_rule.py, shared with Kimi Delta Attention. The state (conv window: the last
K - 1 conv inputs; S in float32) lives in the cache (kv_cache.LinearState) and is updated in
place, so a captured decode step stays valid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmarch.arch.spec import ArchSpec, LayerSpec
from llmarch.errors import LlmarchError
from llmarch.runtime.ops.delta_rule import CHUNK, chunked, gated_delta, l2norm, recurrent_step, short_conv
from llmarch.runtime.ops.linear_common import linear_sizes, tensor_reader
from llmarch.runtime.ops.mlp import activation
from llmarch.runtime.ops.norms import RMSNorm

# the rule's forms stay importable from here (tests, benchmarks)
__all__ = ["CHUNK", "GatedDeltaNet", "chunked", "l2norm", "recurrent_step"]


# per stored layout: the gated norm's and the output projection's tensor names
LAYOUTS = {"grouped": ("norm", "out_proj"), "split": ("norm", "out_proj"), "separate": ("o_norm", "o_proj")}


class GatedDeltaNet(nn.Module):
    def __init__(self, spec: ArchSpec, layer: LayerSpec, rope=None):
        super().__init__()
        lin = linear_sizes(spec, layer, "gated_deltanet", "Gated DeltaNet", grouped=("value heads", "key heads"))
        d = spec.hidden_size
        self.index = layer.index
        self.kh, self.vh, self.dk, self.dv = lin.key_heads, lin.value_heads, lin.key_head_dim, lin.value_head_dim
        self.kernel = lin.conv_kernel
        self.projection = lin.projection
        self.key_dim, self.value_dim = self.kh * self.dk, self.vh * self.dv
        self.conv_dim = lin.conv_channels
        # one matmul for every input projection, rows [q k v | z | b | a] whatever the stored layout
        self.sizes = [self.conv_dim, self.value_dim, self.vh, self.vh]
        self.in_proj = nn.Linear(d, sum(self.sizes), bias=False)
        self.conv = nn.Parameter(torch.empty(self.conv_dim, 1, self.kernel))
        self.A_log = nn.Parameter(torch.empty(self.vh))
        self.dt_bias = nn.Parameter(torch.empty(self.vh))
        self.beta_scale = lin.beta_scale
        eps = lin.norm_eps if lin.norm_eps is not None else spec.norm.eps
        self.norm = RMSNorm(self.dv, eps if eps is not None else 1e-6)  # plain weight
        self.out = nn.Linear(self.value_dim, d, bias=False)
        self.act = activation(spec.activation or "silu")

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        B, T, _ = x.shape
        st = cache.linear[self.index]
        qkv, z, b, a = self.in_proj(x).split(self.sizes, dim=-1)
        y = short_conv(st.conv, qkv, self.conv, self.act)
        q, k, v = y.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(B, T, self.kh, self.dk).float()
        k = k.reshape(B, T, self.kh, self.dk).float()
        v = v.reshape(B, T, self.vh, self.dv).float()
        q, k = l2norm(q) * self.dk**-0.5, l2norm(k)
        if self.vh != self.kh:
            rep = self.vh // self.kh
            q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
        beta = b.float().sigmoid()
        if self.beta_scale != 1.0:
            beta = beta * self.beta_scale
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        o = gated_delta(q, k, v, g, beta, st.recurrent)
        o = self.norm(o.to(x.dtype)) * F.silu(z.view(B, T, self.vh, self.dv).float())
        return self.out(o.to(x.dtype).reshape(B, T, self.value_dim))

    def _split_conv(self, read, where: str) -> torch.Tensor:
        """The conv weight from the Hub layout's q_conv1d / k_conv1d / v_conv1d (transformers joins
        them on load). transformers 5.24's save_pretrained splits the joined weight back into three
        near-equal parts instead of q / k / v widths; either split joins to the same weight."""
        K, even = self.kernel, -(-self.conv_dim // 3)  # torch.chunk's part size
        parts = [
            read("q_conv1d.weight", (self.key_dim, 1, K), (even, 1, K)),
            read("k_conv1d.weight", (self.key_dim, 1, K), (even, 1, K)),
            read("v_conv1d.weight", (self.value_dim, 1, K), (self.conv_dim - 2 * even, 1, K)),
        ]
        w = torch.cat(parts)
        if w.shape[0] != self.conv_dim:
            raise LlmarchError(
                f"layer {self.index}: q/k/v_conv1d hold {w.shape[0]} channels, the config's sizes need {self.conv_dim}",
                where,
            )
        return w

    def load_from(self, source, prefix: str, dtype, device) -> None:
        """This layer's linear_attn.* tensors, the input projections reordered to [q k v | z | b | a]."""
        where = str(source.ckpt.path)
        base = f"{getattr(source, 'prefix', '')}layers.{self.index}.linear_attn."
        read = tensor_reader(source, base, "Gated DeltaNet", self.index)

        d = self.out.weight.shape[0]
        if self.projection == "grouped":
            # per key head: [q (dk) k (dk) v (r dv) z (r dv)] and [b (r) a (r)], r value heads per key head
            r = self.vh // self.kh
            qkvz = read("in_proj_qkvz.weight", (2 * self.key_dim + 2 * self.value_dim, d))
            ba = read("in_proj_ba.weight", (2 * self.vh, d)).view(self.kh, 2 * r, d)
            q, k, v, z = qkvz.view(self.kh, -1, d).split([self.dk, self.dk, r * self.dv, r * self.dv], dim=1)
            parts = [q, k, v, z, ba[:, :r], ba[:, r:]]
            w = torch.cat([p.reshape(-1, d) for p in parts])
        elif self.projection == "split":
            w = torch.cat(
                [
                    read("in_proj_qkv.weight", (self.conv_dim, d)),
                    read("in_proj_z.weight", (self.value_dim, d)),
                    read("in_proj_b.weight", (self.vh, d)),
                    read("in_proj_a.weight", (self.vh, d)),
                ]
            )
        elif self.projection == "separate":
            # one projection each; g_proj is the output gate (z)
            w = torch.cat(
                [
                    read("q_proj.weight", (self.key_dim, d)),
                    read("k_proj.weight", (self.key_dim, d)),
                    read("v_proj.weight", (self.value_dim, d)),
                    read("g_proj.weight", (self.value_dim, d)),
                    read("b_proj.weight", (self.vh, d)),
                    read("a_proj.weight", (self.vh, d)),
                ]
            )
        else:
            raise LlmarchError(f"layer {self.index}: no Gated DeltaNet input projection tensors found", where)
        norm_name, out_name = LAYOUTS[self.projection]
        put = lambda t: nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)  # noqa: E731
        self.in_proj.weight = put(w)
        conv = read("conv1d.weight", (self.conv_dim, 1, self.kernel), required=self.projection != "separate")
        self.conv = put(conv if conv is not None else self._split_conv(read, where))
        self.A_log = put(read("A_log", (self.vh,)))
        self.dt_bias = put(read("dt_bias", (self.vh,)))
        self.norm.weight = put(read(f"{norm_name}.weight", (self.dv,)))
        self.out.weight = put(read(f"{out_name}.weight", (d, self.value_dim)))

"""Kimi Delta Attention (Kimi Linear): the gated delta rule with one decay per key channel.

Per layer, H heads of width d (keys and values alike): q, k, v = their projections of x, each
through a causal depthwise conv (kernel K, its own weights per channel) and the activation; q and
k L2-normalised per head (q also scaled by 1/sqrt(d)); then per head the d x d state S of
delta_rule.py, whose rows decay each by their own gate:

    g = -exp(A_log[h]) * softplus(f_b(f_a(x)) + dt_bias)     (per channel: [.., H, d])
    beta = sigmoid(b(x))                                     (per head)

o passes an RMS norm (float32) times sigmoid(g_b(g_a(x))), then o_proj. f_a/f_b and g_a/g_b are
low-rank (hidden -> d -> H d). The state (conv window over [q | k | v], S in float32) lives in
the cache (kv_cache.LinearState), updated in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmarch.arch.spec import ArchSpec, LayerSpec
from llmarch.errors import LlmarchError
from llmarch.runtime.ops.delta_rule import gated_delta, l2norm, short_conv
from llmarch.runtime.ops.linear_common import linear_sizes, tensor_reader
from llmarch.runtime.ops.mlp import activation
from llmarch.runtime.ops.norms import RMSNorm


class KimiDeltaAttention(nn.Module):
    def __init__(self, spec: ArchSpec, layer: LayerSpec, rope=None):
        super().__init__()
        lin = linear_sizes(spec, layer, "kda", "Kimi Delta Attention")
        if lin.key_heads != lin.value_heads or lin.key_head_dim != lin.value_head_dim:
            raise LlmarchError(
                f"layer {layer.index}: Kimi Delta Attention needs as many key as value heads, of one width"
            )
        d = spec.hidden_size
        self.index = layer.index
        self.H, self.d = lin.value_heads, lin.value_head_dim
        self.width = self.H * self.d
        self.kernel = lin.conv_kernel
        # one matmul for every projection of x: rows [q k v | b | f_a | g_a]
        self.sizes = [3 * self.width, self.H, self.d, self.d]
        self.in_proj = nn.Linear(d, sum(self.sizes), bias=False)
        self.f_b = nn.Linear(self.d, self.width, bias=False)
        self.g_b = nn.Linear(self.d, self.width, bias=False)
        self.conv = nn.Parameter(torch.empty(3 * self.width, 1, self.kernel))
        self.A_log = nn.Parameter(torch.empty(self.H))
        self.dt_bias = nn.Parameter(torch.empty(self.width))
        self.norm = RMSNorm(self.d, spec.norm.eps if spec.norm.eps is not None else 1e-6)
        self.out = nn.Linear(self.width, d, bias=False)
        self.act = activation(spec.activation or "silu")

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        B, T, _ = x.shape
        heads = (B, T, self.H, self.d)
        st = cache.linear[self.index]
        qkv, b, fa, ga = self.in_proj(x).split(self.sizes, dim=-1)
        q, k, v = (t.reshape(heads).float() for t in short_conv(st.conv, qkv, self.conv, self.act).chunk(3, dim=-1))
        q, k = l2norm(q) * self.d**-0.5, l2norm(k)
        beta = b.float().sigmoid()
        gate_in = self.f_b(fa).float().view(heads) + self.dt_bias.float().view(self.H, self.d)
        g = -self.A_log.float().exp()[:, None] * F.softplus(gate_in)
        o = gated_delta(q, k, v, g, beta, st.recurrent)
        # the norm and its gate in float32 on the output as the activation dtype rounds it
        o = self.norm(o.to(x.dtype).float()) * torch.sigmoid(self.g_b(ga).view(heads).float())
        return self.out(o.to(x.dtype).reshape(B, T, self.width))

    def load_from(self, source, prefix: str, dtype, device) -> None:
        """This layer's self_attn.* tensors (Hub names), the projections of x fused in one matrix."""
        base = f"{getattr(source, 'prefix', '')}layers.{self.index}.self_attn."
        read = tensor_reader(source, base, "Kimi Delta Attention", self.index)

        hidden, w, d, H = self.out.weight.shape[0], self.width, self.d, self.H
        fused = torch.cat(
            [
                read("q_proj.weight", (w, hidden)),
                read("k_proj.weight", (w, hidden)),
                read("v_proj.weight", (w, hidden)),
                read("b_proj.weight", (H, hidden)),
                read("f_a_proj.weight", (d, hidden)),
                read("g_a_proj.weight", (d, hidden)),
            ]
        )
        conv = torch.cat([read(f"{p}_conv1d.weight", (w, 1, self.kernel)) for p in "qkv"])
        put = lambda t: nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)  # noqa: E731
        self.in_proj.weight = put(fused)
        self.f_b.weight = put(read("f_b_proj.weight", (w, d)))
        self.g_b.weight = put(read("g_b_proj.weight", (w, d)))
        self.conv = put(conv)
        # A_log is stored [1, 1, H, 1] (broadcast over [B, T, H, d]); dt_bias one per channel
        self.A_log = put(read("A_log", (1, 1, H, 1), (H,)).reshape(H))
        # dt_bias stays float32 whatever the model's dtype, as transformers keeps it
        self.dt_bias = nn.Parameter(read("dt_bias", (w,)).to(device), requires_grad=False)
        self.norm.weight = put(read("o_norm.weight", (d,)))
        self.out.weight = put(read("o_proj.weight", (hidden, w)))

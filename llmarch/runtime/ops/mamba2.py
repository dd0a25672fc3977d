"""Mamba-2 (Nemotron-H / Nemotron 3): a selective state-space mixer with a fixed-size state.

Per layer: x -> in_proj -> [z | x B C | dt]; x, B and C pass a causal depthwise conv (kernel K, with
bias) and the config's mamba_hidden_act (silu by default); each head h (head_dim P) reads B and C
from its group (consecutive heads share a group, N = state size) and keeps an N x P state S that,
token by token, decays and takes a write:

    dt = softplus(dt + dt_bias)     A = -exp(A_log)
    S <- exp(dt A) S + B (dt x)^T;   y = C^T S + D x

then y * silu(z) passes an RMS norm over each group's slice of the heads (the grouped gated
norm) and out_proj. This is linear attention with q = C, k = B, v = dt x and one decay per head,
so the state takes the same place as a delta-rule layer's (kv_cache.LinearState: conv window of
the last K - 1 inputs of [x B C], and S in float32 laid out [heads, N, P], the transpose of
transformers' [heads, P, N]).

Two forms: `recurrent_step` (one token, decode) and `chunked` (prefill, the SSD chunk form: inside
a chunk every output is one matmul over the chunk; only the chunk-to-chunk state is sequential).
transformers' reference clamps dt from below by time_step_min in its chunked form and not in
its one-token update; each form here does what the reference's does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmarch.arch.spec import ArchSpec, LayerSpec
from llmarch.errors import LlmarchError
from llmarch.runtime.ops.delta_rule import short_conv
from llmarch.runtime.ops.linear_common import linear_sizes, tensor_reader
from llmarch.runtime.ops.mlp import ACTIVATIONS

CHUNK = 64  # tokens per chunk of the prefill form


def recurrent_step(x, dt, A, B, C, state: torch.Tensor) -> torch.Tensor:
    """One token. x [b,H,P], dt [b,H], A [H], B, C [b,H,N] (float32); state [b,H,N,P] float32,
    updated in place. Returns y [b,H,P] (without the D skip)."""
    state.mul_((dt * A).exp()[..., None, None])
    state.add_(B[..., :, None] * (dt[..., None] * x)[..., None, :])
    return torch.einsum("bhn,bhnp->bhp", C, state)


def chunked(x, dt, A, B, C, state: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """T tokens in the SSD chunk form. x [b,H,T,P], dt [b,H,T], A [H], B, C [b,H,T,N] (float32);
    state [b,H,N,P] float32, updated in place. Returns y [b,H,T,P] (without the D skip)."""
    b, H, T, P = x.shape
    a = dt * A[:, None]  # log-decay per token, <= 0
    v = x * dt[..., None]
    pad = (-T) % chunk
    if pad:  # padded tokens write nothing (v = 0, B = 0) and do not decay (a = 0)
        v, B, C = (F.pad(t, (0, 0, 0, pad)) for t in (v, B, C))
        a = F.pad(a, (0, pad))
    n = (T + pad) // chunk
    v, B, C = (t.reshape(b, H, n, chunk, t.shape[-1]) for t in (v, B, C))
    gc = a.reshape(b, H, n, chunk).cumsum(-1)  # log-decay from the chunk's start to each token
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).triu(1)
    # exp(gc_i - gc_j) for j <= i: exponents <= 0, so no overflow however strong the decay
    decay = (gc[..., :, None] - gc[..., None, :]).masked_fill(upper, float("-inf")).exp()
    within = ((C @ B.transpose(-1, -2)) * decay) @ v  # [b,H,n,L,P]
    c_dec = C * gc.exp()[..., None]  # reads the state as it was at the chunk's start
    last = gc[..., -1:]
    local = (B * (last - gc).exp()[..., None]).transpose(-1, -2) @ v  # each chunk's own writes [b,H,n,N,P]
    chunk_decay = last.exp()[..., None]  # [b,H,n,1,1]
    out = torch.empty(b, H, n, chunk, P, dtype=x.dtype, device=x.device)
    S = state
    for i in range(n):
        out[:, :, i] = within[:, :, i] + c_dec[:, :, i] @ S
        S = S * chunk_decay[:, :, i] + local[:, :, i]
    state.copy_(S)
    return out.reshape(b, H, n * chunk, P)[:, :, :T]


class Mamba2(nn.Module):
    def __init__(self, spec: ArchSpec, layer: LayerSpec, rope=None):
        super().__init__()
        # in LinearAttentionSpec terms: value heads = Mamba heads (head_dim P), key heads = groups
        # (B and C per group, key_head_dim = the state size N)
        lin = linear_sizes(spec, layer, "mamba2", "Mamba-2", grouped=("heads", "groups"))
        d = spec.hidden_size
        self.index = layer.index
        self.heads, self.head_dim, self.groups, self.state = (
            lin.value_heads,
            lin.value_head_dim,
            lin.key_heads,
            lin.key_head_dim,
        )
        self.inner = self.heads * self.head_dim
        self.conv_dim = lin.conv_channels
        self.kernel = lin.conv_kernel
        self.dt_min = lin.dt_min
        act = ACTIVATIONS.get(lin.conv_activation or "")
        if act is None:
            raise LlmarchError(
                f"Mamba-2 conv activation {lin.conv_activation!r} (mamba_hidden_act) is not supported by "
                f"llmarch run (one of {', '.join(sorted(ACTIVATIONS))})",
                spec.source,
            )
        self.act = act
        self.eps = spec.norm.eps if spec.norm.eps is not None else 1e-5
        self.sizes = [self.inner, self.conv_dim, self.heads]
        self.in_proj = nn.Linear(d, sum(self.sizes), bias=False)
        self.conv = nn.Parameter(torch.empty(self.conv_dim, 1, self.kernel))
        self.conv_bias: nn.Parameter | None = None
        self.A_log = nn.Parameter(torch.empty(self.heads))
        self.dt_bias = nn.Parameter(torch.empty(self.heads))
        self.D = nn.Parameter(torch.empty(self.heads))
        self.norm_weight = nn.Parameter(torch.empty(self.inner))
        self.out = nn.Linear(self.inner, d, bias=False)

    def _conv_act(self, y: torch.Tensor) -> torch.Tensor:
        # y [b, C, T]: the conv's bias, then mamba_hidden_act
        if self.conv_bias is not None:
            y = y + self.conv_bias[:, None].to(y.dtype)
        return self.act(y)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        b, T, _ = x.shape
        st = cache.linear[self.index]
        z, xbc, dt = self.in_proj(x).split(self.sizes, dim=-1)
        xbc = short_conv(st.conv, xbc, self.conv, self._conv_act)
        xs, Bm, Cm = xbc.float().split([self.inner, self.groups * self.state, self.groups * self.state], dim=-1)
        rep = self.heads // self.groups
        xs = xs.reshape(b, T, self.heads, self.head_dim).transpose(1, 2)
        Bm, Cm = (
            t.reshape(b, T, self.groups, self.state).repeat_interleave(rep, dim=2).transpose(1, 2) for t in (Bm, Cm)
        )
        dt = F.softplus(dt.float() + self.dt_bias.float()).transpose(1, 2)  # [b, H, T]
        A = -self.A_log.float().exp()
        if T == 1:
            y = recurrent_step(xs[:, :, 0], dt[:, :, 0], A, Bm[:, :, 0], Cm[:, :, 0], st.recurrent)[:, :, None]
        else:
            y = chunked(xs, dt.clamp(min=self.dt_min), A, Bm, Cm, st.recurrent)
        y = y + self.D.float()[:, None, None] * xs
        return self.out(self.gated_norm(y.transpose(1, 2).reshape(b, T, self.inner), z).to(x.dtype))

    def gated_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """RMS norm of y * silu(z) over each group's slice of the heads, then the weight."""
        h = y.float() * F.silu(z.float())
        g = h.unflatten(-1, (self.groups, -1))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.norm_weight.float() * g.flatten(-2)

    def load_from(self, source, prefix: str, dtype, device) -> None:
        """This layer's Mamba-2 tensors (mixer.* beside the layer's one norm), checked against the
        config's sizes."""
        base = f"{getattr(source, 'prefix', '')}layers.{self.index}.mixer."
        read = tensor_reader(source, base, "Mamba-2", self.index)

        d = self.out.weight.shape[0]
        put = lambda t: nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)  # noqa: E731
        self.in_proj.weight = put(read("in_proj.weight", (sum(self.sizes), d)))
        in_bias = read("in_proj.bias", (sum(self.sizes),), required=False)
        if in_bias is not None:
            self.in_proj.bias = put(in_bias)
        self.conv = put(read("conv1d.weight", (self.conv_dim, 1, self.kernel)))
        conv_bias = read("conv1d.bias", (self.conv_dim,), required=False)
        self.conv_bias = put(conv_bias) if conv_bias is not None else None
        self.A_log = put(read("A_log", (self.heads,)))
        self.dt_bias = put(read("dt_bias", (self.heads,)))
        self.D = put(read("D", (self.heads,)))
        self.norm_weight = put(read("norm.weight", (self.inner,)))
        self.out.weight = put(read("out_proj.weight", (d, self.inner)))
        out_bias = read("out_proj.bias", (d,), required=False)
        if out_bias is not None:
            self.out.bias = put(out_bias)

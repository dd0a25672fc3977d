"""Gated DeltaNet (Qwen3-Next, Qwen3.5): a linear-attention mixer with a fixed-size state.

Per layer: x -> in_proj -> [q k v | z | b | a]; q, k, v pass a causal depthwise conv (kernel K)
and the activation; q and k are L2-normalised per head (q also scaled by 1/sqrt(dk)); each value
head h keeps a dk x dv matrix S that, token by token, decays by exp(g) and takes a delta-rule write:

    g = -exp(A_log) * softplus(a + dt_bias)       beta = sigmoid(b)
    S <- exp(g) S;   S <- S + k (beta (v - k^T S))^T;   o = q^T S

then o passes an RMS norm gated by silu(z) and out_proj. Several value heads may share one q/k head
(consecutive value heads per key head, as transformers repeats them).

Two forms of the same recurrence: `recurrent_step` (one token, decode) and `chunked` (prefill), the
chunk/WY form: inside a chunk of C tokens the delta-rule writes are condensed by one triangular
solve into matmuls over the whole chunk; only the chunk-to-chunk state update is sequential.
The state (conv window: the last K - 1 conv inputs; S in float32) lives in the cache
(kv_cache.LinearState) and is updated in place, so a captured decode step stays valid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmarch.arch.spec import ArchSpec, LayerSpec
from llmarch.errors import LlmarchError
from llmarch.runtime.ops.mlp import activation
from llmarch.runtime.ops.norms import RMSNorm

CHUNK = 64  # tokens per chunk of the prefill form (the reference kernels' size)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def recurrent_step(q, k, v, g, beta, state: torch.Tensor) -> torch.Tensor:
    """One token. q, k [B,H,Dk], v [B,H,Dv], g, beta [B,H] (float32); state [B,H,Dk,Dv] float32,
    updated in place. Returns o [B,H,Dv]."""
    state.mul_(g.exp()[..., None, None])
    kv_mem = torch.einsum("bhk,bhkv->bhv", k, state)
    delta = (v - kv_mem) * beta[..., None]
    state.add_(k[..., :, None] * delta[..., None, :])
    return torch.einsum("bhk,bhkv->bhv", q, state)


def chunked(q, k, v, g, beta, state: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """T tokens in the chunk/WY form. q, k [B,H,T,Dk], v [B,H,T,Dv], g, beta [B,H,T] (float32);
    state [B,H,Dk,Dv] float32, updated in place. Returns o [B,H,T,Dv]."""
    B, H, T, Dk = k.shape
    Dv = v.shape[-1]
    pad = (-T) % chunk
    if pad:  # padded tokens write nothing (beta = 0, k = 0) and do not decay (g = 0)
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (T + pad) // chunk
    q, k, v = (x.reshape(B, H, n, chunk, x.shape[-1]) for x in (q, k, v))
    g, beta = g.reshape(B, H, n, chunk), beta.reshape(B, H, n, chunk)
    gc = g.cumsum(-1)  # log-decay from the chunk's start to each token
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    decay = (gc[..., :, None] - gc[..., None, :]).masked_fill(upper, float("-inf")).exp()  # [.., i, j], j <= i
    kb = k * beta[..., None]
    # the WY form: (I + strictly_lower(diag(beta) K K^T * decay)) [u | w] = [beta v | beta k exp(gc)]
    system = (kb @ k.transpose(-1, -2)) * decay
    rhs = torch.cat([v * beta[..., None], kb * gc.exp()[..., None]], dim=-1)
    uw = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u, w = uw.split([Dv, Dk], dim=-1)
    attn = (q @ k.transpose(-1, -2)) * decay  # within-chunk q.k with decay, causal
    q_dec = q * gc.exp()[..., None]
    last = gc[..., -1:]  # [B,H,n,1]
    k_dec = k * (last - gc).exp()[..., None]
    chunk_decay = last.exp()[..., None]  # [B,H,n,1,1]
    out = torch.empty(B, H, n, chunk, Dv, dtype=q.dtype, device=q.device)
    S = state
    for i in range(n):
        v_new = u[:, :, i] - w[:, :, i] @ S  # what the old state does not already predict
        out[:, :, i] = q_dec[:, :, i] @ S + attn[:, :, i] @ v_new
        S = S * chunk_decay[:, :, i] + k_dec[:, :, i].transpose(-1, -2) @ v_new
    state.copy_(S)
    return out.reshape(B, H, n * chunk, Dv)[:, :, :T]


class GatedDeltaNet(nn.Module):
    def __init__(self, spec: ArchSpec, layer: LayerSpec, rope=None):
        super().__init__()
        lin = spec.linear
        if lin is None or lin.kind != "gated_deltanet":
            raise LlmarchError(f"layer {layer.index}: linear layer without Gated DeltaNet sizes in the spec")
        if lin.value_heads % lin.key_heads:
            raise LlmarchError(
                f"layer {layer.index}: {lin.value_heads} value heads do not divide among {lin.key_heads} key heads"
            )
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
        self.norm = RMSNorm(self.dv, spec.norm.eps if spec.norm.eps is not None else 1e-6)  # plain weight
        self.out = nn.Linear(self.value_dim, d, bias=False)
        self.act = activation(spec.activation or "silu")

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        B, T, _ = x.shape
        st = cache.linear[self.index]
        qkv, z, b, a = self.in_proj(x).split(self.sizes, dim=-1)
        # causal depthwise conv over [cached K-1 inputs | this step's], the window kept for the next
        xc = torch.cat([st.conv.to(x.dtype), qkv.transpose(1, 2)], dim=-1)
        if self.kernel > 1:
            st.conv.copy_(xc[..., -(self.kernel - 1) :])
        y = self.act(F.conv1d(xc, self.conv, groups=self.conv_dim)).transpose(1, 2)
        q, k, v = y.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(B, T, self.kh, self.dk).float()
        k = k.reshape(B, T, self.kh, self.dk).float()
        v = v.reshape(B, T, self.vh, self.dv).float()
        q, k = l2norm(q) * self.dk**-0.5, l2norm(k)
        if self.vh != self.kh:
            rep = self.vh // self.kh
            q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
        beta = b.float().sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        if T == 1:
            o = recurrent_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], st.recurrent)[:, None]
        else:
            tr = lambda t: t.transpose(1, 2)  # noqa: E731  [B,T,H,...] -> [B,H,T,...]
            o = tr(chunked(tr(q), tr(k), tr(v), tr(g), tr(beta), st.recurrent))
        o = self.norm(o.to(x.dtype)) * F.silu(z.view(B, T, self.vh, self.dv).float())
        return self.out(o.to(x.dtype).reshape(B, T, self.value_dim))

    def load_from(self, source, prefix: str, dtype, device) -> None:
        """This layer's linear_attn.* tensors, the input projections reordered to [q k v | z | b | a]."""
        where = str(source.ckpt.path)
        base = f"{getattr(source, 'prefix', '')}layers.{self.index}.linear_attn."

        def read(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            info = source.ckpt.tensors.get(base + name)
            if info is None:
                raise LlmarchError(f"weight missing: {base}{name} (Gated DeltaNet layer {self.index})", where)
            t = source.read(info)
            if tuple(t.shape) != shape:
                raise LlmarchError(
                    f"weight {info.name} has shape {tuple(t.shape)}, the config's linear-attention sizes need {shape}",
                    where,
                )
            return t.to(torch.float32)

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
        else:
            raise LlmarchError(f"layer {self.index}: no Gated DeltaNet input projection tensors found", where)
        put = lambda t: nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)  # noqa: E731
        self.in_proj.weight = put(w)
        self.conv = put(read("conv1d.weight", (self.conv_dim, 1, self.kernel)))
        self.A_log = put(read("A_log", (self.vh,)))
        self.dt_bias = put(read("dt_bias", (self.vh,)))
        self.norm.weight = put(read("norm.weight", (self.dv,)))
        self.out.weight = put(read("out_proj.weight", (d, self.value_dim)))

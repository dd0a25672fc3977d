"""Manifold-constrained hyper-connections (DeepSeek V4; semantics from transformers 5.24's
DeepseekV4HyperConnection / DeepseekV4HyperHead).

The residual is `streams` parallel copies of the hidden state, [B, T, N, d]. Around each
sub-block (attention, FFN) a one-layer perceptron over the RMS-normed, flattened streams gives
three weights per token: `pre` collapses the streams into the sub-block's input, `post` spreads its
output back over the streams, and `comb` (made doubly stochastic by Sinkhorn-Knopp iterations)
mixes the incoming streams into the outgoing ones:
    out = post * block(sum_n pre_n x_n) + comb^T @ x
After the last layer a head collapses the streams by its own `pre` weights. All in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmarch.errors import LlmarchError


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


class HyperConnection(nn.Module):
    def __init__(self, d: int, streams: int, iters: int, hc_eps: float, norm_eps: float):
        super().__init__()
        n = streams
        self.n, self.iters, self.hc_eps, self.norm_eps = n, iters, hc_eps, norm_eps
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * d))
        self.base = nn.Parameter(torch.empty((2 + n) * n))
        self.scale = nn.Parameter(torch.empty(3))

    def weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, N, d] -> (pre [B,T,N], post [B,T,N], comb [B,T,N,N]), float32."""
        n, eps = self.n, self.hc_eps
        mix = F.linear(_rms(x.flatten(-2).float(), self.norm_eps), self.fn.float())
        pre_w, post_w, comb_w = mix.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
        s_pre, s_post, s_comb = self.scale.float().unbind(0)
        pre = torch.sigmoid(pre_w * s_pre + pre_b) + eps
        post = 2 * torch.sigmoid(post_w * s_post + post_b)
        comb = torch.softmax(comb_w.unflatten(-1, (n, n)) * s_comb + comb_b.view(n, n), dim=-1) + eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        for _ in range(self.iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        return pre, post, comb

    def around(self, x: torch.Tensor, block) -> torch.Tensor:
        """The streams after `block` (a function of the collapsed [B, T, d] input) with this mixing."""
        pre, post, comb = self.weights(x)
        h = block((pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype))
        dt = x.dtype
        return post.to(dt).unsqueeze(-1) * h.unsqueeze(-2) + torch.matmul(comb.to(dt).transpose(-1, -2), x)


class HyperHead(nn.Module):
    """Collapses the streams after the last layer."""

    def __init__(self, d: int, streams: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        self.hc_fn = nn.Parameter(torch.empty(streams, streams * d))
        self.hc_base = nn.Parameter(torch.empty(streams))
        self.hc_scale = nn.Parameter(torch.empty(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mix = F.linear(_rms(x.flatten(2).float(), self.norm_eps), self.hc_fn.float())
        pre = torch.sigmoid(mix * self.hc_scale.float() + self.hc_base.float()) + self.hc_eps
        return (pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype)


def load_params(module: nn.Module, source, names: dict[str, str], dtype, device) -> None:
    """Assign module's parameters from the checkpoint tensors `names` (parameter -> tensor name)."""
    where = str(source.ckpt.path)
    for pname, tname in names.items():
        p = module._parameters[pname]
        info = source.ckpt.tensors.get(tname)
        if info is None:
            raise LlmarchError(f"weight missing: {tname} (hyper-connections)", where)
        t = source.read(info)
        if tuple(t.shape) != tuple(p.shape):
            raise LlmarchError(f"weight {tname} has shape {tuple(t.shape)}, the spec needs {tuple(p.shape)}", where)
        module._parameters[pname] = nn.Parameter(t.to(device=device, dtype=torch.float32), requires_grad=False)

"""AltUp (alternating updates, Gemma 3n): the hidden state is n parallel streams [n, B, T, d].

The model makes streams 1.. from the embedding by learned projections rescaled to its RMS, and at
the end maps them back and averages (AltUpStreams). Each layer (AltUp) predicts every stream as
itself plus a per-token mix of all streams, with coefficients from a router over the active stream;
the layer body runs on the active stream's prediction only; then each stream is corrected by the
innovation (body output - active prediction) times its own per-token coefficient (+1).
"""

from __future__ import annotations

import torch
from torch import nn

from llmarch.arch.spec import ArchSpec
from llmarch.runtime.ops.norms import make_norm


def _rescaled(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """h scaled to the per-token RMS `target` (its own RMS floored at sqrt(1e-5))."""
    mag = torch.sqrt(torch.mean(h**2, dim=-1, keepdim=True).clamp(min=1e-5))
    return h * target / mag


class AltUpStreams(nn.Module):
    """Embedding -> n streams (expand), n streams -> one hidden state (collapse)."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        d, n = spec.hidden_size, spec.altup.streams if spec.altup else 1
        self.up = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(n - 1))
        self.down = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(n - 1))

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        target = torch.mean(x**2, dim=-1, keepdim=True) ** 0.5
        return torch.stack([x] + [_rescaled(p(x), target) for p in self.up], dim=0)

    def collapse(self, s: torch.Tensor) -> torch.Tensor:
        target = torch.mean(s[0] ** 2, dim=-1, keepdim=True) ** 0.5
        outs = [s[0]] + [_rescaled(p(s[i + 1]), target) for i, p in enumerate(self.down)]
        return torch.stack(outs).mean(dim=0)


class AltUp(nn.Module):
    """One layer's predict / correct over the streams."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        a = spec.altup
        assert a is not None
        d, n = spec.hidden_size, a.streams
        self.n, self.active, self.correct_scale = n, a.active, a.correct_scale
        self.router_norm = make_norm("rms", d, spec.norm.eps, spec.norm.unit_offset)
        self.router = nn.Linear(d, n, bias=False)
        self.predict_coefs = nn.Linear(n, n * n, bias=False)
        self.correct_coefs = nn.Linear(n, n, bias=False)
        self.correct_output_scale = nn.Parameter(torch.zeros(d))
        self.router_scale = 1.0 / d

    def modalities(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.router(self.router_norm(x) * self.router_scale).float()).type_as(x)

    def predict(self, s: torch.Tensor) -> torch.Tensor:
        m = self.modalities(s[self.active])  # [B, T, n]
        coefs = self.predict_coefs(m).reshape(*m.shape[:-1], self.n, self.n).permute(0, 1, 3, 2)
        pred = torch.matmul(s.permute(1, 2, 3, 0), coefs).permute(3, 0, 1, 2)
        return (pred + s).type_as(s)

    def correct(self, pred: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
        m = self.modalities(activated)
        innovation = activated - pred[self.active]
        coefs = (self.correct_coefs(m) + 1.0).permute(2, 0, 1).unsqueeze(-1)  # [n, B, T, 1]
        return (innovation.unsqueeze(0) * coefs + pred).type_as(activated)

    def active_output(self, s: torch.Tensor) -> torch.Tensor:
        """The corrected active stream, scaled by its learned vector where the model says so."""
        x = s[self.active]
        if not self.correct_scale:
            return x
        return (x.type_as(self.correct_output_scale) * self.correct_output_scale).type_as(x)

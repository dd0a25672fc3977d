"""Per-layer inputs (PLE, Gemma 3n / Gemma 4): each layer gets a small extra input per token.

The model computes, once per step, a [B, T, layers, width] tensor: the token's row of a large
[vocab, layers * width] table (its identity, scaled by sqrt(width)) plus a projection of the main
embedding (RMS-normed per layer), summed and scaled by 1/sqrt(2). Each layer then gates its slice
into the residual stream: post_norm(projection(act(gate(h)) * per_layer_input)).

The table is the only large part, and the only one read per token by row, so where it lives is
left to a row store with one method, `gather(ids) -> rows`; `ResidentRows` below is the plain
in-memory one. Another store (on the CPU, or read from disk per step) replaces it through
`PerLayerInputs.set_rows(store)` before the weights are loaded.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llmarch.arch.spec import ArchSpec
from llmarch.runtime.ops.mlp import activation
from llmarch.runtime.ops.norms import make_norm


class ResidentRows(nn.Module):
    """The per-layer table held whole where the model runs (its weight loads like any other)."""

    def __init__(self, vocab: int, row_width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, row_width))

    def gather(self, ids: torch.LongTensor) -> torch.Tensor:
        return self.weight[ids]


class PerLayerInputs(nn.Module):
    def __init__(self, spec: ArchSpec):
        super().__init__()
        ple = spec.per_layer_embeddings or {}
        d, self.layers, self.width = spec.hidden_size, spec.layers, int(ple["dim"])
        self.vocab = int(ple.get("vocab") or spec.vocab_size)
        self.rows: nn.Module | object = ResidentRows(self.vocab, self.layers * self.width)
        self.model_projection = nn.Linear(d, self.layers * self.width, bias=False)
        self.projection_norm = make_norm("rms", self.width, spec.norm.eps, spec.norm.unit_offset)
        # the constants of the technique, as both reference implementations define them
        self.table_scale = math.sqrt(self.width)
        self.projection_scale = d**-0.5
        self.combine_scale = 2.0**-0.5

    def set_rows(self, store) -> None:
        """Use `store` for the table: any object with gather(ids) -> [*ids.shape, layers * width]
        rows AS STORED in the checkpoint (not yet scaled by sqrt(width): forward scales them), in
        the compute dtype on the compute device. Ids passed to it are always inside the table."""
        if "rows" in self._modules:
            del self._modules["rows"]
        self.rows = store

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """ids [B, T], x [B, T, d] the scaled main embedding -> [B, T, layers, width]."""
        return self.combine(ids, self.project(x))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The main embedding's part, [B, T, layers, width]: needs no row of the table, so a step
        can compute it (and more) while the rows are still being fetched."""
        shape = (*x.shape[:-1], self.layers, self.width)
        proj = self.model_projection(x) * torch.tensor(self.projection_scale, dtype=x.dtype)
        return self.projection_norm(proj.reshape(shape))

    def combine(self, ids: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        """The table's rows for ids added to project()'s output: the layers' inputs."""
        # ids beyond the table (a larger main vocabulary) read row 0, as Gemma 3n does
        ids = torch.where((ids >= 0) & (ids < self.vocab), ids, torch.zeros_like(ids))
        rows = self.rows.gather(ids).to(proj.dtype)
        rows = rows * torch.tensor(self.table_scale, dtype=proj.dtype)
        return (proj + rows.reshape(proj.shape)) * torch.tensor(self.combine_scale, dtype=proj.dtype)


class PerLayerGate(nn.Module):
    """One layer's use of its per-layer input: post_norm(projection(act(gate(h)) * input))."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        d, w = spec.hidden_size, int((spec.per_layer_embeddings or {})["dim"])
        self.gate = nn.Linear(d, w, bias=False)
        self.projection = nn.Linear(w, d, bias=False)
        self.norm = make_norm("rms", d, spec.norm.eps, spec.norm.unit_offset)
        self.act = activation(spec.activation)

    def forward(self, h: torch.Tensor, per_layer_input: torch.Tensor) -> torch.Tensor:
        return self.norm(self.projection(self.act(self.gate(h)) * per_layer_input))

"""What the linear-attention mixers (Gated DeltaNet, Kimi Delta Attention, Mamba-2) share around
their different cores: finding their sizes in the spec and reading their tensors checked
against those sizes."""

from __future__ import annotations

import torch

from llmarch.arch.spec import ArchSpec, LayerSpec, LinearAttentionSpec
from llmarch.errors import LlmarchError


def linear_sizes(
    spec: ArchSpec, layer: LayerSpec, kind: str, what: str, grouped: tuple[str, str] | None = None
) -> LinearAttentionSpec:
    """The spec's linear-attention sizes, which must be of this mixer's kind. grouped: the mixer's
    names for its value heads and key heads where the former are shared out among the latter, so
    that one must divide the other."""
    lin = spec.linear
    if lin is None or lin.kind != kind:
        raise LlmarchError(f"layer {layer.index}: {what} layer without {what} sizes in the spec")
    if grouped is not None and lin.value_heads % lin.key_heads:
        raise LlmarchError(
            f"layer {layer.index}: {lin.value_heads} {grouped[0]} do not divide among {lin.key_heads} {grouped[1]}"
        )
    return lin


def tensor_reader(source, base: str, what: str, index: int):
    """read(name, *shapes, required=True): the tensor base + name in float32, of one of `shapes`
    (the first is what the config's sizes give; others are stored variants of it). A missing
    tensor (unless not required: None) or another shape is an LlmarchError naming the checkpoint
    and the tensor, not a torch error later."""
    where = str(source.ckpt.path)

    def read(name: str, *shapes: tuple[int, ...], required: bool = True) -> torch.Tensor | None:
        info = source.ckpt.tensors.get(base + name)
        if info is None:
            if not required:
                return None
            raise LlmarchError(f"weight missing: {base}{name} ({what} layer {index})", where)
        t = source.read(info)
        if tuple(t.shape) not in shapes:
            raise LlmarchError(
                f"weight {info.name} has shape {tuple(t.shape)}, the config's linear-attention sizes need {shapes[0]}",
                where,
            )
        return t.to(torch.float32)

    return read

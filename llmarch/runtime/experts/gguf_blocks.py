"""A GGUF's routed experts used as stored: the ggml block types moe_cpu.c reads (Q8_0, Q4_0), their
tensors as views of the file's memory map (nothing copied, nothing read until an expert is used),
and the run report's line saying which path the experts took.

llama.cpp stacks each layer's experts as blk.N.ffn_{gate,up,down}_exps [E, rows, in]: row r of
expert e is row e * rows + r of the tensor, one after another, which is the kernel's own stacking.
Gate and up are two tensors (or one, gate rows then up rows: Gemma 4's ffn_gate_up_exps); the kernel
reads two apart rather than have them joined (a copy).
"""

from __future__ import annotations

import numpy as np
import torch

from llmarch.checkpoint.parts import joined
from llmarch.errors import LlmarchError
from llmarch.runtime.experts.formats import ExpertFormat, G
from llmarch.runtime.quant import BLOCKS, PLAIN

ROLES = ("ffn_gate_exps", "ffn_up_exps", "ffn_gate_up_exps", "ffn_down_exps")


def expert_types(ckpt) -> list[str]:
    """The storage types of a GGUF's routed expert tensors (empty for other checkpoints)."""
    if getattr(ckpt, "format", None) != "gguf":
        return []
    suffixes = tuple(f".{r}.weight" for r in ROLES)
    return sorted({t.dtype for n, t in ckpt.tensors.items() if n.endswith(suffixes)})


def block_format(ckpt, spec) -> ExpertFormat | None:
    """The format that reads this GGUF's experts as stored: every expert tensor of one block type
    the kernel has a layout for, and widths that are whole groups of the kernel's input rounding."""
    types = expert_types(ckpt)
    fmt = ExpertFormat.from_ggml(types[0]) if len(types) == 1 else None
    inter = spec.moe.expert_ffn or spec.intermediate_size
    if fmt is None or spec.hidden_size % G or (inter or 0) % G:
        return None
    return fmt


def note(ckpt, spec, place) -> str | None:
    """One line for the run report on a GGUF's offloaded experts: its blocks used as stored, or
    dequantized (and requantized where --expert-bits asks), and why."""
    types = expert_types(ckpt)
    if not types or place.experts == "gpu":
        return None
    stored = "/".join(types)
    if place.format.ggml_type:
        return f"routed experts: the GGUF's {stored} blocks used as stored (memory-mapped, not copied)"
    if all(t in PLAIN for t in types):
        return f"routed experts: the GGUF's {stored} tensors read into host memory ({place.format.value})"
    done = "dequantized" if not place.format.quantized else f"dequantized, then requantized to {place.format.value}"
    if block_format(ckpt, spec) is not None:
        why = f"{place.format.option} asks for that"
    elif len(types) > 1:
        why = "the CPU expert kernel reads them as stored only when all are of one block type"
    elif types[0] in BLOCKS and ExpertFormat.from_ggml(types[0]) is not None:
        why = f"the expert widths are not multiples of {G}"
    else:
        readable = "/".join(f.ggml_type for f in ExpertFormat if f.ggml_type)
        why = f"the CPU expert kernel reads {readable} blocks, not {stored}"
    return f"routed experts: the GGUF's {stored} blocks {done} ({why})"


def views(infos: tuple, fmt: ExpertFormat, own_map: bool) -> tuple:
    """(gate_up, up, down, mapping): the tensors' blocks as uint8 [E, rows, row bytes] views of the
    file. own_map (--experts disk): a mapping of their own, which the disk cache may drop pages of
    without touching the other weights' (else the map all weights are read through; mapping None).
    Gated experts pass (gate, up, down) or (gate_up, None, down), non-gated (up, None, down)."""
    from llmarch.runtime.weights import _raw

    per, nbytes = BLOCKS[fmt.ggml_type]
    files = {t.file for t in infos if t is not None}
    mm = None
    if own_map and len(files) == 1 and joined(next(iter(files))) is None:
        mm = np.memmap(next(iter(files)), dtype=np.uint8, mode="c")
    out = []
    for t in infos:
        if t is None:
            out.append(None)
            continue
        raw = _raw(t) if mm is None else torch.frombuffer(mm, dtype=torch.uint8, count=t.nbytes, offset=t.offset)
        E, rows, k = t.shape
        out.append(raw.view(E, rows, k // per * nbytes))
    return (*out, mm)


def check(infos: tuple, fmt: ExpertFormat, moe, where: str) -> None:
    """Each tensor is of the format's block type, shaped as the config says, its bytes whole blocks."""
    fused = moe.gated and infos[1] is None  # gate rows then up rows in the first tensor
    want = [(moe.E, (2 if fused else 1) * moe.inter, moe.d), (moe.E, moe.inter, moe.d), (moe.E, moe.d, moe.inter)]
    per, nbytes = BLOCKS[fmt.ggml_type]
    for t, shape in zip(infos, want):
        if t is None:
            continue
        if t.dtype != fmt.ggml_type:
            raise LlmarchError(
                f"tensor {t.name}: stored as {t.dtype}, the other experts as {fmt.ggml_type}; use --expert-bits 16",
                where,
            )
        if tuple(t.shape) != shape:
            raise LlmarchError(f"tensor {t.name} has shape {tuple(t.shape)}, the config needs {shape}", where)
        if t.nbytes != t.numel // per * nbytes:
            raise LlmarchError(
                f"tensor {t.name}: {t.nbytes} bytes, {fmt.ggml_type} blocks of shape {shape} take "
                f"{t.numel // per * nbytes}",
                where,
            )

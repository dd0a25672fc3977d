"""A GGUF's routed experts used as stored: the ggml block types moe_cpu.c reads (Q8_0, Q4_0, MXFP4,
Q4_K, Q5_K, Q6_K), their tensors as views of the file's memory map (nothing copied, nothing read
until an expert is used), and the run report's line saying which path the experts took.

Each tensor keeps its own type: a Q4_K_M file holds Q4_K gate and up experts beside Q6_K down
experts in some layers and Q4_K in others, and the kernel reads each matrix in its own layout.

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
from llmarch.runtime.quant import PLAIN, SUPPORTED

ROLES = ("ffn_gate_exps", "ffn_up_exps", "ffn_gate_up_exps", "ffn_down_exps")
READABLE = "/".join(f.ggml_type for f in ExpertFormat if f.ggml_type)  # the types the kernel reads, for messages


def expert_tensors(ckpt) -> list:
    """A GGUF's routed expert tensor infos (empty for other checkpoints)."""
    if getattr(ckpt, "format", None) != "gguf":
        return []
    suffixes = tuple(f".{r}.weight" for r in ROLES)
    return [t for n, t in ckpt.tensors.items() if n.endswith(suffixes)]


def expert_types(ckpt) -> list[str]:
    """The storage types of a GGUF's routed expert tensors (empty for other checkpoints)."""
    return sorted({t.dtype for t in expert_tensors(ckpt)})


def refuse_unreadable(ckpt, place=None) -> None:
    """One line naming the file, before anything is loaded, where an expert tensor's type is one
    llmarch reads neither as stored (the CPU kernel's) nor dequantized (quant.py's); with the
    placement known, also where the experts will not be read as stored and their type is one only
    the kernel reads (MXFP4: quant.py has no torch decoder for it)."""
    kept = place is not None and place.experts != "gpu" and place.format.ggml_type
    for t in expert_tensors(ckpt):
        if t.dtype in SUPPORTED:
            continue
        if ExpertFormat.from_ggml(t.dtype) is None:
            raise LlmarchError(
                f"tensor {t.name}: routed experts stored as {t.dtype}, which llmarch run reads neither as stored "
                f"({READABLE}) nor dequantized ({', '.join(SUPPORTED)})",
                ckpt.path,
            )
        if place is not None and not kept:
            raise LlmarchError(
                f"tensor {t.name}: routed experts stored as {t.dtype}, which llmarch run reads only as stored, "
                "by the CPU expert kernel: use --experts cpu or disk without --expert-bits",
                ckpt.path,
            )


def block_format(ckpt, spec) -> ExpertFormat | None:
    """The format that reads this GGUF's experts as stored, or None: every expert tensor of a block
    type the kernel has a layout for, and widths that are whole groups of the kernel's input
    rounding. Where the types differ the widest is returned (the placement sizes the experts by it;
    each store reads its tensors' own types)."""
    fmts = [ExpertFormat.from_ggml(t) for t in expert_types(ckpt)]
    inter = spec.moe.expert_ffn or spec.intermediate_size
    if not fmts or None in fmts or spec.hidden_size % G or (inter or 0) % G:
        return None
    return max((f for f in fmts if f is not None), key=lambda f: f.bytes_per_weight(2))


def note(ckpt, spec, place) -> str | None:
    """One line for the run report on a GGUF's offloaded experts: its blocks used as stored, or
    dequantized (and requantized where --expert-bits asks), and why. Raises first where that
    placement cannot read them (refuse_unreadable)."""
    refuse_unreadable(ckpt, place)
    types = expert_types(ckpt)
    if not types or place.experts == "gpu":
        return None
    stored = "/".join(types)
    if place.format.ggml_type:
        return f"routed experts: the GGUF's {stored} blocks used as stored (memory-mapped, not copied)"
    if all(t in PLAIN for t in types):
        return f"routed experts: the GGUF's {stored} tensors read into host memory ({place.format.value})"
    done = "dequantized" if not place.format.quantized else f"dequantized, then requantized to {place.format.value}"
    unread = [t for t in types if ExpertFormat.from_ggml(t) is None]
    if block_format(ckpt, spec) is not None:
        why = f"{place.format.option} asks for that"
    elif not unread:
        why = f"the expert widths are not multiples of {G}"
    else:
        why = f"the CPU expert kernel reads {READABLE} blocks, not {'/'.join(unread)}"
    return f"routed experts: the GGUF's {stored} blocks {done} ({why})"


def formats(infos: tuple) -> tuple:
    """The ExpertFormat of each tensor info (None stays None): the types check() let through."""
    return tuple(None if t is None else ExpertFormat.from_ggml(t.dtype) for t in infos)


def views(infos: tuple, own_map: bool) -> tuple:
    """(gate_up, up, down, mapping): the tensors' blocks as uint8 [E, rows, row bytes] views of the
    file. own_map (--experts disk): a mapping of their own, which the disk cache may drop pages of
    without touching the other weights' (else the map all weights are read through; mapping None).
    Gated experts pass (gate, up, down) or (gate_up, None, down), non-gated (up, None, down)."""
    from llmarch.runtime.weights import _raw

    files = {t.file for t in infos if t is not None}
    mm = None
    if own_map and len(files) == 1 and joined(next(iter(files))) is None:
        mm = np.memmap(next(iter(files)), dtype=np.uint8, mode="c")
    out = []
    for t, fmt in zip(infos, formats(infos)):
        if t is None:
            out.append(None)
            continue
        per, nbytes = fmt.block
        raw = _raw(t) if mm is None else torch.frombuffer(mm, dtype=torch.uint8, count=t.nbytes, offset=t.offset)
        E, rows, k = t.shape
        out.append(raw.view(E, rows, k // per * nbytes))
    return (*out, mm)


def check(infos: tuple, moe, where: str) -> None:
    """Each tensor is of a block type the kernel reads, shaped as the config says, its bytes whole
    blocks of whole rows."""
    fused = moe.gated and infos[1] is None  # gate rows then up rows in the first tensor
    want = [(moe.E, (2 if fused else 1) * moe.inter, moe.d), (moe.E, moe.inter, moe.d), (moe.E, moe.d, moe.inter)]
    for t, shape, fmt in zip(infos, want, formats(infos)):
        if t is None:
            continue
        if fmt is None:
            raise LlmarchError(
                f"tensor {t.name}: stored as {t.dtype}, which the CPU expert kernel does not read ({READABLE}); "
                "use --expert-bits 16",
                where,
            )
        if tuple(t.shape) != shape:
            raise LlmarchError(f"tensor {t.name} has shape {tuple(t.shape)}, the config needs {shape}", where)
        per, nbytes = fmt.block
        if shape[2] % per or t.nbytes != t.numel // per * nbytes:
            raise LlmarchError(
                f"tensor {t.name}: {t.nbytes} bytes, {t.dtype} blocks of {per} along rows of {shape[2]} "
                f"need {shape[0] * shape[1] * (shape[2] // per) * nbytes}",
                where,
            )

"""Format-independent view of a checkpoint: config, metadata and where each tensor's bytes lie."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any, NamedTuple

from llmarch.errors import CheckpointError


def open_regular(path: Path):
    """Open `path` for reading only if it is a regular file (a FIFO, socket or device named
    model.safetensors would block or never end). O_NONBLOCK makes the open itself return at once
    on a FIFO; the mode is checked on the opened descriptor, so nothing can swap the file in
    between."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CheckpointError(f"cannot read: {e.strerror or e}", path) from e
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CheckpointError("not a regular file (a FIFO, socket or device cannot be a checkpoint)", path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of a small regular file (config.json, an index), refused past `limit` bytes."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise CheckpointError(f"{size} bytes, more than the {limit} a file of this kind can need", path)
        data = f.read(size + 1)  # never read(limit): that would allocate `limit` bytes up front
        if len(data) > limit:
            raise CheckpointError(f"more than the {limit} bytes a file of this kind can need", path)
        return data


def check_no_overlap(spans: list[tuple[int, int, str]], path) -> None:
    """spans: (start, end, tensor name) of one file's tensors; two that share bytes mean a corrupt header."""
    spans.sort()
    for (_s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise CheckpointError(f"tensors {n0!r} and {n1!r} overlap", path)


class TensorInfo(NamedTuple):
    """One tensor's place in a file. Immutable; a NamedTuple rather than a frozen dataclass because
    a DeepSeek-V3 checkpoint has ~91k of them and a frozen dataclass costs 2x more to build."""

    name: str
    dtype: str  # safetensors dtype ("BF16", "F32", ...) or GGML type name ("Q4_K", "F16", ...)
    shape: tuple[int, ...]  # logical shape, PyTorch order (outermost first)
    file: Path
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass
class Checkpoint:
    format: str  # "safetensors" | "gguf"
    path: Path  # what the user named (folder or file)
    files: list[Path]
    tensors: dict[str, TensorInfo]
    config: dict[str, Any] | None = None  # config.json (safetensors) or None (GGUF)
    metadata: dict[str, Any] = field(default_factory=dict)  # safetensors __metadata__ / GGUF KV
    # GGUF arrays that were skipped, not read: key -> (element type name, length)
    skipped_arrays: dict[str, tuple[str, int, int]] = field(
        default_factory=dict
    )  # key -> (element type, count, offset)
    extra_files: dict[str, Path] = field(default_factory=dict)  # tokenizer.json etc. beside it

    @property
    def stored_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def dtype_counts(self) -> dict[str, int]:
        """Parameters stored per dtype / quant type."""
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.dtype] = out.get(t.dtype, 0) + t.numel
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

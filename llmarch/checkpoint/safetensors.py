"""safetensors header reader: validates the header against the file, never reads tensor data."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from llmarch.checkpoint.base import TensorInfo, check_no_overlap
from llmarch.errors import CheckpointError

# bytes per element; sub-byte and exotic types are refused rather than guessed
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own cap


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Return (tensors, __metadata__) of one .safetensors file, validated against its size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    "empty file" if not head else "truncated safetensors file (no header length)", path
                )
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(
                    f"truncated or corrupt: header length {n} runs past the end of the file ({size} bytes)", path
                )
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit", path)
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read: {e.strerror or e}", path) from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt safetensors header (not JSON: {e})", path) from e
    if not isinstance(header, dict):
        raise CheckpointError("corrupt safetensors header (not a JSON object)", path)

    # json.loads keeps the last of duplicate keys: a tensor named twice would vanish silently.
    # Each entry has one "data_offsets" key; counting `"data_offsets":` counts keys only (a quote
    # cannot occur unescaped inside a JSON string, and a string value is never followed by ':'),
    # so this is a C-speed duplicate check with no false alarm.
    meta = header.get("__metadata__")
    n_keys = len(header) - ("__metadata__" in header) + (isinstance(meta, dict) and "data_offsets" in meta)
    if raw.count(b'"data_offsets":') + raw.count(b'"data_offsets" :') > n_keys:
        raise CheckpointError("corrupt safetensors header (a tensor name or key appears twice)", path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError("corrupt safetensors header (__metadata__ is not an object)", path)
    data_start = 8 + n
    data_size = size - data_start
    tensors: dict[str, TensorInfo] = {}
    spans = []
    sizes = DTYPE_SIZES
    for name, entry in header.items():
        # fast path for well-formed entries (~91k in a DeepSeek-V3 checkpoint); anything odd goes
        # through _tensor_info, which names the problem
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            item = sizes[dtype]
        except (TypeError, KeyError, ValueError):
            item = None
        ok = item is not None and type(start) is int and type(end) is int and 0 <= start <= end <= data_size
        if ok and type(shape) is list:
            numel = 1
            for d in shape:
                if type(d) is not int or d < 0:
                    ok = False
                    break
                numel *= d
            ok = ok and item is not None and numel * item == end - start
        else:
            ok = False
        if ok:
            tensors[name] = TensorInfo(name, dtype, tuple(shape), path, data_start + start, end - start)
        else:
            tensors[name] = t = _tensor_info(path, name, entry, data_start, data_size)
            start, end = t.offset - data_start, t.offset - data_start + t.nbytes
        spans.append((start, end, name))
    check_no_overlap(spans, path)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _tensor_info(path: Path, name: str, entry, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CheckpointError(f"tensor {name!r}: header entry is not an object", path)
    dtype = entry.get("dtype")
    if dtype not in DTYPE_SIZES:
        raise CheckpointError(f"tensor {name!r}: unknown dtype {dtype!r}", path)
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"tensor {name!r}: bad shape {shape!r}", path)
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise CheckpointError(f"tensor {name!r}: bad data_offsets {offsets!r}", path)
    start, end = offsets
    if 0 <= start <= end and end > data_size:
        raise CheckpointError(
            f"truncated? tensor {name!r}: data_offsets {offsets} run past the end of the file "
            f"(data section is {data_size} bytes)",
            path,
        )
    if not 0 <= start <= end <= data_size:
        raise CheckpointError(
            f"tensor {name!r}: data_offsets {offsets} out of range (data section is {data_size} bytes)", path
        )
    numel = 1
    for d in shape:
        numel *= d
    if numel * DTYPE_SIZES[dtype] != end - start:
        raise CheckpointError(
            f"tensor {name!r}: {dtype}{shape} needs {numel * DTYPE_SIZES[dtype]} bytes, offsets span {end - start}",
            path,
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + start, end - start)

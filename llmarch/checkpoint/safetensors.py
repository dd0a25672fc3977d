"""safetensors header reader: validates the header against the file, never reads tensor data."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

from llmarch.checkpoint.base import TensorInfo, check_no_overlap, open_regular
from llmarch.checkpoint.config_check import parse_json, show
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
    with open_regular(path) as f:
        try:
            size = os.fstat(f.fileno()).st_size
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
    header = _parse_header(raw, path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError("corrupt safetensors header (__metadata__ is not an object of strings)", path)
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
    return tensors, metadata


def _parse_header(raw: bytes, path: Path) -> dict:
    """The header as a dict; a key given twice (a tensor, `__metadata__`, a field) is refused, as
    the safetensors library does. json.loads keeps the last of duplicate keys, so they are
    counted: in JSON without escapes and without whitespace before a colon, every `":` ends a
    key, so its count is the number of keys in the text, and it must equal the number of keys
    parsed. That costs a few ms on DeepSeek-V3's 91k entries; text with escapes, spaced colons or
    objects nested in entries (never written by the safetensors library) takes the slower checked
    parse."""
    plain = b"\\" not in raw and _SPACED_COLON.search(raw) is None
    header = parse_json(raw, path, "corrupt safetensors header (not JSON: {})", check_unique=not plain)
    if not isinstance(header, dict):
        raise CheckpointError("corrupt safetensors header (not a JSON object)", path)
    if plain and raw.count(b'":') != _count_keys(header):
        header = parse_json(raw, path, "corrupt safetensors header ({})")  # names the key given twice
    return header


_SPACED_COLON = re.compile(rb'"[ \t\r\n]+:')


def _count_keys(header: dict) -> int:
    """Keys of the header and of its entries. Keys nested deeper are counted in the text but not
    here, so a header that has any takes the checked parse too: slower, still exact."""
    return len(header) + sum([len(v) for v in header.values() if type(v) is dict])


def _tensor_info(path: Path, name: str, entry, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CheckpointError(f"tensor {name!r}: header entry is not an object", path)
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise CheckpointError(f"tensor {name!r}: unknown dtype {show(dtype)}", path)
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"tensor {name!r}: bad shape {show(shape)}", path)
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise CheckpointError(f"tensor {name!r}: bad data_offsets {show(offsets)}", path)
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

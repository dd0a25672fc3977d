"""Lazy GGUF header reader.

gguf.GGUFReader builds a Python object per vocab entry (>30 s on a 262k vocab); here arrays
larger than a few thousand elements are skipped (their place is remembered so the tokenizer
can read them later), and every length from the file is checked against the file's size
before anything is allocated. Constants come from gguf-py (gguf/constants.py alone: `import gguf`
pulls in numpy and the whole package, which costs more than the parse). No numpy here.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from contextlib import contextmanager
from itertools import repeat
from pathlib import Path
from typing import Any

from llmarch.checkpoint.base import Checkpoint, TensorInfo, check_no_overlap, open_regular
from llmarch.checkpoint.config_check import check_json_tree, check_value, parse_json, show
from llmarch.checkpoint.gguf_constants import GENERIC_KEYS, GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from llmarch.checkpoint.parts import joined
from llmarch.errors import CheckpointError

GGUF_MAGIC = b"GGUF"
MAX_INLINE_ARRAY = 4096  # arrays up to this length are read into metadata; longer ones are skipped
MAX_STRING = 1 << 24  # no metadata string (chat templates included) is legitimately this long
MAX_DIMS = 4

_SCALAR = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_U64 = struct.Struct("<Q")
SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


class _Cursor:
    """Bounds-checked reads from a memory map."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise CheckpointError(
                f"truncated GGUF: {what} needs {n} bytes at offset {self.pos}, file is {self.size}", self.path
            )

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        if n > MAX_STRING:
            raise CheckpointError(f"absurd string length {n} in {what}", self.path)
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int, what: str) -> None:
        """Walk `count` length-prefixed strings without decoding them (262k vocab: ~30 ms).

        The hot loop has no bounds check: a length past the end makes the next unpack_from
        fail (struct.error), and the final position is checked once.
        """
        buf, pos = self.buf, self.pos
        unpack = _U64.unpack_from
        try:
            for _ in repeat(None, count):
                pos += 8 + unpack(buf, pos)[0]
        except (struct.error, OverflowError):
            pos = self.size + 1
        if pos > self.size:
            raise CheckpointError(f"truncated GGUF inside array {what}", self.path)
        self.pos = pos


def _value_type(c: _Cursor, what: str) -> GGUFValueType:
    raw = c.unpack("<I", what)
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise CheckpointError(f"unknown GGUF value type {raw} for {what}", c.path) from None


def _read_value(c: _Cursor, vtype: GGUFValueType, key: str, skipped: dict):
    if vtype == GGUFValueType.STRING:
        return c.string(key)
    if vtype in _SCALAR:
        return c.unpack(_SCALAR[vtype], key)
    # array
    etype = _value_type(c, key)
    count = c.unpack("<Q", key)
    start = c.pos
    if etype == GGUFValueType.ARRAY:
        raise CheckpointError(f"nested arrays are not supported ({key})", c.path)
    if etype == GGUFValueType.STRING:
        if count * 8 > c.size - c.pos:  # each element needs at least 8 bytes: checked before any work
            raise CheckpointError(
                f"absurd array length {count} for {key}: more than the rest of the file can hold "
                "(corrupt or truncated)",
                c.path,
            )
        if count <= MAX_INLINE_ARRAY:
            return [c.string(key) for _ in range(count)]
        c.skip_strings(count, key)
    else:
        item = struct.calcsize(_SCALAR[etype])
        if count * item > c.size - c.pos:
            raise CheckpointError(
                f"absurd array length {count} for {key}: more than the rest of the file can hold "
                "(corrupt or truncated)",
                c.path,
            )
        if count <= MAX_INLINE_ARRAY:
            values = list(struct.unpack_from(f"<{count}{_SCALAR[etype][1:]}", c.buf, c.pos))
            c.pos += count * item
            return values
        c.pos += count * item
    skipped[key] = (etype.name, count, start)
    return None


def read_gguf_part(path: Path) -> tuple[dict[str, Any], dict[str, tuple], dict[str, TensorInfo]]:
    """Parse one GGUF file: (metadata, skipped arrays, tensors)."""
    parted = joined(path)  # a file read in place from its parts (the embedded model)
    if parted is not None:
        return _parse(parted, path)
    with open_regular(path) as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise CheckpointError("empty file, not a GGUF", path) from None
        except OSError as e:
            raise CheckpointError(f"cannot read: {e.strerror or e}", path) from e
        try:
            return _parse(buf, path)
        finally:
            buf.close()


def _parse(buf, path: Path):
    c = _Cursor(buf, path)
    c.need(4, "magic")
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise CheckpointError("not a GGUF file (bad magic)", path)
    c.pos = 4
    version = c.unpack("<I", "version")
    if version not in (2, 3):
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in (2, 3):
            raise CheckpointError(f"big-endian GGUF (version {swapped}) is not supported", path)
        raise CheckpointError(f"unsupported GGUF version {version}", path)
    n_tensors = c.unpack("<Q", "tensor count")
    n_kv = c.unpack("<Q", "metadata count")
    # every KV needs >= 12 bytes and every tensor info >= 24: bound the counts by the file size
    if n_kv * 12 > c.size or n_tensors * 24 > c.size:
        raise CheckpointError(
            f"header declares {n_kv} keys and {n_tensors} tensors, more than the {c.size}-byte "
            "file can hold (truncated or corrupt)",
            path,
        )

    meta: dict[str, Any] = {"GGUF.version": version}
    skipped: dict[str, tuple] = {}
    for _ in range(n_kv):
        key = c.string("metadata key")
        # an empty or repeated key is no GGUF any writer makes; refusing it at once also stops a
        # lying key count from walking a zero-filled region one 13-byte "key" at a time
        if not key:
            raise CheckpointError(f"empty metadata key at offset {c.pos - 8}", path)
        if key in meta or key in skipped:
            raise CheckpointError(f"metadata key {show(key)} appears twice", path)
        vtype = _value_type(c, key)
        value = _read_value(c, vtype, key, skipped)
        if value is not None:
            meta[key] = value

    # each tensor info is checked as it is read, against the bytes left after it (an upper bound
    # of the data section): a lying tensor count then stops at the first implausible info
    # instead of parsing millions of them out of the vocabulary's bytes
    infos = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name = c.string("tensor name")
        n_dims = c.unpack("<I", name)
        if n_dims > MAX_DIMS:
            raise CheckpointError(f"tensor {name!r}: {n_dims} dimensions (max {MAX_DIMS})", path)
        ne = [c.unpack("<Q", name) for _ in range(n_dims)]
        raw_type = c.unpack("<I", name)
        offset = c.unpack("<Q", name)
        try:
            qtype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise CheckpointError(f"tensor {name!r}: unknown GGML type {raw_type}", path) from None
        numel = 1
        for d in ne:
            numel *= d
        if ne and ne[0] % block:
            raise CheckpointError(
                f"tensor {name!r}: row of {ne[0]} is not a multiple of the {qtype.name} block {block}", path
            )
        nbytes = numel // block * type_size
        if offset + nbytes > c.size - c.pos:
            raise CheckpointError(f"tensor {name!r}: data at {offset}+{nbytes} runs past the end of the file", path)
        if name in names:
            raise CheckpointError(f"tensor {name!r} appears twice", path)
        names.add(name)
        infos.append((name, ne, qtype.name, offset, nbytes))

    alignment = meta.get("general.alignment", 32)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"bad general.alignment {show(alignment)}", path)
    data_start = (c.pos + alignment - 1) // alignment * alignment
    data_size = c.size - data_start

    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, ne, qname, offset, nbytes in infos:
        if offset + nbytes > data_size:
            raise CheckpointError(f"tensor {name!r}: data at {offset}+{nbytes} runs past the end of the file", path)
        tensors[name] = TensorInfo(name, qname, tuple(reversed(ne)), path, data_start + offset, nbytes)
        spans.append((offset, offset + nbytes, name))
    check_no_overlap(spans, path)
    return meta, skipped, tensors


def split_parts(path: Path) -> list[Path]:
    """All parts of a split GGUF (name-0000i-of-0000n.gguf), or just [path]."""
    m = SPLIT_RE.match(path.name)
    if not m:
        return [path]
    n = int(m["n"])
    parts = [path.with_name(f"{m['stem']}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    for p in parts:
        if not p.is_file():
            raise CheckpointError(f"split GGUF part {p.name} is missing", path)
    return parts


SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"


def open_gguf(path: Path) -> Checkpoint:
    """One GGUF, or all parts of a split one (llama.cpp's gguf-split: the full metadata is in the
    first part; every part carries split.no / split.count / split.tensors.count)."""
    parts = split_parts(path)
    meta: dict[str, Any] = {}
    skipped: dict[str, tuple] = {}
    tensors: dict[str, TensorInfo] = {}
    for i, part in enumerate(parts):
        m, s, t = read_gguf_part(part)
        _check_split_keys(m, i, parts, part)
        if i == 0:
            meta, skipped = m, s
        dup = tensors.keys() & t.keys()
        if dup:
            raise CheckpointError(f"tensor {sorted(dup)[0]!r} appears in two parts", part)
        tensors.update(t)
    if "general.architecture" not in meta:
        raise CheckpointError("GGUF has no general.architecture key", parts[0])
    check_metadata_types(meta, parts[0])
    expected = meta.get(SPLIT_TENSORS)
    if isinstance(expected, int) and expected != len(tensors):
        raise CheckpointError(
            f"{SPLIT_TENSORS} says {expected} tensors, the {len(parts)} part(s) hold {len(tensors)}", parts[0]
        )
    return Checkpoint(
        format="gguf",
        path=path,
        files=parts,
        tensors=tensors,
        config=None,
        metadata=meta,
        skipped_arrays=skipped,
    )


# per-layer arrays llama.cpp writes for these (hybrid and Gemma 3n GGUFs); gguf_arch reads them
PER_LAYER_KEYS = {"num_attention_heads", "num_key_value_heads", "intermediate_size"}
ROPE_SCALING_JSON = "llmarch.rope_scaling"


def check_metadata_types(meta: dict[str, Any], path: Path) -> None:
    """Each key the fingerprint reads is checked as the config key it stands for (config_check:
    type, finiteness, range; a bool is not a count), and reported under its GGUF name. Integral
    float values of integer keys are stored back as ints."""
    arch = meta["general.architecture"]
    if not isinstance(arch, str) or not arch:
        raise CheckpointError(f"general.architecture must be a non-empty string, got {show(arch)}", path)
    for template, ckey in GENERIC_KEYS.items():
        key = template.format(arch=arch)
        if key in meta:
            meta[key] = check_value(ckey, meta[key], path, key, per_layer=ckey in PER_LAYER_KEYS)
    if ROPE_SCALING_JSON in meta:  # llmarch's converter writes Llama 3 scaling as a JSON object
        text = meta[ROPE_SCALING_JSON]
        if not isinstance(text, str):
            raise CheckpointError(f"{ROPE_SCALING_JSON} must be a JSON string, got {show(text)}", path)
        rope = parse_json(text, path, f"{ROPE_SCALING_JSON} is not valid JSON ({{}})")
        check_json_tree(rope, path, ROPE_SCALING_JSON)
        check_value("rope_scaling", rope, path, ROPE_SCALING_JSON)


def _check_split_keys(meta: dict[str, Any], i: int, parts: list[Path], part: Path) -> None:
    count, no = meta.get(SPLIT_COUNT), meta.get(SPLIT_NO)
    if count is None:
        return
    if not isinstance(count, int) or count < 1:
        raise CheckpointError(f"bad {SPLIT_COUNT} {count!r}", part)
    if len(parts) == 1 and count > 1:
        raise CheckpointError(
            f"part {no + 1 if isinstance(no, int) else '?'} of a split GGUF of {count} parts, but the name does not "
            f"follow NAME-0000i-of-{count:05d}.gguf, so the other parts cannot be found",
            part,
        )
    if count != len(parts):
        raise CheckpointError(f"{SPLIT_COUNT} is {count} but the file names say {len(parts)} parts", part)
    if no is not None and no != i:
        raise CheckpointError(f"{SPLIT_NO} is {no} but the file name says part {i + 1} (split.no {i})", part)


@contextmanager
def _mapped(path: Path):
    """The file's bytes: its registered parts' buffer, else a read-only map."""
    parted = joined(path)
    if parted is not None:
        yield parted
        return
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        yield buf


def read_skipped_array(ckpt: Checkpoint, key: str) -> list:
    """Read an array that the header parse skipped (e.g. the vocab), for the tokenizer."""
    etype_name, count, offset = ckpt.skipped_arrays[key]
    etype = GGUFValueType[etype_name]
    with _mapped(ckpt.files[0]) as buf:
        if etype != GGUFValueType.STRING:
            return list(struct.unpack_from(f"<{count}{_SCALAR[etype][1:]}", buf, offset))
        # the header parse walked these strings within the file; decoding from views of the map, not
        # copies, reads a 262k-token vocabulary about 3x faster (it is on every GGUF run's start-up path)
        length, out, pos = struct.Struct("<Q").unpack_from, [], offset
        with memoryview(buf) as mv:
            for _ in range(count):
                n = length(mv, pos)[0]
                out.append(str(mv[pos + 8 : pos + 8 + n], "utf-8", "replace"))
                pos += 8 + n
        return out


ROPE_FREQS = "rope_freqs.weight"


def read_rope_freqs(ckpt: Checkpoint) -> list[float] | None:
    """llama.cpp's per-frequency RoPE divisors (rope_freqs.weight: one F32 value per rotated pair,
    written by its converter for Llama 3 scaling and for Gemma 4's proportional RoPE), read from
    the file: a few hundred bytes, checked as a header value is (F32, one dimension no longer than
    an inline metadata array, each value finite and > 0). None when the file has none."""
    t = ckpt.tensors.get(ROPE_FREQS)
    if t is None:
        return None
    if t.dtype != "F32" or len(t.shape) != 1 or not 0 < t.shape[0] <= MAX_INLINE_ARRAY:
        raise CheckpointError(
            f"tensor {ROPE_FREQS!r} must be one F32 row of 1 to {MAX_INLINE_ARRAY} values, "
            f"got {t.dtype} {list(t.shape)}",
            t.file,
        )
    with _mapped(t.file) as buf:
        values = struct.unpack_from(f"<{t.shape[0]}f", buf, t.offset)
    bad = next((v for v in values if not (math.isfinite(v) and v > 0)), None)
    if bad is not None:
        raise CheckpointError(
            f"tensor {ROPE_FREQS!r} holds {bad}; RoPE frequency divisors must be finite and > 0", t.file
        )
    return list(values)

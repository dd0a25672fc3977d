"""Streaming GGUF writer: header, metadata and tensor infos first (gguf-py's GGUFWriter), then each
tensor converted and pwrite()n at its final offset by a thread pool.

Memory stays bounded by a few chunks per thread: sources are read with pread (not mmap, whose
touched pages would count in RSS), large tensors go in row blocks, and same-type copies
(bf16 -> bf16 without permutation) never enter user space (copy_file_range). numpy's kernels
and the syscalls release the GIL, so threads use every core. The file is written under a
partial name and renamed only when complete (llmarch/convert/output.py).
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType

from llmarch.convert.output import publishing, pwrite_all, reserve, write_all
from llmarch.convert.plan import Piece, Plan, PlannedTensor, tensor_bytes
from llmarch.errors import LlmarchError
from llmarch.qk_permute import to_gguf_order

CHUNK_ELEMS = 1 << 22  # elements per row block (16 MiB as f32)
NP_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
GROUP_ELEMS = 1 << 16
BLOCK_KERNELS = {
    Q.Q8_0: gguf.quants.Q8_0.quantize_blocks,
    Q.Q4_0: gguf.quants.Q4_0.quantize_blocks,
    Q.Q4_1: gguf.quants.Q4_1.quantize_blocks,
    Q.Q5_0: gguf.quants.Q5_0.quantize_blocks,
    Q.Q5_1: gguf.quants.Q5_1.quantize_blocks,
}
SAME = {("F32", Q.F32), ("F16", Q.F16), ("BF16", Q.BF16)}


_NP_KV = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
    GGUFValueType.BOOL: "?",
}


class _Writer(gguf.GGUFWriter):
    """GGUFWriter packing big arrays (vocab, scores, merges: 150k+ entries) in one go instead of
    one struct.pack per element (>1 s per array in Python). Same bytes."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if (
            vtype != GGUFValueType.ARRAY
            or not isinstance(val, (list, tuple))
            or len(val) < 1024
            or self.endianess != gguf.GGUFEndian.LITTLE
        ):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        ltype = sub_type if sub_type is not None else GGUFValueType.get_type(val[0])
        head = (struct.pack("<I", vtype) if add_vtype else b"") + struct.pack("<IQ", ltype, len(val))
        if ltype == GGUFValueType.STRING:
            enc = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in val]
            lens = np.fromiter((len(e) for e in enc), dtype="<u8", count=len(enc))
            return head + b"".join(l + e for l, e in zip(map(bytes, lens.view("V8")), enc))
        if ltype in _NP_KV:
            return head + np.asarray(val, dtype=_NP_KV[ltype]).tobytes()
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def to_f32(a: np.ndarray, src_dtype: str) -> np.ndarray:
    if src_dtype == "BF16":  # bf16 is the top half of an f32 (one pass: widen and shift together)
        return np.left_shift(a, 16, dtype=np.uint32).view(np.float32)
    return a.astype(np.float32, copy=False)


def encode(a: np.ndarray, src_dtype: str, qtype: Q, shift: float = 0.0) -> np.ndarray:
    """Source array (bf16 as uint16) -> bytes of GGML type qtype."""
    if not shift and (src_dtype, qtype) in SAME:
        return a  # bf16 -> bf16 etc.: bit copy, no float32 detour
    x = to_f32(a, src_dtype)
    if shift:
        x = x + np.float32(shift)
    if qtype == Q.F32:
        return x
    if qtype == Q.F16:
        return x.astype(np.float16)
    kernel = BLOCK_KERNELS.get(qtype)
    if kernel is None:
        return gguf.quants.quantize(x, qtype)
    # gguf.quants' own block kernel on 64k-element groups: quantize() runs it on 16-row groups and
    # concatenates, which costs a third more here; the bytes are the same
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = x.reshape(-1, block)
    out = np.empty((blocks.shape[0], size), dtype=np.uint8)
    step = GROUP_ELEMS // block
    for i in range(0, blocks.shape[0], step):
        out[i : i + step] = kernel(blocks[i : i + step])
    return out


class _Sources:
    """One read-only fd per source file, shared by the threads (pread is position-free)."""

    def __init__(self):
        self.fds: dict[Path, int] = {}
        self.lock = threading.Lock()

    def fd(self, path: Path) -> int:
        with self.lock:
            if path not in self.fds:
                self.fds[path] = os.open(path, os.O_RDONLY)
            return self.fds[path]

    def read(self, piece: Piece, first: int = 0, count: int | None = None) -> np.ndarray:
        """Elements [first, first+count) of the piece's source tensor, as its numpy dtype."""
        src = piece.src
        dt = NP_DTYPES.get(src.dtype)
        if dt is None:
            raise LlmarchError(f"tensor {src.name} has dtype {src.dtype}, not a float type we convert", src.file)
        size = np.dtype(dt).itemsize
        count = src.numel if count is None else count
        buf = np.empty(count, dtype=dt)
        mv, off, done = memoryview(buf).cast("B"), src.offset + first * size, 0
        while done < count * size:
            n = os.preadv(self.fd(src.file), [mv[done:]], off + done)
            if n <= 0:
                raise LlmarchError(f"short read of tensor {src.name}", src.file)
            done += n
        return buf

    def close(self):
        for fd in self.fds.values():
            os.close(fd)


def _tasks(t: PlannedTensor, base: int):
    """(piece, first row, rows, byte offset in the file) units of work for one tensor."""
    for p in t.pieces:
        shape = p.shape
        if p.data is not None or p.view or p.permute_heads or p.transpose or p.neg_exp or len(shape) < 2:
            yield p, 0, None, base + p.offset
            continue
        rows, cols = int(np.prod(shape[:-1])), shape[-1]
        row_bytes = tensor_bytes((cols,), t.type)
        step = max(1, CHUNK_ELEMS // cols)
        for r in range(0, rows, step):
            yield p, r, min(step, rows - r), base + p.offset + r * row_bytes


def _run(task, t: PlannedTensor, src: _Sources, out_fd: int) -> None:
    p, first, rows, at = task
    if p.data is not None:
        data = encode(p.data, "F32", t.type)
    else:
        shape = p.src.shape
        cols = shape[-1] if len(shape) else 1
        if rows is not None and not p.shift and (p.src.dtype, t.type) in SAME:
            size = np.dtype(NP_DTYPES[p.src.dtype]).itemsize
            _copy_range(src.fd(p.src.file), out_fd, rows * cols * size, p.src.offset + first * cols * size, at)
            return
        a = src.read(p, first * cols, None if rows is None else rows * cols)
        a = a.reshape((rows, cols) if rows is not None else shape)
        if p.view:
            a = np.ascontiguousarray(p.view(a))
        if p.transpose:
            a = np.ascontiguousarray(a.T)
        if p.permute_heads:
            a = to_gguf_order(a, p.permute_heads)
        dtype = p.src.dtype
        if p.neg_exp:  # computed in float64 so the float32 result is the correctly rounded -exp
            a, dtype = (-np.exp(to_f32(a, dtype).astype(np.float64))).astype(np.float32), "F32"
        data = encode(a, dtype, t.type, p.shift)
    pwrite_all(out_fd, np.ascontiguousarray(data), at)


def _copy_range(src_fd: int, dst_fd: int, n: int, src_off: int, dst_off: int) -> None:
    done = 0
    while done < n:
        k = os.copy_file_range(src_fd, dst_fd, n - done, src_off + done, dst_off + done)
        if k <= 0:
            raise OSError("copy_file_range copied nothing")
        done += k


def write_gguf(plan: Plan, out: Path, add_metadata, threads: int | None = None) -> None:
    """add_metadata(writer) adds the KV pairs; tensors come from the plan. The file appears under
    `out` only when complete (output.publishing)."""
    threads = threads or os.cpu_count() or 1
    sources = _Sources()
    try:
        with publishing(out, folder=False) as tmp:
            _write(plan, tmp, out, add_metadata, threads, sources)
    finally:
        sources.close()


def _write(plan: Plan, tmp: Path, out: Path, add_metadata, threads: int, sources: _Sources) -> None:
    w = _Writer(tmp, plan.family.arch_name)
    add_metadata(w)
    for t in plan.tensors:
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    f = w.fout[0]
    start = gguf.GGUFWriter.ggml_pad(f.tell(), w.data_alignment)
    f.close()
    offsets, pos = [], start
    for t in plan.tensors:
        offsets.append(pos)
        pos += gguf.GGUFWriter.ggml_pad(t.nbytes, w.data_alignment)
    fd = os.open(tmp, os.O_RDWR)
    try:
        reserve(fd, pos, out)
        work = [(task, t) for t, base in zip(plan.tensors, offsets) for task in _tasks(t, base)]
        write_all([(_run, task, t, sources, fd) for task, t in work], threads)
    finally:
        os.close(fd)

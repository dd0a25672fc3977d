"""--ple gpu|cpu|disk: where the per-layer embedding table (Gemma 3n / Gemma 4) lives, and how each
step gets its rows.

The table is vocab x (layers x per-layer width), more than a third of an E2B/E4B checkpoint, yet a
token reads one row of it (~15 KB in bf16). The model asks a store for rows by token id:

    store.prefetch(ids)  -> None: start the reads now, so they overlap work that does not need them
    store.gather(ids)    -> [*ids.shape, layers * width] in the compute dtype on the compute device

A CUDA graph of the decode step cannot hold a host-side gather (it needs the ids on the host), so
the stores that gather on the host (cpu, disk, with the model on a GPU: `store.stages`) let the
graph read the step's row from a buffer at a fixed device address instead:

    with store.captured(): ...   warm-up and capture: gather returns the rows in that buffer
    store.stage(ids)     -> None: before each replay, the row of the one sampled token into the
                            buffer (host gather into a pinned buffer, then a non-blocking copy on
                            the current stream, the one the replay is queued on)

gpu / cpu: the table is read once into memory on the GPU / in host RAM; rows are gathered there and
copied to the compute device.
disk: the table is never resident. Each step's rows are read from the checkpoint file itself
(safetensors and GGUF both store a token's row contiguously, GGUF as whole quant blocks) by pread
into a small staging buffer (pinned when the model runs on CUDA): straight from the page cache when
the rows are there (RWF_NOWAIT), else from a small thread pool, started by prefetch; a prefill
reads each distinct token once; an optional hot-row cache keeps recently read rows up to a byte
budget. Rows stored in a type llmarch's torch dequantizer does not decode are converted once, by
gguf-py, into a row-major file in the compute dtype under LLMARCH_CACHE/ple (gguf-py's numpy decoders
are for bulk conversion, not for a decode step), and read from there.
No memory map: pages of a mapping that a step touched count in the process's RSS until dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmarch.checkpoint.base import TensorInfo
from llmarch.errors import CheckpointError, LlmarchError
from llmarch.runtime.quant import BLOCKS
from llmarch.runtime.weights import ST_DTYPES

MODES = ("gpu", "cpu", "disk")
LOAD_CHUNK_BYTES = 64 << 20  # the resident load and the row-file conversion go this many bytes at a time
READ_THREADS = 2
GiB = 2**30


@dataclass(frozen=True)
class TableLayout:
    """Where the table's rows lie in one file: row r is `row_bytes` bytes at offset + r * row_bytes."""

    name: str
    path: Path
    offset: int
    rows: int
    width: int  # layers x per-layer width
    stored: str  # safetensors dtype or GGML type name
    row_bytes: int

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    @classmethod
    def of(cls, info: TensorInfo, layers: int, per_layer: int, vocab: int | None = None) -> TableLayout:
        """The table's layout, checked against the config's layers x per-layer width and vocabulary
        and against the file's real size."""
        where = info.file
        if len(info.shape) != 2:
            raise CheckpointError(
                f"per-layer embedding table {info.name!r} has shape {list(info.shape)}; "
                f"expected [vocab, {layers} layers x {per_layer}]",
                where,
            )
        rows, width = info.shape
        if width != layers * per_layer:
            raise CheckpointError(
                f"per-layer embedding table {info.name!r} is {rows} x {width}, but the config's {layers} layers "
                f"x per-layer width {per_layer} need rows of {layers * per_layer}",
                where,
            )
        if vocab is not None and rows != vocab:
            raise CheckpointError(
                f"per-layer embedding table {info.name!r} has {rows} rows, the config's per-layer vocabulary is {vocab}",
                where,
            )
        if rows <= 0 or info.nbytes % rows:
            raise CheckpointError(
                f"per-layer embedding table {info.name!r}: {info.nbytes} bytes do not split into {rows} rows", where
            )
        layout = cls(info.name, Path(where), info.offset, rows, width, info.dtype, info.nbytes // rows)
        layout.check_size()
        return layout

    def check_size(self) -> None:
        try:
            size = os.stat(self.path).st_size
        except OSError as e:
            raise CheckpointError(f"cannot read the per-layer embedding table: {e.strerror or e}", self.path) from e
        if size < self.offset + self.nbytes:
            raise CheckpointError(
                f"file is {size} bytes, shorter than the {self.rows} rows of per-layer embedding table "
                f"{self.name!r} claim (they end at byte {self.offset + self.nbytes})",
                self.path,
            )


# ----------------------------------------------------------------------------- row decoding


def torch_decodes(stored: str) -> bool:
    """Whether rows of this stored type are decoded in torch (on the compute device) step by step."""
    return stored in ST_DTYPES or stored in BLOCKS


def decode_rows(raw: torch.Tensor, stored: str, width: int) -> torch.Tensor:
    """raw: uint8 [n, row_bytes] (any device) -> [n, width] floats (the stored float type, or float32)."""
    n = raw.shape[0]
    if stored in ST_DTYPES:
        return raw.view(ST_DTYPES[stored]).reshape(n, width)
    if stored in BLOCKS:
        from llmarch.runtime.quant import dequantize

        return dequantize(raw.reshape(-1), stored, (n, width))
    import gguf
    from gguf.quants import dequantize as gguf_dequantize

    try:
        qtype = gguf.GGMLQuantizationType[stored]
    except KeyError:
        raise LlmarchError(f"per-layer embedding rows of type {stored} cannot be decoded") from None
    out = gguf_dequantize(raw.cpu().numpy(), qtype)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(n, width)


def read_chunks(layout: TableLayout, rows_per_chunk: int):
    """Yield (first row, uint8 [n, row_bytes]) over the whole table, one buffer reused: bounded
    memory however large the table."""
    step = max(1, rows_per_chunk)
    try:
        fd = os.open(layout.path, os.O_RDONLY)
    except OSError as e:
        raise CheckpointError(f"cannot read the per-layer embedding table: {e.strerror or e}", layout.path) from e
    try:
        buf = np.empty((min(step, layout.rows), layout.row_bytes), dtype=np.uint8)
        for r in range(0, layout.rows, step):
            n = min(step, layout.rows - r)
            _pread_into(fd, buf[:n], layout.offset + r * layout.row_bytes, layout.path)
            yield r, torch.from_numpy(buf[:n])
    finally:
        os.close(fd)


def _pread_into(fd: int, buf: np.ndarray, offset: int, path: Path) -> None:
    """Fill buf (a contiguous uint8 array) from the file at offset; a short read names the file."""
    view, got = buf.data.cast("B"), 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise CheckpointError(
                f"file ends at byte {offset + got}, before the per-layer embedding rows it claims "
                f"(reading {len(view)} bytes at {offset})",
                path,
            )
        got += n


# ----------------------------------------------------------------------------- stores


@dataclass
class Counters:
    tokens: int = 0  # ids asked for (prefill tokens + decode steps)
    rows_read: int = 0  # rows read from the file (disk) or gathered from memory (resident)
    reads: int = 0  # pread calls
    cache_hits: int = 0
    wait_s: float = 0.0  # time gather() spent blocked on reads not yet finished
    read_s: float = 0.0  # time the reading threads spent in pread


class PleStore:
    """The interface the model holds: prefetch(ids), gather(ids), report()."""

    mode: str
    layout: TableLayout
    note: str = ""  # how the mode was chosen (for the run report)
    source: TableLayout | None = None  # the checkpoint's table, when the rows come from a converted row file
    stages: bool = False  # rows gathered on the host for a GPU: a captured decode step needs stage(ids)

    def __init__(self, layout: TableLayout, device: torch.device, dtype: torch.dtype, scale: float | None = None):
        layout.check_size()  # the file may have changed since its header was read
        self.layout, self.device, self.dtype, self.scale = layout, torch.device(device), dtype, scale
        # the scale rounded to the compute dtype first, as transformers' scaled embeddings multiply;
        # made here, not per step, so that a step captured in a CUDA graph allocates nothing
        self._scale = None if scale is None else torch.tensor(scale, dtype=dtype, device=self.device)
        self.stats = Counters()
        self._static: torch.Tensor | None = None  # the captured step's row, at a fixed address
        self._in_capture = False
        self._copied: torch.cuda.Event | None = None  # after the last copy out of the host staging

    def prefetch(self, ids: torch.Tensor) -> None:
        """Start fetching the rows of ids; a resident table has nothing to start."""

    def gather(self, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    # ---------------------------------------------------------------- a captured decode step
    def _static_like(self) -> tuple[tuple[int, ...], torch.dtype]:  # pragma: no cover - interface
        """Shape and dtype of one staged row as stage() copies it to the device."""
        raise NotImplementedError

    def _from_static(self, ids: torch.Tensor) -> torch.Tensor:
        """The staged row, finished (decoded, scaled) as gather would return it for one token."""
        assert self._static is not None
        return self._finish(self._static, ids)

    @contextlib.contextmanager
    def captured(self):
        """While a one-token decode step is warmed up and captured: gather ignores the ids it is
        given (the graph's placeholder) and returns the row stage() puts in the static buffer;
        prefetch starts nothing. Outside it (prefill, eager steps) the store gathers as usual."""
        if self._static is None:
            shape, dtype = self._static_like()
            self._static = torch.zeros(shape, dtype=dtype, device=self.device)
        self._in_capture = True
        try:
            yield
        finally:
            self._in_capture = False

    def stage(self, ids: torch.Tensor | int) -> None:  # pragma: no cover - interface
        """Before a replay: the row of the one token in ids (on the host) into the static buffer."""
        raise NotImplementedError

    def _row_of(self, ids: torch.Tensor | int) -> int:
        """The table row of a one-token step; an id outside the table reads row 0, as the model's
        per-layer inputs map it before they gather."""
        if isinstance(ids, torch.Tensor):
            if ids.numel() != 1:
                raise LlmarchError(f"a captured decode step stages one token's row, got {ids.numel()} ids")
            ids = int(ids.reshape(-1)[0])
        return ids if 0 <= ids < self.layout.rows else 0

    def _to_static(self, host: torch.Tensor) -> None:
        """Copy one staged row to the static buffer, queued on the current stream."""
        assert self._static is not None, "stage() before captured()"
        self._static.copy_(host.view(self._static.shape), non_blocking=True)

    def _mark_copied(self) -> torch.cuda.Event | None:
        """An event after the copies queued so far, so a host buffer is not refilled under them."""
        if self.device.type != "cuda":
            return None
        done = torch.cuda.Event()
        done.record()
        return done

    def _finish(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        rows = rows.to(self.dtype)
        if self._scale is not None:
            rows = rows * self._scale
        return rows.reshape(*ids.shape, self.layout.width)

    def resident_bytes(self) -> int:
        return 0

    def where(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def report(self) -> dict:
        s = self.stats
        return {
            "mode": self.mode,
            "chosen": self.note,
            "table_bytes": self.layout.rows * self.layout.width * _itemsize(self.dtype),
            "stored_bytes": self.layout.nbytes,
            "where": self.where(),
            "resident_bytes": self.resident_bytes(),
            "tokens": s.tokens,
            "rows_read": s.rows_read,
            "rows_read_per_token": round(s.rows_read / s.tokens, 3) if s.tokens else 0.0,
            "reads": s.reads,
            "cache_hits": s.cache_hits,
            "read_wait_s": round(s.wait_s, 6),
            "read_s": round(s.read_s, 6),
        }

    def close(self) -> None:
        pass


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _not_capturing(mode: str) -> None:
    """Host-side rows need the step's ids on the host: a CUDA graph holds the step only when it
    reads them from the static buffer (PleStore.captured / stage)."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise LlmarchError(
            f"--ple {mode} gathers rows on the host, which a CUDA graph cannot capture; capture the step "
            "inside store.captured() and stage(ids) before each replay (as the Generator does)"
        )


def _check_ids(flat: torch.Tensor, rows: int, path: Path) -> None:
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= rows):
        bad = int(flat[(flat < 0) | (flat >= rows)][0])
        raise LlmarchError(f"token id {bad} is outside the per-layer embedding table's {rows} rows", path)


class ResidentTable(PleStore):
    """--ple gpu / cpu: the whole table in memory at `where`, in the compute dtype."""

    def __init__(self, layout, where: torch.device, device, dtype, scale=None):
        super().__init__(layout, device, dtype, scale)
        self.home = torch.device(where)
        self.mode = "gpu" if self.home.type == "cuda" else "cpu"
        self.table = self._load()
        self._pinned = self.home.type == "cpu" and self.device.type == "cuda"
        self.stages = self._pinned
        self._host_row: torch.Tensor | None = None  # stage()'s row, pinned for the copy to the GPU

    def _load(self) -> torch.Tensor:
        lay = self.layout
        table = torch.empty(lay.rows, lay.width, dtype=self.dtype, device=self.home)
        decode_on = self.home if torch_decodes(lay.stored) else torch.device("cpu")
        for r, raw in read_chunks(lay, LOAD_CHUNK_BYTES // lay.row_bytes):
            table[r : r + raw.shape[0]] = decode_rows(raw.to(decode_on), lay.stored, lay.width).to(self.dtype)
        return table

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        if self._in_capture:
            return self._from_static(ids)
        if self._pinned:
            _not_capturing(self.mode)
        flat = ids.reshape(-1).to(self.home)
        if self.home.type == "cpu":  # on a GPU an out-of-range index fails in the kernel; a check would sync
            _check_ids(flat, self.layout.rows, self.layout.path)
        rows = self.table.index_select(0, flat)
        if self._pinned:
            rows = rows.pin_memory()
        self.stats.tokens += flat.numel()
        self.stats.rows_read += flat.numel()
        return self._finish(rows.to(self.device, non_blocking=True), ids)

    def _static_like(self) -> tuple[tuple[int, ...], torch.dtype]:
        return (1, self.layout.width), self.dtype

    def stage(self, ids: torch.Tensor | int) -> None:
        r = self._row_of(ids)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy out of the host row is done
        if self._host_row is None:
            self._host_row = torch.empty(1, self.layout.width, dtype=self.dtype, pin_memory=self._pinned)
        self._host_row.copy_(self.table[r : r + 1])
        self._to_static(self._host_row)
        self._copied = self._mark_copied()
        self.stats.tokens += 1
        self.stats.rows_read += 1

    def resident_bytes(self) -> int:
        return self.table.numel() * self.table.element_size()

    def report(self) -> dict:
        out = super().report()
        # one row per token by construction; the counters miss steps replayed from a CUDA graph
        out["rows_read_per_token"] = 1.0
        return out

    def where(self) -> str:
        return "GPU" if self.home.type == "cuda" else "host RAM"


class _Slot:
    """A staging buffer for one request's rows (pinned when the rows go on to a GPU) and the event
    after which its last copy to the GPU has finished."""

    def __init__(self, row_bytes: int, pinned: bool):
        self.row_bytes, self.pinned = row_bytes, pinned
        self.buf = torch.empty(0, row_bytes, dtype=torch.uint8)
        self.event: torch.cuda.Event | None = None

    def take(self, n: int) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()  # the previous copy out of this buffer is done
            self.event = None
        if self.buf.shape[0] < n:
            cap = max(n, 2 * self.buf.shape[0])
            self.buf = torch.empty(cap, self.row_bytes, dtype=torch.uint8, pin_memory=self.pinned)
        return self.buf[:n]


@dataclass
class _Request:
    key: list[int]  # the flat ids asked for
    unique: torch.Tensor  # distinct ids, ascending
    inverse: torch.Tensor  # flat position -> index into unique
    staged: torch.Tensor  # uint8 [len(unique), row_bytes] in a slot
    slot: _Slot
    futures: list[Future]
    missed: list[tuple[int, int]]  # (id, row in staged) of rows read from the file (for the hot cache)


class DiskTable(PleStore):
    """--ple disk: rows read per step from the file, never the whole table."""

    mode = "disk"

    def __init__(
        self,
        layout: TableLayout,
        device,
        dtype,
        scale=None,
        cache_bytes: int = 0,
        threads: int = READ_THREADS,
        source: TableLayout | None = None,
    ):
        super().__init__(layout, device, dtype, scale)
        self.source = source  # the checkpoint's table when the rows are read from a converted row file
        try:
            self.fd = os.open(layout.path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"cannot read the per-layer embedding table: {e.strerror or e}", layout.path) from e
        if hasattr(os, "posix_fadvise"):  # random rows: read-ahead would fetch neighbours nobody asked for
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="llmarch-ple")
        self.threads = max(1, threads)
        pinned = self.device.type == "cuda" and torch.cuda.is_available()
        self.stages = pinned
        self.slots = [_Slot(layout.row_bytes, pinned), _Slot(layout.row_bytes, pinned)]
        self.next_slot = 0
        self.cache_bytes = max(0, int(cache_bytes))
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.pending: _Request | None = None
        self.lock = threading.Lock()
        self._zero = torch.zeros(1, dtype=torch.long)
        self.nowait = hasattr(os, "RWF_NOWAIT")  # Linux: try each read from the page cache first

    # ---------------------------------------------------------------- reads
    def _read_runs(self, runs: list[tuple[int, int, int]], staged: np.ndarray) -> None:
        """runs: (first id, count, first row in staged) of consecutive ids; one pread per run."""
        lay, t0 = self.layout, time.perf_counter()
        for first, count, at in runs:
            _pread_into(self.fd, staged[at : at + count], lay.offset + first * lay.row_bytes, lay.path)
        dt = time.perf_counter() - t0
        with self.lock:
            self.stats.read_s += dt
            self.stats.reads += len(runs)

    def _read_now(self, run: tuple[int, int, int], host: np.ndarray) -> bool:
        """Read a run on this thread if the page cache holds it all (a memory copy of microseconds,
        cheaper than waking a pool thread); False when the read would wait for the disk."""
        first, count, at = run
        lay, t0 = self.layout, time.perf_counter()
        view = host[at : at + count].data.cast("B")
        try:
            n = os.preadv(self.fd, [view], lay.offset + first * lay.row_bytes, os.RWF_NOWAIT)
        except OSError:
            n = -1  # EAGAIN: not cached; other errors: the pool's read reports them
        dt = time.perf_counter() - t0
        with self.lock:
            self.stats.read_s += dt
            self.stats.reads += n == len(view)
        return n == len(view)

    def _host_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        flat = ids.detach().reshape(-1)
        if flat.device.type != "cpu":
            _not_capturing(self.mode)
            flat = flat.cpu()
        return flat, flat.tolist()

    def _start(self, flat: torch.Tensor, key: list[int]) -> _Request:
        if len(key) == 1:  # a decode step
            ulist, unique, inverse = key, flat, self._zero
        else:
            unique, inverse = torch.unique(flat, sorted=True, return_inverse=True)
            ulist = unique.tolist()
        if ulist and (min(ulist) < 0 or max(ulist) >= self.layout.rows):
            bad = next(r for r in ulist if not 0 <= r < self.layout.rows)
            raise LlmarchError(
                f"token id {bad} is outside the per-layer embedding table's {self.layout.rows} rows", self.layout.path
            )
        slot = self.slots[self.next_slot]
        self.next_slot ^= 1
        staged = slot.take(len(ulist))
        host = staged.numpy()
        runs: list[tuple[int, int, int]] = []
        missed: list[tuple[int, int]] = []
        for i, r in enumerate(ulist):
            hit = self.cache.get(r) if self.cache_bytes else None
            if hit is not None:
                host[i] = hit
                self.cache.move_to_end(r)
                self.stats.cache_hits += 1
                continue
            missed.append((r, i))
            if runs and runs[-1][0] + runs[-1][1] == r and runs[-1][2] + runs[-1][1] == i:
                first, count, at = runs[-1]
                runs[-1] = (first, count + 1, at)
            else:
                runs.append((r, 1, i))
        self.stats.rows_read += len(missed)
        if self.nowait:
            runs = [run for run in runs if not self._read_now(run, host)]
        # what must wait for the disk goes to the pool in contiguous shares
        share = max(1, -(-len(runs) // self.threads))
        futures = [self.pool.submit(self._read_runs, runs[k : k + share], host) for k in range(0, len(runs), share)]
        return _Request(key, unique, inverse, staged, slot, futures, missed)

    def prefetch(self, ids: torch.Tensor) -> None:
        """A hint: ids outside the table start nothing (the caller maps them before it gathers,
        and gather reads whatever was not prefetched). While a step is captured, nothing: its rows
        come from stage()."""
        if self._in_capture:
            return
        flat, key = self._host_ids(ids)
        if self.pending is not None:
            if self.pending.key == key:  # already started (the decode loop, then the forward pre-hook)
                return
            self._wait(self.pending)  # a prefetch nobody gathered: let its reads finish before the slot is reused
            self.pending = None
        if key and 0 <= min(key) and max(key) < self.layout.rows:
            self.pending = self._start(flat, key)

    def _wait(self, req: _Request) -> None:
        t0 = time.perf_counter()
        for f in req.futures:
            f.result()
        self.stats.wait_s += time.perf_counter() - t0

    def _collect(self, flat: torch.Tensor, key: list[int]) -> _Request:
        """The request for key, read: the prefetched one when it matches, else started now."""
        req, self.pending = self.pending, None
        if req is None or req.key != key:
            if req is not None:
                self._wait(req)
            req = self._start(flat, key)
        self._wait(req)
        self.stats.tokens += len(req.key)
        if self.cache_bytes and req.missed:
            self._remember(req)
        return req

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        if self._in_capture:
            return self._from_static(ids)
        req = self._collect(*self._host_ids(ids))
        raw = req.staged.to(self.device, non_blocking=True)
        req.slot.event = self._mark_copied()
        rows = decode_rows(raw, self.layout.stored, self.layout.width)
        # index_select always copies: the result never aliases the staging buffer
        return self._finish(rows.index_select(0, req.inverse.to(rows.device)), ids)

    def _static_like(self) -> tuple[tuple[int, ...], torch.dtype]:
        return (1, self.layout.row_bytes), torch.uint8  # the stored bytes: the graph decodes them

    def _from_static(self, ids: torch.Tensor) -> torch.Tensor:
        assert self._static is not None
        return self._finish(decode_rows(self._static, self.layout.stored, self.layout.width), ids)

    def stage(self, ids: torch.Tensor | int) -> None:
        r = self._row_of(ids)
        req = self._collect(torch.tensor([r]), [r])  # the decode loop's prefetch of this id, if it matches
        self._to_static(req.staged)
        req.slot.event = self._mark_copied()

    def _remember(self, req: _Request) -> None:
        host = req.staged.numpy()
        limit = self.cache_bytes // self.layout.row_bytes
        for r, i in req.missed:
            if limit <= 0:
                break
            self.cache[r] = host[i].copy()
            while len(self.cache) > limit:
                self.cache.popitem(last=False)

    # ---------------------------------------------------------------- report
    def resident_bytes(self) -> int:
        return sum(s.buf.numel() for s in self.slots) + len(self.cache) * self.layout.row_bytes

    def where(self) -> str:
        src = f" (converted from {self.source.path})" if self.source is not None else ""
        return f"file {self.layout.path}{src}"

    def report(self) -> dict:
        out = super().report()
        out["cache_budget_bytes"] = self.cache_bytes
        out["staging_bytes"] = sum(s.buf.numel() for s in self.slots)
        return out

    def close(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            self.pool.shutdown(wait=True)
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ----------------------------------------------------------------------------- the row file


def row_file(layout: TableLayout, dtype: torch.dtype, folder: Path) -> TableLayout:
    """A row-major copy of the table in `dtype` under `folder`, written once (keyed by the source
    file's identity) for stored types that are not decoded step by step in torch."""
    st = os.stat(layout.path)
    key = hashlib.sha256(
        repr(
            (str(Path(layout.path).resolve()), st.st_size, st.st_mtime_ns, layout.offset, layout.stored, str(dtype))
        ).encode()
    ).hexdigest()[:24]
    isz = _itemsize(dtype)
    stored = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
    out = TableLayout(layout.name, folder / f"{key}.rows", 0, layout.rows, layout.width, stored, layout.width * isz)
    if out.path.is_file() and out.path.stat().st_size == out.nbytes:
        return out
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{os.getpid()}.part"
        f = open(tmp, "wb")
    except OSError as e:
        raise LlmarchError(
            f"--ple disk: cannot write the per-layer embedding row file here: {e.strerror or e}", folder
        ) from e
    try:
        with f:
            for _, raw in read_chunks(layout, LOAD_CHUNK_BYTES // max(layout.row_bytes, out.row_bytes)):
                rows = decode_rows(raw, layout.stored, layout.width).to(dtype)
                f.write(rows.contiguous().view(torch.uint8).numpy().tobytes())
        os.replace(tmp, out.path)
    except OSError as e:
        raise LlmarchError(f"--ple disk: cannot write the per-layer embedding row file: {e.strerror or e}", tmp) from e
    finally:
        if tmp.exists():
            tmp.unlink()  # ours: written above under a name only this process uses
    return out


# ----------------------------------------------------------------------------- choosing and opening


def host_available() -> int:
    from llmarch.runtime.experts.placement import _host_available

    return _host_available()


def choose_mode(asked: str | None, table_bytes: int, other_bytes: int, device: torch.device) -> tuple[str, str]:
    """(mode, why). Not asked: the table goes beside the weights when everything fits in 90% of the
    free memory of the compute device; on a GPU, else host RAM when the table fits there; else disk."""
    if asked is not None:
        if asked not in MODES:
            raise LlmarchError(f"--ple must be gpu, cpu or disk, got {asked!r}")
        if asked == "gpu" and device.type != "cuda":
            raise LlmarchError("--ple gpu needs the model on a GPU (--device cuda); use --ple cpu or disk")
        if asked == "gpu":
            free = torch.cuda.mem_get_info(device)[0]
            if other_bytes + table_bytes > free:
                raise LlmarchError(
                    f"--ple gpu: the table ({table_bytes / GiB:.2f} GiB) and the other weights "
                    f"({other_bytes / GiB:.2f} GiB) need more than the GPU's {free / GiB:.1f} GiB free; "
                    "use --ple cpu or --ple disk"
                )
        if asked == "cpu" and table_bytes > host_available():
            raise LlmarchError(
                f"--ple cpu: the table ({table_bytes / GiB:.2f} GiB) needs more than the "
                f"{host_available() / GiB:.1f} GiB of host RAM available; use --ple disk"
            )
        return asked, "asked"
    host = host_available()
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if other_bytes + table_bytes < 0.9 * free:
            return "gpu", f"default: the table fits on the GPU ({free / GiB:.1f} GiB free)"
        if table_bytes < 0.9 * host:
            return "cpu", (
                f"default: the table ({table_bytes / GiB:.2f} GiB) and weights do not fit the GPU's "
                f"{free / GiB:.1f} GiB free; host RAM has {host / GiB:.1f} GiB"
            )
        return "disk", f"default: the table ({table_bytes / GiB:.2f} GiB) fits neither the GPU nor host RAM"
    if other_bytes + table_bytes < 0.9 * host:
        return "cpu", f"default: the table fits in host RAM ({host / GiB:.1f} GiB available)"
    return "disk", (
        f"default: weights and table ({(other_bytes + table_bytes) / GiB:.2f} GiB) do not fit the "
        f"{host / GiB:.1f} GiB of host RAM available"
    )


def row_dir(folder: str | Path | None) -> Path:
    if folder is not None:
        return Path(folder)
    from llmarch.runtime.cbuild import cache_dir

    return cache_dir("ple")


def open_store(
    layout: TableLayout,
    mode: str,
    device: torch.device,
    dtype: torch.dtype,
    scale: float | None = None,
    cache_bytes: int = 0,
    folder: str | Path | None = None,
    threads: int = READ_THREADS,
) -> PleStore:
    """The store for `mode` (one of MODES) over the table at `layout`."""
    device = torch.device(device)
    if mode == "disk":
        if torch_decodes(layout.stored):
            return DiskTable(layout, device, dtype, scale, cache_bytes, threads)
        rows = row_file(layout, dtype, row_dir(folder))
        return DiskTable(rows, device, dtype, scale, cache_bytes, threads, source=layout)
    if mode == "gpu":
        return ResidentTable(layout, device if device.type == "cuda" else torch.device("cuda"), device, dtype, scale)
    if mode == "cpu":
        return ResidentTable(layout, torch.device("cpu"), device, dtype, scale)
    raise LlmarchError(f"--ple must be gpu, cpu or disk, got {mode!r}")


def check_options(spec, ple: str | None, cache_mib: float | None, folder: str | None) -> None:
    """The --ple options, judged from the header alone (before any weight is read)."""
    given = [n for n, v in (("--ple", ple), ("--ple-cache-mib", cache_mib), ("--ple-dir", folder)) if v is not None]
    if given and not spec.per_layer_embeddings:
        verb = "applies" if len(given) == 1 else "apply"
        raise LlmarchError(
            f"{' and '.join(given)} only {verb} to models with per-layer embeddings (Gemma 3n, Gemma 4); "
            "this model has none"
        )
    if ple is not None and ple not in MODES:
        raise LlmarchError(f"--ple must be gpu, cpu or disk, got {ple!r}")
    if cache_mib is not None and not cache_mib >= 0:
        raise LlmarchError(f"--ple-cache-mib must be >= 0, got {cache_mib}")


def attach(
    model,
    source,
    spec,
    asked: str | None,
    device: torch.device,
    dtype: torch.dtype,
    cache_mib: float | None = None,
    folder: str | Path | None = None,
) -> PleStore | None:
    """Give the model's per-layer inputs a store for the table (before its weights load, so the
    table is never read as an ordinary weight): the mode asked for, else the default. Returns None
    for a model without per-layer inputs."""
    pli = getattr(model, "per_layer_inputs", None)
    if pli is None:
        return None
    info = source.info("per_layer_inputs.rows.weight")
    if info is None:
        raise LlmarchError(
            "the config has per-layer inputs but no per-layer embedding table was found", source.ckpt.path
        )
    layout = TableLayout.of(info, pli.layers, pli.width, pli.vocab)
    isz = _itemsize(dtype)
    table_bytes = layout.rows * layout.width * isz
    other = max(int((spec.params or {}).get("total") or 0) * isz - table_bytes, 0)
    mode, why = choose_mode(asked, table_bytes, other, torch.device(device))
    store = open_store(layout, mode, device, dtype, cache_bytes=int((cache_mib or 0) * 2**20), folder=folder)
    store.note = why
    pli.set_rows(store)
    if store.stages:  # the Generator's captured decode step stages each step's row through it
        model.graph_inputs = store
    if mode == "disk":
        # start each step's reads as soon as its ids are known: the decode loop calls prefetch_next
        # right after sampling (the reads overlap the token's streaming and the step's setup), the
        # pre-hook covers prefills and callers that do not (a repeated prefetch starts nothing)
        model.prefetch_next = store.prefetch
        model.register_forward_pre_hook(lambda _m, args: store.prefetch(args[0]) if args else None)
    return store


def find_store(model) -> PleStore | None:
    """The model's per-layer embedding store, wherever the model keeps it."""
    for m in model.modules() if hasattr(model, "modules") else [model]:
        for v in vars(m).values():
            if isinstance(v, PleStore):
                return v
    return None


def summary(r: dict) -> str:
    """The run report's PLE part, one clause."""
    from llmarch.report.text import nbytes

    line = (
        f"PLE {r['mode']}: table {nbytes(r['table_bytes'])} in {r['where']}, "
        f"{r['rows_read_per_token']:.2f} rows read per token"
    )
    if r["mode"] == "disk":
        line += f", {1e3 * r['read_wait_s']:.1f} ms waiting on reads"
        if r["cache_budget_bytes"]:
            line += f", {r['cache_hits']} hot-row hits"
    return line

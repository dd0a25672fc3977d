"""The GPU's share of a decode token's routed experts, read from host memory by the GPU itself.

With the experts in host RAM a decode step is bound by how fast their bytes are read, and the CPU
cores are not the only reader host memory can serve: pinned host memory lies in the GPU's address
space, so a kernel can read it over PCIe. Measured on the H200 machine (benchmarks/
probe_pcie_gather.py): a Triton gather of 3 Qwen3-30B-A3B Q4_0 expert matrices from pinned memory
ran at 47.7 GB/s (the copy engine: 52.2), and beside it the cores still read 98 GB/s (100 alone).
So each offloaded layer's top-k is split by whole experts: the GPU takes `slots` of them (their
stored bytes gathered into device memory, then multiplied in their stored layout), the CPU kernel
the others, at the same time; the GPU's part is queued in the segment's graph after the copy that
wakes the host, and the next segment, which adds the CPU's part, runs after it on the same stream.

Every layout the CPU kernel reads has a GPU product here: a GGUF's Q8_0, Q4_0, MXFP4, Q4_K, Q5_K
and Q6_K blocks as stored (each matrix in its own type), gpt-oss's MXFP4 as shipped, and
moe_cpu.c's int4 and int8 (--expert-bits 4 / 8). Float experts take the torch path, without a
share; --experts disk (its point is not to hold the experts in RAM, which pinning would) and memory
that cannot be pinned leave every expert to the CPU.
"""

from __future__ import annotations

import ctypes
import os
import weakref

import torch

from llmarch.errors import LlmarchError
from llmarch.runtime.experts.formats import ExpertFormat, G

# the share of a token's experts the GPU reads, slots = floor(k * SHARE): PCIe carries ~48 GB/s
# against the cores' 60-100 (the GGUF Q4_0 rows are read slower than int4's), and the GPU's part has
# a fixed cost (launches, the products) besides. On the H200 machine (Qwen3-30B-A3B shape, top-8,
# alternated rounds) 3 of 8 was the fastest split measured: 4-layer Q4_0 GGUF 541 tok/s median
# against 520 (2), 475 (1), 451 (none); 48 layers int4 3 > 2 > none in each of 3 rounds
SHARE = 0.375
# the smallest expert (stored bytes) worth a share: the GPU's part costs ~20 us of launches and
# products whatever its size, about what PCIe carries of a 1 MiB expert
MIN_EXPERT_BYTES = 1 << 20
GGML32 = {ExpertFormat.Q4_0: 0, ExpertFormat.Q8_0: 1, ExpertFormat.GGUF_MXFP4: 2}  # gemv_ggml32's MODE
KQUANTS = {ExpertFormat.Q4_K: 0, ExpertFormat.Q5_K: 1, ExpertFormat.Q6_K: 2}  # gemv_kquant's KIND
FORMATS = (*GGML32, *KQUANTS, ExpertFormat.MXFP4, ExpertFormat.INT4, ExpertFormat.INT8)
PAGE = 4096
READ_ONLY = 0x08  # CU_MEMHOSTREGISTER_READ_ONLY: a GGUF's map is read-only; the GPU only reads anyway


def slots_for(k: int, expert_bytes: int) -> int:
    """LLMARCH_MOE_GPU_SLOTS=N (0: off), else floor(k * SHARE) for experts of MIN_EXPERT_BYTES or
    more: how many of a token's k experts the GPU computes (the CPU keeps at least one)."""
    value = os.environ.get("LLMARCH_MOE_GPU_SLOTS")
    if value is None:
        return int(k * SHARE) if expert_bytes >= MIN_EXPERT_BYTES else 0
    if not value.isdigit() or int(value) >= max(k, 1):
        raise LlmarchError(f"LLMARCH_MOE_GPU_SLOTS={value!r}: expected a number of experts from 0 to {k - 1}")
    return int(value)


def kernels_available() -> bool:
    """Whether triton imports (a CPU build of torch may come without it)."""
    try:
        from llmarch.runtime.experts import gpu_share_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def unsupported(store) -> str | None:
    """Why the GPU cannot take a share of this store's experts (None: it can)."""
    for what, fmt in (("gate/up", store.format), ("up", store.up_format), ("down", store.down_format)):
        if fmt not in FORMATS:
            return f"{what} experts in {fmt.value}"
    if store.on_disk:
        return "experts on disk"
    return None


def _page_ranges(tensors) -> list[tuple[int, int]]:
    """The page-aligned [start, end) ranges holding the tensors, overlapping ones merged."""
    spans = sorted(
        (t.data_ptr() // PAGE * PAGE, -(-(t.data_ptr() + t.numel() * t.element_size()) // PAGE) * PAGE) for t in tensors
    )
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


# host ranges registered by pin(), with how many owners hold each: two decoders over the same
# experts (a benchmark's variants) share a registration, which CUDA would refuse to make twice
_PINNED: dict[tuple[int, int], int] = {}


def _driver():
    drv = ctypes.CDLL("libcuda.so.1")
    drv.cuMemHostRegister_v2.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint)
    drv.cuMemHostUnregister.argtypes = (ctypes.c_void_p,)
    return drv


def _release(ranges, _tensors) -> None:
    """Drop one hold on each range, unregistering those nobody holds (the tensors lived until now)."""
    drv = None
    for r in ranges:
        _PINNED[r] -= 1
        if not _PINNED[r]:
            del _PINNED[r]
            drv = drv or _driver()
            drv.cuMemHostUnregister(r[0])


def pin(owner, tensors) -> str | None:
    """Register the host memory of `tensors` with CUDA, read-only, for as long as `owner` lives (the
    tensors are held until then): the GPU may then read it at its host addresses. None, or why it
    failed (all undone then)."""
    drv, held = _driver(), []
    for a, b in _page_ranges(tensors):
        if (a, b) not in _PINNED:
            rc = drv.cuMemHostRegister_v2(a, b - a, READ_ONLY)
            if rc:
                _release(held, None)
                return f"pinning {b - a} bytes of host memory failed (CUresult {rc})"
            _PINNED[(a, b)] = 0
        _PINNED[(a, b)] += 1
        held.append((a, b))
    weakref.finalize(owner, _release, held, list(tensors))
    return None


def staged_bytes(host: torch.Tensor, slots: int) -> int:
    """Device bytes a part's gathered experts take in the staging buffer, 16-byte aligned."""
    return -(-slots * host[0].numel() * host.element_size() // 16) * 16


class ExpertPart:
    """One stored part of a layer's experts (quants or scales) in host memory, gathered by expert id
    into `staged`, a piece of device memory [slots, expert's bytes]."""

    def __init__(self, host: torch.Tensor, slots: int, staged: torch.Tensor):
        E = host.shape[0]
        per = host[0].numel() * host.element_size()
        self.word = torch.int32 if per % 4 == 0 and host.data_ptr() % 4 == 0 else torch.uint8
        self.src = host.view(torch.uint8).reshape(E, per).view(self.word)
        self.staged = staged[: slots * per].view(self.word).view(slots, -1)
        self.shape, self.dtype = host.shape[1:], host.dtype

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """The experts `ids` [slots] gathered; returned as [slots, *one expert's shape] in its dtype."""
        from llmarch.runtime.experts import gpu_share_kernels as k

        n, block = self.src.shape[1], 4096
        k.gather_experts[(ids.numel(), -(-n // block))](self.src, ids, self.staged, n, BLOCK=block)
        return self.staged.view(torch.uint8).view(self.dtype).view(-1, *self.shape)


def gemv(fmt: ExpertFormat, q: torch.Tensor, s: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor) -> None:
    """y [slots, rows] = W[s] @ x[s] for the gathered experts W (q [slots, rows, bytes], scales s),
    x [slots or 1, K] float32 (one row: the same input for every slot)."""
    from llmarch.runtime.experts import gpu_share_kernels as k

    slots, rows = q.shape[0], q.shape[1]
    K = x.shape[-1]
    x_slot, y_slot = 0 if x.shape[0] == 1 else x.stride(0), y.stride(0)
    br = 16
    grid = (slots, -(-rows // br))
    if fmt in GGML32:
        nbytes = fmt.block[1]
        k.gemv_ggml32[grid](
            q, x, y, rows, K // 32, q[0].numel(), x_slot, y_slot, BYTES=nbytes, MODE=GGML32[fmt], BR=br, BB=8
        )
    elif fmt in KQUANTS:
        nbytes = fmt.block[1]
        k.gemv_kquant[grid](
            q, x, y, rows, K // 256, q[0].numel(), x_slot, y_slot, KIND=KQUANTS[fmt], BYTES=nbytes, BR=br
        )
    elif fmt is ExpertFormat.MXFP4:
        assert s is not None
        k.gemv_mxfp4[grid](q, s, x, y, rows, K // 32, q[0].numel(), s[0].numel(), x_slot, y_slot, BR=br, BB=8)
    else:
        assert s is not None
        k.gemv_grouped64[grid](
            q,
            s,
            x,
            y,
            rows,
            K // G,
            q[0].numel(),
            s[0].numel(),
            x_slot,
            y_slot,
            INT4=fmt is ExpertFormat.INT4,
            BR=br,
            BG=4,
        )


def staging_bytes(store, slots: int) -> int:
    """Device bytes one layer's share gathers into at once (all its parts)."""
    return sum(staged_bytes(t, slots) for t in store.parts() if t is not None)


class GpuShare:
    """One offloaded layer's GPU share: the experts of `slots` router slots computed on the device,
    their weighted sum added to the residual. staging: device bytes (staging_bytes or more) to
    gather into; the layers of a model can share one, their shares running one after another on
    one stream (a DeepSeek V3 layer's 3 experts are 74 MB)."""

    def __init__(self, store, moe, slots: int, device, staging: torch.Tensor | None = None):
        self.store, self.moe, self.slots = store, moe, slots
        if staging is None:
            staging = torch.empty(staging_bytes(store, slots), dtype=torch.uint8, device=device)
        parts, at = [], 0
        for t in store.parts():
            parts.append(None if t is None else ExpertPart(t, slots, staging[at:]))
            at += 0 if t is None else staged_bytes(t, slots)
        self.gu, self.gu_s, self.up, self.dn, self.dn_s = parts
        to_dev = lambda b: None if b is None else b.to(device)  # noqa: E731
        self.gu_b, self.dn_b = to_dev(store.gu_b), to_dev(store.dn_b)
        rows = store.gu.shape[1] + (store.up.shape[1] if store.up is not None else 0)
        self.gate_up = torch.empty((slots, rows), dtype=torch.float32, device=device)
        self.down = torch.empty((slots, store.d), dtype=torch.float32, device=device)

    def host_tensors(self) -> list[torch.Tensor]:
        return [p.src for p in (self.gu, self.gu_s, self.up, self.dn, self.dn_s) if p is not None]

    def __call__(self, ids: torch.Tensor, w: torch.Tensor, x: torch.Tensor, h: torch.Tensor) -> None:
        """h += the weighted sum of experts ids [1, slots] (router weights w [1, slots]) over x [1, d]."""
        st, moe = self.store, self.moe
        ids1, w1 = ids.view(-1), w.view(-1, 1).float()
        x = x.float()
        if moe.weight_input:
            x = x * w1
        gate_rows = st.gu.shape[1]
        gemv(st.format, self.gu.gather(ids1), self.gu_s and self.gu_s.gather(ids1), x, self.gate_up[:, :gate_rows])
        if self.up is not None:
            gemv(st.up_format, self.up.gather(ids1), None, x, self.gate_up[:, gate_rows:])
        gu = self.gate_up if self.gu_b is None else self.gate_up + self.gu_b[ids1]
        a = moe.act(gu).contiguous()
        gemv(st.down_format, self.dn.gather(ids1), self.dn_s and self.dn_s.gather(ids1), a, self.down)
        y = self.down if self.dn_b is None else self.down + self.dn_b[ids1]
        if not moe.weight_input:
            y = y * w1
        h.add_(y.sum(0).view_as(h).to(h.dtype))


def layer_shares(owner, stores, moes, k: int, device) -> tuple[list[GpuShare], str | None]:
    """One GpuShare per offloaded layer (stores, their MoEs), pinned for as long as `owner` lives,
    where the GPU can take a share of a token's k experts; and the run's note, which says why not
    where it cannot (None where no share was asked for)."""
    slots = slots_for(k, min(st.expert_bytes() for st in stores))
    if not slots:
        return [], None
    why = next((r for r in map(unsupported, stores) if r), None)
    if why is None and not kernels_available():
        why = "triton is not importable"
    shares = []
    if why is None:
        try:  # one staging buffer for all layers: their shares run one after another on one stream
            staging = torch.empty(max(staging_bytes(st, slots) for st in stores), dtype=torch.uint8, device=device)
            shares = [GpuShare(st, moe, slots, device, staging) for st, moe in zip(stores, moes)]
        except torch.cuda.OutOfMemoryError:
            why = "no room on the GPU to gather them into"
    if why is None:
        why = pin(owner, [t for sh in shares for t in sh.host_tensors()])
    if why:
        return [], f"experts: the CPU reads all {k} of a token's experts ({why})"
    return shares, f"experts: the GPU reads {slots} of a token's {k} experts from host RAM over PCIe, the CPU the rest"

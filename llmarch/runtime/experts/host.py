"""Routed experts kept away from the GPU: quantized in host RAM (or memory-mapped from disk) and
computed on the CPU, only the selected ones, with all cores at once (moe_cpu.c); dense layers,
attention, router and shared experts stay on the GPU. With --gpu-experts N the N most used experts
of each layer (counted while running) also get a float copy on the GPU and are computed there.

Per step of one layer: the router's choice comes to the host (the one sync), the GPU share (shared
expert, hot experts) is queued first so it runs while the CPU computes the rest, then the CPU
result goes back and is added. A prompt chunk long enough to make the experts matrix work
(upload.UPLOAD_TOKENS) runs them on the GPU instead: their stored bytes copied over (upload.py).
"""

from __future__ import annotations

import ctypes
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from llmarch.runtime.experts import upload
from llmarch.runtime.experts.disk import map_to_disk
from llmarch.runtime.experts.formats import dequantize, quantize
from llmarch.runtime.experts.kernel import cpu_kernel, kernel_activation, kernel_scratch, ptr
from llmarch.runtime.experts.stores import ExpertStore, at, expert_loop, group_by_expert

if TYPE_CHECKING:
    from llmarch.runtime.experts.placement import Placement
    from llmarch.runtime.ops.moe import MoE


class OffloadedExperts(ExpertStore):
    """Routed experts of one layer on the host (RAM or mmap), optionally a few hot ones on the GPU."""

    def __init__(self, moe: MoE, gate_up: torch.Tensor, down: torch.Tensor, biases, place: Placement, dtype):
        """Float experts, stored in place.format."""
        super().__init__()
        fmt = place.format
        parts = (
            (*quantize(gate_up, fmt), *quantize(down, fmt))
            if fmt.quantized
            else (gate_up.to(dtype), None, down.to(dtype), None)
        )
        self._hold(moe, parts, biases, place, dtype)

    @classmethod
    def from_quantized(
        cls,
        moe: MoE,
        parts: tuple,
        place: Placement,
        dtype,
        biases=(None, None),
        up=None,
        mapped=None,
        formats: tuple | None = None,
    ) -> OffloadedExperts:
        """Experts already in place.format's layout, (gate_up q, scales, down q, scales): random ones for
        a benchmark, a checkpoint's MXFP4 blocks as shipped, or a GGUF's blocks as stored (gate in the
        first place and its up rows apart in `up`, scales inside the blocks). mapped: the file mapping
        the parts are views of, for --experts disk (nothing is written then). formats: the GGUF's
        own type of each of (gate_up, up, down) where they differ from place.format (None: the same)."""
        self = cls.__new__(cls)
        ExpertStore.__init__(self)
        self._hold(moe, parts, biases, place, dtype, up, mapped, formats)
        return self

    def _hold(
        self, moe: MoE, parts: tuple, biases, place: Placement, dtype, up=None, mapped=None, formats=None
    ) -> None:
        self.E, self.d, self.inter, self.index = moe.E, moe.d, moe.inter, moe.index
        self.gated = getattr(moe, "gated", True)  # gate rows then up rows, or up alone (kernel tests pass a namespace)
        gu_f, up_f, dn_f = formats or (None, None, None)
        self.format, self.dtype = gu_f or place.format, dtype
        self.up_format, self.down_format = up_f or self.format, dn_f or self.format
        self.gu, self.gu_s, self.dn, self.dn_s = (None if t is None else t.contiguous() for t in parts)
        self.up = up
        self.gu_b, self.dn_b = (None if b is None else b.float().contiguous() for b in biases)  # the kernel's float32
        self.cache = self._mm = None
        if place.experts == "disk":
            if mapped is not None:  # already views of a file (a GGUF's blocks): map, do not copy
                self._mm = mapped
            else:
                folder = Path(place.disk_dir or tempfile.mkdtemp(prefix="llmarch-experts-"))
                self._mm, stored = map_to_disk(
                    folder / f"layer{self.index}.bin", (self.gu, self.gu_s, self.dn, self.dn_s)
                )
                self.gu, self.gu_s, self.dn, self.dn_s = stored
            self.cache = place.disk_cache
            if self.cache is not None:
                self.cache.add(self._mm)
        self._expert_bytes = sum(
            t[0].numel() * t.element_size() for t in (self.gu, self.gu_s, self.up, self.dn, self.dn_s) if t is not None
        )
        self.hot_n = place.gpu_experts
        self.counts = np.zeros(self.E, dtype=np.int64)
        self.hot: dict[int, tuple] = {}
        self.calls = 0
        self.bytes_read = 0  # host expert bytes touched (each selected expert once per step)
        self.device = None
        self._buf: tuple | None = None

    PARTS = ("gu", "gu_s", "up", "dn", "dn_s")

    def parts(self) -> tuple:
        """The tensors the kernel reads (None where a format has no such part)."""
        return tuple(getattr(self, n) for n in self.PARTS)

    def touched(self, nbytes: int) -> None:
        """Host expert bytes a call has read (after it ran): the report's figure and the disk cache's."""
        self.bytes_read += nbytes
        if self.cache is not None:
            self.cache.touch(nbytes)

    def expert_bytes(self) -> int:
        """Stored bytes of one expert, scales included."""
        return self._expert_bytes

    @property
    def on_disk(self) -> bool:
        """Whether the experts are read from a file mapping (disk placement), not held in RAM."""
        return self._mm is not None

    @property
    def kernel_bits(self) -> int:
        """moe_cpu.c's `bits`: gate/up's layout code, up's and down's in the next bytes where they differ."""
        gu, up, dn = (f.kernel_code for f in (self.format, self.up_format, self.down_format))
        return gu | (0 if up == gu else up << 8) | (0 if dn == gu else dn << 16)

    @property
    def format_name(self) -> str:
        """The experts' format for the report: gate/up's, then up's and down's where they differ."""
        other = [f"{what} {f.value.split()[-1]}" for what, f in (("up", self.up_format), ("down", self.down_format))]
        differ = [o for o, f in zip(other, (self.up_format, self.down_format)) if f is not self.format]
        return self.format.value + (f" ({', '.join(differ)})" if differ else "")

    def expert(self, e: int, device=None) -> tuple:
        """Expert e in the model dtype, dequantized if need be, on the host or on `device`."""
        if self.format.quantized:
            gu, dn = (
                dequantize(self.gu[e], at(self.gu_s, e), self.format),
                dequantize(self.dn[e], at(self.dn_s, e), self.down_format),
            )
            if self.up is not None:
                gu = torch.cat([gu, dequantize(self.up[e], None, self.up_format)])
        else:
            gu, dn = self.gu[e], self.dn[e]
        return tuple(
            None if t is None else t.to(device, self.dtype, non_blocking=True)
            for t in (gu, dn, at(self.gu_b, e), at(self.dn_b, e))
        )

    def _refresh_hot(self) -> None:
        want = set(np.argsort(-self.counts, kind="stable")[: self.hot_n].tolist())
        for e in list(self.hot):
            if e not in want:
                del self.hot[e]
        for e in want - set(self.hot):
            self.hot[e] = self.expert(e, self.device)

    def forward(self, x, idx, w, act, weight_input: bool = False):
        self.device = x.device
        if x.device.type == "cuda":  # one device->host copy (and sync) for ids, weights and activations
            k = idx.shape[1]
            both = torch.cat([idx.float(), w.float(), x.float()], dim=1).cpu()
            idx_h, w_h, x_h = both[:, :k].long(), both[:, k : 2 * k], both[:, 2 * k :]
        else:
            idx_h, w_h, x_h = idx, w.float(), x.float()
        if self.hot_n:
            self.counts += np.bincount(idx_h.flatten().numpy(), minlength=self.E)
            self.calls += 1
            if self.calls in (1, 8) or self.calls % 64 == 0:
                self._refresh_hot()
        if upload.worth_uploading(x):  # a long prompt: the used experts go to the GPU
            y = upload.compute_uploaded(self, x, idx_h, w_h, act, weight_input)
            if y is not None:
                return y
        out = torch.zeros_like(x)
        cold = idx_h
        if self.hot:  # ids marked E are computed by the other side
            hot_mask = torch.isin(idx_h, torch.tensor(list(self.hot), dtype=idx_h.dtype))
            if hot_mask.any():  # queue the GPU share first: it runs while the CPU computes the rest
                rows, ws, segs = group_by_expert(idx_h.masked_fill(~hot_mask, self.E), w_h, self.E)
                out = expert_loop(x, rows.to(x.device), ws.to(x.device), segs, self.hot.__getitem__, act, weight_input)
            cold = idx_h.masked_fill(hot_mask, self.E)
        y = self.host_compute(x_h.contiguous(), cold, w_h, act, weight_input)
        if y is not None:
            out = out + y.to(x.device, x.dtype, non_blocking=True)
        return out

    def host_compute(self, x_h, idx_h, w_h, act, weight_input) -> torch.Tensor | None:
        """The experts of idx_h [T, k] (id E: not here) over x_h [T, d] on the CPU, all in one kernel
        call, or through the expert loop when not quantized. None when no id is left."""
        groups = self._groups(idx_h.numpy(), w_h.numpy())
        if groups is None:
            return None
        sel, start, tok, wts = groups
        if self.format.quantized:
            y = self._kernel(x_h, sel, start, tok, wts, act, weight_input)
        else:
            segs = zip(sel.tolist(), start[:-1].tolist(), start[1:].tolist())
            y = expert_loop(
                x_h.to(self.dtype),
                torch.from_numpy(tok.astype(np.int64)),
                torch.from_numpy(wts),
                segs,
                self.expert,
                act,
                weight_input,
            )
        self.touched(len(sel) * self._expert_bytes)
        return y

    def _groups(self, idx_np: np.ndarray, w_np: np.ndarray):
        """(experts used, start of each one's rows, token rows, weights), rows sorted by expert; None
        when no id is below E. In numpy: these are a few dozen ids, where each torch op would cost
        more than its math."""
        T, k = idx_np.shape
        if T == 1 and not self.hot:  # decode: k distinct experts, one token each
            order = np.argsort(idx_np[0], kind="stable")
            sel, wts = idx_np[0][order].astype(np.int64), w_np[0][order].astype(np.float32)
            counts, tok = np.ones(k, np.int64), np.zeros(k, np.int32)
        else:
            flat, rows, wf = idx_np.ravel(), np.repeat(np.arange(T, dtype=np.int32), k), w_np.ravel()
            keep = flat < self.E
            if not keep.any():
                return None
            flat, rows, wf = flat[keep], rows[keep], wf[keep]
            order = np.argsort(flat, kind="stable")
            tok, wts = rows[order], wf[order].astype(np.float32)
            sel, counts = np.unique(flat[order], return_counts=True)
            sel = sel.astype(np.int64)
        start = np.zeros(len(sel) + 1, dtype=np.int32)
        np.cumsum(counts, out=start[1:])
        return sel, start, tok, wts

    def _kernel(self, x_h, sel, start, tok, wts, act, weight_input) -> torch.Tensor:
        d, I = self.d, self.inter
        XQ, XS, H, AQ, AS, Y = self._scratch(len(tok))
        out = np.zeros((x_h.shape[0], d), dtype=np.float32)
        x_np = np.ascontiguousarray(x_h.numpy(), dtype=np.float32)
        cpu_kernel().moe_experts(
            ctypes.c_int(self.kernel_bits),
            ctypes.c_int(len(sel)),
            ptr(sel),
            ptr(start),
            ptr(np.ascontiguousarray(tok)),
            ptr(wts),
            ptr(x_np),
            ptr(out),
            ctypes.c_int(d),
            ctypes.c_int(I),
            ptr(self.gu),
            ptr(self.gu_s),
            ptr(self.up),
            ptr(self.dn),
            ptr(self.dn_s),
            ptr(self.gu_b),
            ptr(self.dn_b),
            ptr(XQ),
            ptr(XS),
            ptr(H),
            ptr(AQ),
            ptr(AS),
            ptr(Y),
            ctypes.c_int(kernel_activation(act)),
            ctypes.c_int(1 if self.gated else 0),
            ctypes.c_float(act.alpha),
            ctypes.c_float(act.limit),
            ctypes.c_int(1 if weight_input else 0),
        )
        return torch.from_numpy(out)

    def _scratch(self, rows: int) -> tuple:
        """Kernel work buffers, kept between calls (allocation would cost more than a decode step's math)."""
        if self._buf is None or self._buf[0].shape[0] < rows:
            self._buf = kernel_scratch(self.d, self.inter, max(rows, 16))
        return self._buf

"""Routed experts kept away from the GPU: quantized in host RAM (or memory-mapped from disk) and
computed on the CPU, only the selected ones, with all cores at once (moe_cpu.c); dense layers,
attention, router and shared experts stay on the GPU. With --gpu-experts N the N most used experts
of each layer (counted while running) also get a float copy on the GPU and are computed there.

Per step of one layer: the router's choice comes to the host (the one sync), the GPU share (shared
expert, hot experts) is queued first so it runs while the CPU computes the rest, then the CPU
result goes back and is added.
"""

from __future__ import annotations

import ctypes
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from llmarch.runtime.experts.formats import dequantize, quantize
from llmarch.runtime.experts.kernel import cpu_kernel, kernel_scratch, ptr
from llmarch.runtime.experts.stores import expert_ffn

if TYPE_CHECKING:
    from llmarch.runtime.experts.placement import Placement
    from llmarch.runtime.ops.moe import MoE


class OffloadedExperts(nn.Module):
    """Routed experts of one layer on the host (RAM or mmap), optionally a few hot ones on the GPU."""

    def __init__(self, moe: MoE, gate_up: torch.Tensor, down: torch.Tensor, biases, place: Placement, dtype):
        super().__init__()
        self.E, self.d, self.inter, self.bits, self.dtype = moe.E, moe.d, moe.inter, place.bits, dtype
        self.index = moe.index
        gb, db = biases
        self.gu_b = gb.float().contiguous() if gb is not None else None
        self.dn_b = db.float().contiguous() if db is not None else None
        if self.bits == 16:
            self.gu, self.dn = gate_up.to(dtype).contiguous(), down.to(dtype).contiguous()
            self.gu_s = self.dn_s = None
        else:
            self.gu, self.gu_s = quantize(gate_up, self.bits)
            self.dn, self.dn_s = quantize(down, self.bits)
        self.cache = None
        self._maybe_to_disk(place)
        self.hot_n = place.gpu_experts
        self.counts = np.zeros(self.E, dtype=np.int64)
        self.hot: dict[int, tuple] = {}
        self.calls = 0
        self.bytes_read = 0  # host expert bytes touched (each selected expert once per step)
        self.device = None

    def _maybe_to_disk(self, place: Placement) -> None:
        if place.experts == "disk":
            self._to_disk(Path(place.disk_dir or tempfile.mkdtemp(prefix="llmarch-experts-")))
            self.cache = place.disk_cache
            if self.cache is not None:
                self.cache.add(self._mm)

    def _to_disk(self, folder: Path) -> None:
        """Write this layer's quantized experts to one file and map it back: RSS holds only what is touched."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"layer{self.index}.bin"
        parts = [t for t in (self.gu, self.gu_s, self.dn, self.dn_s) if t is not None]
        with open(path, "wb") as f:
            for t in parts:
                f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
        mm = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable views, nothing copied
        off, out = 0, []
        for t in parts:
            n = t.numel() * t.element_size()
            out.append(torch.frombuffer(mm, dtype=torch.uint8, count=n, offset=off).view(t.dtype).view(t.shape))
            off += n
        self._mm = mm
        if self.gu_s is None:
            self.gu, self.dn = out
        else:
            self.gu, self.gu_s, self.dn, self.dn_s = out

    def touched(self, nbytes: int) -> None:
        """Host expert bytes a call has read (after it ran): the report's figure and the disk cache's."""
        self.bytes_read += nbytes
        if self.cache is not None:
            self.cache.touch(nbytes)

    def expert_bytes(self) -> int:
        if getattr(self, "_eb", None) is None:
            self._eb = self._expert_bytes()
        return self._eb

    def _expert_bytes(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in (self.gu, self.gu_s, self.dn, self.dn_s) if t is not None)

    def _float(self, e: int):
        if self.bits == 16:
            return self.gu[e], self.dn[e]
        return dequantize(self.gu[e], self.gu_s[e], self.bits), dequantize(self.dn[e], self.dn_s[e], self.bits)

    def _refresh_hot(self) -> None:
        want = set(np.argsort(-self.counts, kind="stable")[: self.hot_n].tolist())
        for e in list(self.hot):
            if e not in want:
                del self.hot[e]
        for e in want - set(self.hot):
            gu, dn = self._float(e)
            self.hot[e] = (gu.to(self.device, self.dtype, non_blocking=True), dn.to(self.device, self.dtype, non_blocking=True))

    @classmethod
    def from_quantized(cls, moe: MoE, parts: tuple, place: Placement, dtype, biases=(None, None)) -> "OffloadedExperts":
        """Wrap already-quantized (gate_up q, scales, down q, scales) in place.bits' layout: random ones
        for a benchmark, or a checkpoint's MXFP4 blocks as shipped."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.E, self.d, self.inter, self.bits, self.dtype, self.index = moe.E, moe.d, moe.inter, place.bits, dtype, moe.index
        self.gu, self.gu_s, self.dn, self.dn_s = (t.contiguous() for t in parts)
        self.gu_b, self.dn_b = (None if b is None else b.float().contiguous() for b in biases)
        self.hot_n, self.counts, self.hot, self.calls, self.bytes_read, self.device, self.cache = (
            place.gpu_experts, np.zeros(self.E, dtype=np.int64), {}, 0, 0, None, None)
        return self

    def forward(self, x, idx, w, act, weight_input: bool = False):
        self.device = x.device
        if x.device.type == "cuda":  # one device->host copy (and sync) for ids, weights and activations
            k = idx.shape[1]
            both = torch.cat([idx.float(), w.float(), x.float()], dim=1).cpu()
            idx_h, w_h, x_h = both[:, :k].long(), both[:, k:2 * k], both[:, 2 * k:]
        else:
            idx_h, w_h, x_h = idx, w.float(), x.float()
        if self.hot_n:
            self.counts += np.bincount(idx_h.flatten().numpy(), minlength=self.E)
            self.calls += 1
            if self.calls in (1, 8) or self.calls % 64 == 0:
                self._refresh_hot()
        out = torch.zeros_like(x)
        cold = idx_h
        if self.hot:
            hot_mask = torch.isin(idx_h, torch.tensor(list(self.hot), dtype=idx_h.dtype))
            if hot_mask.any():  # queue the GPU share first: it runs while the CPU computes the rest
                out = self._gpu(x, idx_h, w_h, hot_mask, act, weight_input)
            cold = idx_h.masked_fill(hot_mask, -1)
        y = self._cpu(x_h.contiguous(), cold, w_h, act, weight_input)
        if y is not None:
            out = out + y.to(x.device, x.dtype, non_blocking=True)
        return out

    def _gpu(self, x, idx_h, w_h, hot_mask, act, weight_input):
        out = torch.zeros_like(x)
        for e in torch.unique(idx_h[hot_mask]).tolist():
            rows, slot = (idx_h == e).nonzero(as_tuple=True)
            r = rows.to(x.device)
            ws = w_h[rows, slot].to(x.device)[:, None]
            gu, dn = self.hot[e]
            out.index_add_(0, r, expert_ffn(x[r], ws, gu, dn,
                                            None if self.gu_b is None else self.gu_b[e].to(x.device, x.dtype),
                                            None if self.dn_b is None else self.dn_b[e].to(x.device, x.dtype),
                                            act, weight_input))
        return out

    def _cpu(self, x_h, idx_h, w_h, act, weight_input):
        # index work in numpy: these are a few dozen ids, where each torch op would cost more than its math
        idx_np, w_np = idx_h.numpy(), w_h.numpy()
        T, k = idx_np.shape
        if T == 1 and not self.hot:  # decode: k distinct experts, one token each
            order = np.argsort(idx_np[0], kind="stable")
            sel, wts = idx_np[0][order].astype(np.int64), w_np[0][order].astype(np.float32)
            counts, tok = np.ones(k, np.int64), np.zeros(k, np.int32)
        else:
            flat, rows, wf = idx_np.ravel(), np.repeat(np.arange(T, dtype=np.int32), k), w_np.ravel()
            keep = flat >= 0
            if not keep.any():
                return None
            flat, rows, wf = flat[keep], rows[keep], wf[keep]
            order = np.argsort(flat, kind="stable")
            tok, wts = rows[order], wf[order].astype(np.float32)
            sel, counts = np.unique(flat[order], return_counts=True)
            sel = sel.astype(np.int64)
        if self.bits == 16:
            y = self._cpu_float(x_h, torch.from_numpy(tok.astype(np.int64)), torch.from_numpy(sel),
                                torch.from_numpy(counts), torch.from_numpy(wts), act, weight_input)
            self.touched(len(sel) * self.expert_bytes())
            return y
        start = np.zeros(len(sel) + 1, dtype=np.int32)
        np.cumsum(counts, out=start[1:])
        n, d, I = len(tok), self.d, self.inter
        XQ, XS, H, AQ, AS, Y = self._scratch(n)
        out = np.zeros((T, d), dtype=np.float32)
        x_np = np.ascontiguousarray(x_h.numpy(), dtype=np.float32)
        cpu_kernel().moe_experts(
            ctypes.c_int(self.bits), ctypes.c_int(len(sel)), ptr(sel), ptr(start), ptr(np.ascontiguousarray(tok)), ptr(wts),
            ptr(x_np), ptr(out), ctypes.c_int(d), ctypes.c_int(I),
            ptr(self.gu), ptr(self.gu_s), ptr(self.dn), ptr(self.dn_s), ptr(self.gu_b), ptr(self.dn_b),
            ptr(XQ), ptr(XS), ptr(H), ptr(AQ), ptr(AS), ptr(Y),
            ctypes.c_int(1 if act.clamped else 0), ctypes.c_float(act.alpha), ctypes.c_float(act.limit),
            ctypes.c_int(1 if weight_input else 0))
        self.touched(len(sel) * self.expert_bytes())
        return torch.from_numpy(out)

    def _scratch(self, rows: int):
        """Kernel work buffers, kept between calls (allocation would cost more than a decode step's math)."""
        have = getattr(self, "_buf", None)
        if have is None or have[0].shape[0] < rows:
            have = self._buf = kernel_scratch(self.d, self.inter, max(rows, 16))
        return have

    def _cpu_float(self, x_h, tok, sel, counts, wts, act, weight_input):
        x_h = x_h.to(self.dtype)
        out = torch.zeros_like(x_h)
        a = 0
        for e, c in zip(sel.tolist(), counts.tolist()):
            r, ws = tok[a:a + c], wts[a:a + c, None]
            a += c
            out.index_add_(0, r, expert_ffn(x_h[r], ws, self.gu[e], self.dn[e],
                                            None if self.gu_b is None else self.gu_b[e].to(self.dtype),
                                            None if self.dn_b is None else self.dn_b[e].to(self.dtype),
                                            act, weight_input))
        return out

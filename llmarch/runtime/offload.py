"""Routed experts kept away from the GPU: quantized in host RAM (or memory-mapped from disk) and
computed on the CPU, only the selected ones, with all cores at once (moe_cpu.c); dense layers,
attention, router and shared experts stay on the GPU.

    --experts gpu|cpu|disk   where the routed experts live (default: gpu when they fit, else cpu)
    --expert-bits 16|8|4     16: the model dtype; 8: int8, one fp16 scale per 64 inputs;
                             4: int4, fp16 scale + min per 64 inputs (4.5 bits per weight)
    --gpu-experts N          the N most used experts of each layer (counted while running) also
                             get a float copy on the GPU and are computed there

Per step of one layer: the router's choice comes to the host (the one sync), the GPU share (shared
expert, hot experts) is queued first so it runs while the CPU computes the rest, then the CPU
result goes back and is added.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmarch.errors import LlmarchError
from llmarch.runtime.ops.moe import MoE, ResidentExperts, group_by_expert

G = 64  # quantization group along the input dim (moe_cpu.c's G)


# ----------------------------------------------------------------------------- quantization

def quantize(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] float -> (q, scales) in moe_cpu.c's layouts (K must be a multiple of 64)."""
    *lead, N, K = w.shape
    if K % G:
        raise LlmarchError(f"--expert-bits {bits}: expert input width {K} is not a multiple of {G}")
    g = w.float().reshape(*lead, N, K // G, G)
    if bits == 8:
        s = g.abs().amax(-1) / 127.0
        q = torch.round(g / s.clamp(min=1e-12)[..., None]).clamp(-127, 127).to(torch.int8)
        return q.reshape(*lead, N, K), s.half()
    lo, hi = g.amin(-1), g.amax(-1)
    s = ((hi - lo) / 15.0).half()
    m = lo.half()
    q = torch.round((g - m.float()[..., None]) / s.float().clamp(min=1e-12)[..., None]).clamp(0, 15).to(torch.uint8)
    packed = q[..., : G // 2] | (q[..., G // 2:] << 4)  # byte j: element j (low), j + 32 (high)
    return packed.reshape(*lead, N, K // 2), torch.stack([s, m], dim=-1).reshape(*lead, N, 2 * (K // G))


def dequantize(q: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of quantize() (float32), for GPU-hot experts and for tests."""
    *lead, N, _ = q.shape
    if bits == 8:
        K = q.shape[-1]
        return (q.float().reshape(*lead, N, K // G, G) * s.float()[..., None]).reshape(*lead, N, K)
    K = q.shape[-1] * 2
    b = q.reshape(*lead, N, K // G, G // 2)
    v = torch.cat([b & 15, b >> 4], dim=-1).float()
    sm = s.float().reshape(*lead, N, K // G, 2)
    return (v * sm[..., 0:1] + sm[..., 1:2]).reshape(*lead, N, K)


# ----------------------------------------------------------------------------- the C kernel

_LIB = None


def cpu_kernel():
    """Build moe_cpu.c once per machine (keyed by source + CPU model) and load it."""
    global _LIB
    if _LIB is not None:
        return _LIB
    src = Path(__file__).with_name("moe_cpu.c")
    cpu = next((l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")), "")
    key = hashlib.sha1(src.read_bytes() + cpu.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("LLMARCH_CACHE", Path(tempfile.gettempdir()) / "llmarch"))
    cache.mkdir(parents=True, exist_ok=True)
    so = cache / f"moe_cpu_{key}.so"
    if not so.exists():
        cc = os.environ.get("CC", "gcc")
        tmp = so.with_suffix(f".{os.getpid()}.so")
        try:
            subprocess.run([cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(tmp), "-lm"],
                           check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise LlmarchError(f"--expert-bits 8/4 on the CPU needs a C compiler ({cc}) to build its kernel: {e}") from e
        tmp.replace(so)
    lib = ctypes.CDLL(str(so))
    lib.moe_experts.restype = None
    _LIB = lib
    return lib


def _p(t: torch.Tensor | None):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


# ----------------------------------------------------------------------------- stores

@dataclass
class Placement:
    experts: str = "gpu"  # gpu | cpu | disk
    bits: int = 16
    gpu_experts: int = 0
    disk_dir: str | None = None


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
        if place.experts == "disk":
            self._to_disk(Path(place.disk_dir or tempfile.mkdtemp(prefix="llmarch-experts-")))
        self.hot_n = place.gpu_experts
        self.counts = np.zeros(self.E, dtype=np.int64)
        self.hot: dict[int, tuple] = {}
        self.calls = 0
        self.bytes_read = 0  # host expert bytes touched (each selected expert once per step)
        self.device = None

    def _to_disk(self, folder: Path) -> None:
        """Write this layer's quantized experts to one file and map it back: RSS holds only what is touched."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"layer{self.index}.bin"
        parts = [t for t in (self.gu, self.gu_s, self.dn, self.dn_s) if t is not None]
        with open(path, "wb") as f:
            for t in parts:
                f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
        mm = np.memmap(path, dtype=np.uint8, mode="r")
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

    def expert_bytes(self) -> int:
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

    def forward(self, x, idx, w, act, weight_input: bool = False):
        self.device = x.device
        idx_h, w_h = idx.cpu(), w.float().cpu()  # the one sync per layer
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
        x_h = x.float().cpu()
        y = self._cpu(x_h, cold, w_h, act, weight_input)
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
            xs = x[r] * ws.to(x.dtype) if weight_input else x[r]
            h = F.linear(xs, gu, None if self.gu_b is None else self.gu_b[e].to(x.device, x.dtype))
            y = F.linear(act(h), dn, None if self.dn_b is None else self.dn_b[e].to(x.device, x.dtype))
            out.index_add_(0, r, y if weight_input else y * ws.to(y.dtype))
        return out

    def _cpu(self, x_h, idx_h, w_h, act, weight_input):
        keep = idx_h >= 0
        if not keep.any():
            return None
        tok, slot = keep.nonzero(as_tuple=True)
        experts = idx_h[tok, slot]
        order = torch.argsort(experts, stable=True)
        tok, experts, wts = tok[order], experts[order], w_h[tok[order], slot[order]]
        sel, counts = torch.unique_consecutive(experts, return_counts=True)
        self.bytes_read += len(sel) * self.expert_bytes()
        if self.bits == 16:
            return self._cpu_float(x_h, tok, sel, counts, wts, act, weight_input)
        start = torch.zeros(len(sel) + 1, dtype=torch.int32)
        start[1:] = counts.cumsum(0)
        rows, d, I = len(tok), self.d, self.inter
        out = torch.zeros_like(x_h)
        f32 = lambda *s: torch.empty(*s, dtype=torch.float32)  # noqa: E731
        XR, XS, H, A, AS, Y = f32(rows, d), f32(rows, d // G), f32(rows, 2 * I), f32(rows, I), f32(rows, max(I // G, 1)), f32(rows, d)
        sel64, tok32, wts = sel.to(torch.int64).contiguous(), tok.to(torch.int32).contiguous(), wts.float().contiguous()
        cpu_kernel().moe_experts(
            ctypes.c_int(self.bits), ctypes.c_int(len(sel)), _p(sel64), _p(start), _p(tok32), _p(wts),
            _p(x_h), _p(out), ctypes.c_int(d), ctypes.c_int(I),
            _p(self.gu), _p(self.gu_s), _p(self.dn), _p(self.dn_s), _p(self.gu_b), _p(self.dn_b),
            _p(XR), _p(XS), _p(H), _p(A), _p(AS), _p(Y),
            ctypes.c_int(1 if act.clamped else 0), ctypes.c_float(act.alpha), ctypes.c_float(act.limit),
            ctypes.c_int(1 if weight_input else 0), ctypes.c_int(x_h.shape[0]))
        return out

    def _cpu_float(self, x_h, tok, sel, counts, wts, act, weight_input):
        x_h = x_h.to(self.dtype)
        out = torch.zeros_like(x_h)
        a = 0
        for e, c in zip(sel.tolist(), counts.tolist()):
            r, ws = tok[a:a + c], wts[a:a + c, None]
            a += c
            xs = x_h[r] * ws.to(x_h.dtype) if weight_input else x_h[r]
            h = F.linear(xs, self.gu[e], None if self.gu_b is None else self.gu_b[e].to(self.dtype))
            y = F.linear(act(h), self.dn[e], None if self.dn_b is None else self.dn_b[e].to(self.dtype))
            out.index_add_(0, r, y if weight_input else y * ws.to(y.dtype))
        return out


class QuantGPUExperts(ResidentExperts):
    """--experts gpu with 8/4-bit: quantized on the GPU, each used expert dequantized as it is needed."""

    def __init__(self, moe: MoE, gate_up, down, biases, place: Placement, dtype, device):
        nn.Module.__init__(self)
        self.bits, self.dtype = place.bits, dtype
        self.q = [t.to(device) for t in (*quantize(gate_up, place.bits), *quantize(down, place.bits))]
        self.gate_up_bias = None if biases[0] is None else biases[0].to(device, dtype)
        self.down_bias = None if biases[1] is None else biases[1].to(device, dtype)

    def forward(self, x, idx, w, act, weight_input: bool = False):
        out = torch.zeros_like(x)
        rows, ws, segs = group_by_expert(idx, w)
        gq, gs, dq, ds = self.q
        for e, a, b in segs:
            r = rows[a:b]
            xs = x[r] * ws[a:b, None].to(x.dtype) if weight_input else x[r]
            h = F.linear(xs, dequantize(gq[e], gs[e], self.bits).to(x.dtype),
                         None if self.gate_up_bias is None else self.gate_up_bias[e])
            y = F.linear(act(h), dequantize(dq[e], ds[e], self.bits).to(x.dtype),
                         None if self.down_bias is None else self.down_bias[e])
            out.index_add_(0, r, y if weight_input else y * ws[a:b, None].to(y.dtype))
        return out


def store_factory(place: Placement, dtype, device):
    def make(moe: MoE, gate_up, down, biases):
        if place.experts == "gpu" and place.bits == 16:
            ex = ResidentExperts(moe.E, moe.d, moe.inter, biases[0] is not None).to_empty(device=device)
            with torch.no_grad():
                ex.gate_up = nn.Parameter(gate_up.to(device, dtype), requires_grad=False)
                ex.down = nn.Parameter(down.to(device, dtype), requires_grad=False)
                if biases[0] is not None:
                    ex.gate_up_bias = nn.Parameter(biases[0].to(device, dtype), requires_grad=False)
                    ex.down_bias = nn.Parameter(biases[1].to(device, dtype), requires_grad=False)
            return ex
        if place.experts == "gpu":
            return QuantGPUExperts(moe, gate_up, down, biases, place, dtype, device)
        return OffloadedExperts(moe, gate_up, down, biases, place, dtype)
    return make

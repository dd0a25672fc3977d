"""Routed experts kept away from the GPU: quantized in host RAM (or memory-mapped from disk) and
computed on the CPU, only the selected ones, with all cores at once (moe_cpu.c); dense layers,
attention, router and shared experts stay on the GPU.

    --experts gpu|cpu|disk   where the routed experts live (default: gpu when they fit, else cpu)
    --expert-bits 16|8|4     16: the model dtype; 8: int8, one fp16 scale per 64 inputs;
                             4: int4, fp16 scale + min per 64 inputs (4.5 bits per weight);
                             not given, on the CPU, for gpt-oss's MXFP4 experts: kept as shipped
                             (MXFP4 = bits 2 internally: 4.25 bits per weight)
    --gpu-experts N          the N most used experts of each layer (counted while running) also
                             get a float copy on the GPU and are computed there

Per step of one layer: the router's choice comes to the host (the one sync), the GPU share (shared
expert, hot experts) is queued first so it runs while the CPU computes the rest, then the CPU
result goes back and is added.
"""

from __future__ import annotations

import atexit
import ctypes
import mmap
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmarch.errors import LlmarchError
from llmarch.runtime.cbuild import build
from llmarch.runtime.ops.moe import MoE, ResidentExperts, expert_ffn, group_by_expert

G = 64  # quantization group along the input dim (moe_cpu.c's G)
MXFP4 = 2  # the `bits` code of gpt-oss's experts kept as shipped (moe_cpu.c's third layout)
FORMAT = {16: "16-bit", 8: "int8", 4: "int4", MXFP4: "mxfp4"}


# ----------------------------------------------------------------------------- quantization

def quantize(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] float -> (q, scales) in moe_cpu.c's layouts (K must be a multiple of 64)."""
    *lead, N, K = w.shape
    if K % G or K > 1024 * G:  # moe_cpu.c keeps a row's group factors on the stack (1024 groups)
        raise LlmarchError(f"--expert-bits {bits}: expert input width {K} is not a multiple of {G} up to {1024 * G}")
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


def fake_quant_activations(x: torch.Tensor) -> torch.Tensor:
    """What moe_cpu.c does to its inputs (x, and the activation before the down projection): round to
    int8 per group of 64 with scale max|x|/127, then back to float. For tests and error estimates."""
    g = x.float().reshape(*x.shape[:-1], -1, G)
    d = g.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(g * inv) * d).reshape(x.shape)


def dequantize(q: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of quantize() (float32), for GPU-hot experts and for tests; MXFP4 rows too."""
    *lead, N, _ = q.shape
    if bits == MXFP4:
        from llmarch.runtime.moe_names import mxfp4_dequant

        return mxfp4_dequant(q.reshape(*lead, N, -1, 16), s)
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
    """moe_cpu.c, built for this CPU (-march=native) on first use."""
    global _LIB
    if _LIB is None:
        try:
            _LIB = build("moe_cpu", Path(__file__).with_name("moe_cpu.c").read_text(), ["-O3", "-march=native", "-fopenmp"])
        except (OSError, subprocess.SubprocessError) as e:
            raise LlmarchError(f"--expert-bits 8/4 on the CPU needs a C compiler ({os.environ.get('CC', 'cc')}) "
                               f"to build its kernel: {e}") from e
        _LIB.moe_experts.restype = _LIB.moe_decode.restype = None
    return _LIB


def kernel_scratch(d: int, I: int, rows: int) -> tuple:
    """moe_experts' work buffers for `rows` (expert, token) pairs: XQ, XS, H, AQ, AS, Y."""
    return (np.empty((rows, d), np.int8), np.empty((rows, 2 * (d // G)), np.float32), np.empty((rows, 2 * I), np.float32),
            np.empty((rows, I), np.int8), np.empty((rows, 2 * max(I // G, 1)), np.float32), np.empty((rows, d), np.float32))


def ptr(t) -> ctypes.c_void_p:
    """The address of a torch tensor or numpy array for the kernel (NULL for None)."""
    if t is None:
        return ctypes.c_void_p(0)
    return ctypes.c_void_p(t.ctypes.data if isinstance(t, np.ndarray) else t.data_ptr())


# ----------------------------------------------------------------------------- stores

class DiskCache:
    """--experts disk: expert pages read through the file mappings count in RSS until dropped. Once
    the bytes touched since the last drop pass the budget, every mapping is told MADV_DONTNEED: the
    pages leave the process (the kernel's page cache may keep them; a later touch maps them back)."""

    def __init__(self, budget: int):
        self.budget, self.touched, self.maps, self.drops = budget, 0, [], 0

    def add(self, mm) -> None:
        self.maps.append(mm)

    def touch(self, nbytes: int) -> None:
        self.touched += nbytes
        if self.touched > self.budget:
            for mm in self.maps:
                mm._mmap.madvise(mmap.MADV_DONTNEED)
            self.touched, self.drops = 0, self.drops + 1


@dataclass
class Placement:
    experts: str = "gpu"  # gpu | cpu | disk
    bits: int = 16
    gpu_experts: int = 0
    disk_dir: str | None = None
    disk_cache: DiskCache | None = None


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
            out.index_add_(0, r, expert_ffn(x[r], ws[a:b, None], dequantize(gq[e], gs[e], self.bits).to(x.dtype),
                                            dequantize(dq[e], ds[e], self.bits).to(x.dtype),
                                            None if self.gate_up_bias is None else self.gate_up_bias[e],
                                            None if self.down_bias is None else self.down_bias[e], act, weight_input))
        return out


def store_factory(place: Placement, dtype, device):
    def make(moe: MoE, gate_up, down, biases, mxfp4=None):
        if place.bits == MXFP4:  # blocks [E, rows, K/32, 16] as rows of K/2 bytes, e8m0 scales [E, rows, K/32]
            if moe.d % G or moe.inter % G:
                raise LlmarchError(f"MXFP4 experts on the CPU need widths that are multiples of {G} (hidden {moe.d}, "
                                   f"expert {moe.inter}); use --expert-bits 16")
            if mxfp4 is None:
                raise LlmarchError(f"layer {moe.index}: experts are not MXFP4 like the other layers'; use --expert-bits 16")
            gub, gus, dnb, dns = mxfp4
            parts = (gub.reshape(*gub.shape[:2], -1), gus, dnb.reshape(*dnb.shape[:2], -1), dns)
            st = OffloadedExperts.from_quantized(moe, parts, place, dtype, biases)
            st._maybe_to_disk(place)
            return st
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
    make.keeps_mxfp4 = place.bits == MXFP4  # read_moe hands over the blocks instead of dequantizing
    return make


# ----------------------------------------------------------------------------- placement, memory, report

GiB = 2**30


def _host_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def expert_bytes(spec, bits: int, dtype_bytes: int = 2) -> tuple[int, int]:
    """(bytes of all routed experts at `bits`, bytes of everything else at the model dtype)."""
    m = spec.moe
    inter = m.expert_ffn or spec.intermediate_size
    n_moe = sum(1 for l in spec.schedule if l.ffn == "moe")
    routed = n_moe * m.experts * 3 * spec.hidden_size * inter
    per_weight = {16: dtype_bytes, 8: 1 + 2 / G, 4: 0.5 + 4 / G, MXFP4: 0.5 + 1 / 32}[bits]
    total = spec.params.get("total") or routed
    dense = max(total - routed - spec.params.get("mtp", 0), 0)
    return int(routed * per_weight), int(dense * dtype_bytes)


def plan(spec, device: torch.device, dtype, experts: str | None, bits: int | None, gpu_experts: int = 0,
         cache_gib: float = 2.0, disk_dir: str | None = None, mxfp4: bool = False) -> Placement:
    """Check the options and that the placement fits; the default puts experts on the GPU when they fit.
    mxfp4: the checkpoint's experts are MXFP4; without --expert-bits they stay so on the CPU/disk."""
    keep_mxfp4 = mxfp4 and bits is None
    bits = 16 if bits is None else bits
    if bits not in (16, 8, 4):
        raise LlmarchError(f"--expert-bits must be 16, 8 or 4, got {bits}")
    if experts not in (None, "gpu", "cpu", "disk"):
        raise LlmarchError(f"--experts must be gpu, cpu or disk, got {experts!r}")
    if gpu_experts < 0:
        raise LlmarchError(f"--gpu-experts must be >= 0, got {gpu_experts}")
    if not cache_gib >= 0:
        raise LlmarchError(f"--expert-cache-gib must be >= 0, got {cache_gib}")
    dbytes = torch.empty(0, dtype=dtype).element_size()
    routed, dense = expert_bytes(spec, bits, dbytes)
    on_gpu = device.type == "cuda"
    dev_free = torch.cuda.mem_get_info(device)[0] if on_gpu else _host_available()
    host_free = _host_available()
    where = "the GPU" if on_gpu else "host RAM"
    if experts is None:
        experts = "gpu" if routed + dense < 0.9 * dev_free else "cpu"
    if keep_mxfp4 and experts != "gpu":
        bits = MXFP4
        routed = expert_bytes(spec, bits, dbytes)[0]
    hot = gpu_experts * routed // max(spec.moe.experts, 1)
    need_dev = dense + (routed if experts == "gpu" else hot)
    if need_dev > dev_free:
        fits = [f"--expert-bits {b}" for b in (8, 4) if b < bits and expert_bytes(spec, b, dbytes)[0] + dense < dev_free]
        alt = f"; would fit: --experts gpu {' or '.join(fits)}" if fits and experts == "gpu" else ""
        if experts == "gpu" and dense < dev_free:
            alt += f"; or --experts cpu ({routed / GiB:.1f} GiB of experts in host RAM, {host_free / GiB:.1f} GiB free)"
        raise LlmarchError(f"not enough memory for --experts {experts} --expert-bits {bits}: needs {need_dev / GiB:.1f} GiB "
                           f"on {where} (dense {dense / GiB:.1f} GiB + experts), {dev_free / GiB:.1f} GiB free{alt}")
    if experts == "cpu" and on_gpu and routed > host_free:
        raise LlmarchError(f"not enough host RAM for --experts cpu ({FORMAT[bits]} experts): experts need {routed / GiB:.1f} GiB, "
                           f"{host_free / GiB:.1f} GiB free; try --expert-bits 4 or --experts disk")
    cache = DiskCache(int(cache_gib * GiB)) if experts == "disk" and hasattr(mmap, "MADV_DONTNEED") else None
    folder = None
    if experts == "disk":  # one fresh folder per run inside --expert-dir, removed at exit
        try:
            if disk_dir is not None:
                Path(disk_dir).mkdir(parents=True, exist_ok=True)
            folder = tempfile.mkdtemp(prefix="llmarch-experts-", dir=disk_dir)
        except OSError as e:
            raise LlmarchError(f"--expert-dir: cannot create a folder for the expert files: {e.strerror}",
                               disk_dir or tempfile.gettempdir()) from e
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return Placement(experts, bits, gpu_experts, folder, cache)


def attach(model, place: Placement, dtype, device) -> None:
    for m in model.modules():
        if isinstance(m, MoE):
            m.store_factory = store_factory(place, dtype, device)


def offloaded(model) -> list[OffloadedExperts]:
    return [m for m in model.modules() if isinstance(m, OffloadedExperts)]


def host_read_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Bytes/s that all cores read from host RAM: a float32 sum over a buffer far larger than caches."""
    t = torch.ones(nbytes // 4, dtype=torch.float32)
    t.sum()
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        t.sum()
        best = max(best, nbytes / (time.perf_counter() - t0))
    return best


def report(model, steps: int, decode_s: float, device, bandwidth: float | None = None) -> dict:
    """tok/s, host expert bytes read per decode token, the bandwidth bound and the fraction reached."""
    import resource

    stores = offloaded(model)
    per_tok = sum(s.bytes_read for s in stores) / max(steps, 1)
    tok_s = steps / decode_s if decode_s > 0 else 0.0
    out = {"decode_tok_s": round(tok_s, 2), "expert_format": FORMAT[stores[0].bits] if stores else None,
           "expert_bytes_per_token": int(per_tok),
           "host_rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}
    if device.type == "cuda":
        out["gpu_peak_mib"] = torch.cuda.max_memory_allocated(device) // 2**20
    if stores and per_tok:
        bw = bandwidth or host_read_bandwidth()
        out["host_read_gb_s"] = round(bw / 1e9, 1)
        out["bound_tok_s"] = round(bw / per_tok, 2)
        out["fraction_of_bound"] = round(tok_s / (bw / per_tok), 3)
    return out


def reset_counters(model) -> None:
    for s in offloaded(model):
        s.bytes_read = 0

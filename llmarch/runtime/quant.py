"""GGML block formats dequantized in torch (vectorised over blocks), and weight-only int8/int4
linear layers for --keep-quantized.

gguf.quants does the same in single-threaded numpy; torch is several times faster on the 270M
Gemma file and runs on the GPU too. Layouts follow ggml-quants.c (block_q4_0, block_q4_K, ...).
"""

from __future__ import annotations

import torch
from torch import nn

from llmarch.errors import LlmarchError
from llmarch.runtime import cpu_kernels

QK_K = 256
# type name -> (elements per block, bytes per block)
BLOCKS = {
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}
PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SUPPORTED = sorted(set(BLOCKS) | set(PLAIN))


def _f16(b: torch.Tensor, start: int) -> torch.Tensor:
    """A little-endian float16 at byte `start` of every block, as float32 [n, 1]."""
    return b[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32]: low nibbles are elements 0..15, high nibbles 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits32(b: torch.Tensor, start: int) -> torch.Tensor:
    """The 32 bits of a little-endian uint32 at byte `start`, as uint8 [n, 32] (bit j = element j)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device)
    return ((b[:, start : start + 4, None] >> shifts) & 1).reshape(-1, 32)


def _scale_min_k4(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins (get_scale_min_k4)."""
    sc = sc.long()
    lo_s, lo_m = sc[:, 0:4] & 63, sc[:, 4:8] & 63
    hi_s = (sc[:, 8:12] & 0x0F) | ((sc[:, 0:4] >> 6) << 4)
    hi_m = (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)
    return torch.cat([lo_s, hi_s], 1).float(), torch.cat([lo_m, hi_m], 1).float()


def _q8_0(b):
    return _f16(b, 0) * b[:, 2:34].contiguous().view(torch.int8).float()


def _q4_0(b):
    return _f16(b, 0) * (_nibbles(b[:, 2:18]).float() - 8)


def _q4_1(b):
    return _f16(b, 0) * _nibbles(b[:, 4:20]).float() + _f16(b, 2)


def _q5_0(b):
    q = _nibbles(b[:, 6:22]) | (_bits32(b, 2) << 4)
    return _f16(b, 0) * (q.float() - 16)


def _q5_1(b):
    q = _nibbles(b[:, 8:24]) | (_bits32(b, 4) << 4)
    return _f16(b, 0) * q.float() + _f16(b, 2)


def _k4_body(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes -> 256 values: each 32-byte chunk gives 32 low nibbles then 32 high nibbles."""
    q = qs.view(-1, 4, 32)
    return torch.stack([q & 0x0F, q >> 4], dim=2).reshape(-1, 8, 32)


def _q4_k(b):
    d, dmin = _f16(b, 0), _f16(b, 2)
    s, m = _scale_min_k4(b[:, 4:16])
    q = _k4_body(b[:, 16:144]).float()
    return (d[:, :, None] * s[:, :, None] * q - dmin[:, :, None] * m[:, :, None]).reshape(-1, QK_K)


def _q5_k(b):
    d, dmin = _f16(b, 0), _f16(b, 2)
    s, m = _scale_min_k4(b[:, 4:16])
    qh = b[:, 16:48]  # bit i of qh[l] is the 5th bit of value l of sub-block i
    high = torch.stack([(qh >> i) & 1 for i in range(8)], dim=1)  # [n, 8 sub-blocks, 32]
    q = _k4_body(b[:, 48:176]) | (high << 4)
    return (d[:, :, None] * s[:, :, None] * q.float() - dmin[:, :, None] * m[:, :, None]).reshape(-1, QK_K)


def _q6_k(b):
    ql, qh = b[:, 0:128], b[:, 128:192]
    sc = b[:, 192:208].contiguous().view(torch.int8).float()  # 16 scales, one per 16 values
    d = _f16(b, 208)
    out = []
    for half in range(2):
        l = ql[:, 64 * half : 64 * half + 64]
        h = qh[:, 32 * half : 32 * half + 32]
        out += [
            (l[:, :32] & 0x0F) | ((h & 3) << 4),
            (l[:, 32:] & 0x0F) | (((h >> 2) & 3) << 4),
            (l[:, :32] >> 4) | (((h >> 4) & 3) << 4),
            (l[:, 32:] >> 4) | (((h >> 6) & 3) << 4),
        ]
    q = torch.cat(out, dim=1).float() - 32  # [n, 256], uint8 until here
    return (d * sc).repeat_interleave(16, dim=1) * q


_DEQUANT = {
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


def dequantize(raw: torch.Tensor, qtype: str, shape: tuple[int, ...], chunk_blocks: int | None = None) -> torch.Tensor:
    """raw: uint8 bytes of one tensor -> float32 tensor of `shape` (chunked to bound temporaries:
    on a GPU in larger chunks, where each chunk's ten-odd ops cost a launch each)."""
    if chunk_blocks is None:
        chunk_blocks = 1 << 16 if raw.device.type == "cpu" else 1 << 20
    if qtype in PLAIN:
        return raw.view(PLAIN[qtype]).reshape(shape).float()
    if qtype not in BLOCKS:
        raise LlmarchError(
            f"GGUF quant type {qtype} is not supported by llmarch run (supported: {', '.join(SUPPORTED)})"
        )
    per, nbytes = BLOCKS[qtype]
    blocks = raw.view(-1, nbytes)
    out = torch.empty(blocks.shape[0], per, dtype=torch.float32, device=raw.device)
    fn = _DEQUANT[qtype]
    for i in range(0, blocks.shape[0], chunk_blocks):
        out[i : i + chunk_blocks] = fn(blocks[i : i + chunk_blocks])
    return out.reshape(shape)


# ----------------------------------------------------------------------------- keep-quantized


GROUP = 32  # values per scale, as llama.cpp's Q8_0 / Q4_0 (and the C kernel's block)


class BlockQuantLinear(nn.Module):
    """Weight-only 8- or 4-bit linear, one float scale per 32 weights of a row (symmetric, like
    Q8_0 / Q4_0). On AVX2 CPUs the C kernel multiplies with int8-quantized activation blocks
    (decode steps); otherwise, and for long prefills, slabs of rows are dequantized for a float GEMM.

    4-bit rows pack each block as 16 bytes: value i in the low nibble of byte i, value i + 16 in
    the high nibble, stored + 8 (the Q4_0 layout).
    """

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, bits: int = 8, rows=None):
        """weight [out, in]; or weight None and rows = (fetch(start, stop) -> float rows, out, in, device),
        so a big table (a tied 262k-row embedding) is never held in float all at once."""
        super().__init__()
        if weight is not None:
            out_f, in_f = weight.shape
            device = weight.device
            fetch = lambda a, b: weight[a:b]  # noqa: E731
        else:
            fetch, out_f, in_f, device = rows
        qmax = 127 if bits == 8 else 7
        packed = torch.empty(
            out_f, in_f if bits == 8 else in_f // 2, dtype=torch.int8 if bits == 8 else torch.uint8, device=device
        )
        scales = torch.empty(out_f, in_f // GROUP, dtype=torch.float32, device=device)
        step = max(1, (1 << 22) // in_f)  # rows at a time: float temporaries stay ~16 MB, not the table's size
        for i in range(0, out_f, step):
            w = fetch(i, min(i + step, out_f)).to(device).float().reshape(-1, in_f // GROUP, GROUP)
            scale = w.abs().amax(-1) / qmax
            q = torch.round(w / torch.where(scale > 0, scale, 1.0)[..., None]).clamp(-qmax - (bits == 4), qmax)
            scales[i : i + step] = scale
            if bits == 8:
                packed[i : i + step] = q.to(torch.int8).reshape(-1, in_f)
            else:
                u = (q + 8).to(torch.uint8)  # [rows, blocks, 32] in 0..15
                packed[i : i + step] = (u[..., :16] | (u[..., 16:] << 4)).reshape(-1, in_f // 2)
        self.register_buffer("qweight", packed)
        self.register_buffer("scales", scales)  # [N, in / 32]
        self.bits = bits
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = out_f, in_f

    def dequantize_rows(self, rows, dtype) -> torch.Tensor:
        q = self.qweight[rows]  # rows: a slice or a 1-D index tensor -> [n, row bytes]
        n = q.shape[0]
        if self.bits == 4:
            b = q.view(n, -1, 16)
            q = torch.cat([b & 0x0F, b >> 4], dim=-1).to(torch.int16) - 8
        scale = self.scales[rows].reshape(n, -1, 1).to(dtype)
        return (q.reshape(n, -1, GROUP).to(dtype) * scale).reshape(n, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        T = x2.shape[0]
        if x2.device.type == "cpu" and x2.dtype == torch.float32 and T <= 8 and cpu_kernels.available():
            y = cpu_kernels.qmatmul(x2, self.qweight, self.scales, self.bits, None)
        else:  # dequantize a slab of rows at a time and use the float GEMM
            y = torch.empty(T, self.out_features, dtype=x2.dtype, device=x2.device)
            step = max(1, (1 << 22) // self.in_features)
            for i in range(0, self.out_features, step):
                y[:, i : i + step] = x2 @ self.dequantize_rows(slice(i, i + step), x2.dtype).t()
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def row(self, ids: torch.Tensor, dtype) -> torch.Tensor:
        """Embedding lookup from the same table (tied embeddings share it with the head)."""
        flat = ids.reshape(-1)
        return self.dequantize_rows(flat, dtype).reshape(*ids.shape, self.in_features)


def quantize_linear(mod: nn.Linear, bits: int) -> nn.Module:
    if mod.in_features % GROUP:
        return mod  # no whole blocks: keep this one in float
    return BlockQuantLinear(mod.weight.data, mod.bias.data if mod.bias is not None else None, bits)

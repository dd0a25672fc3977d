"""Expert formats: what the bytes of a stored expert mean, in moe_cpu.c's layouts.

The quantized formats group G = 64 inputs: int8 has one fp16 scale per group (w = q * scale); int4
packs a group in 32 bytes with an fp16 scale and min (w = q * scale + min, 4.5 bits per weight);
MXFP4 is gpt-oss's as shipped (32 fp4 e2m1 codes per block and one e8m0 scale: 4.25 bits per
weight). The "gguf" formats are a GGUF's ggml blocks as stored, read by the kernel from the file's
memory map: Q8_0, Q4_0 and MXFP4 (32 weights and their scale per block: 8.5, 4.5 and 4.25 bits per
weight) and the K-quants Q4_K, Q5_K, Q6_K (256 weights per super-block with a scale, and for
Q4_K / Q5_K a min, per 32 or 16 of them: 4.5, 5.5 and 6.5625 bits per weight).
"""

from __future__ import annotations

from enum import Enum

import torch

from llmarch.checkpoint.gguf_constants import GGML_QUANT_SIZES, GGMLQuantizationType
from llmarch.errors import LlmarchError
from llmarch.plan.memory import EXPERT_BYTES_PER_WEIGHT, EXPERT_GROUP
from llmarch.runtime.quant import dequantize as ggml_dequantize

G = EXPERT_GROUP  # quantization group along the input dim (moe_cpu.c's G)


class ExpertFormat(Enum):
    """How a layer's routed experts are stored; the value names it in the offload report."""

    FLOAT = "16-bit"  # not quantized: the model's dtype (--expert-bits 16)
    INT8 = "int8"  # --expert-bits 8
    INT4 = "int4"  # --expert-bits 4
    MXFP4 = "mxfp4"  # gpt-oss's experts kept as shipped: on the CPU or disk when --expert-bits is not given
    Q8_0 = "gguf q8_0"  # a GGUF's expert blocks as stored, likewise
    Q4_0 = "gguf q4_0"
    GGUF_MXFP4 = "gguf mxfp4"  # ggml's MXFP4 block (gpt-oss GGUFs): e8m0 scale then 16 bytes, as Q4_0's
    Q4_K = "gguf q4_k"
    Q5_K = "gguf q5_k"
    Q6_K = "gguf q6_k"

    @classmethod
    def from_bits(cls, bits: int) -> ExpertFormat:
        """The format --expert-bits 16|8|4 asks for."""
        for fmt, b in _EXPERT_BITS.items():
            if b == bits:
                return fmt
        raise LlmarchError(f"--expert-bits must be 16, 8 or 4, got {bits}")

    @property
    def option(self) -> str:
        """The command line that gives this format, for messages."""
        bits = _EXPERT_BITS.get(self)
        if bits:
            return f"--expert-bits {bits}"
        return f"without --expert-bits ({self.stored_as} as {'stored' if self.ggml_type else 'shipped'})"

    @property
    def stored_as(self) -> str:
        """What the checkpoint calls this format ("MXFP4", "Q8_0", ...)."""
        return self.ggml_type or self.name

    @property
    def ggml_type(self) -> str | None:
        """The GGUF block type this format reads as stored, or None."""
        return _GGML_TYPES.get(self)

    @property
    def stored(self) -> bool:
        """Read from the checkpoint's own bytes, not made by quantize()."""
        return self is ExpertFormat.MXFP4 or self.ggml_type is not None

    @property
    def block(self) -> tuple[int, int]:
        """A GGUF block format's (weights per block, bytes per block)."""
        return GGUF_BLOCKS[self.ggml_type or ""]

    @property
    def quantized(self) -> bool:
        return self is not ExpertFormat.FLOAT

    @property
    def kernel_code(self) -> int:
        """moe_cpu.c's number for this layout (its `bits` argument)."""
        return {
            ExpertFormat.INT8: 8,
            ExpertFormat.INT4: 4,
            ExpertFormat.MXFP4: 2,
            ExpertFormat.Q8_0: 16,
            ExpertFormat.Q4_0: 17,
            ExpertFormat.Q4_K: 18,
            ExpertFormat.Q5_K: 19,
            ExpertFormat.Q6_K: 20,
            ExpertFormat.GGUF_MXFP4: 21,
        }[self]

    def bytes_per_weight(self, dtype_bytes: int) -> float:
        """Stored bytes per weight, scales included; a float expert's are its dtype's (the table is
        llmarch.plan's, which sizes placements without torch)."""
        if self is ExpertFormat.FLOAT:
            return dtype_bytes
        if self.ggml_type:
            per, nbytes = self.block
            return nbytes / per
        return EXPERT_BYTES_PER_WEIGHT[_EXPERT_BITS.get(self, "mxfp4")]

    @classmethod
    def from_ggml(cls, ggml_type: str) -> ExpertFormat | None:
        """The format that reads a GGUF's blocks of this type as stored, or None (Q5_0, Q2_K, the IQ
        types and the rest: the kernel has no layout for them)."""
        return next((f for f in cls if f.ggml_type == ggml_type), None)


_EXPERT_BITS = {ExpertFormat.FLOAT: 16, ExpertFormat.INT8: 8, ExpertFormat.INT4: 4}
_GGML_TYPES = {
    ExpertFormat.Q8_0: "Q8_0",
    ExpertFormat.Q4_0: "Q4_0",
    ExpertFormat.GGUF_MXFP4: "MXFP4",
    ExpertFormat.Q4_K: "Q4_K",
    ExpertFormat.Q5_K: "Q5_K",
    ExpertFormat.Q6_K: "Q6_K",
}
# (weights, bytes) per block of the GGUF types the kernel reads, from gguf-py's table (quant.py's has
# no MXFP4: its torch dequantizer does not decode it; dequantize() below does, for experts)
GGUF_BLOCKS = {t: GGML_QUANT_SIZES[GGMLQuantizationType[t]] for t in _GGML_TYPES.values()}
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def mxfp4_dequant(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """OpenAI's MXFP4 (gpt-oss safetensors): 32 fp4 values per block, low nibble first, shared e8m0."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    b = blocks.to(torch.uint8)
    vals = torch.stack([lut[(b & 0x0F).long()], lut[(b >> 4).long()]], dim=-1)  # [..., G, 16, 2]
    vals = vals.reshape(*b.shape[:-1], 32) * torch.exp2(scales.to(torch.int32) - 127).float()[..., None]
    return vals.reshape(*b.shape[:-2], -1)


def quantize(w: torch.Tensor, fmt: ExpertFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] float -> (q, scales) in fmt's layout, INT8 or INT4 (K must be a multiple of 64)."""
    *lead, N, K = w.shape
    if K % G or K > 1024 * G:  # moe_cpu.c keeps a row's group factors on the stack (1024 groups)
        raise LlmarchError(f"{fmt.option}: expert input width {K} is not a multiple of {G} up to {1024 * G}")
    g = w.float().reshape(*lead, N, K // G, G)
    if fmt is ExpertFormat.INT8:
        s = g.abs().amax(-1) / 127.0
        q = torch.round(g / s.clamp(min=1e-12)[..., None]).clamp(-127, 127).to(torch.int8)
        return q.reshape(*lead, N, K), s.half()
    if fmt is not ExpertFormat.INT4:
        raise ValueError(f"quantize() writes int8 or int4, not {fmt}")
    lo, hi = g.amin(-1), g.amax(-1)
    s = ((hi - lo) / 15.0).half()
    m = lo.half()
    q = torch.round((g - m.float()[..., None]) / s.float().clamp(min=1e-12)[..., None]).clamp(0, 15).to(torch.uint8)
    packed = q[..., : G // 2] | (q[..., G // 2 :] << 4)  # byte j: element j (low), j + 32 (high)
    return packed.reshape(*lead, N, K // 2), torch.stack([s, m], dim=-1).reshape(*lead, N, 2 * (K // G))


def fake_quant_activations(x: torch.Tensor) -> torch.Tensor:
    """What moe_cpu.c does to its inputs (x, and the activation before the down projection): round to
    int8 per group of 64 with scale max|x|/127, then back to float. For tests and error estimates."""
    g = x.float().reshape(*x.shape[:-1], -1, G)
    d = g.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(g * inv) * d).reshape(x.shape)


def dequantize(q: torch.Tensor, s: torch.Tensor, fmt: ExpertFormat) -> torch.Tensor:
    """Inverse of quantize() (float32), for GPU-hot experts and for tests; MXFP4 and GGUF block rows too."""
    *lead, N, _ = q.shape
    if fmt.ggml_type:  # rows of blocks [..., N, K / per * block bytes]
        per, nbytes = fmt.block
        K = q.shape[-1] // nbytes * per
        if fmt is ExpertFormat.GGUF_MXFP4:  # per block: e8m0, then byte j = element j (low), j + 16 (high)
            b = q.contiguous().view(*lead, N, K // 32, 17)
            codes = torch.cat([b[..., 1:] & 0x0F, b[..., 1:] >> 4], dim=-1)
            return mxfp4_dequant(codes[..., 0::2] | (codes[..., 1::2] << 4), b[..., 0]).reshape(*lead, N, K)
        return ggml_dequantize(q.contiguous().view(-1), fmt.ggml_type, (*lead, N, K))
    if fmt is ExpertFormat.MXFP4:
        return mxfp4_dequant(q.reshape(*lead, N, -1, 16), s)
    if fmt is ExpertFormat.INT8:
        K = q.shape[-1]
        return q.float().reshape(*lead, N, K // G, G).mul_(s.float()[..., None]).reshape(*lead, N, K)
    K = q.shape[-1] * 2
    b = q.reshape(*lead, N, K // G, G // 2)
    v = torch.cat([b & 15, b >> 4], dim=-1).float()
    sm = s.float().reshape(*lead, N, K // G, 2)
    return v.mul_(sm[..., 0:1]).add_(sm[..., 1:2]).reshape(*lead, N, K)  # in place: one float32 copy at a time

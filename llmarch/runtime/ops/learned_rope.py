"""LeRoPE (Mistral Large 4): RoPE whose inverse frequencies are multiplied by exp(alpha), alpha a
learned vector of one entry per rotated pair, shared by every layer (rotary_emb.alpha; transformers
initialises it to 0, no change until it is loaded, and keeps it in float32). The Rope tables are
built from the scaled frequencies once the weights are loaded (rope.py's freq_scale).
"""

from __future__ import annotations

import torch
from torch import nn

from llmarch.arch.spec import ArchSpec
from llmarch.errors import LlmarchError


class LearnedRopeScale(nn.Module):
    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros((spec.attention.qk_rope_head_dim or 0) // 2))  # MLA's rope dims

    def factors(self) -> torch.Tensor:
        """exp(alpha) per pair, float32 on the CPU (where the tables are computed)."""
        return self.alpha.detach().float().cpu().exp()

    def load_from(self, source, prefix: str, dtype, device) -> None:
        name = f"{getattr(source, 'prefix', '')}rotary_emb.alpha"
        info = source.ckpt.tensors.get(name)
        if info is None:
            raise LlmarchError(f"weight missing: {name} (the learned RoPE frequency scale)", str(source.ckpt.path))
        t = source.read(info)
        if tuple(t.shape) != tuple(self.alpha.shape):
            raise LlmarchError(
                f"weight {info.name} has shape {tuple(t.shape)}, the spec needs {tuple(self.alpha.shape)} "
                "(one entry per rotated pair)",
                str(info.file),
            )
        if not torch.isfinite(t).all():
            raise LlmarchError(f"weight {info.name} is not finite", str(info.file))
        self.alpha = nn.Parameter(t.to(device=device, dtype=torch.float32), requires_grad=False)

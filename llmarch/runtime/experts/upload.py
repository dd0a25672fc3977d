"""A long prompt's host experts computed on the GPU instead of the CPU.

The CPU expert kernel is made for decode: a few rows per expert, bound by reading the weights. A
prompt of hundreds of tokens sends most experts of a layer dozens of rows each, which is matrix
work the host does at a small fraction of the GPU's speed (on the H200 machine a 512-token prompt
through 4 Qwen3-30B-A3B layers took 1.4 s on its 16 cores). Copying the layer's used experts over
PCIe in their stored (quantized) form, dequantizing them there and running the usual expert loop
costs about the copy: ~0.3 GB a Qwen3-30B-A3B layer in int4. llama.cpp does the same for batches
of 32 tokens and more. A decode step and short prompts stay on the CPU, where the bytes do not
move.

The experts go over in chunks whose dequantized (float32) size stays under CHUNK_BYTES, so the
extra GPU memory is bounded whatever the expert count; hot experts already on the GPU are used as
they are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from llmarch.runtime.experts.formats import dequantize
from llmarch.runtime.experts.stores import expert_loop, group_by_expert

if TYPE_CHECKING:
    from llmarch.runtime.experts.host import OffloadedExperts

UPLOAD_TOKENS = 32  # tokens in one call from which the experts go to the GPU (llama.cpp's batch threshold)
CHUNK_BYTES = 256 << 20  # float32 bytes of dequantized experts on the GPU at once


def worth_uploading(x: torch.Tensor) -> bool:
    """Whether this call's experts run on x's GPU: a prompt chunk of UPLOAD_TOKENS tokens or more."""
    return x.device.type == "cuda" and x.shape[0] >= UPLOAD_TOKENS


def experts_on(store: OffloadedExperts, ids: list[int], device) -> dict[int, tuple]:
    """Experts `ids` of the store as (gate_up, down, gate_up bias, down bias) in its dtype on
    `device`: the stored bytes of all of them copied in one go a part, dequantized there."""
    sel = torch.tensor(ids, dtype=torch.long)

    def moved(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.index_select(0, sel).to(device)

    if store.format.quantized:
        gu = dequantize(moved(store.gu), moved(store.gu_s), store.format)
        if store.up is not None:  # a GGUF's up rows apart from its gate rows
            gu = torch.cat([gu, dequantize(moved(store.up), None, store.up_format)], dim=-2)
        dn = dequantize(moved(store.dn), moved(store.dn_s), store.down_format)
    else:
        gu, dn = moved(store.gu), moved(store.dn)
    gu, dn = gu.to(store.dtype), dn.to(store.dtype)  # type: ignore[union-attr]
    gu_b, dn_b = moved(store.gu_b), moved(store.dn_b)
    return {
        e: (
            gu[i],
            dn[i],
            None if gu_b is None else gu_b[i].to(store.dtype),
            None if dn_b is None else dn_b[i].to(store.dtype),
        )
        for i, e in enumerate(ids)
    }


def compute_uploaded(
    store: OffloadedExperts, x: torch.Tensor, idx_h: torch.Tensor, w_h: torch.Tensor, act, weight_input: bool
) -> torch.Tensor:
    """The routed experts of idx_h [T, k] (host ids) weighted by w_h over x [T, d] on x's device."""
    rows, ws, segs = group_by_expert(idx_h, w_h, store.E)
    rows, ws = rows.to(x.device), ws.to(x.device)
    per = max(1, CHUNK_BYTES // (4 * (2 * store.inter * store.d + store.d * store.inter)))
    cold = [s for s in segs if s[0] not in store.hot]
    out = expert_loop(x, rows, ws, [s for s in segs if s[0] in store.hot], store.hot.__getitem__, act, weight_input)
    for i in range(0, len(cold), per):
        chunk = cold[i : i + per]
        weights = experts_on(store, [e for e, _, _ in chunk], x.device)
        out += expert_loop(x, rows, ws, chunk, weights.__getitem__, act, weight_input)
        del weights
    store.touched(len(cold) * store.expert_bytes())
    return out

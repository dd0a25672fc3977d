"""A long prompt's host experts computed on the GPU instead of the CPU.

The CPU expert kernel is made for decode: a few rows per expert, bound by reading the weights. A
prompt of hundreds of tokens sends most experts of a layer dozens of rows each, which is matrix
work the host does at a small fraction of the GPU's speed (on the H200 machine a 512-token prompt
through 4 Qwen3-30B-A3B layers took 1.4 s on its 16 cores). Copying the layer's used experts over
PCIe in their stored (quantized) form, dequantizing them there and multiplying there costs about
the copy: ~0.34 GB a Qwen3-30B-A3B layer in Q4_0. llama.cpp does the same for batches of 32 tokens
and more. A decode step and short prompts stay on the CPU, where the bytes do not move.

The experts go over in chunks of consecutive ids whose dequantized (float32) size stays under
UPLOAD_CHUNK_BYTES, and each stored part is dequantized and converted to the model's dtype before
the next, so the extra GPU memory is about that bound whatever the expert count (`llmarch fit`
shows it beside its plan: plan.memory.upload_chunk_bytes); a chunk's ids that form one range are
copied as one slice of the store (no gather on the host first). Hot experts already
on the GPU are used as they are. Where torch._grouped_mm runs (bf16 on sm90/sm100) a chunk's
experts are two grouped products; elsewhere the usual expert loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from llmarch.plan.memory import UPLOAD_CHUNK_BYTES, UPLOAD_TOKENS, upload_expert_bytes
from llmarch.runtime.experts.formats import dequantize
from llmarch.runtime.experts.stores import expert_loop, group_by_expert, grouped_mm_fits, routed_static

if TYPE_CHECKING:
    from llmarch.runtime.experts.host import OffloadedExperts

FREE_SHARE = 4  # and at most this fraction of the GPU memory free now (1 / FREE_SHARE)


def worth_uploading(x: torch.Tensor) -> bool:
    """Whether this call's experts run on x's GPU: a prompt chunk of UPLOAD_TOKENS tokens or more."""
    return x.device.type == "cuda" and x.shape[0] >= UPLOAD_TOKENS


def experts_per_chunk(store: OffloadedExperts, device) -> int:
    """Experts dequantized on the GPU at once: UPLOAD_CHUNK_BYTES of float32, or a quarter of what is free
    there now (the allocator's cached blocks count as free) where that is less; 0 where not even
    one expert fits, and the CPU computes the call as for decode. A GPU the planner filled with
    the model and its cache is thus never pushed out of memory by a prompt."""
    one = upload_expert_bytes(store.d, store.inter)
    free = UPLOAD_CHUNK_BYTES
    if torch.device(device).type == "cuda":
        gpu_free = torch.cuda.mem_get_info(device)[0]
        gpu_free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        free = min(free, gpu_free // FREE_SHARE)
    return free // one


def experts_on(store: OffloadedExperts, ids: list[int], device) -> tuple:
    """Experts `ids` (ascending) of the store stacked as (gate_up [n, 2I, d], down [n, d, I],
    gate_up bias or None, down bias or None) in its dtype on `device`: each stored part of all of
    them copied in one go, dequantized there."""
    one_range = ids[-1] - ids[0] + 1 == len(ids)
    sel = None if one_range else torch.tensor(ids, dtype=torch.long)

    def moved(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        part = t[ids[0] : ids[-1] + 1] if sel is None else t.index_select(0, sel)
        return part.to(device)

    dtype = store.dtype
    if store.format.quantized:  # each part in the model's dtype before the next is dequantized (float32)
        gu = dequantize(moved(store.gu), moved(store.gu_s), store.format).to(dtype)
        if store.up is not None:  # a GGUF's up rows apart from its gate rows
            gu = torch.cat([gu, dequantize(moved(store.up), None, store.up_format).to(dtype)], dim=-2)
        dn = dequantize(moved(store.dn), moved(store.dn_s), store.down_format).to(dtype)
    else:
        gu, dn = moved(store.gu), moved(store.dn)
    biases = (moved(store.gu_b), moved(store.dn_b))
    return (gu.to(dtype), dn.to(dtype), *(None if b is None else b.to(dtype) for b in biases))  # type: ignore[union-attr]


def grouped_ffn(x, rows, ws, segs, gu, dn, gu_b, dn_b, act, weight_input: bool) -> torch.Tensor:
    """The experts of segs (consecutive in rows, expert i of segs = row i of the stacked weights)
    over their rows of x, as routed_static's two grouped products (one expert a row, k = 1); their
    weighted outputs [rows, d] in the order of rows[segs' start:end]."""
    a, b = segs[0][1], segs[-1][2]
    counts = torch.tensor([e - s for _, s, e in segs], device=x.device)
    group = torch.repeat_interleave(torch.arange(len(segs), device=x.device), counts)[:, None]
    return routed_static(x[rows[a:b]], group, ws[a:b, None], gu, dn, gu_b, dn_b, act, weight_input, grouped=True)


def compute_uploaded(
    store: OffloadedExperts, x: torch.Tensor, idx_h: torch.Tensor, w_h: torch.Tensor, act, weight_input: bool
) -> torch.Tensor | None:
    """The routed experts of idx_h [T, k] (host ids) weighted by w_h over x [T, d] on x's device;
    None where the device has no room for one expert (experts_per_chunk)."""
    per = experts_per_chunk(store, x.device)
    if per < 1:
        return None
    rows, ws, segs = group_by_expert(idx_h, w_h, store.E)
    rows, ws = rows.to(x.device), ws.to(x.device)
    cold = [s for s in segs if s[0] not in store.hot]
    out = expert_loop(x, rows, ws, [s for s in segs if s[0] in store.hot], store.hot.__getitem__, act, weight_input)
    for i in range(0, len(cold), per):
        chunk = cold[i : i + per]
        ids = [e for e, _, _ in chunk]
        gu, dn, gu_b, dn_b = experts_on(store, ids, x.device)
        if grouped_mm_fits(x, gu, dn):
            r = rows[chunk[0][1] : chunk[-1][2]]
            # consecutive cold segs are consecutive rows unless a hot expert's rows lie between
            if all(b[1] == a[2] for a, b in zip(chunk, chunk[1:])):
                out.index_add_(0, r, grouped_ffn(x, rows, ws, chunk, gu, dn, gu_b, dn_b, act, weight_input))
                continue
        weights = {e: (gu[i], dn[i], *(None if b is None else b[i] for b in (gu_b, dn_b))) for i, e in enumerate(ids)}
        out += expert_loop(x, rows, ws, chunk, weights.__getitem__, act, weight_input)
    store.touched(len(cold) * store.expert_bytes())
    return out

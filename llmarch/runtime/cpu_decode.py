"""A CPU decode step (one token, batch 1) as one C call: every layer, the final norm, the head and
the greedy argmax, for models whose layers it can run from a GGUF's stored blocks.

Why: on the CPU a decode step of a small model is a few dozen matmuls and hundreds of tiny ops.
Run from Python, each module call, view, cache write and small op costs microseconds of dispatch
for nanoseconds of work: on the embedded Gemma 3 270M that glue was ~11 ms of a ~46 ms step. Here
the step walks a plan built once (pointers to the stored blocks, norm weights, RoPE tables and the
KV cache's own tensors) and calls the same kernels the module path calls: gguf_matmul's stored-block
matmul and cpu_kernels' RMS norm, RoPE and one-token attention, compiled into one library.

What it runs is read from the ArchSpec and the built modules, never from a family name: pre, post
or sandwich RMS norms (Gemma's 1 + w already folded at load), QK-norm per head or over the whole
projection, rotate-half RoPE from each layer's own tables (or none), MHA/GQA/MQA, full layers and
sliding-window ring buffers, a gated MLP (silu, gelu, gelu-tanh), residuals, a final RMS norm, a
stored-block head, the final logit soft-cap. Anything else (biases, float matrices, sinks, output
gates, attention soft-capping, MoE, linear attention, per-layer inputs, ...) keeps the module path.
A prompt for a model the step runs is one C call per chunk of tokens (prefill()): each matmul over
the chunk's rows at once, attention token by token as the step's. The Generator takes it for
prompts of up to C_PREFILL_MAX tokens, the longest measured faster than the module path (whose
matmuls over more than 128 rows dequantize the weights for a float GEMM); longer prompts keep the
module path, not measured against it. Both paths read and write the KV cache's own
tensors in place, so either can follow the other.
"""

from __future__ import annotations

import ctypes

import torch

from llmarch.runtime import cpu_kernels, gguf_matmul
from llmarch.runtime.cpu_plan import (
    C_PREFILL_MAX,
    Group,
    Layer,
    Lin,
    Norm,
    Plan,
    check_rc,
    lib,
    prefill,
    work_floats,
)
from llmarch.runtime.run_checks import kernel_threads


class _Unsupported(Exception):
    """A part of the model the C step does not run: the module path decodes instead."""


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise _Unsupported(what)


def _f32(t: torch.Tensor | None, keep: list, n: int | None = None) -> int | None:
    """The address of a float32 CPU tensor's contiguous data (None for None), kept alive."""
    if t is None:
        return None
    _need(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous(), "a float32 CPU tensor")
    _need(n is None or t.numel() == n, "a tensor of the expected size")
    keep.append(t)
    return t.data_ptr()


class CpuDecode:
    """The model's one-token step as one C call over `cache` (built by plan(); see the module docstring)."""

    def __init__(self, model, cache, spec):
        from llmarch.runtime.model import Transformer
        from llmarch.runtime.ops.attention import Attention
        from llmarch.runtime.ops.mlp import GatedMLP
        from llmarch.runtime.ops.norms import RMSNorm

        _need(lib() is not None, "the C kernels")
        _need(type(model) is Transformer, "the plain decoder")
        for part in ("pos_embed", "per_layer_inputs", "altup_streams", "hyper_head"):
            _need(getattr(model, part, None) is None, part)
        _need(getattr(model, "act_dtype", None) == torch.float32, "float32 activations")
        _need(not cache.linear and not cache.compressed, "attention-only caches")
        keep: list = []
        self.keep = keep
        d = spec.hidden_size

        def norm(mod, dim: int) -> Norm:
            if mod is None:
                return Norm(None, 0.0)
            _need(type(mod) is RMSNorm and not mod.unit_offset, "RMS norms (offset folded)")
            return Norm(_f32(mod.weight.detach(), keep, dim), float(mod.eps))

        def linear(mod, out: int, width: int) -> Lin:
            _need(isinstance(mod, gguf_matmul.StoredBlockLinear) and mod.args is not None, "stored-block matrices")
            _need(mod.in_features == width and mod.out_features == out, "matrix shapes")
            a = mod.args
            keep.append(a)
            order = None
            if mod.out_order is not None:
                order = mod.out_order.to(torch.int64).contiguous()
                keep.append(order)
            return Lin(a.n, out, *a.args, order.data_ptr() if order is not None else None)

        groups: list[Group] = []
        group_of: dict[int, int] = {}
        layers = []
        widest = d
        longest = 1
        act = cpu_kernels.GATED_ACTS.get(spec.activation or "silu")
        for block, ls in zip(model.layers, spec.schedule, strict=True):
            at, mlp = block.attn, block.mlp
            _need(type(at) is Attention and type(mlp) is GatedMLP, "attention + gated MLP layers")
            _need(block.hyper is None and block.laurel is None and block.altup is None, "plain residuals")
            _need(block.per_layer is None and block.layer_scalar is None and not block.hashed, "plain residuals")
            _need(
                at.kv_source is None
                and not at.v_from_k
                and not at.gate_in_q
                and at.gate is None
                and at.sinks is None
                and at.softcap is None
                and at.v_norm_eps is None
                and at.v_scale is None
                and at.temperature is None
                and not at.l2
                and at.qk_norm in (None, False, "", "per_head", "whole"),
                "plain softmax attention",
            )
            _need(mlp.std_multiplier is None and mlp.limit is None and act is not None, "a plain gated MLP")
            lc = cache.layers.get(ls.index)
            _need(lc is not None, "a KV cache layer")
            H, KV, D, Dv = at.heads, at.kv_heads, at.head_dim, at.v_dim
            k, v = lc.k, lc.v
            _need(tuple(k.shape[:2]) == (1, KV) and k.shape[3] == D and v.shape[3] == Dv, "cache shapes")
            g = lc.group
            if id(g) not in group_of:
                group_of[id(g)] = len(groups)
                mask = torch.zeros(g.size, dtype=torch.uint8)
                keep += [g.slot_pos, mask]
                groups.append(Group(g.slot_pos.data_ptr(), g.size, g.window or 0, int(g.ring), mask.data_ptr()))
            longest = max(longest, g.size)
            qk = at.qk_norm or None
            q_dim, k_dim = (H * D, KV * D) if qk == "whole" else (D, D)
            rope = at.rope
            if rope is not None:
                _need(rope.cos is not None and rope.rot_dim <= D and rope.cos.shape[1] == rope.rot_dim, "RoPE tables")
            hidden = mlp.hidden
            widest = max(widest, H * D + KV * D + KV * Dv, 2 * hidden, H * Dv)
            layers.append(
                Layer(
                    norm(block.attn_norm, d),
                    norm(block.attn_post_norm, d),
                    norm(block.ffn_norm, d),
                    norm(block.ffn_post_norm, d),
                    norm(at.q_norm, q_dim) if qk else Norm(None, 0.0),
                    norm(at.k_norm, k_dim) if qk else Norm(None, 0.0),
                    int(qk == "whole"),
                    linear(at.qkv, H * D + KV * D + KV * Dv, d),
                    linear(at.o, d, H * Dv),
                    linear(mlp.gate_up, 2 * hidden, d),
                    linear(mlp.down, d, hidden),
                    H,
                    KV,
                    D,
                    Dv,
                    hidden,
                    act,
                    float(at.scale),
                    _f32(rope.cos, keep) if rope is not None else None,
                    _f32(rope.sin, keep) if rope is not None else None,
                    rope.rot_dim if rope is not None else 0,
                    rope.cos.shape[0] if rope is not None else 0,
                    _f32(k, keep),
                    _f32(v, keep),
                    k.stride(1),
                    v.stride(1),
                    group_of[id(g)],
                )
            )
        head = model.tied_quant if model.tied_quant is not None else model.lm_head
        self.layers = (Layer * len(layers))(*layers)
        self.groups = (Group * len(groups))(*groups)
        self.work = torch.empty(work_floats(d, widest, spec.vocab_size, longest), dtype=torch.float32)
        self.plan = Plan(
            len(layers),
            len(groups),
            d,
            spec.vocab_size,
            ctypes.addressof(self.layers),
            ctypes.addressof(self.groups),
            norm(model.final_norm, d),
            linear(head, spec.vocab_size, d),
            float(model.final_softcap or 0.0),
            widest,
            self.work.data_ptr(),
        )
        self.model = model
        self.logits = torch.empty(1, spec.vocab_size, dtype=torch.float32)
        self.next = ctypes.c_long(0)
        self.prefill_rows = C_PREFILL_MAX

    def __call__(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """ids [1, 1] -> logits [1, vocab] (a buffer the next call overwrites); self.next_token()
        is their argmax."""
        x = self.model.embed_ids(ids, torch.tensor([pos])).reshape(-1)
        x = x.float().contiguous() if x.dtype != torch.float32 else x.contiguous()
        rc = lib().decode_step(
            ctypes.addressof(self.plan),
            x.data_ptr(),
            pos,
            self.logits.data_ptr(),
            kernel_threads(),
            ctypes.addressof(self.next),
        )
        check_rc(rc, "decode step", f"position {pos}")
        return self.logits

    def prefill(self, ids: torch.Tensor, pos0: int) -> torch.Tensor:
        """ids [1, T] at positions pos0 .. pos0 + T - 1 through every layer (their K/V written
        into the cache) -> the last token's logits [1, vocab], as __call__: those and every
        token's K/V are T decode steps' bit for bit (cpu_plan.prefill)."""
        T = ids.shape[1]
        x = self.model.embed_ids(ids, torch.arange(pos0, pos0 + T)).reshape(T, -1)
        x = x.float().contiguous() if x.dtype != torch.float32 else x.contiguous()
        rc, nxt = prefill(ctypes.addressof(self.plan), x.data_ptr(), pos0, T, self.logits.data_ptr(), kernel_threads())
        check_rc(rc, "prefill", f"positions {pos0}-{pos0 + T - 1}")
        self.next.value = nxt
        return self.logits

    def next_token(self) -> int:
        return self.next.value


def plan(model, cache, spec) -> CpuDecode | None:
    """The C decode step for `model` over `cache`, or None where any part of it needs the module
    path (or there is no C compiler / AVX2, or LLMARCH_NO_CKERNEL is set)."""
    try:
        return CpuDecode(model, cache, spec)
    except _Unsupported:
        return None

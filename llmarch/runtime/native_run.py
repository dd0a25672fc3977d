"""Greedy generation on the CPU from a saved decode plan (plan_file.py), without importing torch.

A run whose every step the one-C-call decode can take needs no torch: the plan is built from the
GGUF's header and small tensors on its first run (plan_build.py) where that builder is sure of it,
else a torch run plans it (cpu_decode.py) and saves it; after that, the plan file, the GGUF's stored
blocks and the C library are all there is. The prompt goes through the C prefill (cpu_plan.prefill: every layer
over the prompt's tokens at once, equal bit for bit to one decode step per token) and each new token
through the C decode step, as on the torch path; the cache, masks and RoPE rows are the ones the
torch path would hold (same sizes, same ring buffers), only allocated with numpy.

Taken only where nothing asks for torch: greedy decoding on the CPU of a GGUF with default options
(run.py's `native_options`); anything else, or no usable plan, takes the torch path.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import numpy as np

from llmarch.errors import LlmarchError, printable
from llmarch.runtime.cpu_plan import Group, Layer, Lin, Norm, Plan, check_rc, lib, prefill, work_floats
from llmarch.runtime.generate_types import Result
from llmarch.runtime.kernel_sources import GATED_ACTS
from llmarch.runtime.plan_file import Plan as PlanFile
from llmarch.runtime.plan_file import PlanMismatch, _float, _int, embed_rows, plan_path
from llmarch.runtime.plan_file import load as load_plan


def _layer_tensors(i: int):
    """Whether a tensor name is one of layer i's (llama.cpp's blk.<i>. names)."""
    prefix = f"blk.{i}."
    return lambda name: name.startswith(prefix)


def gpu_possible() -> bool:
    """Whether torch might pick a GPU for `--device auto`: a CUDA or ROCm device node that
    CUDA_VISIBLE_DEVICES does not hide. Judged from /dev alone, so that deciding needs no torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", os.environ.get("HIP_VISIBLE_DEVICES"))
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    dev = Path("/dev")
    return any(dev.glob("nvidia[0-9]*")) or (dev / "kfd").exists()


class NativeDecoder:
    """The C decode step over numpy buffers, built from a checked plan for `max_seq` positions."""

    def __init__(self, plan, max_seq: int, threads: int):
        """Every number taken from the plan is checked here against the spec (layer by layer) and the
        checkpoint's tensor table before it becomes a size or an address for the C step."""
        import gguf

        h, spec = plan.header, plan.spec
        a = spec.attention
        self.plan_file, self.threads, self.max_seq = plan, threads, max_seq
        if max_seq > _int(h.get("positions"), 1, 1 << 24, "positions"):
            raise PlanMismatch("more positions than the plan's RoPE rows")
        d, vocab = spec.hidden_size, spec.vocab_size
        names = gguf.TENSOR_NAMES
        embed_name = names[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
        head_names = {embed_name, names[gguf.MODEL_TENSOR.OUTPUT] + ".weight"}
        keep: list = []  # everything the C structs point at stays alive with this object
        self.keep = keep

        def addr(x: np.ndarray) -> int:
            keep.append(x)
            return int(x.ctypes.data)

        def norm(n, dim: int) -> Norm:
            if n is None:
                return Norm(None, 0.0)
            if not isinstance(n, dict):
                raise PlanMismatch("a norm entry")
            return Norm(addr(plan.array(n.get("w"), (dim,))), _float(n.get("eps"), "norm eps", positive=True))

        def linear(entry, width: int, want_out: int, tensors) -> Lin:
            parts, out, order = plan.matrix(entry, width, tensors)
            if out != want_out:
                raise PlanMismatch(f"a matrix of {out} rows, expected {want_out}")
            n = len(parts)
            arrays = (
                (ctypes.c_int * n)(*[p[0] for p in parts]),
                (ctypes.c_void_p * n)(*[p[1] for p in parts]),
                (ctypes.c_long * n)(*[p[2] for p in parts]),
                (ctypes.c_int * n)(*[p[3] for p in parts]),
            )
            keep.append(arrays)
            return Lin(n, out, *[ctypes.addressof(x) for x in arrays], addr(order) if order is not None else None)

        if not 0 < len(h["groups"]) <= spec.layers:
            raise PlanMismatch("more cache groups than layers")
        groups, windows, self.slot_pos = [], [], []
        longest = 1
        for g in h["groups"]:
            window = _int(g.get("window") if isinstance(g, dict) else None, 0, 1 << 30, "window")
            ring = 0 < window < max_seq  # as KVCache: a window shorter than the run is a ring buffer
            size = window if ring else max_seq
            slots = np.full(size, -1, dtype=np.int64)
            self.slot_pos.append(slots)
            groups.append(Group(addr(slots), size, window, int(ring), addr(np.zeros(size, dtype=np.uint8))))
            windows.append(window)
            longest = max(longest, size)
        if len(h["ropes"]) > spec.layers:
            raise PlanMismatch("more RoPE tables than layers")
        ropes = []
        for r in h["ropes"]:
            rot = _int(r.get("rot") if isinstance(r, dict) else None, 2, 1 << 16, "rotated dims")
            cos, sin = plan.array(r.get("cos"), (None, rot)), plan.array(r.get("sin"), (None, rot))
            if rot % 2 or cos.shape != sin.shape or cos.shape[0] < max_seq:
                raise PlanMismatch("RoPE tables of the wrong shape")
            ropes.append((addr(cos), addr(sin), rot, cos.shape[0]))
        act = GATED_ACTS.get(spec.activation or "silu")
        layers, used = [], set()
        widest = d
        for i, (e, ls) in enumerate(zip(h["layers"], spec.schedule, strict=True)):
            if not isinstance(e, dict):
                raise PlanMismatch("a layer entry")
            # the layer's sizes are the spec's (as the torch path builds them), not the file's say-so
            H, KV = a.heads, spec.layer_kv_heads(i)
            D = ls.head_dim or a.head_dim
            Dv = ls.head_dim or a.v_head_dim or a.head_dim
            hidden = ls.ffn_width or spec.intermediate_size
            want = {"heads": H, "kv_heads": KV, "head_dim": D, "v_dim": Dv, "hidden": hidden, "act": act}
            if any(e.get(k) != v or type(e.get(k)) is not int for k, v in want.items()) or H % KV:
                raise PlanMismatch(f"layer {i}: sizes differ from the spec")
            whole = _int(e.get("qk_whole"), 0, 1, "qk_whole")
            q_dim, k_dim = (H * D, KV * D) if whole else (D, D)
            g = _int(e.get("group"), 0, len(groups) - 1, "cache group")
            if windows[g] != (ls.window if ls.mixer == "sliding" else 0):
                raise PlanMismatch(f"layer {i}: window differs from the spec")
            used.add(g)
            r = e.get("rope")
            if (r is not None) != ls.rope:
                raise PlanMismatch(f"layer {i}: RoPE differs from the spec")
            rope = ropes[_int(r, 0, len(ropes) - 1, "rope")] if r is not None else (None, None, 0, 0)
            if rope[2] > D:
                raise PlanMismatch("more rotated dims than the head")
            size = groups[g].size
            k = np.zeros((KV, size, D), dtype=np.float32)
            v = np.zeros((KV, size, Dv), dtype=np.float32)
            widest = max(widest, H * D + KV * D + KV * Dv, 2 * hidden, H * Dv)
            mine = _layer_tensors(i)
            layers.append(
                Layer(
                    norm(e.get("attn_norm"), d),
                    norm(e.get("attn_post_norm"), d),
                    norm(e.get("ffn_norm"), d),
                    norm(e.get("ffn_post_norm"), d),
                    norm(e.get("q_norm"), q_dim),
                    norm(e.get("k_norm"), k_dim),
                    whole,
                    linear(e.get("qkv"), d, H * D + KV * D + KV * Dv, mine),
                    linear(e.get("o"), H * Dv, d, mine),
                    linear(e.get("gate_up"), d, 2 * hidden, mine),
                    linear(e.get("down"), hidden, d, mine),
                    H,
                    KV,
                    D,
                    Dv,
                    hidden,
                    act,
                    _float(e.get("scale"), "attention scale", positive=True),
                    *rope,
                    addr(k),
                    addr(v),
                    size * D,
                    size * Dv,
                    g,
                )
            )
        if len(used) != len(groups):
            raise PlanMismatch("a cache group no layer uses")
        embed = h.get("embed")
        if not isinstance(embed, dict) or embed.get("tensor") != embed_name or embed_name not in plan.ckpt.tensors:
            raise PlanMismatch("no embedding tensor")
        t = plan.ckpt.tensors[embed_name]
        if tuple(t.shape) != (vocab, d) or (embed.get("scale") is not None and not _float(embed["scale"], "scale")):
            raise PlanMismatch("embedding shape or scale")
        self.embed = embed
        self.layers = (Layer * len(layers))(*layers)
        self.groups = (Group * len(groups))(*groups)
        self.work = np.empty(work_floats(d, widest, vocab, longest), dtype=np.float32)
        self.plan = Plan(
            len(layers),
            len(groups),
            d,
            vocab,
            ctypes.addressof(self.layers),
            ctypes.addressof(self.groups),
            norm(h.get("final_norm"), d),
            linear(h.get("head"), d, vocab, head_names.__contains__),
            _float(h.get("softcap"), "soft-cap"),
            widest,
            addr(self.work),
        )
        self.logits = np.empty(vocab, dtype=np.float32)
        self.next = ctypes.c_long(0)
        self.d = d

    def step(self, token: int, pos: int) -> int:
        """Feed `token` at `pos`; the greedy next token."""
        x = embed_rows(self.plan_file.ckpt, self.embed, self.d, [token])
        rc = lib().decode_step(
            ctypes.addressof(self.plan),
            x.ctypes.data,
            pos,
            self.logits.ctypes.data,
            self.threads,
            ctypes.addressof(self.next),
        )
        check_rc(rc, "decode step", f"position {pos}")
        return self.next.value

    def prefill(self, tokens: list[int]) -> int:
        """Feed the prompt from position 0 (every layer over all its tokens at once); the greedy next token."""
        x = embed_rows(self.plan_file.ckpt, self.embed, self.d, tokens)
        rc, nxt = prefill(
            ctypes.addressof(self.plan), x.ctypes.data, 0, len(tokens), self.logits.ctypes.data, self.threads
        )
        check_rc(rc, "prefill", f"positions 0-{len(tokens) - 1}")
        return nxt

    def generate(self, prompt: list[int], max_tokens: int, eos_ids: set[int], on_token) -> Result:
        if not prompt:
            raise LlmarchError("the prompt is empty (no tokens to condition on)")
        if len(prompt) + max_tokens > self.max_seq:
            raise LlmarchError(
                f"prompt ({len(prompt)} tokens) + --max-tokens {max_tokens} exceed the cache ({self.max_seq})"
            )
        for slots in self.slot_pos:  # a new sequence: no slot holds a position yet
            slots.fill(-1)
        t0 = time.perf_counter()
        nxt = self.prefill(prompt)
        prefill_s = time.perf_counter() - t0
        out: list[int] = []
        stopped = "max_tokens"
        t1 = time.perf_counter()
        n = len(prompt)
        while True:
            out.append(nxt)
            if on_token:
                on_token(nxt)
            if nxt in eos_ids:
                stopped = "eos"
                break
            if len(out) >= max_tokens:
                break
            nxt = self.step(nxt, n)
            n += 1
        return Result(out, len(prompt), prefill_s, time.perf_counter() - t1, stopped)


def open_decoder(
    ckpt, spec, max_seq: int, threads: int, encoded: bytes | bytearray | None = None
) -> tuple[NativeDecoder, list[str]] | None:
    """The native decoder of this GGUF for `max_seq` positions and the saved run-report notes, or None
    (no plan saved, one that does not fit, no C library): the torch path runs instead. encoded: a
    plan's bytes not saved yet (plan_build.py's), read and checked as a saved one is."""
    if lib() is None:
        return None
    try:
        plan = load_plan(ckpt, spec) if encoded is None else PlanFile(plan_path(ckpt), ckpt, spec, encoded)
    except Exception:  # as load(): a plan that does not fit is not used
        plan = None
    if plan is None:
        return None
    try:
        notes = [printable(n) for n in plan.header["notes"] if isinstance(n, str)]  # shown on a terminal
        return NativeDecoder(plan, max_seq, threads), notes
    except Exception:  # anything in a cache file that does not fit, however it fails: not used
        return None

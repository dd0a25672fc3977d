"""A GGUF's CPU decode plan (plan_file.py's header and arrays) built from its header, its ArchSpec and
its small float tensors with numpy alone, so that the FIRST run of a GGUF the C step can run starts
without torch too (native_run.py), not only the runs after a torch run saved the plan.

The plan is the one the torch path would save for the same file, bit for bit (tests/test_native_run.py
compares the two files): the same tensors form each matrix part (gguf_names.py, the torch loader's
table), the same Q/K row orders (qk_permute's from_gguf_order over row numbers, as the loader's
probe), norm weights with Gemma's stored (1 + w) taken apart and put back in float32 as the loader
and RMSNorm.fold_unit_offset do, the RoPE tables of rope_tables.py (which the torch model computes
its CPU tables with), the same cache-group windows, scale and embedding scale.

Whether the C step can run the model is decided from ArchSpec facts and the tensors' types, never
from a family name, and conservatively: every spec field outside a short list of facts the step
handles must hold its default (a new fact added to the spec therefore takes the torch path until it
is handled here), and anything unsure (a RoPE scaling kind computed in torch, an embedding type whose
two dequantizers are not known to agree, a missing or odd tensor) makes build() refuse: the run takes
the torch path as before, which reports any error in the file the way it always has.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np

from llmarch.arch.spec import NORM_SLOTS
from llmarch.runtime.gguf_names import GGUFNames
from llmarch.runtime.kernel_sources import GATED_ACTS, KERNEL_TYPES
from llmarch.runtime.mapped import file_bytes
from llmarch.runtime.plan_file import MAX_POSITIONS, _Arrays
from llmarch.runtime.rope_tables import plain_inv_freq, rope_key, tables

# facts the C step handles (the rest of each spec object must hold its default)
_SPEC_FREE = {
    "family", "format", "architecture", "source", "model_type", "text_family", "gguf_arch", "supports",
    "layers", "hidden_size", "vocab_size", "context_length", "intermediate_size", "activation",
    "attention", "rope", "norm", "schedule", "tied_embeddings", "embedding_scale", "final_softcap",
    "params", "stored_bytes", "part_params", "part_bytes", "dtypes", "kv_dtype_default", "evidence",
    "warnings", "config", "recipe",
}  # fmt: skip
_ATTENTION_FREE = {"heads", "kv_heads", "head_dim", "v_head_dim", "qk_norm", "scale"}
_ROPE_FREE = {"theta", "scaling", "partial", "local_theta", "nope_layers"}
_NORM_FREE = {"placement", "eps", "unit_offset"}
_LAYER_FREE = {
    "index", "mixer", "window", "rope", "rope_theta", "rope_scaling", "kv_heads", "rope_partial", "head_dim",
    "ffn_width", "norm_placement",
}  # fmt: skip
# embedding types whose rows gguf-py's dequantizer (the native run's) and llmarch's quant.dequantize
# (the torch path's) give bit for bit: the same float32 operations in the same order (a test holds
# both to it on random blocks of each)
EMBED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K")


class NotBuilt(Exception):
    """The plan is not built here (the message says why): the torch path runs, as before."""


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise NotBuilt(what)


def _defaults_but(obj, free: set[str], what: str) -> None:
    for f in dataclasses.fields(obj):
        if f.name in free:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        _need(getattr(obj, f.name) == default, f"{what}.{f.name}")


def _f32(x: float) -> float:
    """A value as the C plan's float field holds it (the torch path saves what its struct holds)."""
    return float(np.float32(x))


def stored_blocks_note(types: Counter, mats: int, quant_bits: int | None = None, where: str = "") -> str:
    """The run report's line on matrices read from the file's blocks (gguf_matmul.summary's text)."""
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(types.items()))
    rest = f"int{quant_bits} blocks" if quant_bits else "float"
    return f"{mats} matrices run from the GGUF's stored blocks{where} ({kinds} tensors), the rest in {rest}"


class _Builder:
    def __init__(self, ckpt, spec):
        self.ckpt, self.spec = ckpt, spec
        self.names = GGUFNames(ckpt.metadata.get("general.architecture"), spec)
        self.arrays = _Arrays()
        self.types: Counter = Counter()
        self.mats = 0

    def tensor(self, name: str | None):
        t = self.ckpt.tensors.get(name) if name else None
        _need(t is not None, f"tensor {name} missing")
        return t

    def norm(self, name: str | None, dim: int) -> dict:
        """{w, eps} of an RMS norm, its weight as the torch path's RMSNorm multiplies by it."""
        t = self.tensor(name)
        _need(t.dtype == "F32" and tuple(t.shape) == (dim,) and t.nbytes == 4 * dim, f"{t.name}: a float32 [{dim}]")
        w = file_bytes(t.file)[t.offset : t.offset + t.nbytes].view(np.float32).copy()
        if self.spec.norm.unit_offset:  # the loader takes the stored 1 + w apart, the norm puts it back
            w = (w - np.float32(1.0)) + np.float32(1.0)
        eps = self.spec.norm.eps
        return {"w": self.arrays.add(w), "eps": _f32(eps if eps is not None else 1e-6)}

    def linear(self, names: list[str | None], out: int, width: int, heads: list[int | None]) -> dict:
        """A stored-block matrix: the tensors stacked by rows, each read in place, and the order of
        the stacked rows the loader gives (heads[i]: llama.cpp's Q/K permutation over that many heads)."""
        parts, orders, col = [], [], 0
        for name, h in zip(names, heads, strict=True):
            t = self.tensor(name)
            _need(t.dtype in KERNEL_TYPES and len(t.shape) == 2, f"{t.name}: a stored-block type")
            from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

            per, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[t.dtype]]
            rows = t.shape[0]
            _need(t.shape[1] == width and width % per == 0 and rows > 0, f"{t.name}: width")
            _need(t.nbytes == rows * (width // per) * nbytes, f"{t.name}: size")
            parts.append({"tensor": t.name, "at": 0, "type": t.dtype, "row_bytes": t.nbytes // rows, "rows": rows})
            probe = np.arange(rows, dtype=np.int64)[:, None] + col
            if h is not None and self.names.permute_qk:
                from llmarch.qk_permute import from_gguf_order

                probe = from_gguf_order(probe, h)
            orders.append(probe[:, 0])
            col += rows
            self.types[t.dtype] += 1
        _need(col == out, "matrix rows")
        self.mats += 1
        order = np.concatenate(orders)
        _need(np.array_equal(np.sort(order), np.arange(out)), "a row order")
        keep = None if np.array_equal(order, np.arange(out)) else self.arrays.add(order)
        return {"out": out, "parts": parts, "order": keep}

    def check_spec(self) -> None:
        spec = self.spec
        _need(self.ckpt.format == "gguf", "not a GGUF")
        _defaults_but(spec, _SPEC_FREE, "spec")
        _defaults_but(spec.attention, _ATTENTION_FREE, "attention")
        _defaults_but(spec.rope, _ROPE_FREE, "rope")
        _defaults_but(spec.norm, _NORM_FREE, "norm")
        _need(spec.attention.qk_norm in (None, "per_head", "whole"), "QK-norm kind")
        _need(spec.activation is None or spec.activation in GATED_ACTS, "activation")
        _need(len(spec.schedule) == spec.layers > 0, "layer schedule")
        for ls in spec.schedule:
            _defaults_but(ls, _LAYER_FREE, f"layer {ls.index}")
            _need(ls.mixer in ("full", "sliding"), f"layer {ls.index}: mixer {ls.mixer}")

    def build(self, notes_extra: list[str]) -> dict:
        self.check_spec()
        spec, names = self.spec, self.names
        a, d = spec.attention, spec.hidden_size
        act = GATED_ACTS[spec.activation or "silu"]
        positions = min(MAX_POSITIONS, spec.context_length or MAX_POSITIONS)
        ropes: dict = {}
        rope_list: list[dict] = []
        groups: dict = {}
        layers = []
        for i, ls in enumerate(spec.schedule):
            H, KV = a.heads, spec.layer_kv_heads(i)
            D = ls.head_dim or a.head_dim
            Dv = ls.head_dim or a.v_head_dim or a.head_dim
            hidden = ls.ffn_width or spec.intermediate_size
            _need(H > 0 and KV > 0 and H % KV == 0 and D > 0 and Dv > 0 and bool(hidden), f"layer {i}: sizes")
            r = None
            key = rope_key(spec, ls)
            if key is not None:
                (theta, _, rot, head_dim), scaling = key
                _need(2 <= rot <= D and rot % 2 == 0, f"layer {i}: rotated dims")
                if key[0] not in ropes:
                    inv = plain_inv_freq(rot, theta, scaling)
                    _need(inv is not None, f"layer {i}: RoPE scaling computed in torch")
                    cos, sin = tables(inv, 1.0, positions)
                    ropes[key[0]] = len(rope_list)
                    rope_list.append({"cos": self.arrays.add(cos), "sin": self.arrays.add(sin), "rot": rot})
                r = ropes[key[0]]
            window = ls.window if ls.mixer == "sliding" else None
            g = groups.setdefault(window, len(groups))
            slots = NORM_SLOTS.get(ls.norm_placement or spec.norm.placement, NORM_SLOTS["pre"])
            qk = a.qk_norm
            q_dim, k_dim = (H * D, KV * D) if qk == "whole" else (D, D)

            def name(stem: str, layer: int = i) -> str | None:
                return names.layer_name(layer, stem)

            entry = {
                slot: (self.norm(name(slot), d) if slot in slots else None)
                for slot in ("attn_norm", "attn_post_norm", "ffn_norm", "ffn_post_norm")
            }
            entry["q_norm"] = self.norm(name("attn.q_norm"), q_dim) if qk else None
            entry["k_norm"] = self.norm(name("attn.k_norm"), k_dim) if qk else None
            entry["qk_whole"] = int(qk == "whole")
            qkv = [name("attn.q"), name("attn.k"), name("attn.v")]
            entry["qkv"] = self.linear(qkv, H * D + KV * D + KV * Dv, d, [H, KV, None])
            entry["o"] = self.linear([name("attn.o")], d, H * Dv, [None])
            entry["gate_up"] = self.linear([name("mlp.gate"), name("mlp.up")], 2 * hidden, d, [None, None])
            entry["down"] = self.linear([name("mlp.down")], d, hidden, [None])
            entry.update({"heads": H, "kv_heads": KV, "head_dim": D, "v_dim": Dv, "hidden": hidden, "act": act})
            entry["group"] = g
            entry["scale"] = _f32(a.scale if a.scale is not None else D**-0.5)
            entry["rope"] = r
            layers.append(entry)
        final_norm = self.norm(names.globals["final_norm"] + ".weight", d)
        embed_name = names.globals["embed"] + ".weight"
        embed = self.tensor(embed_name)
        _need(len(embed.shape) == 2 and tuple(embed.shape) == (spec.vocab_size, d), "a [vocab, hidden] embedding")
        _need(embed.dtype in EMBED_TYPES, f"embedding type {embed.dtype}")
        if spec.tied_embeddings:
            _need(d % 32 == 0, "a tied head's width")  # the loader's tied-table rule (quant.GROUP)
            head = self.linear([embed_name], spec.vocab_size, d, [None])
        else:
            head = self.linear([names.globals["lm_head"] + ".weight"], spec.vocab_size, d, [None])
        scale = spec.embedding_scale
        return {
            "d": d,
            "vocab": spec.vocab_size,
            "softcap": _f32(spec.final_softcap or 0.0),
            "final_norm": final_norm,
            "head": head,
            "embed": {"tensor": embed_name, "scale": float(scale) if scale is not None else None},
            "groups": [{"window": w or 0} for w in groups],
            "ropes": rope_list,
            "positions": positions,
            "layers": layers,
            "notes": [stored_blocks_note(self.types, self.mats), *notes_extra],
        }


def build(ckpt, spec) -> tuple[dict, list[np.ndarray]]:
    """(plan header, its arrays) for this GGUF, as the torch path would save them; NotBuilt (with
    the reason) where the C step might not run it or the plan might differ from the torch path's."""
    b = _Builder(ckpt, spec)
    try:
        header = b.build([])
    except NotBuilt:
        raise
    except Exception as e:  # an odd header value anywhere: the torch path judges the file
        raise NotBuilt(f"{type(e).__name__}: {e}") from None
    return header, b.arrays.items

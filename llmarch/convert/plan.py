"""The per-tensor plan of an HF -> GGUF conversion: what each GGUF tensor is, its type, shape and
bytes, and which source tensors (pieces) fill it at which offset. `--dry-run` prints it.

Type rules follow llama.cpp's convert_hf_to_gguf.py so that files load the same way: 1-D tensors,
norms, biases, routers and position embeddings stay F32; the rest gets --dtype, falling back to
F16 when a row does not divide into quant blocks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
from gguf import GGML_QUANT_SIZES, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES, GGMLQuantizationType, LlamaFileType

from llmarch.arch.rope_factors import llama3_divisors
from llmarch.arch.spec import ArchSpec
from llmarch.arch.tensor_roles import is_vision, layer_of
from llmarch.checkpoint.base import Checkpoint, TensorInfo
from llmarch.convert.layout import Family, name_map, recipe_kind_of, scale_kind_of
from llmarch.errors import LlmarchError

Q = GGMLQuantizationType
DTYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (Q.F32, LlamaFileType.ALL_F32),
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (Q.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q5_0": (Q.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q5_1": (Q.Q5_1, LlamaFileType.MOSTLY_Q5_1),
}
# llama.cpp keeps these F32 whatever --outtype says (convert_hf_to_gguf.py, prepare_tensors)
F32_KINDS = {
    MODEL_TENSOR.FFN_GATE_INP,
    MODEL_TENSOR.FFN_GATE_INP_SHEXP,
    MODEL_TENSOR.POS_EMBD,
    MODEL_TENSOR.TOKEN_TYPES,
    MODEL_TENSOR.ROPE_FREQS,
    MODEL_TENSOR.ALTUP_CORRECT_COEF,
    MODEL_TENSOR.ALTUP_PREDICT_COEF,
    MODEL_TENSOR.SSM_CONV1D,
    MODEL_TENSOR.SSM_CONV1D_Q,  # Kimi's KDA convolutions: llama.cpp's conv op reads F32 only
    MODEL_TENSOR.SSM_CONV1D_K,
    MODEL_TENSOR.SSM_CONV1D_V,
    MODEL_TENSOR.SHORTCONV_CONV,  # LFM2's short convolution: the same conv op
}
# the text model inside multimodal wrappers, in the Hub's spellings
TEXT_PREFIX_RE = re.compile(r"^(language_model\.model\.|model\.language_model\.|language_model\.lm_head)")
EXPERT_RE = re.compile(r"^(?P<pre>.*\.experts)\.(?P<xid>\d+)\.(?P<w>[^.]+)\.(?P<suffix>weight|bias)$")
# a numbered list outside the layers (altup_projections.1.weight): stacked when the family says so
LISTED_RE = re.compile(r"^(?P<pre>(?:(?!\.layers\.).)*[^\d.])\.(?P<xid>\d+)\.(?P<suffix>weight|bias)$")


@dataclass
class Piece:
    """One source tensor (or generated array) and where its bytes go inside the output tensor."""

    src: TensorInfo | None
    offset: int  # byte offset inside the output tensor
    permute_heads: int | None = None  # llama.cpp's Q/K row permutation for its RoPE layout
    transpose: bool = False
    shift: float = 0.0
    data: np.ndarray | None = None  # generated tensors (rope_freqs)
    view: object = None  # callable re-laying out the whole source (dtype-agnostic numpy ops)
    out_shape: tuple[int, ...] | None = None  # shape after `view`
    neg_exp: bool = False  # written as -exp(value), in float32 (HF's A_log -> llama.cpp's A)

    @property
    def shape(self) -> tuple[int, ...]:
        if self.out_shape is not None:
            return self.out_shape
        shape = tuple(self.data.shape) if self.data is not None else self.src.shape
        return shape[::-1] if self.transpose else shape


@dataclass
class PlannedTensor:
    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]  # PyTorch order (outermost first)
    pieces: list[Piece] = field(default_factory=list)
    sources: str = ""

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.shape, self.type)


@dataclass
class Plan:
    family: Family
    spec: ArchSpec
    file_type: LlamaFileType
    tensors: list[PlannedTensor]
    kv: list = field(default_factory=list)  # (key, value, GGUFValueType, sub_type)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def tensor_bytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def choose_type(
    name: str, kind: MODEL_TENSOR, shape: tuple[int, ...], want: GGMLQuantizationType
) -> GGMLQuantizationType:
    if len(shape) <= 1 or name.endswith("_norm.weight") or kind in F32_KINDS or not name.endswith(".weight"):
        return Q.F32
    block, _ = GGML_QUANT_SIZES[want]
    if shape[-1] % block:
        return Q.F16  # as llama.cpp does when a row does not split into blocks
    return want


def build_plan(ckpt: Checkpoint, spec: ArchSpec, fam: Family, dtype: str) -> Plan:
    if dtype not in DTYPES:
        raise LlmarchError(f"unknown --dtype {dtype!r}; one of {', '.join(DTYPES)}")
    want, ftype = DTYPES[dtype]
    n_blocks = spec.layers
    tmap = name_map(fam.arch, n_blocks)
    allowed = set(MODEL_TENSORS[fam.arch])
    heads, kv_heads = spec.attention.heads, spec.attention.kv_heads or spec.attention.heads
    conv = fam.recipe.convert

    groups: dict[str, dict] = {}  # gguf name -> {kind, pieces: [(xid, piece)]}
    blocked: list[str] = []
    for hf_name, info in ckpt.tensors.items():
        if fam.skipped(hf_name):
            continue
        layer = layer_of(hf_name)
        if spec.mtp_layers and layer is not None and layer >= spec.layers:
            continue  # MTP layers after the main stack: llama.cpp's file has none (convert_hf_to_gguf skip_mtp)
        if is_vision(hf_name):
            continue  # multimodal wrappers: the text model only (llama.cpp puts vision in a separate mmproj file)
        m = EXPERT_RE.match(hf_name)
        probe = f"{m['pre']}.{m['w']}.{m['suffix']}" if m else hf_name
        probe = TEXT_PREFIX_RE.sub(lambda t: "lm_head" if t.group(0).endswith("lm_head") else "model.", probe)
        probe = probe.replace("e_score_correction_bias", "e_score_correction.bias")  # gguf-py's spelling
        for old, new in conv.hf_aliases.items():
            if probe.endswith(old):
                probe = probe[: -len(old)] + new
        if probe.endswith(".sinks"):
            probe += ".weight"  # gpt-oss attention sinks, as convert_hf_to_gguf.py names them
        if fam.fused_experts and FUSED_RE.search(hf_name):
            for gname, kind, piece in _fused_experts(hf_name, info, layer, fam.fused_split):
                groups[gname] = {"kind": kind, "pieces": [(None, piece)]}
            continue
        listed = LISTED_RE.match(probe) if fam.stacked and not m else None
        if listed:
            found = tmap.get_type_and_name(f"{listed['pre']}.{listed['suffix']}", try_suffixes=(".weight", ".bias"))
            if found is not None and found[0] in fam.stacked:
                m = listed
                probe = f"{listed['pre']}.{listed['suffix']}"
        found = (
            tmap.get_type_and_name(probe, try_suffixes=(".weight", ".bias"))
            or recipe_kind_of(fam, probe)
            or scale_kind_of(fam, probe)
        )
        if found is None or found[0] not in allowed:
            blocked.append(hf_name)
            continue
        kind, gname = found
        if not gname.endswith((".weight", ".bias", ".scale")) and kind.name not in conv.gguf_bare:
            gname += ".weight"  # HF parameters without a suffix (Gemma 3n's correct_output_scale)
        if kind == MODEL_TENSOR.ATTN_KV_B and fam.split_kv_b:
            for k, piece in _split_kv_b(info, spec, layer).items():
                groups[TENSOR_NAMES[k].format(bid=layer) + ".weight"] = {"kind": k, "pieces": [(None, piece)]}
            continue
        piece = Piece(src=info, offset=0, transpose=fam.transposed(hf_name), neg_exp=kind.name in conv.neg_exp)
        if kind.name in conv.squeezed:
            kept = tuple(n for n in info.shape if n != 1)
            piece.view, piece.out_shape = (lambda x, s=kept: x.reshape(s)), kept
        if kind.name in conv.column:
            col = (math.prod(piece.shape), 1)
            piece.view, piece.out_shape = (lambda x, s=col: x.reshape(s)), col
        if kind.name in conv.grouped and spec.linear and spec.linear.key_heads:
            if math.prod(piece.shape) % spec.linear.key_heads:
                raise LlmarchError(
                    f"{hf_name}: {math.prod(piece.shape)} values do not split into the config's "
                    f"{spec.linear.key_heads} linear-attention groups",
                    info.file,
                )
            rows = (spec.linear.key_heads, math.prod(piece.shape) // spec.linear.key_heads)
            piece.view, piece.out_shape = (lambda x, s=rows: x.reshape(s)), rows
        if conv.tile_v_heads and spec.linear and kind in V_HEAD_AXES:
            _tile_v_heads(piece, kind, spec)
        if fam.permute_qk and kind in (MODEL_TENSOR.ATTN_Q, MODEL_TENSOR.ATTN_K):
            piece.permute_heads = heads if kind == MODEL_TENSOR.ATTN_Q else kv_heads
        if fam.norm_shift and hf_name.endswith("norm.weight") and kind.name not in conv.unshifted:
            piece.shift = fam.norm_shift
        g = groups.setdefault(gname, {"kind": kind, "pieces": []})
        g["pieces"].append((int(m["xid"]) if m else None, piece))
    if blocked:
        raise LlmarchError(
            f"{len(blocked)} tensor(s) have no place in llama.cpp's {fam.arch_name} architecture "
            f"(gguf-py MODEL_TENSORS), e.g. {', '.join(blocked[:3])}",
            ckpt.path,
        )

    tensors: list[PlannedTensor] = []
    for gname, g in groups.items():
        pieces = sorted(g["pieces"], key=lambda p: -1 if p[0] is None else p[0])
        shape0 = pieces[0][1].shape
        if pieces[0][0] is not None:  # experts: stack into one 3-D tensor
            xids = [x for x, _ in pieces]
            if xids != list(range(len(xids))) or any(p.shape != shape0 for _, p in pieces):
                raise LlmarchError(f"experts of {gname} are incomplete or differ in shape", ckpt.path)
            shape = (len(pieces), *shape0)
        else:
            if len(pieces) != 1:
                raise LlmarchError(f"several source tensors map to {gname}", ckpt.path)
            shape = shape0
        qtype = choose_type(gname, g["kind"], shape, want)
        step = tensor_bytes(shape0, qtype)
        for i, (_, p) in enumerate(pieces):
            p.offset = i * step
        src = pieces[0][1].src.name if len(pieces) == 1 else f"{pieces[0][1].src.name} .. ({len(pieces)} experts)"
        tensors.append(PlannedTensor(gname, qtype, shape, [p for _, p in pieces], src))
        if g["kind"] == MODEL_TENSOR.PER_LAYER_TOKEN_EMBD:
            _pad_to_vocab(tensors[-1], groups)
    if fam.recipe.convert.shared_kv_placeholders:
        tensors.extend(_shared_kv_placeholders(spec, {t.name: t for t in tensors}))
    tensors.extend(_generated(spec, fam))
    return Plan(fam, spec, ftype, tensors)


def _shared_kv_placeholders(spec: ArchSpec, have: dict[str, PlannedTensor]) -> list[PlannedTensor]:
    """Zero k/v projections and k-norm for the layers that reuse another layer's KV and lack their
    own: llama.cpp requires them and never reads them (it reuses the owner's cache)."""
    out = []
    for layer in spec.schedule:
        if layer.kv_shared_from is None:
            continue
        for kind in (MODEL_TENSOR.ATTN_K, MODEL_TENSOR.ATTN_V, MODEL_TENSOR.ATTN_K_NORM):
            name = TENSOR_NAMES[kind].format(bid=layer.index) + ".weight"
            owner = have.get(TENSOR_NAMES[kind].format(bid=layer.kv_shared_from) + ".weight")
            if name in have or owner is None:
                continue
            zeros = np.zeros(owner.shape, dtype=np.float32)  # pages never written: no memory until encoded
            note = f"(zeros: layer {layer.index} reuses layer {layer.kv_shared_from}'s KV)"
            out.append(PlannedTensor(name, owner.type, owner.shape, [Piece(None, 0, data=zeros)], note))
    return out


# Gated DeltaNet tensors with a value-head axis: (axis, channels before the value heads in units
# of key_heads * key_head_dim, width of one value head's slice: "v" = value_head_dim, 1 = a scalar)
V_HEAD_AXES = {
    MODEL_TENSOR.ATTN_QKV: (0, 2, "v"),  # in_proj_qkv rows: q, k, then v
    MODEL_TENSOR.ATTN_GATE: (0, 0, "v"),  # in_proj_z rows
    MODEL_TENSOR.SSM_BETA: (0, 0, 1),
    MODEL_TENSOR.SSM_ALPHA: (0, 0, 1),
    MODEL_TENSOR.SSM_A: (0, 0, 1),
    MODEL_TENSOR.SSM_DT: (0, 0, 1),
    MODEL_TENSOR.SSM_CONV1D: (0, 2, "v"),  # conv channels: q, k, then v
    MODEL_TENSOR.SSM_OUT: (1, 0, "v"),  # out_proj columns
}


def _tile_v_heads(piece: Piece, kind: MODEL_TENSOR, spec: ArchSpec) -> None:
    """Value heads from HF's grouped order (each key head's value heads together) to the tiled
    order llama.cpp's qwen35 broadcasts in (value head j of every key head, then j + 1), as
    _LinearAttentionVReorderBase.modify_tensors does; composed after any earlier view."""
    lin = spec.linear
    if not lin.key_heads or lin.value_heads == lin.key_heads:
        return
    before, shape = piece.view, piece.shape

    def tiled(x, before=before):
        return reorder_v_heads(before(x) if before else x, kind, spec)

    piece.view, piece.out_shape = tiled, shape


def reorder_v_heads(x: np.ndarray, kind: MODEL_TENSOR, spec: ArchSpec, inverse: bool = False) -> np.ndarray:
    """A Gated DeltaNet tensor's value heads grouped per key head (HF) -> tiled across key heads
    (llama.cpp's qwen35), or back with inverse=True."""
    lin = spec.linear
    k, v = lin.key_heads, lin.value_heads
    if not k or v == k:
        return x
    axis, skip, width = V_HEAD_AXES[kind]
    hd = lin.value_head_dim if width == "v" else 1
    start = skip * k * lin.key_head_dim
    x = np.moveaxis(x, axis, 0)
    head, vals = x[:start], x[start:]
    groups = (v // k, k) if inverse else (k, v // k)
    vals = vals.reshape(*groups, hd, *vals.shape[1:]).swapaxes(0, 1).reshape(vals.shape)
    return np.moveaxis(np.concatenate([head, vals]), 0, axis)


FUSED_RE = re.compile(r"\.(mlp|feed_forward)\.experts\.(gate_up_proj|down_proj)(_bias)?$")


def _fused_experts(
    hf_name: str, info: TensorInfo, layer: int, split: str = "interleaved"
) -> list[tuple[str, MODEL_TENSOR, Piece]]:
    """Fused expert tensors ([E, in, out]) -> llama.cpp's *_exps, transposed to [E, out, in]. gpt-oss
    (GptOssModel.modify_tensors): gate = even rows, up = odd rows; Llama 4 (Llama4Model.modify_tensors,
    split="halves"): gate = first half, up = second half."""
    m = FUSED_RE.search(hf_name)
    which, bias = m.group(2), bool(m.group(3))
    suffix = ".bias" if bias else ".weight"
    name = lambda k: TENSOR_NAMES[k].format(bid=layer) + suffix  # noqa: E731
    shape = info.shape
    if which == "down_proj":
        if bias:
            return [(name(MODEL_TENSOR.FFN_DOWN_EXP), MODEL_TENSOR.FFN_DOWN_EXP, Piece(info, 0))]
        e, f, h = shape
        return [
            (
                name(MODEL_TENSOR.FFN_DOWN_EXP),
                MODEL_TENSOR.FFN_DOWN_EXP,
                Piece(info, 0, view=lambda x: x.transpose(0, 2, 1), out_shape=(e, h, f)),
            )
        ]
    if bias:
        e, f2 = shape
        return [
            (name(k), k, Piece(info, 0, view=lambda x, o=o: x[:, o::2], out_shape=(e, f2 // 2)))
            for k, o in ((MODEL_TENSOR.FFN_GATE_EXP, 0), (MODEL_TENSOR.FFN_UP_EXP, 1))
        ]
    e, h, f2 = shape
    if split == "halves":
        f = f2 // 2
        return [
            (
                name(k),
                k,
                Piece(
                    info, 0, view=lambda x, o=o: x.transpose(0, 2, 1)[:, o * f : (o + 1) * f, :], out_shape=(e, f, h)
                ),
            )
            for k, o in ((MODEL_TENSOR.FFN_GATE_EXP, 0), (MODEL_TENSOR.FFN_UP_EXP, 1))
        ]
    return [
        (name(k), k, Piece(info, 0, view=lambda x, o=o: x.transpose(0, 2, 1)[:, o::2, :], out_shape=(e, f2 // 2, h)))
        for k, o in ((MODEL_TENSOR.FFN_GATE_EXP, 0), (MODEL_TENSOR.FFN_UP_EXP, 1))
    ]


def _split_kv_b(info: TensorInfo, spec: ArchSpec, layer: int) -> dict:
    """MLA kv_b_proj -> llama.cpp's absorbed k_b (per head, transposed) and v_b (DeepseekV2Model)."""
    a = spec.attention
    h, nope, v = a.heads, a.qk_nope_head_dim, a.v_head_dim
    r = info.shape[-1]
    if info.shape[0] != h * (nope + v):
        raise LlmarchError(f"{info.name}: {info.shape} is not heads x (qk_nope + v) rows", info.file)

    def k_b(x):
        return x.reshape(h, nope + v, r)[:, :nope, :].transpose(0, 2, 1)

    def v_b(x):
        return x.reshape(h, nope + v, r)[:, nope:, :]

    return {
        MODEL_TENSOR.ATTN_K_B: Piece(info, 0, view=k_b, out_shape=(h, r, nope)),
        MODEL_TENSOR.ATTN_V_B: Piece(info, 0, view=v_b, out_shape=(h, v, r)),
    }


def _pad_to_vocab(t: PlannedTensor, groups: dict) -> None:
    """llama.cpp reads the per-layer table with a row per token of the vocabulary; Gemma 3n's is
    narrower (vocab_size_per_layer_input: the text tokens, not the vision/audio ones after them).
    It is padded up to the token embedding's rows (a real tensor's size, not a config number) with
    copies of row 0, the row transformers' Gemma 3n reads for ids past the table, so llama.cpp
    computes what transformers does for every id (llama.cpp's converter pads zeros)."""
    from llmarch.convert.writer import _Sources, to_f32

    embd = groups.get(TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD] + ".weight")
    rows = embd["pieces"][0][1].shape[0] if embd else t.shape[0]
    if len(t.shape) != 2 or rows <= t.shape[0] or len(t.pieces) != 1 or t.pieces[0].src is None:
        return
    if rows - t.shape[0] > t.shape[0]:  # the padding stays smaller than the table itself
        raise LlmarchError(
            f"per-layer embedding table {t.pieces[0].src.name} has {t.shape[0]} rows, less than half of the "
            f"token embedding's {rows}; llama.cpp needs one row per token",
            t.pieces[0].src.file,
        )
    src = t.pieces[0].src
    reader = _Sources()
    try:
        first = to_f32(reader.read(t.pieces[0], 0, t.shape[1]), src.dtype)
    finally:
        reader.close()
    pad = np.repeat(first[None, :], rows - t.shape[0], axis=0)
    t.pieces.append(Piece(None, tensor_bytes(t.shape, t.type), data=pad))
    t.shape = (rows, t.shape[1])
    t.sources += f" + {pad.shape[0]} copies of its row 0 (to the vocabulary)"


def _generated(spec: ArchSpec, fam: Family) -> list[PlannedTensor]:
    """Tensors llama.cpp derives from config: rope_freqs for Llama 3 RoPE scaling, and for
    proportional RoPE (Gemma 4's full layers: the first partial_rotary_factor of the frequencies
    over the whole head, the rest not rotated) divisors of 1 then 1e30, as its converter writes."""
    sc = spec.rope.scaling or {}
    kind = (sc.get("type") or "").lower()
    if kind not in ("llama3", "proportional") or MODEL_TENSOR.ROPE_FREQS not in MODEL_TENSORS[fam.arch]:
        return []
    name = TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight"
    if kind == "proportional":
        head = max(l.head_dim or spec.attention.head_dim for l in spec.schedule if l.mixer != "sliding")
        rotated = int(head * float(sc.get("partial_rotary_factor", 1.0)) / 2)
        factors = np.array([1.0] * rotated + [1e30] * (head // 2 - rotated), dtype=np.float32)
        return [PlannedTensor(name, Q.F32, factors.shape, [Piece(None, 0, data=factors)], "(proportional rope)")]
    factors = llama3_divisors(spec.attention.head_dim, spec.rope.theta or 10000.0, sc)
    return [PlannedTensor(name, Q.F32, factors.shape, [Piece(None, 0, data=factors)], "(llama3 rope scaling)")]


def describe(plan: Plan) -> list[dict]:
    return [
        {"name": t.name, "type": t.type.name, "shape": list(t.shape), "bytes": t.nbytes, "source": t.sources}
        for t in plan.tensors
    ]

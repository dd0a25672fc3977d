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
gates, attention soft-capping, MoE, linear attention, per-layer inputs, ...) keeps the module path,
as does every step of more than one token: the prefill writes the KV cache that this step then
reads and writes in place, and either path can follow the other.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from llmarch.errors import LlmarchError
from llmarch.runtime import cpu_kernels, gguf_matmul
from llmarch.runtime.cbuild import build_avx2

DECODE = r"""
typedef struct { int nparts, out; const int* types; const void* const* ws; const long* row_bytes;
                 const int* rows; const int64_t* order; } Lin;
typedef struct { const float* w; float eps; } Norm;
typedef struct {
    Norm attn_norm, attn_post_norm, ffn_norm, ffn_post_norm, q_norm, k_norm;
    int qk_whole;                      /* q/k norms over the whole projection, not per head */
    Lin qkv, o, gate_up, down;
    int heads, kv_heads, head_dim, v_dim, hidden, act;
    float scale;
    const float* cos; const float* sin; long rot, npos;  /* cos NULL: no RoPE on this layer */
    float* k; float* v; long k_stride, v_stride;           /* the cache's [KV, slots, D] tensors */
    int group;
} Layer;
typedef struct { int64_t* slot_pos; long size, window; int ring; uint8_t* mask; } Group;
typedef struct {
    int n_layers, n_groups, d, vocab;
    const Layer* layers; const Group* groups;
    Norm final_norm; Lin head; float softcap;
    long widest;                       /* the widest of a layer's vectors (q|k|v, gate|up, ...) */
    float* work;                       /* scratch: d + 3 * widest + max(widest, vocab) + the longest cache */
} Plan;

/* y = x @ W^T for one token; rows reordered by `order` where the loader permuted them */
static int lin(const Lin* l, const float* x, int K, float* y, float* tmp, int nthreads) {
    float* out = l->order ? tmp : y;
    int rc = gguf_linear(x, 1, K, l->nparts, l->types, l->ws, l->row_bytes, l->rows, out, nthreads);
    if (l->order)
        for (int i = 0; i < l->out; i++) y[i] = tmp[l->order[i]];
    return rc;
}
static void norm(const Norm* n, float* x, long rows, long dim) {
    if (n->w) rms_norm(x, n->w, x, rows, dim, n->eps);
}
/* x [d]: the token's embedding in, clobbered; logits [vocab] out; *next: their first argmax.
   Returns 0, 1 (kernel failure), 2 (out of memory), 3 (position outside the cache or the RoPE tables). */
int decode_step(const Plan* P, float* x, long pos, float* logits, int nthreads, long* next) {
    for (int g = 0; g < P->n_groups; g++) {  /* the cache's slot tables and masks, as KVCache.prepare */
        const Group* G = P->groups + g;
        if (!G->ring && pos >= G->size) return 3;
        G->slot_pos[G->ring ? pos % G->size : pos] = pos;
        const long n = G->ring ? G->size : pos + 1;
        for (long j = 0; j < n; j++) {
            const int64_t s = G->slot_pos[j];
            G->mask[j] = s >= 0 && s <= pos && (G->window == 0 || s > pos - G->window);
        }
    }
    const int d = P->d;
    const long W = P->widest;
    float* h = P->work;                    /* [d] normed input, then a sub-block's output */
    float* qkv = h + d;                    /* q | k | v, then gate | up */
    float* q = qkv + W;                    /* rotated queries */
    float* att = q + W;                    /* attention output [H * Dv] */
    float* tmp = att + W;                  /* a Linear's output before its rows are reordered */
    float* scores = tmp + (W > P->vocab ? W : P->vocab);
    int rc = 0;
    for (int i = 0; i < P->n_layers && !rc; i++) {
        const Layer* L = P->layers + i;
        const Group* G = P->groups + L->group;
        const int H = L->heads, KV = L->kv_heads, D = L->head_dim, Dv = L->v_dim;
        const long slot = G->ring ? pos % G->size : pos, S = G->ring ? G->size : pos + 1;
        /* attention */
        memcpy(h, x, sizeof(float) * d);
        norm(&L->attn_norm, h, 1, d);
        if ((rc = lin(&L->qkv, h, d, qkv, tmp, nthreads))) break;
        float* kin = qkv + H * D;
        float* vin = kin + KV * D;
        if (L->qk_whole) { norm(&L->q_norm, qkv, 1, (long)H * D); norm(&L->k_norm, kin, 1, (long)KV * D); }
        else { norm(&L->q_norm, qkv, H, D); norm(&L->k_norm, kin, KV, D); }
        for (int k = 0; k < KV; k++) {
            float* kdst = L->k + k * L->k_stride + slot * D;
            if (L->cos) {
                if (rope_rotate_half(kin + k * D, L->cos, L->sin, &pos, kdst, 1, 1, D, L->rot, L->npos)) { rc = 3; break; }
            } else memcpy(kdst, kin + k * D, sizeof(float) * D);
            memcpy(L->v + k * L->v_stride + slot * Dv, vin + k * Dv, sizeof(float) * Dv);
        }
        if (rc) break;
        if (L->cos) rope_rotate_half(qkv, L->cos, L->sin, &pos, q, H, 1, D, L->rot, L->npos);
        else memcpy(q, qkv, sizeof(float) * H * D);
        attend_one(q, L->k, L->k_stride, L->v, L->v_stride, G->mask, att, scores, H, KV, (int)S, D, Dv, L->scale);
        if ((rc = lin(&L->o, att, H * Dv, h, tmp, nthreads))) break;
        norm(&L->attn_post_norm, h, 1, d);
        for (int j = 0; j < d; j++) x[j] += h[j];
        /* gated MLP */
        memcpy(h, x, sizeof(float) * d);
        norm(&L->ffn_norm, h, 1, d);
        float* gu = qkv;
        if ((rc = lin(&L->gate_up, h, d, gu, tmp, nthreads))) break;
        gated_act(gu, gu, 1, L->hidden, L->act);
        if ((rc = lin(&L->down, gu, L->hidden, h, tmp, nthreads))) break;
        norm(&L->ffn_post_norm, h, 1, d);
        for (int j = 0; j < d; j++) x[j] += h[j];
    }
    if (!rc) {
        norm(&P->final_norm, x, 1, d);
        rc = lin(&P->head, x, d, logits, tmp, nthreads);
    }
    if (rc) return rc;
    if (P->softcap > 0.f)  /* libm's tanhf: within an ulp of torch.tanh, the one op not bit-equal */
        for (int j = 0; j < P->vocab; j++) logits[j] = tanhf(logits[j] / P->softcap) * P->softcap;
    long best = 0;
    for (int j = 1; j < P->vocab; j++)
        if (logits[j] > logits[best]) best = j;
    *next = best;
    return 0;
}
"""


class Lin(ctypes.Structure):
    _fields_ = [
        ("nparts", ctypes.c_int),
        ("out", ctypes.c_int),
        ("types", ctypes.c_void_p),
        ("ws", ctypes.c_void_p),
        ("row_bytes", ctypes.c_void_p),
        ("rows", ctypes.c_void_p),
        ("order", ctypes.c_void_p),
    ]


class Norm(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("eps", ctypes.c_float)]


class Layer(ctypes.Structure):
    _fields_ = [
        *[(n, Norm) for n in ("attn_norm", "attn_post_norm", "ffn_norm", "ffn_post_norm", "q_norm", "k_norm")],
        ("qk_whole", ctypes.c_int),
        *[(n, Lin) for n in ("qkv", "o", "gate_up", "down")],
        *[(n, ctypes.c_int) for n in ("heads", "kv_heads", "head_dim", "v_dim", "hidden", "act")],
        ("scale", ctypes.c_float),
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        ("rot", ctypes.c_long),
        ("npos", ctypes.c_long),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("k_stride", ctypes.c_long),
        ("v_stride", ctypes.c_long),
        ("group", ctypes.c_int),
    ]


class Group(ctypes.Structure):
    _fields_ = [
        ("slot_pos", ctypes.c_void_p),
        ("size", ctypes.c_long),
        ("window", ctypes.c_long),
        ("ring", ctypes.c_int),
        ("mask", ctypes.c_void_p),
    ]


class Plan(ctypes.Structure):
    _fields_ = [
        *[(n, ctypes.c_int) for n in ("n_layers", "n_groups", "d", "vocab")],
        ("layers", ctypes.c_void_p),
        ("groups", ctypes.c_void_p),
        ("final_norm", Norm),
        ("head", Lin),
        ("softcap", ctypes.c_float),
        ("widest", ctypes.c_long),
        ("work", ctypes.c_void_p),
    ]


@lru_cache(maxsize=1)
def _lib():
    source = "#include <string.h>\n" + gguf_matmul.SOURCE + cpu_kernels.FLOAT_OPS + DECODE
    lib = build_avx2("cpu_decode", source, ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"])
    if lib is None:
        return None
    p = ctypes.c_void_p
    lib.decode_step.argtypes = [p, p, ctypes.c_long, p, ctypes.c_int, p]
    lib.decode_step.restype = ctypes.c_int
    return lib


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

        lib = _lib()
        _need(lib is not None, "the C kernels")
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
        self.work = torch.empty(d + 3 * widest + max(widest, spec.vocab_size) + longest, dtype=torch.float32)
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

    def __call__(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """ids [1, 1] -> logits [1, vocab] (a buffer the next call overwrites); self.next_token()
        is their argmax."""
        x = self.model.embed_ids(ids, torch.tensor([pos])).reshape(-1)
        x = x.float().contiguous() if x.dtype != torch.float32 else x.contiguous()
        rc = _lib().decode_step(
            ctypes.addressof(self.plan),
            x.data_ptr(),
            pos,
            self.logits.data_ptr(),
            torch.get_num_threads(),
            ctypes.addressof(self.next),
        )
        if rc:
            what = {2: "out of memory", 3: f"position {pos} outside the cache or RoPE tables"}.get(rc, "kernel failure")
            raise LlmarchError(f"CPU decode step failed ({what})")
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

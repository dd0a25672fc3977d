"""The C decode step of cpu_decode.py as a torch-free library: its source, the plan structures it
walks (ctypes mirrors of the C structs) and the build. cpu_decode.py fills a plan from built torch
modules; native_run.py fills one from a saved plan file without importing torch. Both call the same
`decode_step`."""

from __future__ import annotations

import ctypes
from functools import lru_cache

from llmarch.runtime.cbuild import build_avx2
from llmarch.runtime.kernel_sources import FLOAT_OPS, GGUF_MATMUL

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
def lib():
    """The built library, or None (no compiler / AVX2, or LLMARCH_NO_CKERNEL)."""
    source = "#include <string.h>\n" + GGUF_MATMUL + FLOAT_OPS + DECODE
    lib = build_avx2("cpu_decode", source, ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"])
    if lib is None:
        return None
    p = ctypes.c_void_p
    lib.decode_step.argtypes = [p, p, ctypes.c_long, p, ctypes.c_int, p]
    lib.decode_step.restype = ctypes.c_int
    return lib

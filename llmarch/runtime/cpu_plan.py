"""The C decode step of cpu_decode.py as a torch-free library: its source, the plan structures it
walks (ctypes mirrors of the C structs) and the build. cpu_decode.py fills a plan from built torch
modules; native_run.py fills one from a saved plan file without importing torch. Both call the same
`decode_step` (one token) and `prefill` (a prompt: `prefill_step` over chunks of PREFILL_ROWS tokens,
each chunk's matmuls over all its rows at once)."""

from __future__ import annotations

import ctypes
import threading
from functools import lru_cache

from llmarch.errors import LlmarchError
from llmarch.runtime.cbuild import build_avx2
from llmarch.runtime.kernel_sources import FLOAT_OPS, GGUF_MATMUL, KQUANT_ROWS

# tokens per prefill_step call: bounds its scratch and the int8 activations each matmul quantizes,
# which grow with the rows (a 512-token prefill of the embedded model ran alike in chunks of 64 to
# 512 within this 2-core machine's noise, one thread)
PREFILL_ROWS = 128
# the longest prompt prefilled in C (the Generator's and the native run's rule, so both give the
# same logits): with the token-tiled matmul kernel the C prefill beat the module path at 256 and
# 512 tokens on the embedded model (one thread; README, CPU prefill)
C_PREFILL_MAX = 512

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

/* y [m, out] = x [m, K] @ W^T (each row's result does not depend on m); rows reordered by `order`
   where the loader permuted them, through tmp [m, out] */
static int lin(const Lin* l, const float* x, long m, int K, float* y, float* tmp, int nthreads) {
    float* out = l->order ? tmp : y;
    int rc = gguf_linear(x, (int)m, K, l->nparts, l->types, l->ws, l->row_bytes, l->rows, out, nthreads);
    if (l->order)
        for (long t = 0; t < m; t++)
            for (int i = 0; i < l->out; i++) y[t * l->out + i] = tmp[t * l->out + l->order[i]];
    return rc;
}
static void norm(const Norm* n, float* x, long rows, long dim) {
    if (n->w) rms_norm(x, n->w, x, rows, dim, n->eps);
}
static void add_rows(float* x, const float* h, long n) {
    for (long j = 0; j < n; j++) x[j] += h[j];
}
/* Positions pos0 .. pos0 + T - 1 in order, as T decode steps would see them: each group's slot table
   takes each position in turn (as KVCache.prepare) and masks[g] row t [size] is what position pos0 + t
   sees. A layer then writes token t's K/V into its slot before token t attends, so each token reads
   exactly the keys a decode step at its position reads, rings that wrap within the T included. */
static int set_slots(const Plan* P, long pos0, long T, uint8_t* const* masks) {
    if (pos0 < 0 || T < 1) return 3;
    for (int g = 0; g < P->n_groups; g++)
        if (!P->groups[g].ring && pos0 + T > P->groups[g].size) return 3;
    for (int g = 0; g < P->n_groups; g++) {
        const Group* G = P->groups + g;
        for (long t = 0; t < T; t++) {
            const long pos = pos0 + t;
            uint8_t* mask = masks[g] + t * G->size;
            G->slot_pos[G->ring ? pos % G->size : pos] = pos;
            const long n = G->ring ? G->size : pos + 1;
            for (long j = 0; j < n; j++) {
                const int64_t s = G->slot_pos[j];
                mask[j] = s >= 0 && s <= pos && (G->window == 0 || s > pos - G->window);
            }
        }
    }
    return 0;
}
/* x [T, d]: the tokens' embeddings in, clobbered; every layer's matmuls over the T rows at once,
   attention token by token over the cache (see set_slots). logits [vocab] (NULL: skip the head, for
   a chunk that is not the prompt's last): the last token's; *next: their first argmax.
   Returns 0, 1 (kernel failure), 2 (out of memory), 3 (position outside the cache or the RoPE tables).
   Scratch: the plan's work for T = 1 (a decode step allocates nothing), else allocated here. */
int prefill_step(const Plan* P, float* x, long pos0, long T, float* logits, int nthreads, long* next) {
    if (T < 1 || T > (1L << 24)) return 3;
    const int d = P->d;
    const long W = P->widest;
    long longest = 1, mask_bytes = 0;
    for (int g = 0; g < P->n_groups; g++) {
        if (P->groups[g].size > longest) longest = P->groups[g].size;
        mask_bytes += T * P->groups[g].size;
    }
    const long tmp_n = T * W > P->vocab ? T * W : P->vocab;
    float* work = P->work;
    uint8_t* own_masks = NULL;
    uint8_t* masks[P->n_groups > 0 ? P->n_groups : 1];
    if (T == 1) {
        for (int g = 0; g < P->n_groups; g++) masks[g] = P->groups[g].mask;
    } else {
        work = (float*)malloc(sizeof(float) * (size_t)(T * d + 2 * T * W + W + tmp_n + longest));
        own_masks = (uint8_t*)malloc((size_t)mask_bytes);
        if (!work || !own_masks) { free(work); free(own_masks); return 2; }
        long off = 0;
        for (int g = 0; g < P->n_groups; off += T * P->groups[g].size, g++) masks[g] = own_masks + off;
    }
    int rc = set_slots(P, pos0, T, masks);
    float* h = work;                       /* [T, d] normed input, then a sub-block's output */
    float* qkv = h + T * d;                /* [T, q | k | v], then [T, gate | up] */
    float* q = qkv + T * W;                /* one token's rotated queries */
    float* att = q + W;                    /* attention output [T, H * Dv] */
    float* tmp = att + T * W;              /* a Linear's output before its rows are reordered */
    float* scores = tmp + tmp_n;           /* one head's scores over the cache */
    for (int i = 0; i < P->n_layers && !rc; i++) {
        const Layer* L = P->layers + i;
        const Group* G = P->groups + L->group;
        const int H = L->heads, KV = L->kv_heads, D = L->head_dim, Dv = L->v_dim;
        const long nqkv = (long)H * D + (long)KV * D + (long)KV * Dv;
        /* attention */
        memcpy(h, x, sizeof(float) * T * d);
        norm(&L->attn_norm, h, T, d);
        if ((rc = lin(&L->qkv, h, T, d, qkv, tmp, nthreads))) break;
        for (long t = 0; t < T && !rc; t++) {
            long pos = pos0 + t;
            const long slot = G->ring ? pos % G->size : pos;
            /* slots past pos hold no position <= pos (a ring's slot j only ever holds j + k * size),
               so the keys a token sees all lie below min(size, pos + 1) */
            const long S = pos + 1 < G->size ? pos + 1 : G->size;
            float* qin = qkv + t * nqkv;
            float* kin = qin + H * D;
            float* vin = kin + KV * D;
            if (L->qk_whole) { norm(&L->q_norm, qin, 1, (long)H * D); norm(&L->k_norm, kin, 1, (long)KV * D); }
            else { norm(&L->q_norm, qin, H, D); norm(&L->k_norm, kin, KV, D); }
            for (int k = 0; k < KV; k++) {
                float* kdst = L->k + k * L->k_stride + slot * D;
                if (L->cos) {
                    if (rope_rotate_half(kin + k * D, L->cos, L->sin, &pos, kdst, 1, 1, D, L->rot, L->npos)) { rc = 3; break; }
                } else memcpy(kdst, kin + k * D, sizeof(float) * D);
                memcpy(L->v + k * L->v_stride + slot * Dv, vin + k * Dv, sizeof(float) * Dv);
            }
            if (rc) break;
            if (L->cos) rope_rotate_half(qin, L->cos, L->sin, &pos, q, H, 1, D, L->rot, L->npos);
            else memcpy(q, qin, sizeof(float) * H * D);
            attend_one(q, L->k, L->k_stride, L->v, L->v_stride, masks[L->group] + t * G->size, att + t * H * Dv,
                       scores, H, KV, (int)S, D, Dv, L->scale);
        }
        if (rc) break;
        if ((rc = lin(&L->o, att, T, H * Dv, h, tmp, nthreads))) break;
        norm(&L->attn_post_norm, h, T, d);
        add_rows(x, h, T * d);
        /* gated MLP */
        memcpy(h, x, sizeof(float) * T * d);
        norm(&L->ffn_norm, h, T, d);
        float* gu = qkv;
        if ((rc = lin(&L->gate_up, h, T, d, gu, tmp, nthreads))) break;
        gated_act(gu, gu, T, L->hidden, L->act);  /* in place: row t's output ends before row t's input */
        if ((rc = lin(&L->down, gu, T, L->hidden, h, tmp, nthreads))) break;
        norm(&L->ffn_post_norm, h, T, d);
        add_rows(x, h, T * d);
    }
    float* last = x + (T - 1) * d;
    if (!rc && logits) {
        norm(&P->final_norm, last, 1, d);
        rc = lin(&P->head, last, 1, d, logits, tmp, nthreads);
    }
    if (own_masks) { free(work); free(own_masks); }
    if (rc) return rc;
    if (!logits) { *next = -1; return 0; }
    if (P->softcap > 0.f)  /* libm's tanhf: within an ulp of torch.tanh, the one op not bit-equal */
        for (int j = 0; j < P->vocab; j++) logits[j] = tanhf(logits[j] / P->softcap) * P->softcap;
    long best = 0;
    for (int j = 1; j < P->vocab; j++)
        if (logits[j] > logits[best]) best = j;
    *next = best;
    return 0;
}
/* One decode step: prefill_step's T = 1 case. x [d] in, clobbered. */
int decode_step(const Plan* P, float* x, long pos, float* logits, int nthreads, long* next) {
    return prefill_step(P, x, pos, 1, logits, nthreads, next);
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


def check_rc(rc: int, what: str, where: str) -> None:
    """decode_step's / prefill_step's return code as one error line (0: nothing)."""
    if rc:
        why = {2: "out of memory", 3: f"{where} outside the cache or RoPE tables"}.get(rc, "kernel failure")
        raise LlmarchError(f"CPU {what} failed ({why})")


def work_floats(d: int, widest: int, vocab: int, longest: int) -> int:
    """The size of Plan.work (a decode step's scratch, see the struct): d, three of the widest
    layer vector, the wider of that and the logits, and the longest cache's scores."""
    return d + 3 * widest + max(widest, vocab) + longest


_building: threading.Thread | None = None


def start_building() -> None:
    """Compile the library on a thread of its own (the compilers are subprocesses, ~3 s on 2 cores
    the first time on a machine), so that a first run's start-up (the tokenizer, the decode plan)
    goes on beside it; lib() waits for it. Not a daemon: an early exit waits for the compiler
    rather than leave its half-written output in the cache."""
    global _building
    if _building is None:
        _building = threading.Thread(target=_built, name="llmarch-cc")
        _building.start()


def lib():
    """The built library, or None (no compiler / AVX2, or LLMARCH_NO_CKERNEL)."""
    if _building is not None:
        _building.join()
    return _built()


@lru_cache(maxsize=1)
def _built():
    source = "#define KQUANT_APART\n#include <string.h>\n" + GGUF_MATMUL + FLOAT_OPS + DECODE
    lib = build_avx2("cpu_decode", source, ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"], (KQUANT_ROWS,))
    if lib is None:
        return None
    p = ctypes.c_void_p
    lib.decode_step.argtypes = [p, p, ctypes.c_long, p, ctypes.c_int, p]
    lib.decode_step.restype = ctypes.c_int
    lib.prefill_step.argtypes = [p, p, ctypes.c_long, ctypes.c_long, p, ctypes.c_int, p]
    lib.prefill_step.restype = ctypes.c_int
    return lib


def prefill(
    plan_address: int, x_address: int, pos0: int, T: int, logits_address: int, nthreads: int
) -> tuple[int, int]:
    """Run the T tokens whose float32 embeddings lie at x_address ([T, d], contiguous, clobbered)
    through every layer at positions pos0 .. pos0 + T - 1, writing their K/V into the plan's cache,
    in chunks of PREFILL_ROWS; the last token's logits go to logits_address ([vocab] float32).
    Returns (rc, next): rc as prefill_step's (0 ok, 1 kernel failure, 2 out of memory, 3 position
    outside the cache or the RoPE tables), next the logits' first argmax. No torch: native_run.py
    calls it with its own buffers' addresses."""
    if T < 1:
        return 3, -1
    row = Plan.from_address(plan_address).d * ctypes.sizeof(ctypes.c_float)
    nxt = ctypes.c_long(-1)
    for i in range(0, T, PREFILL_ROWS):
        n = min(PREFILL_ROWS, T - i)
        out = logits_address if i + n == T else None  # the head only for the prompt's last token
        rc = lib().prefill_step(plan_address, x_address + i * row, pos0 + i, n, out, nthreads, ctypes.byref(nxt))
        if rc:
            return rc, -1
    return 0, nxt.value

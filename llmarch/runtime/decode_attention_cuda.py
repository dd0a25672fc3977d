"""A one-token decode step's attention on CUDA as one Triton kernel (flash-decoding), instead of
two cuBLAS products with inductor's scale / mask / softmax kernel between them.

Why: batch-1 decode of a small model is a few hundred short kernels a step, and the attention's
three launches a layer cost more than the few kilobytes of K and V they read. The kernel
(decode_attention_cuda_kernels) reads each K and V row once for all the query heads that share it
(GQA / MQA), keeps scores and softmax in float32 and applies the cache group's visibility mask as
attend() does (a captured step attends over every slot; the mask hides empty, future and
out-of-window ones). A long cache is split along the slot axis over more programs, whose partial
softmaxes a second kernel merges; a short one (up to 256 slots a KV head) is one launch.

One torch custom op, so torch.compile keeps it whole (an opaque call) and CUDA graph capture records
its launches. attend() sends a step here when its Attention was built with enabled() true (DEFAULT_ON,
or LLMARCH_NO_DECODE_ATTN=0 / =1) and takes() says so: CUDA, one query token, float16 / bfloat16 q,
K and V, a [1, S] bool mask; and none of soft-capping or sinks (attend() checks those; they keep
the explicit form).

decode_attention_new goes one step further where only a per-head RMS norm and RoPE lie between the
projection and the cache (Attention.decode_new, new_step_enabled(): LLMARCH_NO_DECODE_ROPE): the
kernel takes the raw q, k, v projections, norms and rotates q and k, writes k and v into the cache
slot and attends, in place of inductor's norm / RoPE / index_copy kernels and the attention op.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from typing import NamedTuple

import torch

from llmarch.runtime import gemv_cuda
from llmarch.runtime.gguf_cuda import interpreting, switched_on

DTYPES = (torch.bfloat16, torch.float16)
TILE = 8192  # K (or V) values a program holds per step: slots per step x head width
MIN_CHUNK = 256  # slots a split walks at least: below that a second launch costs more than it spreads
MAX_SPLITS = 64  # splits of one KV head at most (a 16k-slot cache: 256 slots each)
# whether a CUDA decode step takes the kernel when LLMARCH_NO_DECODE_ATTN is unset: on, since the
# H200 measured it faster end to end (benchmarks/bench_gemv_cuda.py decode; README)
DEFAULT_ON = True
# the same for the step that also norms and rotates q and k and writes the cache (decode_attention_new)
NEW_STEP_ON = True
CPU_TOO = False  # tests: CPU tensors take the kernels under the Triton interpreter (see on_device)
# checked once, without importing triton (which costs seconds): attend() runs on every device
HAVE_TRITON = importlib.util.find_spec("triton") is not None


@cache
def _kernels():
    from llmarch.runtime import decode_attention_cuda_kernels

    return decode_attention_cuda_kernels


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << (n - 1).bit_length())


def plan(S: int, width: int) -> tuple[int, int, int]:
    """(slots per step, slots per split, splits) for S slots of heads `width` values wide (padded
    to a power of two). Slots per split are a power-of-two multiple of the step (a compile-time
    loop bound: an eager step's growing prefix makes a new variant only as it doubles)."""
    bs = max(16, min(128, TILE // width))
    total = -(-S // bs)
    steps = max(MIN_CHUNK // bs, _pow2(-(-total // MAX_SPLITS), 1))
    steps = min(steps, _pow2(total, 1))
    return bs, steps * bs, -(-S // (steps * bs))


def launch(q, k, v, mask, scale: float, out, chunk: int | None = None, new: NewStep | None = None) -> None:
    """out [B, H, DV] = softmax(q . k^T * scale, hidden where not mask) @ v for q [B, H, D],
    k [B, KV, >= S, D], v [B, KV, >= S, DV] (last dims contiguous), mask bool [S] over the first S
    slots; chunk replaces plan()'s slots per split (tests force splits on short caches).

    new: q is this step's raw query projection, and the kernel norms and rotates it and new.k, and
    writes new.k / new.v into k / v at slot new.slot (see the kernel's NEW)."""
    B, H, D = q.shape
    KV, S, DV = k.shape[1], mask.shape[0], v.shape[3]
    rep = H // KV
    rep_p, d_p, dv_p = _pow2(rep), _pow2(D), _pow2(DV)
    bs, ch, splits = plan(S, max(d_p, dv_p))
    if chunk is not None:
        ch = _pow2(-(-chunk // bs), 1) * bs
        splits = -(-S // ch)
    kern = _kernels()
    early = gemv_cuda.pdl(q.device)  # the GEMVs' switch: both or neither, so each pair overlaps
    late = not early and gemv_cuda.attention_late_pdl(q.device)
    dependent = early or late
    launch_opts = {"PDL": dependent, **({"launch_pdl": True} if dependent else {})}
    parts = splits > 1
    if parts:
        pm = torch.empty(B * KV * splits * rep_p, dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
        pa = torch.empty(B * KV * splits * rep_p * dv_p, dtype=torch.float32, device=q.device)
    else:
        pm = pl = pa = out  # unused
    m8 = mask.view(torch.uint8)
    if new is not None:
        kin, vin = new.k, new.v
        ext = (kin, vin, kin.stride(0), kin.stride(1), vin.stride(0), vin.stride(1))
        rot = 0 if new.cos is None else new.cos.shape[-1]
        tables = (new.cos, new.sin) if rot else (q, q)
        weights = (new.q_w, new.k_w) if new.q_w is not None else (q, q)
        ext += (*weights, *tables, new.pos, new.slot, float(new.eps))
    else:
        ext = (q, q, 0, 0, 0, 0, q, q, q, q, q, q, 0.0)  # unused
    kern.decode_attention[(B * KV, splits)](
        q,
        k,
        v,
        m8,
        out,
        pm,
        pl,
        pa,
        S,
        scale,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        *ext,
        CHUNK=ch,
        SPLITS=splits,
        KV=KV,
        REP=rep,
        REP_P=rep_p,
        D=D,
        D_P=d_p,
        DV=DV,
        DV_P=dv_p,
        BS=bs,
        PARTS=parts,
        INTERPRETER=interpreting(),
        NEW=new is not None,
        NORM=new is not None and new.q_w is not None,
        ROT=0 if new is None or new.cos is None else new.cos.shape[-1],
        num_warps=8 if rep_p * max(d_p, dv_p) >= 8192 else 4,  # 512-wide heads spill registers with 4
        LATE=late,
        **launch_opts,
    )
    if parts:
        kern.decode_attention_combine[(B * H,)](
            pm,
            pl,
            pa,
            out,
            out.stride(0),
            out.stride(1),
            splits,
            H=H,
            REP=rep,
            REP_P=rep_p,
            DV=DV,
            DV_P=dv_p,
            SPLITS_P=_pow2(splits, 2),
            num_warps=4,
            **launch_opts,
        )


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    # the kernel reads each row's values contiguously; a compiled graph may hand other layouts
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(q.shape[0], q.shape[1], v.shape[3], dtype=q.dtype, device=q.device)
    launch(q, k, v, mask.reshape(-1).contiguous(), scale, out)
    return out


decode_attention = torch.library.custom_op("llmarch::decode_attention", mutates_args=())(_forward)


@decode_attention.register_fake
def _(q, k, v, mask, scale):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[3])


class NewStep(NamedTuple):
    """This step's raw key / value projections [B, KV, D(V)] and what turns q and k into the cached
    form: per-head RMS norm weights (float32 [D], or None: no norm) and eps, the RoPE tables (cos,
    sin with its first half negated [positions, rotated lanes], or None: no rotation), the position
    and the cache slot it writes ([1] int64 tensors)."""

    k: torch.Tensor
    v: torch.Tensor
    q_w: torch.Tensor | None
    k_w: torch.Tensor | None
    eps: float
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    pos: torch.Tensor
    slot: torch.Tensor


def _forward_new(
    q: torch.Tensor,
    k_in: torch.Tensor,
    v_in: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    mask: torch.Tensor,
    pos: torch.Tensor,
    slot: torch.Tensor,
    q_w: torch.Tensor | None,
    k_w: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    eps: float,
    scale: float,
) -> torch.Tensor:
    q, k_in, v_in = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_in, v_in))
    out = torch.empty(q.shape[0], q.shape[1], v_cache.shape[3], dtype=q.dtype, device=q.device)
    new = NewStep(k_in, v_in, q_w, k_w, eps, cos, sin, pos, slot)
    launch(q, k_cache, v_cache, mask.reshape(-1).contiguous(), scale, out, new=new)
    return out


decode_attention_new = torch.library.custom_op("llmarch::decode_attention_new", mutates_args=("k_cache", "v_cache"))(
    _forward_new
)


@decode_attention_new.register_fake
def _(q, k_in, v_in, k_cache, v_cache, mask, pos, slot, q_w, k_w, cos, sin, eps, scale):
    return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[3])


def new_step_enabled() -> bool:
    """Whether an Attention built now folds its decode step's q/k norm, RoPE and cache write into
    the kernel too (decode_attention_new): LLMARCH_NO_DECODE_ROPE=1 no, =0 yes, unset NEW_STEP_ON."""
    return HAVE_TRITON and switched_on("LLMARCH_NO_DECODE_ROPE", NEW_STEP_ON)


def on_device(t: torch.Tensor) -> bool:
    """Whether t's step may run the kernels: on CUDA (and CPU tensors under the Triton interpreter
    where a test sets CPU_TOO)."""
    return t.device.type == "cuda" or (CPU_TOO and t.device.type == "cpu" and interpreting())


def enabled() -> bool:
    """Whether a model built now sends its CUDA decode steps here (an Attention reads it once, at
    construction, so a compiled step's choice is guarded like any module attribute):
    LLMARCH_NO_DECODE_ATTN=1 keeps torch's products, =0 takes the kernel; unset: DEFAULT_ON."""
    return HAVE_TRITON and switched_on("LLMARCH_NO_DECODE_ATTN", DEFAULT_ON)


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether the kernel attends q [B, H, 1, D] over k / v [B, KV, S, D(v)] with mask [1, S]: a
    decode step on CUDA (or CPU tensors under the Triton interpreter) in one half-precision dtype."""
    on = q.device.type == "cuda" or (q.device.type == "cpu" and interpreting())
    if not on or q.dim() != 4 or q.shape[2] != 1 or k.dim() != 4 or v.dim() != 4:
        return False
    B, H, _, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    return (
        q.dtype in DTYPES
        and k.dtype == q.dtype
        and v.dtype == q.dtype
        and k.device == q.device
        and v.device == q.device
        and mask.device == q.device
        and k.shape[0] == B
        and v.shape[:3] == k.shape[:3]
        and k.shape[3] == D
        and KV > 0
        and H % KV == 0
        and S > 0
        and mask.dtype == torch.bool
        and tuple(mask.shape) == (1, S)
        and q.stride(-1) == 1
        and k.stride(-1) == 1
        and v.stride(-1) == 1
    )


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """ops.attention.attend()'s result [B, H, 1, DV] for a step takes() accepts."""
    return decode_attention(q[:, :, 0], k, v, mask, float(scale))[:, :, None]

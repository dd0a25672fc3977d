"""The one-token decode step's matrix-vector products on CUDA: y = x @ W^T (+ b) for one activation
row (the kernel takes up to 4), W a float16 / bfloat16 Linear weight, float32 accumulation, by one
Triton kernel (gemv_cuda_kernels) instead of cuBLAS or inductor's generated reductions.

Why: batch-1 decode reads every weight once a token, so its speed is the bandwidth the
matrix-vector products reach. The kernel reads each weight row once in wide contiguous loads
whatever the row count, with a tile (rows per program, values per step, warps) picked from the
matrix's shape, so the few-thousand-row projections still get enough programs to fill the GPU.

A Linear's forward is one torch custom op, so torch.compile keeps it whole (an opaque call, as
gguf_cuda's stored-block op) and CUDA graph capture records its launch; Triton compiles it on the
first call of each width, which the Generator's warm-up makes before capturing. Longer inputs
(prefill), float32, CPU tensors and anything else go to F.linear. LLMARCH_NO_GEMV=1 leaves the model's Linears as they are.

A gated MLP's gate|up matrix can also take the kernel with silu(gate) * up as its epilogue
(gated_silu, one more custom op): the activation's own launch a layer goes, and the [gate | up] row
is never written.

A pre-norm layer's RMS norm can be the prologue of the GEMV that reads its output (normed_linear,
gated_silu's norm: q|k|v, gate|up, the head after the final norm), and its residual add the
epilogue of the GEMV whose output is added (linear_add: o, down): a plain pre-norm layer is then
four GEMV launches and the attention op, no normed row or un-added output written between them.

On sm90+ a one-row product goes to gemv_stream_cuda's CUDA kernel instead (weights streamed through
shared memory by bulk copies asked for before its programmatic-dependent-launch wait), the decode
attention op then launched early beside it (attention_late_pdl); the Triton kernel takes what it
does not. Two launch options of the Triton kernel stay off by default, measured slower on the H200
(README): programmatic dependent launches (pdl(), LLMARCH_NO_PDL=0) and weight tiles loaded a step
ahead (ahead(), LLMARCH_NO_GEMV_AHEAD=0).
"""

import os
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from llmarch.runtime import gemv_stream_cuda
from llmarch.runtime.gguf_cuda import available, interpreting, switched_on
from llmarch.runtime.ops.norms import RMSNorm

ROWS = 1  # activation rows a Linear sends to the kernel (see takes())
DTYPES = (torch.bfloat16, torch.float16)
# a gated MLP's silu(gate) * up in the gate|up GEMV's epilogue when LLMARCH_NO_FUSED_GLU is unset:
# on, since the H200 measured it (with the decode attention op) faster end to end (README)
FUSED_GLU = True
# a pre-norm layer's RMS norms in its GEMVs' prologue and its residual adds in their epilogue when
# LLMARCH_NO_FUSED_NORM is unset: on, since the H200 measured it faster end to end and its captured +
# compiled decode test passed there (README)
FUSED_NORM = True
REGS = 64  # float32 accumulator values per thread a tile may hold (MP * BN * BK / threads)
# the decode kernels (these GEMVs, the decode attention op's) launched as programmatic dependent
# launches on sm90+ when LLMARCH_NO_PDL is unset: each lets the next start while its last programs
# drain, the next reading its weights before it waits for the previous kernel's writes. Off: on the
# H200 it was slower end to end alone (0.985x) and with AHEAD (README)
PDL = False
# each program's weight tiles loaded a step ahead (the first before the PDL wait) when
# LLMARCH_NO_GEMV_AHEAD is unset. Off: Triton then keeps a several-step loop rolled, and the
# 2048x8192 down GEMV ran 1.3x slower on the H200 (README)
AHEAD = False
# one-row products on sm90+ by gemv_stream_cuda's CUDA kernel (weights streamed through shared memory
# by bulk copies issued before its PDL wait) when LLMARCH_NO_GEMV_STREAM is unset; the Triton kernel
# takes what it does not
STREAM = True
# the decode attention op launched early (PDL) beside the streaming GEMVs, letting the o GEMV launch
# only at its end, when LLMARCH_NO_ATTN_LATE_PDL is unset: on, since the H200 measured it faster
# (1.016x Llama, 1.020x Qwen3 over the stream kernels alone), where an early trigger lost 7%
ATTN_LATE_PDL = True


@cache
def _kernels():
    from llmarch.runtime import gemv_cuda_kernels

    return gemv_cuda_kernels


def pdl(device: torch.device) -> bool:
    """Whether a decode kernel launched now on `device` goes as a programmatic dependent launch:
    CUDA sm90+ (not the interpreter), LLMARCH_NO_PDL=1 no, =0 yes, unset: PDL. Read at each launch
    (a flag of the launch, not of the model): a captured graph keeps what its capture launched."""
    if device.type != "cuda" or interpreting() or not gemv_stream_cuda.sm90(device.index or 0):
        return False
    return switched_on("LLMARCH_NO_PDL", PDL)


def streaming(device: torch.device) -> bool:
    """Whether a one-row product launched now on `device` may take gemv_stream_cuda's kernel: CUDA (not
    the interpreter), LLMARCH_NO_GEMV_STREAM=1 no, =0 yes, unset: STREAM (read at each launch, as pdl())."""
    return device.type == "cuda" and not interpreting() and switched_on("LLMARCH_NO_GEMV_STREAM", STREAM)


def attention_late_pdl(device: torch.device) -> bool:
    """Whether the decode attention op goes as a programmatic dependent launch that lets the next
    kernel launch only at its end (the GEMVs streaming, sm90+): LLMARCH_NO_ATTN_LATE_PDL=1 no, =0
    yes, unset: ATTN_LATE_PDL (read at each launch, as pdl())."""
    if not streaming(device) or not gemv_stream_cuda.sm90(device.index or 0):
        return False
    return switched_on("LLMARCH_NO_ATTN_LATE_PDL", ATTN_LATE_PDL)


def ahead() -> bool:
    """Whether the GEMV loads its weight tiles a step ahead: LLMARCH_NO_GEMV_AHEAD=1 no, =0 yes,
    unset: AHEAD (read at each launch, as pdl())."""
    return switched_on("LLMARCH_NO_GEMV_AHEAD", AHEAD)


def fits(tile: tuple[int, int, int], mp: int) -> bool:
    bn, bk, warps = tile
    return mp * bn * bk <= REGS * 32 * warps


def pick_tile(mp: int, N: int, K: int) -> tuple[int, int, int]:
    """(weight rows per program, values per step, warps) for an [N, K] matrix and mp activation rows.

    From a sweep of 43 tiles over the Llama-3.2-1B / Qwen3-1.7B decode shapes on an H200
    (benchmarks/bench_gemv_cuda.py): 4 warps over a whole 2048-value row per step, 2 rows a program
    below 8192 rows (q|k|v, o, down: 2048-4096 rows give 1024-2048 programs) and 4 above (gate|up,
    the head), were within ~10% of each shape's best tile, where autotuning on the first call picked
    worse ones (timing noise on 5-20 us kernels) and cost seconds at start."""
    bk = 2048
    while bk > 256 and K % bk:
        bk //= 2
    bk = min(bk, max(16, 1 << (K - 1).bit_length()))  # narrow rows: one step
    bn = max(1, (8192 if N >= 8192 else 4096) // mp // bk)
    return bn, bk, 4


def launch(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    y: torch.Tensor,
    tile=None,
    glu: bool = False,
    norm_w: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
) -> None:
    """y [M, N] = x [M, K] @ w[N, K]^T (+ b), all contiguous, M <= 4: one row on sm90+ by
    gemv_stream_cuda where it takes it (streaming()), else the Triton kernel; tile (BN, BK, warps)
    asks for the Triton kernel with that tile instead of pick_tile's (benchmarks). glu: w (and b)
    hold a gated MLP's [gate; up] rows and y [M, N / 2] = silu(gate) * up, each program taking half
    the rows pick_tile gives from each half (the same weight values a program as without).

    norm_w ([K], float32 or a 16-bit dtype that holds the norm's weight exactly) and eps: x is a
    residual-stream row and the product's input is RMSNorm's output rms_norm(x) * norm_w (the
    kernel's prologue). residual [M, N] (y's dtype, contiguous):
    y = residual + the product (its epilogue).

    w must not be written by the kernel launched just before: the stream kernel (and the Triton
    one with ahead() and pdl()) reads weights before the wait for that kernel (a model's weights
    are no kernel's output)."""
    M, K = x.shape
    if (
        M == 1
        and tile is None
        and streaming(x.device)
        and gemv_stream_cuda.launch(x, w, b, y, glu, norm_w, eps, residual)
    ):
        return
    N = w.shape[0] // 2 if glu else w.shape[0]
    mp = 1 << (M - 1).bit_length()
    if interpreting():
        tile = (16, 256, 1)  # few programs: the interpreter's cost is per program
    if tile is None and glu:
        bn, bk, warps = pick_tile(mp, 2 * N, K)
        tile = (max(1, bn // 2), bk, warps)
    bn, bk, warps = tile or pick_tile(mp, N, K)
    bias = b if b is not None else w  # unused when HAS_BIAS is false
    dependent = pdl(x.device)
    _kernels().gemv[(-(-N // bn),)](
        x,
        w,
        bias,
        y,
        M,
        N,
        K,
        MP=mp,
        BN=bn,
        BK=bk,
        EVEN_K=K % bk == 0,
        HAS_BIAS=b is not None,
        GLU=glu,
        nw=norm_w if norm_w is not None else w,  # unused without NORM
        res=residual if residual is not None else y,  # unused without RES
        eps=float(eps),
        NORM=norm_w is not None,
        RES=residual is not None,
        ONE=K == bk,
        PDL=dependent,
        AHEAD=ahead(),
        num_warps=warps,
        **({"launch_pdl": True} if dependent else {}),
    )


def _forward(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    norm_w: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    launch(x, w, b, y, norm_w=norm_w, eps=eps, residual=residual)
    return y


# norm_w / eps: the RMS-norm prologue, residual: the residual-add epilogue (see launch)
decode_linear = torch.library.custom_op("llmarch::decode_linear", mutates_args=())(_forward)


@decode_linear.register_fake
def _(x, w, b, norm_w=None, eps=0.0, residual=None):
    return x.new_empty(x.shape[0], w.shape[0])


def _gated_forward(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, norm_w: torch.Tensor | None = None, eps: float = 0.0
) -> torch.Tensor:
    y = torch.empty(x.shape[0], w.shape[0] // 2, dtype=x.dtype, device=x.device)
    launch(x, w, b, y, glu=True, norm_w=norm_w, eps=eps)
    return y


decode_gated_linear = torch.library.custom_op("llmarch::decode_gated_linear", mutates_args=())(_gated_forward)


@decode_gated_linear.register_fake
def _(x, w, b, norm_w=None, eps=0.0):
    return x.new_empty(x.shape[0], w.shape[0] // 2)


def takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the kernel runs x @ w^T: one row (a decode step), one float16/bfloat16 dtype, on CUDA
    (or CPU tensors under the Triton interpreter). The kernel computes up to 4 rows right, but on the
    H200 2-4 rows ran slower than cuBLAS (4 rows of gate|up: 35 against 19 us; it is bound by its
    float32 multiply-adds there, cuBLAS by the weights' bytes), so those stay F.linear's."""
    k = x.shape[-1] if x.dim() else 0
    rows = x.numel() // k if k else 0
    return (
        1 <= rows <= ROWS
        and on_device(x)
        and x.dtype in DTYPES
        and w.dtype == x.dtype
        and w.device == x.device
        and w.dim() == 2
        and w.shape[1] == k
        and w.is_contiguous()
    )


def on_device(x: torch.Tensor) -> bool:
    """CUDA tensors, or CPU tensors under the Triton interpreter (tests)."""
    return x.device.type == "cuda" or (x.device.type == "cpu" and interpreting())


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the decode kernel where it takes the shapes."""
    if not takes(x, w):
        return F.linear(x, w, b)
    y = decode_linear(x.reshape(-1, x.shape[-1]).contiguous(), w, b)
    return y.view(*x.shape[:-1], w.shape[0])


def fused_glu() -> bool:
    """Whether a gated MLP built now takes gated_silu (GatedMLP reads it once, at construction, so a
    compiled step's choice is guarded like any module attribute): LLMARCH_NO_FUSED_GLU=1 no, =0 yes,
    unset: FUSED_GLU."""
    return switched_on("LLMARCH_NO_FUSED_GLU", FUSED_GLU)


def gated_silu(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, norm: nn.Module | None = None
) -> torch.Tensor | None:
    """silu(gate) * up of a gated MLP's [gate; up] Linear (w [2H, K]) in the decode kernel, or None
    where it does not take x (see takes()). norm: x is the residual stream and the product's input is
    norm(x), computed in the kernel's prologue (None where the kernel cannot take that norm)."""
    if w.shape[0] % 2 or not takes(x, w):
        return None
    pro = () if norm is None else prologue(norm, x)
    if pro is None:
        return None
    y = decode_gated_linear(x.reshape(-1, x.shape[-1]).contiguous(), w, b, *pro)
    return y.view(*x.shape[:-1], w.shape[0] // 2)


def fused_norm() -> bool:
    """Whether a decoder layer built now hands its pre-norms to the GEMVs' prologue and its residual
    adds to their epilogue in one-token CUDA steps (Block reads it once, at construction):
    LLMARCH_NO_FUSED_NORM=1 no, =0 yes, unset: FUSED_NORM."""
    return switched_on("LLMARCH_NO_FUSED_NORM", FUSED_NORM)


def prologue(norm: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of an RMS norm of x's rows that the kernel's prologue computes as RMSNorm.forward
    does: loaded, its unit offset folded (fold_unit_offset), on x's device; else None. The weight is
    its 16-bit copy where one holds the float32 values exactly (weight_16), else the float32 one."""
    if not isinstance(norm, RMSNorm) or norm.unit_offset or norm.weight_f32 is None:
        return None
    w = norm.weight_16 if norm.weight_16 is not None else norm.weight_f32
    if w.device != x.device or w.dim() != 1 or w.shape[0] != x.shape[-1]:
        return None
    return w, float(norm.eps)


def normed_linear(x: torch.Tensor, lin: nn.Module, norm: nn.Module) -> torch.Tensor:
    """lin(norm(x)): one launch, the norm as the decode kernel's prologue, where the kernel takes x
    and the norm (a DecodeLinear, see takes() and prologue()); else exactly the two modules' calls."""
    pro = prologue(norm, x) if isinstance(lin, DecodeLinear) and takes(x, lin.weight) else None
    if pro is None:
        return lin(norm(x))
    y = decode_linear(x.reshape(-1, x.shape[-1]).contiguous(), lin.weight, lin.bias, *pro)
    return y.view(*x.shape[:-1], lin.weight.shape[0])


def linear_add(x: torch.Tensor, lin: nn.Module, residual: torch.Tensor) -> torch.Tensor:
    """residual + lin(x): one launch, the add as the decode kernel's epilogue, where the kernel takes
    x (a DecodeLinear, see takes()) and residual is its output's shape and dtype; else exactly that sum."""
    n = lin.weight.shape[0] if isinstance(lin, DecodeLinear) else 0
    if (
        not n
        or not takes(x, lin.weight)
        or residual.shape != (*x.shape[:-1], n)
        or residual.dtype != x.dtype
        or residual.device != x.device
    ):
        return residual + lin(x)
    y = decode_linear(
        x.reshape(-1, x.shape[-1]).contiguous(), lin.weight, lin.bias, None, 0.0, residual.reshape(-1, n).contiguous()
    )
    return y.view(residual.shape)


class DecodeLinear(nn.Linear):
    """An nn.Linear (same parameters) whose forward takes the decode kernel where takes() says."""

    @classmethod
    def of(cls, mod: nn.Linear) -> "DecodeLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = mod.in_features, mod.out_features
        new.weight = mod.weight
        new.bias = mod.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def _takes_weight(w: torch.Tensor | None) -> bool:
    return w is not None and w.device.type == "cuda" and w.dtype in DTYPES and w.dim() == 2


def use_for_decode(model: nn.Module) -> str | None:
    """Swap the model's float16/bfloat16 nn.Linear layers on CUDA for DecodeLinear (the same
    parameters), a tied head too (the embedding's weight as an lm_head); the run report's line, or
    None where none was swapped (no triton, LLMARCH_NO_GEMV=1, no such layer)."""
    if os.environ.get("LLMARCH_NO_GEMV") == "1" or not available("cuda"):
        return None
    n = 0
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and _takes_weight(mod.weight):
            path, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(path) if path else model, leaf, DecodeLinear.of(mod))
            n += 1
    embed = getattr(model, "embed", None)
    tied = getattr(model, "lm_head", 0) is None and isinstance(embed, nn.Embedding)
    if tied and isinstance(embed.weight, nn.Parameter) and _takes_weight(embed.weight):
        head = DecodeLinear.of(nn.Linear(embed.weight.shape[1], embed.weight.shape[0], bias=False, device="meta"))
        head.weight = embed.weight  # tied: the head reads the embedding's table, as before
        model.lm_head = head
        n += 1
    if not n:
        return None
    device = next(m.weight.device for m in model.modules() if isinstance(m, DecodeLinear))
    kernel = "CUDA (streaming)" if streaming(device) and gemv_stream_cuda.usable(device) else "Triton"
    return f"{n} matrices take the {kernel} decode GEMV for one-token steps on CUDA (LLMARCH_NO_GEMV=1: torch's)"

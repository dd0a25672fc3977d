"""Matmuls straight from a GGUF's stored blocks on CUDA: y = x @ W^T with W the file's own
Q8_0 / Q4_0 / Q4_K / Q5_K / Q6_K blocks kept on the GPU, instead of a dequantized bf16 copy.

Why: batch-1 decode is bound by the bytes each step reads. Dequantized to bf16 a Q8_0 matrix reads
1.9x its file's bytes, a Q4_K one 3.6x; read as stored, a step reads what llama.cpp reads.

At load each tensor's blocks are split once into one contiguous array per field (quants, scales,
super-block scales: the same bits, except that Q4_K/Q5_K's 12 bytes of packed 6-bit scales and
mins become 16 bytes, one each, so the kernel reads them without bit twiddling: 4.625 bits a
weight instead of 4.5), rows in the order the model wants (llama.cpp's Q/K RoPE row order is undone
here once rather than at every step). Up to GEMV_ROWS activation rows (decode) run one Triton kernel
per stored tensor (gguf_cuda_kernels: dequantize in registers, float32 accumulation); longer
prefills dequantize slabs of rows into one buffer of the activation dtype (one Triton kernel a
slab) for torch's matmul.

A Linear's forward is one torch custom op, so torch.compile keeps it whole (an opaque call) and
CUDA graph capture records its kernel launches; the Triton kernels are compiled and tuned on the
first call, which the Generator's warm-up makes before capturing.

The mirror of gguf_matmul (the CPU's stored-block path): same selection rules (by each tensor's
stored type, bias-free Linears, widths a whole number of blocks, rows the loader only reorders).
"""

import os
from functools import cache, lru_cache

import torch
from torch import nn

from llmarch.errors import LlmarchError
from llmarch.runtime.gguf_matmul import check_shape, stored_parts
from llmarch.runtime.gguf_matmul import summary as stored_summary
from llmarch.runtime.quant import BLOCKS, _scale_min_k4

TYPES = ("Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K")  # the stored types read here, by code = index
GEMV_ROWS = 4  # activation rows per kernel; longer prefills dequantize slabs for torch's matmul
SLAB = 1 << 25  # weight values per dequantized slab in the prefill path (64 MiB of bf16)
MAX_WIDTH = 1024  # values of a row per kernel step


@lru_cache(maxsize=1)
def _kernels():
    """The Triton kernels, or None without triton (a CPU build of torch)."""
    try:
        from llmarch.runtime import gguf_cuda_kernels
    except ImportError:
        return None
    return gguf_cuda_kernels


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def switched_on(name: str, default: bool) -> bool:
    """A kernel feature's LLMARCH_NO_* switch: name=1 off, =0 on, unset (or anything else): default."""
    value = os.environ.get(name)
    return value == "0" if value in ("0", "1") else default


def available(device) -> bool:
    """Whether matrices on `device` can run from stored blocks: CUDA with triton (or CPU tensors
    under the Triton interpreter, for the tests)."""
    dev = torch.device(device)
    if dev.type != "cuda" and not (dev.type == "cpu" and interpreting()):
        return False
    return _kernels() is not None


# ------------------------------------------------------------------------------ repack


def repack(raw: torch.Tensor, qtype: str, rows: int, cols: int, device, order=None) -> tuple[torch.Tensor, ...]:
    """One tensor's stored blocks (uint8 bytes, `rows` x `cols` values) -> its field arrays on
    `device`, rows taken in `order` (row indices) when given. The arrays of each type, in the
    kernels' argument order:
      Q8_0: qs int8 [rows, cols], d fp16 [rows, cols/32]
      Q4_0: qs uint8 [rows, cols/2], d fp16 [rows, cols/32]
      Q4_K: qs uint8 [rows, cols/2], sc uint8 [rows, cols/32], mn uint8 [rows, cols/32], dm fp16 [rows, cols/128]
      Q5_K: qs, qh uint8 [rows, cols/8], sc, mn, dm (as Q4_K)
      Q6_K: ql uint8 [rows, cols/2], qh uint8 [rows, cols/4], sc int8 [rows, cols/16], d fp16 [rows, cols/256]
    """
    check_shape(qtype, raw, rows, cols)
    per, nbytes = BLOCKS[qtype]
    nb = cols // per
    b = raw.to(device).view(rows, nb, nbytes)
    if order is not None:
        b = b[order.to(b.device)]

    def field(lo: int, hi: int, dtype=torch.uint8) -> torch.Tensor:
        return b[..., lo:hi].contiguous().view(dtype).reshape(rows, -1)

    if qtype == "Q8_0":
        return field(2, 34, torch.int8), field(0, 2, torch.float16)
    if qtype == "Q4_0":
        return field(2, 18), field(0, 2, torch.float16)
    if qtype in ("Q4_K", "Q5_K"):
        s, m = _scale_min_k4(b[..., 4:16].reshape(-1, 12))  # exact small integers in float
        sc, mn = s.to(torch.uint8).reshape(rows, -1), m.to(torch.uint8).reshape(rows, -1)
        dm = field(0, 4, torch.float16)
        if qtype == "Q4_K":
            return field(16, 144), sc, mn, dm
        return field(48, 176), field(16, 48), sc, mn, dm
    return field(0, 128), field(128, 192), field(192, 208, torch.int8), field(208, 210, torch.float16)


def dequantize(arrays: tuple[torch.Tensor, ...], qtype: str, cols: int) -> torch.Tensor:
    """Repacked rows -> float32 [rows, cols], in quant.dequantize's order of float operations."""
    n = arrays[0].shape[0]
    if qtype == "Q8_0":
        qs, d = arrays
        return (d.float()[..., None] * qs.view(n, cols // 32, 32).float()).reshape(n, cols)
    if qtype == "Q4_0":
        qs, d = arrays
        b = qs.view(n, cols // 32, 16)
        return (d.float()[..., None] * (torch.cat([b & 15, b >> 4], -1).float() - 8)).reshape(n, cols)
    if qtype in ("Q4_K", "Q5_K"):
        qs, qh, sc, mn, dm = arrays if qtype == "Q5_K" else (arrays[0], None, *arrays[1:])
        b = qs.view(n, cols // 64, 32)
        q = torch.stack([b & 15, b >> 4], 2).reshape(n, cols // 256, 8, 32)
        if qh is not None:
            shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)[:, None]
            q = q | (((qh.view(n, cols // 256, 1, 32) >> shifts) & 1) << 4)
        dm = dm.float().view(n, cols // 256, 1, 2)
        s, m = sc.float().view(n, cols // 256, 8, 1), mn.float().view(n, cols // 256, 8, 1)
        return (dm[..., :1] * s * q.float() - dm[..., 1:] * m).reshape(n, cols)
    ql, qh, sc, d = arrays
    a = ql.view(n, cols // 256, 2, 64)
    h = qh.view(n, cols // 256, 2, 32)
    lo, hi = a[..., :32], a[..., 32:]
    groups = [
        (lo & 15) | ((h & 3) << 4),
        (hi & 15) | (((h >> 2) & 3) << 4),
        (lo >> 4) | (((h >> 4) & 3) << 4),
        (hi >> 4) | ((h >> 6) << 4),
    ]
    q = torch.stack(groups, 3).reshape(n, cols).float() - 32
    return (d.float().repeat_interleave(16, 1) * sc.float()).repeat_interleave(16, 1) * q


# ------------------------------------------------------------------------------ kernels


def _width(qtype: str, cols: int) -> dict:
    """The kernel's step along a row: the largest power-of-two number of blocks that divides the
    row and spans at most MAX_WIDTH values."""
    per = BLOCKS[qtype][0]
    n = 1
    while n * 2 * per <= MAX_WIDTH and (cols // per) % (n * 2) == 0:
        n *= 2
    if qtype in ("Q8_0", "Q4_0"):
        return {"G": n}
    if qtype == "Q6_K":
        return {"HH": 2 * n}
    return {"CC": 4 * n, "HBITS": int(qtype == "Q5_K")}


def ways(qtype: str, device_type: str = "cuda") -> tuple[int, ...]:
    """The K-quant kernels' ways of making floats of the quants (their FAST argument): 0 the
    int-to-float conversion, 1 the exponent-bits trick (_as_float), 2 the same with inline PTX
    that unpacks four bytes at a time (Q4_K and Q6_K, CUDA only; LLMARCH_GGUF_CUDA_ASM=0 leaves it
    out). Every way gives the same sums; the autotuner keeps the fastest per matrix shape."""
    if qtype not in ("Q4_K", "Q5_K", "Q6_K"):
        return ()
    asm = qtype != "Q5_K" and device_type == "cuda" and os.environ.get("LLMARCH_GGUF_CUDA_ASM", "1") != "0"
    return (2, 1, 0) if asm else (1, 0)


def tuned_ways(qtype: str) -> tuple[int, ...]:
    """The ways the autotuner tries: the two fastest by the compiled code's instruction count (each
    tried way costs a compile per matrix shape and input dtype at the first call)."""
    return ways(qtype)[:2]


FORCE_WAY: int | None = None  # tests: run the K-quant kernels this way, on a fixed tile (no autotuning)

# Q4_K and Q6_K decode rows have three paths ("float" the kernels above, whose only rounding is
# float32 accumulation; by integer dot products, gguf_cuda_kernels' *_dp4a, as llama.cpp's mmvq:
# "dp4a" with the activation row quantized to int8 blocks of 32 inside every program, "pre" with it
# quantized once per op by its own launch first). DP4A "auto" times the three on a matrix shape's
# first decode call (cold L2, triton's do_bench) and keeps the fastest for it; any other mode forces
# its path. LLMARCH_GGUF_CUDA_DP4A=float|dp4a|pre|auto (0 = float) sets it; the path is chosen when
# the op runs, so a captured step keeps what was set when it was captured. The default is "pre":
# a compiled, captured decode step of the Llama-3.2-1B shape from a Q4_K_M file measured 1233 tok/s
# with it against 1023 with "float" and 1037 with "auto" on the H200 (auto's per-matrix timings of
# one op alone picked "float" for most shapes, which is not what a step of back-to-back ops favours).
# Its int8 activation blocks are llama.cpp's own rounding for these types (q8_1 before mmvq).
DP4A_MODES = ("auto", "float", "dp4a", "pre")
DP4A_TYPES = ("Q4_K", "Q6_K")


def mode_from_env() -> str:
    """LLMARCH_GGUF_CUDA_DP4A's path; a value that is none of them stops with one line rather than
    running another path than the one asked for."""
    v = os.environ.get("LLMARCH_GGUF_CUDA_DP4A", "pre").strip().lower()
    mode = {"0": "float", "1": "auto"}.get(v, v)
    if mode not in DP4A_MODES:
        raise LlmarchError(f"LLMARCH_GGUF_CUDA_DP4A={v!r}: expected one of 0, 1, {', '.join(DP4A_MODES)}")
    return mode


DP4A = mode_from_env()
DP4A_ASM: bool | None = None  # tests: False runs the dp4a kernels' plain-integer form on CUDA too
CHOSEN: dict[tuple, str] = {}  # auto's choice per (type, rows, width, activation rows, dtype)


def decode_path(qtype: str, x: torch.Tensor, arrays, y: torch.Tensor, col0: int) -> str:
    """The path ("float", "dp4a" or "pre") of one stored tensor's decode rows (see DP4A)."""
    if qtype not in DP4A_TYPES or FORCE_WAY is not None or DP4A == "float":
        return "float"
    if DP4A != "auto":
        return DP4A
    if x.device.type != "cuda":
        return "dp4a"  # the interpreter: nothing to time
    key = (qtype, arrays[0].shape[0], x.shape[1], x.shape[0], x.dtype)
    if key not in CHOSEN:
        if torch.cuda.is_current_stream_capturing():  # no timing inside a capture (the warm-up times)
            return "dp4a"
        CHOSEN[key] = _fastest(qtype, x, arrays, y, col0)
    return CHOSEN[key]


def _fastest(qtype: str, x: torch.Tensor, arrays, y: torch.Tensor, col0: int) -> str:
    """The fastest path for these shapes, each timed from a cold L2 as in a decode step (the weights
    come from memory): median of triton's do_bench, after a first call that compiles and tunes."""
    from triton.testing import do_bench

    def call(path):
        return lambda: gemv(qtype, x, arrays, y, col0, path, quantize_rows(x) if path == "pre" else None)

    times = {}
    for path in ("float", "dp4a", "pre"):
        call(path)()
        times[path] = do_bench(call(path), warmup=5, rep=25, return_mode="median")
    return min(times, key=times.get)


def _dp4a_step(qtype: str, K: int, values: int) -> dict:
    """The dp4a kernel's step along a row: `values` values, or fewer where they do not divide K."""
    per = 64 if qtype == "Q4_K" else 128  # a Q4_K chunk / a Q6_K half
    n = 1
    while n * 2 * per <= values and (K // per) % (n * 2) == 0:
        n *= 2
    return {"CC": n} if qtype == "Q4_K" else {"HH": n}


@cache
def _dp4a_launcher(qtype: str, K: int):
    """The dp4a kernel for `qtype` at row width K: autotuned on CUDA over rows per program, warps
    and step width, once per matrix shape; a fixed tile under the interpreter."""
    import triton

    k = _kernels()
    kernel = k.gemv_q4_k_dp4a if qtype == "Q4_K" else k.gemv_q6_k_dp4a
    if interpreting():
        return kernel, {"BN": 64, **_dp4a_step(qtype, K, 1024)}
    configs, seen = [], set()
    for bn, w, values in ((2, 2, 2048), (4, 4, 1024), (8, 4, 1024), (8, 4, 2048), (16, 8, 2048), (32, 8, 2048)):
        meta = {"BN": bn, **_dp4a_step(qtype, K, values)}
        if (key := (tuple(meta.items()), w)) not in seen:
            seen.add(key)
            configs.append(triton.Config(meta, num_warps=w))
    return triton.autotune(configs, key=["N"])(kernel), {}


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> the dp4a kernels' int8 activations packed in int32 words [M, K/4], block scales
    and block sums float32 [M, K/32]; one launch."""
    M, K = x.shape
    xq = torch.empty(M, K // 4, dtype=torch.int32, device=x.device)
    xd = torch.empty(M, K // 32, dtype=torch.float32, device=x.device)
    xs = torch.empty_like(xd)
    nb = 1
    while nb < 32 and (K // 32) % (nb * 2) == 0:
        nb *= 2
    _kernels().quantize_rows[(M, K // (32 * nb))](x, xq, xd, xs, K, nb, num_warps=4)
    return xq, xd, xs


def gemv_dp4a(qtype: str, x: torch.Tensor, arrays, y: torch.Tensor, col0: int, pre=None) -> None:
    """gemv() for Q4_K / Q6_K by the integer-dot-product kernels; pre: quantize_rows(x), when the
    rows were quantized once for the op."""
    M, K = x.shape
    N = arrays[0].shape[0]
    kernel, fixed = _dp4a_launcher(qtype, K)
    asm = x.device.type == "cuda" and DP4A_ASM is not False
    if qtype == "Q4_K":
        qs, sc, mn, dm = arrays
        args = (qs.view(torch.int32), sc, mn, dm)
    else:
        ql, qh, sc, d = arrays
        args = (ql.view(torch.int32), qh.view(torch.int32), sc, d)

    def grid(m):
        return (-(-N // m["BN"]), M)

    xq, xd, xs = pre if pre is not None else (x, x, x)  # placeholders when quantized in the kernel
    kernel[grid](x, xq, xd, xs, *args, y, N, K, y.shape[1], col0, ASM=asm, PRE=pre is not None, **fixed)


@cache
def _launcher(qtype: str):
    """The kernel for `qtype`: autotuned over rows per program (and for the K-quants over their
    ways) on CUDA, once per matrix shape on the first call; a fixed tile under the interpreter."""
    import triton

    k = _kernels()
    kernel = {"Q8_0": k.gemv_q8_0, "Q4_0": k.gemv_q4_0, "Q4_K": k.gemv_k45, "Q5_K": k.gemv_k45, "Q6_K": k.gemv_q6_k}[
        qtype
    ]
    if interpreting():
        return kernel, {"BN": 64}  # few programs: the interpreter's cost is per program
    tiles = ((2, 2), (4, 2), (4, 4), (8, 4), (8, 8), (16, 4), (16, 8), (32, 8))  # (rows per program, warps)
    configs = [triton.Config({"BN": bn}, num_warps=w) for bn, w in tiles]
    if ways(qtype):  # two tiles (the fewest instructions a weight byte in the compiled code) per way
        tiles = ((8, 4), (16, 8))
        configs = [triton.Config({"BN": bn, "FAST": f}, num_warps=w) for bn, w in tiles for f in tuned_ways(qtype)]
    return triton.autotune(configs, key=["N", "K"])(kernel), {}


def gemv(qtype: str, x: torch.Tensor, arrays, y: torch.Tensor, col0: int, path="float", pre=None) -> None:
    """y[:, col0 : col0 + rows] = x [M, K] @ W^T, W one stored tensor's repacked arrays, by `path`
    (decode_path's; pre: the op's quantize_rows(x) for "pre")."""
    if path != "float":
        return gemv_dp4a(qtype, x, arrays, y, col0, pre if path == "pre" else None)
    kernel, fixed = _launcher(qtype)
    M, K = x.shape
    N = arrays[0].shape[0]
    meta = {**_width(qtype, K), **fixed}
    if ways(qtype) and (FORCE_WAY is not None or interpreting()):
        kernel = {"Q4_K": _kernels().gemv_k45, "Q5_K": _kernels().gemv_k45, "Q6_K": _kernels().gemv_q6_k}[qtype]
        meta.update(BN=fixed.get("BN", 4), FAST=1 if FORCE_WAY is None else FORCE_WAY)
    args = list(arrays) if qtype != "Q4_K" else [arrays[0], arrays[0], *arrays[1:]]  # no qh: a placeholder

    def grid(m):
        return (-(-N // m["BN"]), M)

    kernel[grid](x, *args, y, N, K, y.shape[1], col0, **meta)


def dequantize_into(qtype: str, arrays, out: torch.Tensor) -> None:
    """out [rows, K] (its dtype) = the rows' values, by one Triton kernel: the prefill path's
    weights, instead of the dozen float32 torch ops of dequantize()."""
    k = _kernels()
    N, K = out.shape
    step = _width(qtype, K)
    BN = 64 if interpreting() else 8
    if qtype in ("Q4_K", "Q5_K"):
        args = list(arrays) if qtype == "Q5_K" else [arrays[0], arrays[0], *arrays[1:]]
        grid = (-(-N // BN), K // (64 * step["CC"]))
        k.dequant_k45[grid](*args, out, N, K, BN, step["CC"], step["HBITS"], num_warps=4)
    elif qtype == "Q6_K":
        k.dequant_q6_k[(-(-N // BN), K // (128 * step["HH"]))](*arrays, out, N, K, BN, step["HH"], num_warps=4)
    else:
        G = step["G"]
        k.dequant_q8_q4[(-(-N // BN), K // (32 * G))](*arrays, out, N, K, BN, G, int(qtype == "Q4_0"), num_warps=4)


# ------------------------------------------------------------------------------ the op


def _decode(x: torch.Tensor, parts: list, types: list[int], rows: list[int], y: torch.Tensor) -> None:
    """Decode rows (at most GEMV_ROWS): each part by its decode_path, the activation rows quantized
    once for every part whose path is "pre"."""
    cols = [sum(rows[:i]) for i in range(len(rows))]
    paths = [decode_path(TYPES[code], x, part, y, col) for code, part, col in zip(types, parts, cols)]
    pre = quantize_rows(x) if "pre" in paths else None
    for code, part, col, path in zip(types, parts, cols, paths):
        gemv(TYPES[code], x, part, y, col, path, pre)


def _forward(
    x: torch.Tensor, arrays: list[torch.Tensor], types: list[int], rows: list[int], dtype: torch.dtype
) -> torch.Tensor:
    M, K = x.shape
    y = torch.empty(M, sum(rows), dtype=dtype, device=x.device)
    parts, at = [], 0
    for code in types:
        parts.append(tuple(arrays[at : at + NARRAYS[TYPES[code]]]))
        at += NARRAYS[TYPES[code]]
    if M <= GEMV_ROWS:
        _decode(x, parts, types, rows, y)
        return y
    col = 0
    for code, n, part in zip(types, rows, parts):
        step = max(1, SLAB // K)
        w = torch.empty(min(step, n), K, dtype=x.dtype, device=x.device)  # one buffer for every slab
        for i in range(0, n, step):
            j = min(i + step, n)
            dequantize_into(TYPES[code], tuple(a[i:j] for a in part), w[: j - i])
            if len(rows) == 1 and j - i == n and x.dtype == dtype:
                return x @ w.t()  # one slab: no copy into y
            y[:, col + i : col + j] = x @ w[: j - i].t()
        col += n
    return y


NARRAYS = {"Q8_0": 2, "Q4_0": 2, "Q4_K": 4, "Q5_K": 5, "Q6_K": 4}

stored_linear = torch.library.custom_op(
    "llmarch::gguf_stored_linear",
    mutates_args=(),
    schema="(Tensor x, Tensor[] arrays, int[] types, int[] rows, ScalarType dtype) -> Tensor",
)(_forward)


@stored_linear.register_fake
def _(x, arrays, types, rows, dtype):
    return x.new_empty(x.shape[0], sum(rows), dtype=dtype)


class CudaStoredLinear(nn.Module):
    """A bias-free Linear whose weight is one or more GGUF tensors' stored blocks stacked by rows
    (fused q/k/v, gate/up; each part its own type), repacked on the GPU.

    parts: (qtype, arrays from repack) each, top to bottom; tensor_types: the stored type of each
    GGUF tensor in them (the run report's count), when neighbours of one type share a part."""

    def __init__(self, parts, in_features: int, tensor_types: list[str] | None = None):
        super().__init__()
        self.in_features = in_features
        self.part_types = [q for q, _ in parts]
        self.types = tensor_types or self.part_types
        self.codes = [TYPES.index(q) for q in self.part_types]
        self.rows = [arrays[0].shape[0] for _, arrays in parts]
        self.out_features = sum(self.rows)
        self.names: list[list[str]] = []
        for p, (_, arrays) in enumerate(parts):
            self.names.append([])
            for i, a in enumerate(arrays):
                self.register_buffer(f"p{p}_{i}", a, persistent=False)
                self.names[-1].append(f"p{p}_{i}")

    def arrays(self, part: int) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, n) for n in self.names[part])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = [a for p in range(len(self.names)) for a in self.arrays(p)]
        # the input stays in the model's dtype: measured on the H200, a float32 one (which inductor
        # could fold into the kernel before) ran the kernels at 0.74-1.2x, slower on every matrix of
        # 16384 rows or more (every program reads the whole input row: twice the bytes in float32)
        y = stored_linear(x.reshape(-1, shape[-1]).contiguous(), flat, self.codes, self.rows, x.dtype)
        return y.view(*shape[:-1], self.out_features)

    def row(self, ids: torch.Tensor, dtype) -> torch.Tensor:
        """Embedding lookup from the same blocks (a tied embedding shares them with the head)."""
        flat = ids.reshape(-1)
        rows = dequantize(tuple(a[flat] for a in self.arrays(0)), self.part_types[0], self.in_features)
        return rows.to(dtype).reshape(*ids.shape, self.in_features)

    def stored_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


def from_source(source, names: list[str], shape: tuple[int, int], device) -> CudaStoredLinear | None:
    """The stored-block form on `device` of the Linear made of the GGUF tensors `names` (stacked by
    rows), or None where it cannot be one (gguf_matmul.stored_parts' rules, with this file's types)."""
    from llmarch.runtime.weights import GGUFSource

    if not isinstance(source, GGUFSource) or not available(device):
        return None
    found = stored_parts(source, names, shape, TYPES)
    if found is None:
        return None
    parts, perm = found
    out, col = [], 0
    for raw, qtype, n in parts:
        local = perm[col : col + n] - col  # the loader reorders rows within each tensor
        if not torch.equal(local.sort().values, torch.arange(n)):
            return None
        identity = torch.equal(local, torch.arange(n))
        arrays = repack(raw, qtype, n, shape[1], device, None if identity else local)
        if out and out[-1][0] == qtype:  # one kernel launch for neighbours of one type (q/k/v, gate/up)
            arrays = tuple(torch.cat([a, b]) for a, b in zip(out.pop()[1], arrays))
        out.append((qtype, arrays))
        col += n
    return CudaStoredLinear(out, shape[1], [qtype for _, qtype, _ in parts])


def summary(model: nn.Module, quant_bits: int | None = None) -> str | None:
    """The run report's line for the matrices that run from stored blocks on CUDA."""
    return stored_summary(model, quant_bits, CudaStoredLinear, " on CUDA")

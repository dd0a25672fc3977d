"""source -> (spec, ready model): fingerprint, pick device/dtype, build on meta, assign weights."""

from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass, field

import torch

from llmarch.arch.spec import ArchSpec
from llmarch.errors import LlmarchError
from llmarch.progress import progress
from llmarch.runtime.ple import check_options as check_ple_options
from llmarch.runtime.run_checks import check_moe_options, check_supported, cpu_threads
from llmarch.runtime.weights import ST_DTYPES

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


@dataclass
class Runtime:
    spec: ArchSpec
    model: torch.nn.Module
    ckpt: object
    device: torch.device
    dtype: torch.dtype
    notes: list[str] = field(default_factory=list)


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LlmarchError("--device cuda asked for, but no CUDA GPU is available (torch sees none); use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise LlmarchError(f"unknown --device {device!r}; use cpu or cuda")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LlmarchError(f"unknown --device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LlmarchError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return dev


def _has_fast_bf16_cpu() -> bool:
    cap = torch.backends.cpu.get_cpu_capability()
    return cap in ("AVX512_BF16", "AMX") or "AMX" in cap


def dtype_named(name: str) -> torch.dtype:
    """--dtype, in any case (BF16 = bf16 = bfloat16)."""
    if name.lower() not in DTYPES:
        raise LlmarchError(f"unknown --dtype {name!r}; one of float32, bfloat16, float16")
    return DTYPES[name.lower()]


def pick_dtype(dtype: str | None, ckpt, device: torch.device, notes: list[str]) -> torch.dtype:
    if dtype is not None:
        return dtype_named(dtype)
    floats = [t.dtype for t in ckpt.tensors.values() if t.dtype in ("F32", "BF16", "F16")]
    stored = max(set(floats), key=floats.count) if floats else None
    if ckpt.format == "gguf" or stored is None:
        chosen = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        chosen = ST_DTYPES[stored]
    if device.type == "cpu" and chosen != torch.float32 and not _has_fast_bf16_cpu():
        notes.append(f"dtype float32 (this CPU has no native bf16/fp16 matmul; {chosen} would be slower)")
        chosen = torch.float32
    return chosen


def pick_cpu_threads() -> str | None:
    """cpu_threads() applied to torch; returns the run report's line, or None when the environment chose."""
    threads, note = cpu_threads()
    if threads is not None and note is not None:
        torch.set_num_threads(threads)
    return note


@contextlib.contextmanager
def initializers_skipped():
    """Build modules without running torch.nn.init's initializers. On the meta device they set no
    values (the checkpoint's weights replace every tensor), but normal_ (nn.Embedding's) runs there
    through torch's Python reference ops, whose first call imports torch._dynamo: ~130 MiB of RSS
    and a second or more of start-up on a 2-core machine, for nothing."""
    from torch.nn import init

    names = [n for n in vars(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]
    saved = {n: getattr(init, n) for n in names}

    def skip(tensor, *args, **kwargs):
        return tensor

    try:
        for n in names:
            setattr(init, n, skip)
        yield
    finally:
        for n, fn in saved.items():
            setattr(init, n, fn)


def release_freed_heap() -> None:
    """Hand freed heap pages back to the OS. glibc keeps them resident: the tokenizers library
    loading a 262k-token tokenizer.json frees ~250 MB that would otherwise stay in RSS for the whole run."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def load_runtime(
    source: str | None,
    device: str | None = None,
    dtype: str | None = None,
    quant_bits: int | None = None,
    experts: str | None = None,
    expert_bits: int | None = None,
    gpu_experts: int = 0,
    expert_cache_gib: float = 2.0,
    expert_dir: str | None = None,
    opened: tuple | None = None,
    ple: str | None = None,
    ple_cache_mib: float | None = None,
    ple_dir: str | None = None,
    stored_blocks: bool = False,
) -> Runtime:
    """opened: the (checkpoint, spec) pair already read from the headers, so a caller that checked
    its options against them first does not read them twice. stored_blocks: a GGUF's matrices of the
    block types gguf_matmul (CPU) or gguf_cuda (CUDA) reads run from the file's own blocks; the
    others are requantized to quant_bits, or dequantized to dtype without it."""
    from llmarch.api import load_checkpoint_spec
    from llmarch.runtime.model import build_model, load_weights
    from llmarch.runtime.weights import open_weights

    release_freed_heap()  # what building the tokenizer freed, before the weights arrive
    dev = pick_device(device)
    ckpt, spec = opened or load_checkpoint_spec(source)
    check_supported(spec, ckpt.path, getattr(ckpt, "format", None) == "gguf")
    check_moe_options(spec, experts, expert_bits, gpu_experts, expert_dir)
    check_ple_options(spec, ple, ple_cache_mib, ple_dir)
    notes: list[str] = []
    dt = pick_dtype(dtype, ckpt, dev, notes)
    if spec.mtp_layers:
        notes.append(f"{spec.mtp_layers} MTP layer(s) skipped: llmarch run predicts one token per step")
    if quant_bits and dev.type == "cuda" and quant_bits == 4:
        raise LlmarchError("--keep-quantized 4-bit runs on the CPU only; use 8 on cuda")
    with initializers_skipped():
        model = build_model(spec)
    if spec.moe is not None:  # where the routed experts live
        from llmarch.runtime.experts.gguf_blocks import note
        from llmarch.runtime.experts.placement import attach, plan, stored_format

        place = plan(
            spec, dev, dt, experts, expert_bits, gpu_experts, expert_cache_gib, expert_dir, stored_format(ckpt, spec)
        )
        attach(model, place, dt, dev)
        notes.extend(filter(None, [note(ckpt, spec, place)]))
    weights = open_weights(ckpt, spec)
    # a GGUF's stored blocks are read by gguf_matmul's C kernel on the CPU and by gguf_cuda's Triton
    # kernels on CUDA (triton comes with CUDA builds of torch)
    stored_here = dev.type == "cpu"
    if stored_blocks and dev.type == "cuda":
        from llmarch.runtime.gguf_cuda import available

        stored_here = available(dev)
        if not stored_here and getattr(ckpt, "format", None) == "gguf":
            notes.append("GGUF matrices dequantized on the GPU: triton is not importable for the stored-block kernels")
    to_read = ckpt.stored_bytes
    if spec.per_layer_embeddings:  # where the per-layer embedding table lives (--ple)
        from llmarch.runtime.ple import attach as attach_ple

        store = attach_ple(model, weights, spec, ple, dev, dt, ple_cache_mib, ple_dir)
        if store is not None:
            notes.append(f"per-layer embeddings: --ple {store.mode} ({store.note})")
            to_read -= (store.source or store.layout).nbytes  # the store reads the table itself, or never
    with progress("loading weights", total=to_read) as advance:  # bytes read
        read = weights.read

        def read_counted(t):
            advance(t.nbytes)
            return read(t)

        weights.read = read_counted  # every tensor the model takes passes through read()
        load_weights(model, weights, dt, dev, quant_bits, stored_blocks and stored_here)
    if stored_blocks and stored_here:
        from llmarch.runtime import gguf_cuda, gguf_matmul

        notes.extend(filter(None, [(gguf_cuda if dev.type == "cuda" else gguf_matmul).summary(model, quant_bits)]))
    release_freed_heap()
    model.eval()
    return Runtime(spec, model, ckpt, dev, dt, notes)

"""The checks of `llmarch run` that need no torch (the family is runnable, the options fit the model)
and the CPU thread count: the native runner makes them before deciding whether torch is needed."""

from __future__ import annotations

import os
from functools import lru_cache

from llmarch.arch.recipe_book import supported_names
from llmarch.arch.spec import ArchSpec
from llmarch.errors import LlmarchError
from llmarch.plan.run_placement import gguf_refusal


def supported_note() -> str:
    return f"llmarch run supports {', '.join(supported_names('run'))} (`llmarch families` lists them)"


def check_moe_options(spec: ArchSpec, experts, expert_bits, gpu_experts: int, expert_dir) -> None:
    """The expert-placement options mean nothing on a dense model: say so instead of ignoring them."""
    if spec.moe is not None:
        return
    given = [
        name
        for name, value in (
            ("--experts", experts),
            ("--expert-bits", expert_bits),
            ("--gpu-experts", gpu_experts or None),
            ("--expert-dir", expert_dir),
        )
        if value is not None
    ]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise LlmarchError(f"{' and '.join(given)} only {verb} to MoE models; this model has no routed experts")


def check_supported(spec: ArchSpec, path, gguf: bool = False) -> None:
    """The family's recipe says whether run is proven for it; the facts below refuse what no
    runtime path exists for whatever the family."""
    if not spec.layers or not spec.hidden_size:
        raise LlmarchError(
            f"unknown model family (no usable config: no layer count or hidden size); {supported_note()}", path
        )
    if "run" not in spec.supports:
        raise LlmarchError(f"family {spec.family!r} is not supported by llmarch run yet; {supported_note()}", path)
    refusal = gguf_refusal(spec) if gguf else None  # what `fit` says too
    if refusal:
        raise LlmarchError(refusal, path)


def cpu_threads() -> tuple[int | None, str | None]:
    """Use the cores the rest of the machine leaves free: cores minus the 1-minute load average,
    at least one, unless OMP_NUM_THREADS says. Measured on a shared 2-core VM: two threads while
    other jobs keep it busy decode 4-6x slower than one (each matmul waits for a descheduled peer;
    llama.cpp's two threads collapse the same way), while on an idle machine two beat one.
    Returns (threads, the run report's line), or (None, None) when the environment chose."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None, None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return None, None
    threads = max(1, min(cores, int(cores - load + 0.5)))
    plural = "s" if threads > 1 else ""
    kernels = kernel_threads()
    also = f", {kernels} for the stored-block kernels" if kernels != threads else ""
    return (
        threads,
        f"{threads} CPU thread{plural} (load average {load:.1f} on {cores} cores){also}; OMP_NUM_THREADS=N sets it",
    )


def kernel_threads() -> int:
    """Threads for llmarch's stored-block matmul kernels: OMP_NUM_THREADS where it names a count, else
    every core this process may use. Unlike torch's (cpu_threads), their helper threads only take
    work when they get a core, so a busy machine costs them the share a descheduled helper would
    have done, not a wait (measured on this shared 2-core VM: two threads 1.44x one at load 1.2-1.6,
    equal medians at load 3.1-3.7; see gguf_linear's pool in kernel_sources.py)."""
    return _kernel_threads(os.environ.get("OMP_NUM_THREADS", ""))


@lru_cache(maxsize=8)
def _kernel_threads(given: str) -> int:
    given = given.strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

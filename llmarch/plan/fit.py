"""`llmarch fit`: does a model fit this machine, at what context, and with what flags?

Headers only: the ArchSpec gives weights by part, the KV cache and recurrent state at a context;
each runtime's plan (run_placement, llamacpp, serving) turns them into a placement and a command.
"""

from __future__ import annotations

from llmarch.arch.spec import KV_DTYPE_BYTES, ArchSpec
from llmarch.errors import LlmarchError
from llmarch.plan import memory as mem
from llmarch.plan.llamacpp import plan_llamacpp
from llmarch.plan.llamacpp import weights as llamacpp_weights
from llmarch.plan.run_placement import plan_run
from llmarch.plan.serving import plan_serving


def check_options(memory: str, gpus: int, context: int | None, kv_dtype: str | None, host_memory: str | None):
    """Everything checkable before a file is opened: (GPU bytes, host bytes or None)."""
    gpu = mem.parse_size(memory, "--memory")
    host = mem.parse_size(host_memory, "--host-memory") if host_memory is not None else mem.host_available()
    if gpus < 1:
        raise LlmarchError(f"--gpus must be at least 1, got {gpus}")
    if context is not None and context < 1:
        raise LlmarchError(f"--context must be positive, got {context}")
    if kv_dtype is not None and kv_dtype not in KV_DTYPE_BYTES:
        raise LlmarchError(f"unknown --kv-dtype {kv_dtype!r}; one of {', '.join(KV_DTYPE_BYTES)}")
    return gpu, host


def plan_fit(
    spec: ArchSpec,
    source: str,
    gpu: int,
    gpus: int,
    host: int | None,
    context: int | None = None,
    kv_dtype: str | None = None,
    source_arg: str | None = "",
) -> dict:
    """`source` names the file in commands that need a path; `source_arg` is what the user typed
    ("" : the same as source; None: llmarch's embedded model, which `llmarch run` finds itself)."""
    limit = spec.context_length or context or 4096
    if context is not None and context > limit:
        raise LlmarchError(f"--context {context} is beyond the model's context of {limit}", spec.source)
    target = context or limit
    llama = plan_llamacpp(spec, source, gpu, gpus, target, limit, kv_dtype or "f16")  # llama.cpp's default cache
    kv_dtype = kv_dtype or spec.kv_dtype_default
    weights = llamacpp_weights(spec) if spec.format == "gguf" else mem.text_parts(mem.stored_parts(spec))
    kv = mem.kv_bytes(spec, target, kv_dtype)
    state = mem.state_bytes(spec, kv_dtype)
    overhead = mem.CUDA_CONTEXT * gpus + mem.batch_overhead(spec)
    budget = gpu * gpus

    def need(c: int) -> int:
        return sum(weights.values()) + mem.kv_bytes(spec, c, kv_dtype) + state + overhead

    total = need(target)
    if llama.get("fits") and host is not None and llama["host_bytes"] > host:
        llama["fits"] = False
        llama["reason"] = (
            f"what stays off the GPUs needs {llama['host_bytes'] / mem.GiB:.1f} GiB of host RAM, "
            f"{host / mem.GiB:.1f} GiB given"
        )
    serving = plan_serving(spec, source, gpu, gpus, target, kv_dtype)
    return {
        "source": source,
        "family": spec.family,
        "format": spec.format,
        "model_context": spec.context_length,
        "context": target,
        "kv_dtype": kv_dtype,
        "machine": {"gpu_memory": gpu, "gpus": gpus, "host_memory": host},
        "params": mem.param_parts(spec),
        "weights": weights,
        "weights_total": sum(weights.values()),
        "kv_cache": kv,
        "recurrent_state": state,
        "overhead": overhead,
        "assumptions": mem.OVERHEAD_NOTE,
        "total": total,
        "fits": total <= budget,
        "largest_context": mem.largest_context(need, budget, limit),
        "llmarch_run": plan_run(spec, source if source_arg == "" else source_arg, gpu, host, target, limit),
        "llama_cpp": llama,
        "serving": dict(serving, needed=not (total <= budget or llama.get("fits"))),
    }


# a shell expression for the embedded model's path, joining its chunks once (a second copy on disk)
EMBEDDED_MODEL_FILE = '"$(python -m llmarch.default_model)"'


def fit_source(
    source: str | None,
    memory: str,
    gpus: int = 1,
    context: int | None = None,
    kv_dtype: str | None = None,
    host_memory: str | None = None,
) -> dict:
    gpu, host = check_options(memory, gpus, context, kv_dtype, host_memory)
    from llmarch.api import load_spec

    spec = load_spec(source)
    # the embedded model is read from its package's chunks; other tools need it joined into one file
    named = source or EMBEDDED_MODEL_FILE
    return plan_fit(spec, named, gpu, gpus, host, context, kv_dtype, source)

"""vLLM and SGLang launch lines across GPUs and hosts for a model one machine cannot hold.

Both hold the weights as the checkpoint stores them, split over tensor-parallel ranks (MoE
experts over expert-parallel ranks), and preallocate KV blocks in what is left of
--gpu-memory-utilization. Tensor parallelism stays inside a host (a power of two that divides
the attention heads); hosts are chained by pipeline parallelism (vLLM) or one TP group over the
nodes (SGLang --nnodes).
"""

from __future__ import annotations

import math

from llmarch.arch.spec import ArchSpec
from llmarch.plan import memory as mem

GPU_UTILIZATION = 0.9  # vLLM's default --gpu-memory-utilization (SGLang's --mem-fraction-static is close)


def _tp_sizes(spec: ArchSpec, gpus_per_host: int) -> list[int]:
    heads = spec.attention.heads or 1
    sizes = [t for t in (1, 2, 4, 8, 16) if t <= gpus_per_host and heads % t == 0]
    return sizes or [1]


def plan_serving(spec: ArchSpec, source: str, gpu: int, gpus_per_host: int, context: int, kv_dtype: str) -> dict:
    if spec.format == "gguf":
        source = f"<the Hugging Face checkpoint of {source}>"
    weights = sum(mem.text_parts(mem.stored_parts(spec)).values())
    kv = mem.kv_bytes(spec, context, kv_dtype) + mem.state_bytes(spec, kv_dtype)
    per_gpu = GPU_UTILIZATION * gpu - mem.CUDA_CONTEXT
    if per_gpu <= 0:
        return {"fits": False, "reason": "the GPU memory is smaller than the runtime overhead"}
    # one sequence at the full context must fit beside the weights (the engines refuse to start otherwise)
    needed = math.ceil((weights + kv + mem.batch_overhead(spec)) / per_gpu)
    sizes = _tp_sizes(spec, gpus_per_host)
    tp = next((t for t in sizes if t >= needed), sizes[-1])
    pp = math.ceil(needed / tp)
    total = tp * pp
    moe = bool(spec.moe)
    kv_arg = ["--kv-cache-dtype", "fp8"] if kv_dtype in ("fp8", "f8") else []
    vllm = ["vllm", "serve", source, "--tensor-parallel-size", str(tp)]
    if pp > 1:
        vllm += ["--pipeline-parallel-size", str(pp)]
    if moe and tp > 1:  # vLLM's expert parallel group is its tensor-parallel group (inside a host)
        vllm += ["--enable-expert-parallel"]
    vllm += ["--max-model-len", str(context), *kv_arg]
    sglang = ["python", "-m", "sglang.launch_server", "--model-path", source, "--tp", str(total)]
    if moe and total > 1:  # SGLang's TP group spans the nodes, and its experts with it
        sglang += ["--ep-size", str(total)]
    if pp > 1:
        sglang += ["--nnodes", str(pp), "--node-rank", "0", "--dist-init-addr", "HEAD_NODE_IP:5000"]
    sglang += ["--context-length", str(context), *(["--kv-cache-dtype", "fp8_e5m2"] if kv_arg else [])]
    return {
        "fits": True,
        "weights": weights,
        "kv_cache": kv,
        "gpus": total,
        "hosts": pp,
        "tensor_parallel": tp,
        "pipeline_parallel": pp,
        # experts split over: vLLM's tensor-parallel ranks, SGLang's whole TP group
        "expert_parallel": {"vllm": tp, "sglang": total} if moe else None,
        "context": context,
        "vllm": " ".join(vllm),
        "sglang": " ".join(sglang),
        "note": (
            "one command per host: vLLM across hosts runs on a Ray cluster started on each; SGLang runs the "
            "same line on every host with its --node-rank"
            if pp > 1
            else "one host"
        ),
    }

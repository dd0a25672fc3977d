"""`llmarch fit`'s llmarch-run figures against what `llmarch run` allocates, placement by placement.

A small MoE (Qwen3-MoE layout, experts the bulk of the bytes) is loaded by the runtime on the
CPU with each expert placement fit can propose; the bytes held are counted tensor by tensor
(parameters, buffers and the expert stores' tensors, each storage once: not RSS, which the
memory-mapped checkpoint blurs) and split as fit splits them: what sits on the run device (the
GPU on a GPU machine) and what the host expert store holds. The KV cache is measured after a
generation at the planned context. Each must agree with the plan within 10%.
"""

from __future__ import annotations

import pytest
import torch

CONTEXT = 1024
WIDE = dict(
    vocab_size=384, hidden_size=256, moe_intermediate_size=128, mlp_only_layers=[], max_position_embeddings=4096
)
PLACEMENTS = [("gpu", 16), ("gpu", 8), ("cpu", 16), ("cpu", 8), ("cpu", 4)]


def held_bytes(model) -> tuple[int, int]:
    """(bytes on the run device, bytes in host stores: offloaded experts, a per-layer embedding
    table kept in host RAM): every tensor a module holds as a parameter, buffer or attribute
    (lists of tensors too), each storage counted once."""
    from llmarch.runtime.experts.host import OffloadedExperts
    from llmarch.runtime.ple import find_store

    seen: set[int] = set()
    device = host = 0
    for m in model.modules():
        values = [*m._parameters.values(), *m._buffers.values(), *vars(m).values()]
        flat = [x for v in values for x in (v if isinstance(v, list | tuple) else [v])]
        for t in flat:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            s = t.untyped_storage()
            if s.data_ptr() in seen:
                continue
            seen.add(s.data_ptr())
            if isinstance(m, OffloadedExperts):
                host += s.nbytes()
            else:
                device += s.nbytes()
    store = find_store(model)
    table = getattr(store, "table", None)  # resident: --ple cpu here (gpu needs CUDA); disk: none
    if table is not None and table.untyped_storage().data_ptr() not in seen:
        host += table.untyped_storage().nbytes()
    return device, host


@pytest.mark.parametrize("experts, bits", PLACEMENTS)
def test_run_holds_what_fit_plans(tiny, experts, bits):
    from llmarch.api import load_spec
    from llmarch.plan import memory as mem
    from llmarch.plan.run_placement import Option, footprint, run_dtype_bytes
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime

    src = str(tiny("qwen3_moe", **WIDE))
    spec = load_spec(src)
    dtype_bytes = run_dtype_bytes(spec)
    assert dtype_bytes == 4  # the fixture is float32: run keeps it so
    plan_device, plan_host = footprint(spec, Option(experts, bits), dtype_bytes)
    plan_kv = mem.kv_bytes(spec, CONTEXT, "f32")

    rt = load_runtime(src, "cpu", "float32", experts=experts, expert_bits=bits)
    device, host = held_bytes(rt.model)
    gen = Generator(rt, CONTEXT, cuda_graph=False)
    gen.generate([1, 2, 3, 4], 4, Sampling())
    kv = gen.cache.nbytes()
    print(f"{experts}/{bits}: device {device} vs {plan_device}, host {host} vs {plan_host}, kv {kv} vs {plan_kv}")
    assert abs(device - plan_device) <= 0.10 * plan_device
    assert abs(host - plan_host) <= 0.10 * max(plan_host, 1) or host == plan_host == 0
    assert kv == plan_kv


@pytest.mark.parametrize("ple", ["cpu", "disk"])
def test_run_holds_what_fit_plans_for_the_ple_table(tiny, ple):
    """Gemma 3n: the per-layer embedding table in host RAM (--ple cpu) or read per step (disk)."""
    from llmarch.api import load_spec
    from llmarch.plan.run_placement import Option, footprint, run_dtype_bytes
    from llmarch.runtime.load import load_runtime

    src = str(tiny("gemma3n"))
    spec = load_spec(src)
    plan_device, plan_host = footprint(spec, Option(None, None, ple=ple), run_dtype_bytes(spec))
    rt = load_runtime(src, "cpu", "float32", ple=ple)
    device, host = held_bytes(rt.model)
    print(f"ple {ple}: device {device} vs {plan_device}, host {host} vs {plan_host}")
    assert abs(device - plan_device) <= 0.10 * plan_device
    assert host == plan_host


GPU_WIDE = dict(
    vocab_size=32000,
    hidden_size=1024,
    moe_intermediate_size=512,
    num_experts=32,
    num_hidden_layers=4,
    mlp_only_layers=[],
    max_position_embeddings=8192,
)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("experts, bits", [("gpu", 16), ("gpu", 8), ("gpu", 4), ("cpu", 4)])
def test_run_peak_gpu_memory_matches_fit(tiny, experts, bits, dtype):
    """On a GPU: torch's peak allocated bytes over load + a generation at the planned context
    against the plan's GPU bytes less the CUDA context (which the allocator does not count)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from llmarch.api import load_spec
    from llmarch.plan import memory as mem
    from llmarch.plan.run_placement import Option, footprint, run_dtype_bytes
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime

    src = str(tiny("qwen3_moe", dtype=getattr(torch, dtype), **GPU_WIDE))
    spec = load_spec(src)
    dtype_bytes = run_dtype_bytes(spec)
    assert dtype_bytes == {"float32": 4, "bfloat16": 2}[dtype]  # run keeps the checkpoint's float type
    weights, _ = footprint(spec, Option(experts, bits), dtype_bytes)
    quantized_on_gpu = experts == "gpu" and bits != 16
    kv = mem.kv_bytes(spec, CONTEXT, "f32" if dtype_bytes == 4 else "bf16")
    plan = weights + kv + mem.run_overhead(spec, dtype_bytes, quantized_on_gpu)
    if experts == "cpu":  # the 512-token prompt dequantizes a chunk of the host experts on the GPU (room here)
        plan += mem.upload_chunk_bytes(spec)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    rt = load_runtime(src, "cuda", None, experts=experts, expert_bits=bits)
    after_load = torch.cuda.max_memory_allocated() - base
    gen = Generator(rt, CONTEXT, cuda_graph=False)
    gen.generate(list(range(1, 513)), 16, Sampling())  # a prompt of one 512-token batch, as the plan assumes
    peak = torch.cuda.max_memory_allocated() - base
    steady = torch.cuda.memory_allocated() - base
    print(
        f"GPU {dtype} {experts}/{bits}: plan {plan}, peak {peak} ({peak / plan - 1:+.1%}), load peak {after_load}, held {steady}"
    )
    del gen, rt
    assert abs(peak - plan) <= 0.10 * plan

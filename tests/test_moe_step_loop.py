"""moe_cpu.c's moe_step drives a whole decode step of the segmented decoder (experts/decode.py) from C:
launch segment i's CUDA graph, wait for its event, compute layer i's experts, launch segment i + 1
(whose first node copies the experts' sum back). Here the CUDA calls are Python stand-ins: a
"graph" records the sum the previous layer left in the output buffer (as the graph's copy back
would) and writes the next layer's router choice and input into the pack buffer (as the graph's
copy to the host would); a "wait" records its event. The sums must be moe_decode's on the same
packs, bit for bit, in the order launch, wait, kernel; a failing CUDA call stops the step and names
its segment. On a GPU, tests/test_offload.py's test_graph_decoder_on_gpu_same_tokens runs the real
driver calls (LLMARCH_MOE_STEP_LOOP=c)."""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import numpy as np
import pytest
import torch


def _layers(n_layers: int, k: int):
    from fixtures.expert_kernel import random_float_experts
    from llmarch.runtime.experts.decode import decode_context
    from llmarch.runtime.experts.formats import ExpertFormat
    from llmarch.runtime.experts.host import OffloadedExperts
    from llmarch.runtime.experts.placement import Placement

    g = torch.Generator().manual_seed(23)
    E, d, inter = 8, 256, 128
    pack, out = np.zeros(2 * k + d, np.float32), np.zeros(d, np.float32)
    layers, held = [], []
    for _ in range(n_layers):
        act, gu, dn, bias, moe = random_float_experts("qwen3_moe", E, d, inter, g)
        st = OffloadedExperts(moe, gu, dn, bias, Placement("cpu", ExpertFormat.INT4), torch.float32)
        ctx, scratch = decode_context(st, SimpleNamespace(act=act, gated=True, weight_input=False), k, pack, out)
        held.append((st, scratch))
        ids = torch.randperm(E, generator=g)[:k].float().numpy()
        w, x = torch.rand(k, generator=g).numpy(), torch.randn(d, generator=g).numpy()
        layers.append((ctx, np.concatenate([ids, w, x]).astype(np.float32)))
    return layers, held, pack, out


@pytest.mark.parametrize("fail_at", [None, 0, 2])
def test_moe_step_runs_segments_and_kernels_in_order(fail_at):
    from llmarch.runtime.experts.kernel import StepPlan, cpu_kernel, pointer_array

    lib = cpu_kernel()
    n_layers, k = 3, 4
    layers, _held, pack, out = _layers(n_layers, k)
    want = []
    for ctx, p in layers:  # each layer's sum, moe_decode called directly on its pack
        pack[:] = p
        lib.moe_decode(ctypes.byref(ctx))
        want.append(out.copy())
        assert np.abs(out).max() > 0.05

    calls, seen = [], []
    launch_t = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
    wait_t = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)

    def launch(graph, stream):
        i = graph - 100
        calls.append(("launch", i, stream))
        if i == fail_at:
            return 7
        if i > 0:
            seen.append(out.copy())  # the copy back of the sum layer i - 1 left
        if i < n_layers:
            pack[:] = layers[i][1]  # segment i ends with layer i's router choice and input
            out[:] = np.nan  # moe_decode must write every value
        return 0

    def wait(event):
        calls.append(("wait", event - 200))
        return 0

    keep = (launch_t(launch), wait_t(wait))
    arrays = (
        pointer_array([100 + i for i in range(n_layers + 1)]),
        pointer_array([200 + i for i in range(n_layers)]),
        pointer_array([ctypes.addressof(ctx) for ctx, _ in layers]),
    )
    plan = StepPlan(n_layers + 1, *(ctypes.cast(f, ctypes.c_void_p).value for f in keep), 77)
    plan.graphs, plan.events, plan.ctxs = (ctypes.addressof(a) for a in arrays)
    times = (ctypes.c_double * (3 * (n_layers + 1)))(*[-1.0] * (3 * (n_layers + 1)))
    plan.times = ctypes.addressof(times)
    rc = lib.moe_step(ctypes.cast(ctypes.pointer(plan), ctypes.c_void_p))

    if fail_at is not None:
        assert rc == (fail_at + 1) * 1000 + 7
        assert calls[-1] == ("launch", fail_at, 77)  # nothing after the failed call
        assert len(seen) == max(fail_at - 1, 0)
    else:
        assert rc == 0
        order = [c for i in range(n_layers) for c in (("launch", i, 77), ("wait", i))]
        assert calls == order + [("launch", n_layers, 77)]
        assert len(seen) == n_layers
        marks = list(times)[: 3 * n_layers + 1]  # after each launch, wait and kernel; the last segment's launch
        assert marks == sorted(marks) and marks[0] > 0 and list(times)[-2:] == [-1.0, -1.0]
    for got, ref in zip(seen, want):
        assert np.array_equal(got, ref)


def test_step_loop_choice(monkeypatch):
    from llmarch.errors import LlmarchError
    from llmarch.runtime.experts.decode import step_loop_choice

    monkeypatch.delenv("LLMARCH_MOE_STEP_LOOP", raising=False)
    assert step_loop_choice() == "c"  # the default, as measured
    monkeypatch.setenv("LLMARCH_MOE_STEP_LOOP", "c")
    assert step_loop_choice() == "c"
    monkeypatch.setenv("LLMARCH_MOE_STEP_LOOP", "fast")
    with pytest.raises(LlmarchError, match="LLMARCH_MOE_STEP_LOOP"):
        step_loop_choice()


@pytest.mark.parametrize("fail_at", [None, 2])
def test_moe_step_early_launch_waits_on_the_flag(fail_at):
    """Early launch: segment i + 1 is queued while segment i runs, behind a stream wait on a host flag
    that the host raises after layer i's kernel. The stand-in stream here runs its queue in order only
    when the host waits on an event (as a GPU runs ahead of nothing), and a queued wait whose flag does
    not hold its value yet stalls it: every segment's copy back must still see the sum of the kernel
    before it, bit for bit, and a failed launch must leave no wait pending (the flag raised)."""
    from llmarch.runtime.experts.kernel import StepPlan, cpu_kernel, pointer_array

    lib = cpu_kernel()
    n_layers, k = 3, 4
    layers, _held, pack, out = _layers(n_layers, k)
    want = []
    for ctx, p in layers:
        pack[:] = p
        lib.moe_decode(ctypes.byref(ctx))
        want.append(out.copy())

    flag = np.zeros(1, np.uint32)
    flag[0] = 0xFFFFFFFE  # the sequence numbers wrap
    queue, calls, seen, stalls = [], [], [], []

    def run_graph(i):
        if i > 0:
            seen.append(out.copy())
        if i < n_layers:
            pack[:] = layers[i][1]
            out[:] = np.nan

    def drain():
        """Run queued work in order as far as it goes: up to a wait whose value is not there yet."""
        while queue:
            kind, v = queue[0]
            if kind == "wait_value" and (int(flag[0]) - v) % 2**32 >= 2**31:  # the driver's cyclic >=
                stalls.append(v)
                return
            queue.pop(0)
            if kind == "graph":
                run_graph(v)

    launch_t = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
    wait_t = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
    wait_value_t = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint)

    def launch(graph, stream):
        i = graph - 100
        calls.append(("launch", i))
        if i == fail_at:
            return 7
        queue.append(("graph", i))
        return 0

    def wait(event):
        i = event - 200
        calls.append(("wait", i))
        drain()  # the host waits for segment i's copy to the host: the stream runs as far as it can
        assert ("graph", i) not in queue, "segment i never ran: its stream stalled on a flag"
        return 0

    def wait_value(stream, addr, value, flags):
        assert addr == 0xD0 and flags == 0  # the flag's device address; CU_STREAM_WAIT_VALUE_GEQ
        calls.append(("wait_value", value))
        queue.append(("wait_value", value))
        return 0

    keep = (launch_t(launch), wait_t(wait), wait_value_t(wait_value))
    arrays = (
        pointer_array([100 + i for i in range(n_layers + 1)]),
        pointer_array([200 + i for i in range(n_layers)]),
        pointer_array([ctypes.addressof(ctx) for ctx, _ in layers]),
    )
    plan = StepPlan(n_layers + 1, *(ctypes.cast(f, ctypes.c_void_p).value for f in keep[:2]), 77)
    plan.graphs, plan.events, plan.ctxs = (ctypes.addressof(a) for a in arrays)
    plan.wait_value = ctypes.cast(keep[2], ctypes.c_void_p).value
    plan.flag, plan.flag_dev = flag.ctypes.data, 0xD0
    rc = lib.moe_step(ctypes.cast(ctypes.pointer(plan), ctypes.c_void_p))
    drain()  # after the step: the GPU finishes what was queued
    assert not queue, "a stream wait was left pending"
    seqs = [0xFFFFFFFF, 0, 1]
    if fail_at is not None:
        assert rc == (fail_at + 1) * 1000 + 7
        assert calls[-1] == ("launch", fail_at)
        assert int(flag[0]) == seqs[fail_at - 1]  # raised on the way out
    else:
        assert rc == 0
        order = [("launch", 0)]
        for i in range(n_layers):
            order += [("wait_value", seqs[i]), ("launch", i + 1), ("wait", i)]
        assert calls == order
        assert len(seen) == n_layers and int(flag[0]) == seqs[-1]
    assert stalls  # the stand-in stream did reach a wait before the host raised its flag
    for got, ref in zip(seen, want):
        assert np.array_equal(got, ref)


def test_set_early_launch_fills_the_plan():
    """set_early_launch puts early launch's call, flag address and device address in moe_step's plan and
    takes them out again; the flag is a tensor holding 0 at first (whose truth is False: a device run
    once failed on that). Without the driver's call (no _early), early launch stays off."""
    from llmarch.runtime.experts.decode import SegmentedDecoder
    from llmarch.runtime.experts.kernel import StepPlan

    dec = SegmentedDecoder.__new__(SegmentedDecoder)
    dec.plan = StepPlan(2)
    flag = torch.zeros(1, dtype=torch.int32)
    dec._early = (0x1234, flag, 0xBEEF)
    dec.set_early_launch(True)
    assert dec.early_launch and dec.plan.wait_value == 0x1234
    assert dec.plan.flag == flag.data_ptr() and dec.plan.flag_dev == 0xBEEF
    dec.set_early_launch(False)
    assert not dec.early_launch and not dec.plan.wait_value and not dec.plan.flag and dec.plan.flag_dev == 0
    dec._early = None
    dec.set_early_launch(True)
    assert not dec.early_launch and not dec.plan.wait_value

"""moe_cpu.c has two ways through a call: the general one (the input rounded in one phase, the
activation in another, rows one at a time) and the one-row path a decode token takes (every selected
expert has one row: each thread rounds its own inputs and activates its own expert's row, int4 rows
four at a time). Both must do the same arithmetic per value, so a token computed alone gives exactly
the bits it gets inside a batch. The batch's values are themselves checked against torch's dequantized
experts in tests/test_offload.py (test_cpu_kernel_equals_torch_dequant), which also checks the alone
case against torch within float order; this test pins the two paths to each other bit for bit."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "llama4"])
@pytest.mark.parametrize("d", [192, 1024 + 256])  # int4 rows of up to 1024 inputs go 4 at a time, longer ones alone
def test_decode_token_alone_equals_its_row_in_a_batch(fmt, family, d):
    from fixtures.expert_kernel import random_float_experts
    from llmarch.runtime.experts.formats import ExpertFormat
    from llmarch.runtime.experts.host import OffloadedExperts
    from llmarch.runtime.experts.placement import Placement

    g = torch.Generator().manual_seed(11)
    E, inter, k, T = 6, 128, 3, 5  # T x k = 15 rows over at most 6 experts: the batch takes the general path
    act, gu, dn, bias, moe = random_float_experts(family, E, d, inter, g)
    st = OffloadedExperts(moe, gu, dn, bias, Placement("cpu", ExpertFormat(fmt)), torch.float32)
    x = torch.randn(T, d, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    weight_input = family == "llama4"
    with torch.no_grad():
        batch = st(x, idx, w, act, weight_input)
        for t in range(T):
            alone = st(x[t : t + 1], idx[t : t + 1], w[t : t + 1], act, weight_input)
            assert alone.abs().max().item() > 0.05
            assert torch.equal(alone[0], batch[t]), (t, (alone[0] - batch[t]).abs().max().item())


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "MXFP4", "Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("gated", [True, False])
def test_decode_token_alone_equals_its_row_in_a_batch_ggml_blocks(qtype, gated):
    """The same for a GGUF's blocks as stored (gate and up two tensors): Q8_0 / Q4_0 / MXFP4 down rows
    of up to 1024 inputs go four at a time too; K-quant rows one at a time (four at a time was slower
    on the 2-core box: their super-blocks are compute, not per-row work), through the one-row path
    all the same (K-quants: random blocks in ggml's layout, see ggml_blocks)."""
    pytest.importorskip("gguf")
    from types import SimpleNamespace

    from llmarch.runtime.experts.formats import ExpertFormat
    from llmarch.runtime.experts.host import OffloadedExperts
    from llmarch.runtime.experts.placement import Placement
    from llmarch.runtime.ops.moe import ExpertAct
    from tests.test_offload_gguf_blocks import ggml_blocks

    g = torch.Generator().manual_seed(17)
    E, d, inter, k, T = 6, 256, 256, 3, 5
    spec = SimpleNamespace(
        moe=SimpleNamespace(swiglu_alpha=None, swiglu_limit=None),
        activation="silu" if gated else "relu2",
        ffn_gated=gated,
    )
    act = ExpertAct(spec, inter)
    fmt = ExpertFormat.from_ggml(qtype)
    gate, dn = ggml_blocks(qtype, (E, inter, d), g), ggml_blocks(qtype, (E, d, inter), g)
    up = ggml_blocks(qtype, (E, inter, d), g) if gated else None
    moe = SimpleNamespace(E=E, d=d, inter=inter, index=0, gated=gated)
    st = OffloadedExperts.from_quantized(
        moe,
        (gate[0], None, dn[0], None),
        Placement("cpu", fmt),
        torch.float32,
        up=None if up is None else up[0],
        formats=(fmt, fmt if gated else None, fmt),
    )
    x = torch.randn(T, d, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    with torch.no_grad():
        batch = st(x, idx, w, act, False)
        for t in range(T):
            alone = st(x[t : t + 1], idx[t : t + 1], w[t : t + 1], act, False)
            assert alone.abs().max().item() > 0.05
            assert torch.equal(alone[0], batch[t]), (t, (alone[0] - batch[t]).abs().max().item())

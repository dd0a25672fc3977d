"""The GPU's share of a token's routed experts (experts/gpu_share.py): the selected experts' stored
bytes gathered by id, then multiplied in their stored layouts (GGUF Q4_0 / Q8_0 blocks as gguf-py
writes them, moe_cpu.c's int4 / int8 as formats.quantize writes them).

Against the same experts dequantized (gguf-py's dequantizer, formats.dequantize) and run through
the float expert loop: the share takes the float input (no int8 rounding, unlike the CPU kernel),
so float32 accumulation is all that differs (2e-4 of the output's size); a wrong layout, slot or
weight misses by about the output itself. Gated (GGUF gate and up as two tensors; int4/int8 gate
rows then up rows) and non-gated experts, gpt-oss's biases and clamped SwiGLU, weights on the input
(Llama 4) or the output. The kernels run on LLMARCH_TEST_DEVICE=cuda, else on CPU tensors under the
Triton interpreter (skipped without triton). Pinning and the decoder's split: tests/test_gpu_share_gpu.py.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")

DEVICE = os.environ.get("LLMARCH_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined: jit reads it then
triton = pytest.importorskip("triton")
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.skip("LLMARCH_TEST_DEVICE=cuda without a GPU", allow_module_level=True)

from tests.test_offload_gguf_blocks import ggml_store  # noqa: E402


def act_of(gated: bool, clamped: bool, inter: int):
    from llmarch.runtime.ops.moe import ExpertAct

    clamp = dict(swiglu_alpha=1.702, swiglu_limit=0.5) if clamped else dict(swiglu_alpha=None, swiglu_limit=None)
    spec = SimpleNamespace(moe=SimpleNamespace(**clamp), activation="silu" if gated else "relu2", ffn_gated=gated)
    return ExpertAct(spec, inter)


def gguf_store(types: tuple, gated: bool, E: int, d: int, inter: int, g):
    """ggml_store's experts (gate and up apart, as a GGUF stores them) and no biases."""
    return (*ggml_store(types if gated else (types[0], None, types[2]), E, d, inter, g), (None, None))


def own_store(bits: int | str, gated: bool, bias: bool, E: int, d: int, inter: int, g):
    """An OffloadedExperts quantized by llmarch (int4 / int8, gate rows then up rows), or MXFP4 blocks
    as gpt-oss ships them (random fp4 codes, e8m0 scales around 2^-3), and its dequantization."""
    from llmarch.runtime.experts.formats import ExpertFormat
    from llmarch.runtime.experts.host import OffloadedExperts
    from llmarch.runtime.experts.placement import Placement

    rows = 2 * inter if gated else inter
    biases = (torch.randn(E, rows, generator=g), torch.randn(E, d, generator=g)) if bias else (None, None)
    moe = SimpleNamespace(E=E, d=d, inter=inter, index=0, gated=gated)
    if bits == "mxfp4":

        def mx(n, k):
            return (
                torch.randint(0, 256, (E, n, k // 2), dtype=torch.uint8, generator=g),
                torch.randint(122, 126, (E, n, k // 32), dtype=torch.uint8, generator=g),
            )

        parts = (*mx(rows, d), *mx(d, inter))
        st = OffloadedExperts.from_quantized(moe, parts, Placement("cpu", ExpertFormat.MXFP4), torch.float32, biases)
    else:
        gu, dn = torch.randn(E, rows, d, generator=g) * 0.2, torch.randn(E, d, inter, generator=g) * 0.2
        st = OffloadedExperts(moe, gu, dn, biases, Placement("cpu", ExpertFormat.from_bits(bits)), torch.float32)
    with torch.no_grad():
        deq = [st.expert(e) for e in range(E)]
    return st, torch.stack([t[0] for t in deq]), torch.stack([t[1] for t in deq]), biases


CASES = [
    (("Q4_0",) * 3, True, False, False),
    (("Q4_0",) * 3, False, False, False),
    (("Q8_0",) * 3, True, False, True),
    (("Q4_K", "Q4_K", "Q6_K"), True, False, False),  # Q4_K_M's mix
    (("Q5_K", "Q5_K", "Q4_K"), True, False, True),
    (("Q6_K",) * 3, False, False, False),
    (("MXFP4",) * 3, True, False, False),
    (4, True, True, False),
    (4, False, False, True),
    (8, True, True, True),
    ("mxfp4", True, True, False),
]


@pytest.mark.parametrize("fmt,gated,clamped_bias,weight_input", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("slots", [1, 3])
def test_share_equals_float_experts(fmt, gated, clamped_bias, weight_input, slots):
    from llmarch.runtime.experts import gpu_share
    from llmarch.runtime.experts.gpu_share import GpuShare
    from llmarch.runtime.experts.stores import ResidentExperts

    g = torch.Generator().manual_seed(7)
    E, d, inter = 6, 512, 256  # whole K-quant super-blocks both ways
    if isinstance(fmt, tuple):
        st, gate_up, down, biases = gguf_store(fmt, gated, E, d, inter, g)
    else:
        st, gate_up, down, biases = own_store(fmt, gated, clamped_bias, E, d, inter, g)
    act = act_of(gated, clamped_bias and gated, inter)
    ref = ResidentExperts(E, d, inter, biases[0] is not None, gated=gated)
    ref.load(gate_up, down, biases, torch.float64, "cpu")
    share = GpuShare(st, SimpleNamespace(act=act, weight_input=weight_input), slots, DEVICE)
    if DEVICE.startswith("cuda"):  # the kernels read the host tensors at their addresses
        assert gpu_share.pin(share, share.host_tensors()) is None
    for trial in range(2):
        ids = torch.randperm(E, generator=g)[:slots].view(1, slots)
        w = torch.rand(1, slots, generator=g)
        x = torch.randn(1, d, generator=g)
        h0 = torch.randn(1, 1, d, generator=g)
        h = h0.clone().to(DEVICE)
        share(ids.to(DEVICE), w.to(DEVICE), x.to(DEVICE), h)
        with torch.no_grad():
            want = ref(x.double(), ids, w.double(), act, weight_input).float()
        got = (h.cpu() - h0).view(1, d)
        top = want.abs().max().item()
        assert top > 1e-3
        assert (got - want).abs().max().item() < 2e-4 * top, (trial, fmt)


def test_unsupported_formats_and_slots():
    """Float experts and experts on disk keep all slots on the CPU; LLMARCH_MOE_GPU_SLOTS must leave the
    CPU at least one expert and be a number; experts under MIN_EXPERT_BYTES get no share by default."""
    from llmarch.errors import LlmarchError
    from llmarch.runtime.experts import gpu_share
    from llmarch.runtime.experts.formats import ExpertFormat

    g = torch.Generator().manual_seed(3)
    st, *_ = gguf_store(("Q4_0",) * 3, True, 4, 256, 256, g)
    assert gpu_share.unsupported(st) is None
    st.down_format = ExpertFormat.FLOAT
    assert "down experts in 16-bit" in gpu_share.unsupported(st)
    assert gpu_share.layer_shares(object(), [st], [None], 8, DEVICE) == ([], None)  # 4 small experts: no share
    os.environ["LLMARCH_MOE_GPU_SLOTS"] = "2"
    try:
        shares, note = gpu_share.layer_shares(object(), [st], [None], 8, DEVICE)
    finally:
        del os.environ["LLMARCH_MOE_GPU_SLOTS"]
    assert shares == [] and note == "experts: the CPU reads all 8 of a token's experts (down experts in 16-bit)"
    st.down_format, st._mm = ExpertFormat.Q4_0, object()
    assert gpu_share.unsupported(st) == "experts on disk"
    assert (
        gpu_share.slots_for(8, 3 << 20) == 3
        and gpu_share.slots_for(4, 3 << 20) == 1
        and gpu_share.slots_for(8, 100_000) == 0
    )
    os.environ["LLMARCH_MOE_GPU_SLOTS"] = "3"
    try:
        assert gpu_share.slots_for(8, 10) == 3
        for bad in ("8", "x", "-1"):
            os.environ["LLMARCH_MOE_GPU_SLOTS"] = bad
            with pytest.raises(LlmarchError, match="LLMARCH_MOE_GPU_SLOTS"):
                gpu_share.slots_for(8, 10)
    finally:
        del os.environ["LLMARCH_MOE_GPU_SLOTS"]

"""Runtime ops against transformers' own functions and gguf-py's dequantizers."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def test_attention_softcap_and_gqa_match_transformers_eager():
    """attend() with soft-capping = transformers' Gemma 2 eager attention (the family that applies it)."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    from llmarch.runtime.ops.attention import attend

    g = torch.Generator().manual_seed(0)
    B, H, KV, T, D = 1, 4, 2, 7, 16
    q, k, v = (torch.randn(B, n, T, D, generator=g) for n in (H, KV, KV))
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    additive = torch.zeros(T, T).masked_fill(~mask, float("-inf"))[None, None]

    class M(torch.nn.Module):
        num_key_value_groups, training, head_dim = H // KV, False, D

    for softcap in (None, 1.5):
        ref, _ = eager_attention_forward(M(), q, k, v, additive, scaling=0.3, softcap=softcap)
        got = attend(q, k, v, mask, 0.3, softcap).transpose(1, 2)
        assert (got - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_dequantize_matches_gguf_py(qtype):
    """Random block bytes (with sane fp16 scale fields) decode exactly as gguf.quants does."""
    gguf = pytest.importorskip("gguf")
    from llmarch.runtime.quant import BLOCKS, dequantize

    per, nbytes = BLOCKS[qtype]
    rng = np.random.default_rng(1)
    n = 96
    raw = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    scale_offsets = {"Q6_K": (208,), "Q4_1": (0, 2), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2)}.get(qtype, (0,))
    for off in scale_offsets:
        raw[:, off : off + 2] = np.frombuffer(rng.uniform(-1, 1, n).astype(np.float16).tobytes(), np.uint8).reshape(
            n, 2
        )
    ref = gguf.quants.dequantize(raw.reshape(-1), gguf.GGMLQuantizationType[qtype]).reshape(-1)
    got = dequantize(torch.from_numpy(raw.reshape(-1).copy()), qtype, (n * per,)).numpy()
    assert np.array_equal(ref, got)


def test_unsupported_quant_type_is_one_clear_error():
    from llmarch.errors import LlmarchError
    from llmarch.runtime.quant import dequantize

    with pytest.raises(LlmarchError, match="IQ2_XXS is not supported"):
        dequantize(torch.zeros(66, dtype=torch.uint8), "IQ2_XXS", (256,))


@pytest.mark.parametrize("bits", [8, 4])
def test_block_quant_linear(bits):
    """Decode path (C kernel, int8 activations) = prefill path (dequantized float GEMM) up to the
    activation rounding, and both near the float weights; the embedding rows decode the same table."""
    from llmarch.runtime import cpu_kernels
    from llmarch.runtime.quant import BlockQuantLinear

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 128, generator=g) * 0.05, torch.randn(96, generator=g)
    lin = BlockQuantLinear(w, b, bits)
    deq = lin.dequantize_rows(slice(0, 96), torch.float32)
    assert (deq - w).abs().max().item() <= (0.05 * 4.5) / (127 if bits == 8 else 7)  # half a step of the largest block
    x = torch.randn(3, 128, generator=g)
    exact = x @ deq.t() + b
    fast = lin(x)  # T = 3: the C kernel where available
    assert (fast - exact).abs().max().item() < (0.02 if cpu_kernels.available() else 1e-5) * exact.abs().max().item()
    slab = lin(torch.randn(20, 128, generator=g))  # T = 20: dequantized slabs
    assert slab.shape == (20, 96)
    assert torch.equal(lin.row(torch.tensor([[5, 7]]), torch.float32)[0], deq[[5, 7]])
    assert (lin(x) - (x @ w.t() + b)).abs().max().item() < (0.03 if bits == 8 else 0.3) * exact.abs().max().item()


@pytest.mark.parametrize("bits", [8, 4])
def test_keep_quantized_model_close_to_float(tiny, bits):
    """A tied-embedding model (qwen3) loaded with --keep-quantized: the table is quantized from
    slabs of rows and shared by lookup and head; logits stay near the float model's."""
    from llmarch.runtime.kv_cache import KVCache
    from llmarch.runtime.load import load_runtime

    path = str(tiny("qwen3"))
    out = []
    for qb in (None, bits):
        rt = load_runtime(path, "cpu", "float32", qb)
        s, a = rt.spec, rt.spec.attention
        if qb:
            assert rt.model.tied_quant is not None and rt.model.embed is None
        cache = KVCache(s.schedule, 16, a.kv_heads, a.head_dim, a.head_dim, torch.float32, "cpu")
        rt.model.setup(16, "cpu", torch.float32)
        ids = torch.arange(3, 15)[None]
        with torch.inference_mode():
            out.append(rt.model(ids, torch.arange(12), cache, limit=12, last_only=False))
    ref, got = out
    assert (got - ref).abs().max().item() < (0.05 if bits == 8 else 0.4) * ref.abs().max().item()


def test_gate_in_q_proj_matches_qwen3_next_attention(tiny):
    """An output gate stored as rows of q_proj ([q | gate] per head, spec gate_layout "in_q") =
    transformers' Qwen3NextAttention on the same weights (per-head (1 + w) QK-norm, partial RoPE).
    A separate gate projection (AfMoE) is covered by the MoE parity tests."""
    from transformers import AutoConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextAttention, Qwen3NextRotaryEmbedding

    from llmarch.api import load_spec
    from llmarch.runtime.kv_cache import KVCache
    from llmarch.runtime.model import _rope_key
    from llmarch.runtime.ops.attention import Attention
    from llmarch.runtime.ops.rope import Rope

    path = tiny("qwen3_next")
    spec = load_spec(str(path))
    a = spec.attention
    assert (a.gated, a.gate_layout) == (True, "in_q")
    layer = next(l for l in spec.schedule if l.mixer == "full")
    cfg = AutoConfig.from_pretrained(path)
    cfg._attn_implementation = "eager"
    g = torch.Generator().manual_seed(0)
    ref = Qwen3NextAttention(cfg, layer.index).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    (theta, _, rot, head_dim), scaling = _rope_key(spec, layer)
    rope = Rope(head_dim, rot, theta, scaling, spec.context_length)
    mine = Attention(spec, layer, rope)
    sd = {n: p.detach() for n, p in ref.named_parameters()}
    mine.load_state_dict(
        {
            "qkv.weight": torch.cat([sd["q_proj.weight"], sd["k_proj.weight"], sd["v_proj.weight"]]),
            "o.weight": sd["o_proj.weight"],
            "q_norm.weight": sd["q_norm.weight"],
            "k_norm.weight": sd["k_norm.weight"],
        }
    )
    T = 9
    rope.build(T, "cpu", torch.float32)
    x = torch.randn(1, T, spec.hidden_size, generator=g)
    pos = torch.arange(T)
    cache = KVCache(spec.schedule, T, a.kv_heads, a.head_dim, a.head_dim, torch.float32, "cpu")
    cache.prepare(pos, T)
    mask = torch.zeros(T, T).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))[None, None]
    with torch.no_grad():
        want, _ = ref(x, Qwen3NextRotaryEmbedding(cfg)(x, pos[None]), mask)
        got = mine(x, pos, cache)
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_grouped_attention_in_half_precision(dtype):
    """The CPU path that adds the group's mask bias in one fused matmul must take 16-bit queries
    (--dtype bfloat16/float16 on the CPU): same result as float32 within the dtype's rounding."""
    from llmarch.runtime.kv_cache import SlotGroup
    from llmarch.runtime.ops.attention import attend

    torch.manual_seed(0)
    group = SlotGroup(size=16, window=None, ring=False, device="cpu")
    group.prepare(torch.arange(5), limit=5)
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    want = attend(q, k, v, group.mask, 8**-0.5, group=group)
    got = attend(q.to(dtype), k.to(dtype), v.to(dtype), group.mask, 8**-0.5, group=group)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize(
    "size,window,ring,start,T,limit",
    [
        (16, None, False, 0, 5, 5),  # a first chunk: causal
        (16, None, False, 0, 5, None),  # a captured step attends over the whole buffer: masked
        (16, None, False, 3, 5, 8),  # a later chunk sees earlier positions: masked
        (16, 32, False, 0, 5, 5),  # a window wider than the buffer: causal
        (4, 4, True, 0, 5, 5),  # a ring: ring slots + new keys, masked
        (16, None, False, 0, 1, 1),  # one token: the decode paths
    ],
)
def test_slot_group_causal_flag_only_where_the_mask_is_the_causal_triangle(size, window, ring, start, T, limit):
    """Prefill on a GPU skips the mask (flash attention) when the group says causal: that must
    hold only where the mask it replaces is exactly the lower triangle over the chunk's keys."""
    from llmarch.runtime.kv_cache import SlotGroup

    group = SlotGroup(size=size, window=window, ring=ring, device="cpu")
    if start:
        group.prepare(torch.arange(start), limit=start)
    group.prepare(torch.arange(start, start + T), limit=limit)
    triangle = group.mask.shape == (T, T) and torch.equal(group.mask, torch.ones(T, T, dtype=torch.bool).tril())
    assert group.causal == (triangle and T > 1)

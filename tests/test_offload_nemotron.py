"""Nemotron-H / Nemotron 3's routed experts offloaded to the host (--experts cpu|disk). Its experts
are non-gated (up and down only, relu2: transformers' NemotronHExperts); the host stores and the
CPU kernel read that from the spec (ffn_gated, activation), not from the family.

A tiny random float32 nemotron_h from transformers (Mamba-2, attention, two MoE layers with a
shared expert, a dense MLP; hidden 128 and expert width 64, whole groups of the kernel's 64):
- 16-bit experts (--expert-bits 16, kept as stored): greedy tokens on the host, memory-mapped from
  disk, and through the segmented decoder are transformers' own greedy tokens, which all-on-one-
  device gives too.
- the kernel's non-gated relu2 path equals torch on the same dequantized weights with the inputs
  rounded as the kernel rounds them; int8 / int4 experts against the float model: top-1 agreement
  and logit error measured and bounded (printed with -s).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from fixtures.parity import own_cache, reference_tokens  # noqa: E402

PROMPT, STEPS = 19, 24
SIZES = dict(
    hidden_size=128,
    intermediate_size=128,
    moe_intermediate_size=64,
    moe_shared_expert_intermediate_size=64,
    n_routed_experts=8,
    num_experts_per_tok=2,
    hybrid_override_pattern="ME*E-M",
)


@pytest.fixture(scope="module")
def ckpt(tiny):
    return tiny("nemotron_h", **SIZES)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 128, (1, PROMPT), generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def expected(ckpt, ids):
    """transformers' greedy tokens, decoding through its own cache."""
    from fixtures.reference import reference_model

    toks = reference_tokens(own_cache(reference_model("nemotron_h", ckpt), "cache"), ids, STEPS)
    assert len(set(toks)) > 1
    return toks


def _runtime(path, **kw):
    from llmarch.runtime.load import load_runtime

    return load_runtime(str(path), "cpu", "float32", **kw)


def _tokens(rt, ids, segmented: bool = False):
    from llmarch.runtime.experts.decode import attach_decoder
    from llmarch.runtime.generate import Generator, Sampling

    gen = Generator(rt, PROMPT + STEPS + 1)
    if segmented:
        assert attach_decoder(gen)
    return gen.generate(ids[0].tolist(), STEPS, Sampling()).tokens


def test_schedule_has_offloadable_non_gated_moe(ckpt):
    from llmarch.api import load_checkpoint_spec

    _, spec = load_checkpoint_spec(str(ckpt))
    assert not spec.ffn_gated and spec.activation == "relu2"
    assert [l.ffn for l in spec.schedule] == ["none", "moe", "none", "moe", "dense", "none"]


def test_all_on_one_device_gives_transformers_tokens(ckpt, ids, expected):
    assert _tokens(_runtime(ckpt, experts="gpu"), ids) == expected


@pytest.mark.parametrize("experts,segmented", [("cpu", False), ("disk", False), ("cpu", True)])
def test_16bit_experts_on_the_host_give_transformers_tokens(ckpt, ids, expected, tmp_path, experts, segmented):
    from llmarch.runtime.experts.formats import ExpertFormat
    from llmarch.runtime.experts.host import OffloadedExperts
    from llmarch.runtime.experts.report import offloaded

    rt = _runtime(ckpt, experts=experts, expert_bits=16, expert_dir=str(tmp_path))
    stores = offloaded(rt.model)
    assert len(stores) == 2 and all(isinstance(s, OffloadedExperts) and not s.gated for s in stores)
    assert all(s.format is ExpertFormat.FLOAT and s.gu.shape == (8, 64, 128) for s in stores)  # up rows alone
    if experts == "disk":  # views of the expert file's mapping, not heap copies
        assert all(s._mm.ctypes.data <= s.gu.data_ptr() < s._mm.ctypes.data + s._mm.nbytes for s in stores)
    assert _tokens(rt, ids, segmented) == expected


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("gated,activation", [(False, "relu2"), (True, "gelu_pytorch_tanh")])
def test_cpu_kernel_activation_equals_torch(fmt, gated, activation):
    """The kernel's non-gated path (h = relu(up x)^2, then down; Nemotron-H) and a gated one with
    the spec's own activation (GeGLU, Gemma 4's experts) against ResidentExperts on the same
    dequantized weights, inputs rounded as the kernel rounds them: one decode token, then a group
    of tokens sharing experts."""
    from types import SimpleNamespace

    from fixtures.expert_kernel import check_store_equals_reference
    from llmarch.runtime.experts.formats import ExpertFormat, dequantize
    from llmarch.runtime.experts.host import OffloadedExperts
    from llmarch.runtime.experts.placement import Placement
    from llmarch.runtime.experts.stores import ResidentExperts
    from llmarch.runtime.ops.moe import ExpertAct

    fmt = ExpertFormat(fmt)
    g = torch.Generator().manual_seed(11)
    E, d, inter, k, T = 6, 192, 128, 2, 7
    moe_facts = SimpleNamespace(swiglu_alpha=None, swiglu_limit=None)
    act = ExpertAct(SimpleNamespace(moe=moe_facts, activation=activation, ffn_gated=gated), inter)
    rows = (2 if gated else 1) * inter
    gu, dn = torch.randn(E, rows, d, generator=g) * 0.2, torch.randn(E, d, inter, generator=g) * 0.2
    moe = SimpleNamespace(E=E, d=d, inter=inter, index=0, gated=gated)
    st = OffloadedExperts(moe, gu, dn, (None, None), Placement("cpu", fmt), torch.float32)
    ref = ResidentExperts(E, d, inter, False, gated=gated)
    ref.gate_up.data, ref.down.data = dequantize(st.gu, st.gu_s, fmt), dequantize(st.dn, st.dn_s, fmt)
    check_store_equals_reference(st, ref, act, E, d, k, T, g)


def _logits(rt, seq):
    from fixtures.parity import kv_cache

    cache = kv_cache(rt.spec, len(seq), "cpu", torch.float32)
    rt.model.setup(len(seq), "cpu", torch.float32)
    with torch.inference_mode():
        return rt.model(torch.tensor([seq]), torch.arange(len(seq)), cache, limit=len(seq), last_only=False)[0]


@pytest.mark.parametrize("bits,min_agree,max_err", [(8, 0.95, 0.005), (4, 0.9, 0.05)])
def test_quantized_experts_agreement(ckpt, ids, expected, bits, min_agree, max_err):
    """int8 / int4 experts on the host (the kernel, relu2 non-gated) against the float model over the
    prompt and transformers' greedy tokens: top-1 agreement and max logit error; the segmented
    decoder (one prepared kernel call per layer) gives the plain offloaded path's tokens."""
    seq = ids[0].tolist() + expected
    ref = _logits(_runtime(ckpt, experts="gpu"), seq)
    rt = _runtime(ckpt, experts="cpu", expert_bits=bits)
    q = _logits(rt, seq)
    agree = (q.argmax(-1) == ref.argmax(-1)).float().mean().item()
    err = (q - ref).abs().max().item()
    print(
        f"nemotron_h int{bits} experts: top-1 agreement {agree:.3f}, max logit error {err:.4f} "
        f"(logits up to {ref.abs().max().item():.3f})"
    )
    assert agree >= min_agree and err <= max_err
    assert _tokens(_runtime(ckpt, experts="cpu", expert_bits=bits), ids, segmented=True) == _tokens(rt, ids)

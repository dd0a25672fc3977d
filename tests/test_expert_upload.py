"""A long prompt's host experts computed on the GPU (experts/upload.py): the experts' stored bytes
copied to the device and dequantized there give what the same experts dequantized by the float
path give (ResidentExperts holding formats.dequantize's weights, the reference every store is
checked against). Here the "device" is the CPU, which runs the same code; on a GPU
(LLMARCH_TEST_DEVICE=cuda) a tiny Qwen3-MoE with --experts cpu prefills a long prompt through it
and gives the resident model's logits."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _store_and_reference(fmt_name: str, family: str, g):
    from fixtures.expert_kernel import random_float_experts
    from llmarch.runtime.experts.formats import ExpertFormat, dequantize
    from llmarch.runtime.experts.host import OffloadedExperts
    from llmarch.runtime.experts.placement import Placement
    from llmarch.runtime.experts.stores import ResidentExperts

    E, d, inter = 6, 192, 64
    act, gu, dn, bias, moe = random_float_experts(family, E, d, inter, g)
    fmt = ExpertFormat(fmt_name)
    st = OffloadedExperts(moe, gu, dn, bias, Placement("cpu", fmt), torch.float32)
    ref = ResidentExperts(E, d, inter, bias[0] is not None)
    if fmt.quantized:
        ref.gate_up.data, ref.down.data = dequantize(st.gu, st.gu_s, fmt), dequantize(st.dn, st.dn_s, fmt)
    else:
        ref.gate_up.data, ref.down.data = gu, dn
    if bias[0] is not None:
        ref.gate_up_bias.data, ref.down_bias.data = bias
    return st, ref, act, E, d


@pytest.mark.parametrize("chunk_bytes", [None, 1])
@pytest.mark.parametrize("fmt", ["int8", "int4", "16-bit"])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "llama4"])
def test_uploaded_experts_equal_the_float_path(fmt, family, chunk_bytes, monkeypatch):
    """40 tokens to 2 of 6 experts each (every expert used), one expert hot (already on the
    device): the sum equals ResidentExperts on the same dequantized weights within float32
    summation order, whether the experts go over all at once or one per chunk; the bytes read from
    the host are the cold experts' stored bytes."""
    from llmarch.runtime.experts import upload

    if chunk_bytes is not None:
        monkeypatch.setattr(upload, "CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(3)
    st, ref, act, E, d = _store_and_reference(fmt, family, g)
    T, k = 40, 2
    x = torch.randn(T, d, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    st.hot = {4: st.expert(4, "cpu")}
    with torch.no_grad():
        got = upload.compute_uploaded(st, x, idx, w, act, family == "llama4")
        want = ref(x, idx, w, act, family == "llama4")
    assert want.abs().max().item() > 0.05
    assert (got - want).abs().max().item() < 1e-5 * max(1.0, want.abs().max().item())
    assert st.bytes_read == (E - 1) * st.expert_bytes()


@pytest.mark.parametrize("types", [("Q4_0",) * 3, ("Q4_K", "Q4_K", "Q6_K")], ids=lambda t: "-".join(dict.fromkeys(t)))
def test_uploaded_gguf_blocks_equal_gguf_py(types):
    """A GGUF's expert blocks as stored (gate, up apart, down, each its own type: Q4_K_M's mix too)
    uploaded and dequantized give torch on gguf-py's dequantization of the same blocks."""
    from types import SimpleNamespace

    from test_offload_gguf_blocks import ggml_blocks

    from llmarch.runtime.experts import upload
    from llmarch.runtime.experts.formats import ExpertFormat
    from llmarch.runtime.experts.host import OffloadedExperts
    from llmarch.runtime.experts.placement import Placement
    from llmarch.runtime.experts.stores import ResidentExperts
    from llmarch.runtime.ops.moe import ExpertAct

    g = torch.Generator().manual_seed(17)
    E, d, inter, k, T = 4, 512, 256, 2, 33
    act = ExpertAct(
        SimpleNamespace(moe=SimpleNamespace(swiglu_alpha=None, swiglu_limit=None), activation="silu"), inter
    )
    gate, up, dn = (ggml_blocks(t, shape, g) for t, shape in zip(types, ((E, inter, d), (E, inter, d), (E, d, inter))))
    fmts = tuple(ExpertFormat.from_ggml(t) for t in types)
    moe = SimpleNamespace(E=E, d=d, inter=inter, index=0, gated=True)
    st = OffloadedExperts.from_quantized(
        moe, (gate[0], None, dn[0], None), Placement("cpu", fmts[0]), torch.float32, up=up[0], formats=fmts
    )
    ref = ResidentExperts(E, d, inter, False)
    ref.gate_up.data, ref.down.data = torch.cat([gate[1], up[1]], dim=1), dn[1]
    x = torch.randn(T, d, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    with torch.no_grad():
        got = upload.compute_uploaded(st, x, idx, w, act, False)
        want = ref(x, idx, w, act, False)
    assert want.abs().max().item() > 0.05
    assert (got - want).abs().max().item() < 1e-5 * max(1.0, want.abs().max().item())


def test_only_long_calls_on_a_gpu_upload():
    from llmarch.runtime.experts.upload import UPLOAD_TOKENS, worth_uploading

    assert not worth_uploading(torch.zeros(UPLOAD_TOKENS, 8))  # on the CPU there is nothing to move
    if torch.cuda.is_available():
        assert worth_uploading(torch.zeros(UPLOAD_TOKENS, 8, device="cuda"))
        assert not worth_uploading(torch.zeros(UPLOAD_TOKENS - 1, 8, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [16, 4])
def test_long_prompt_on_a_gpu_gives_the_resident_logits(tiny, bits):
    """A tiny Qwen3-MoE with its experts on the host prefills a 40-token prompt on a GPU through
    the upload path: the resident model's logits (16-bit: the same weights; 4-bit: the resident
    model holding the same int4 experts, --experts gpu --expert-bits 4)."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    from test_offload import SLICE, _logits

    from llmarch.runtime.experts.host import OffloadedExperts
    from llmarch.runtime.load import load_runtime

    path = tiny("qwen3_moe", **SLICE)
    seq = torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    host = load_runtime(str(path), "cuda", "float32", experts="cpu", expert_bits=bits)
    stores = [m for m in host.model.modules() if isinstance(m, OffloadedExperts)]
    assert stores
    got = _logits(host, seq, "cuda")
    assert all(s.bytes_read > 0 for s in stores)  # the upload path counts what it copied
    want = _logits(load_runtime(str(path), "cuda", "float32", experts="gpu", expert_bits=bits), seq, "cuda")
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()

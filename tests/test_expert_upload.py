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


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("chunk_bytes", [None, "one expert"])
@pytest.mark.parametrize("fmt", ["int8", "int4", "16-bit"])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "llama4"])
def test_uploaded_experts_equal_the_float_path(fmt, family, chunk_bytes, grouped, monkeypatch):
    """40 tokens to 2 of 6 experts each, expert 2 never chosen (the others' ids then form no one
    range: copied by a gather), the last one hot (already on the device): the sum equals
    ResidentExperts on the same dequantized weights within float32 summation order, whether the
    experts go over all at once or one per chunk, by the expert loop or the grouped products
    (torch._grouped_mm, which also runs on the CPU); the bytes read from the host are the cold
    experts' stored bytes."""
    from llmarch.runtime.experts import upload

    if chunk_bytes is not None:  # one expert's float32 bytes: one expert a chunk
        monkeypatch.setattr(upload, "UPLOAD_CHUNK_BYTES", 4 * 3 * 64 * 192)
    monkeypatch.setattr(upload, "grouped_mm_fits", lambda *mats: grouped)
    g = torch.Generator().manual_seed(3)
    st, ref, act, E, d = _store_and_reference(fmt, family, g)
    T, k = 40, 2
    x = torch.randn(T, d, generator=g)
    chosen = torch.tensor([0, 1, 3, 4, 5])
    idx = torch.stack([chosen[torch.randperm(len(chosen), generator=g)[:k]] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    st.hot = {E - 1: st.expert(E - 1, "cpu")}
    with torch.no_grad():
        got = upload.compute_uploaded(st, x, idx, w, act, family == "llama4")
        want = ref(x, idx, w, act, family == "llama4")
    assert want.abs().max().item() > 0.05
    assert (got - want).abs().max().item() < 1e-5 * max(1.0, want.abs().max().item())
    assert st.bytes_read == (len(chosen) - 1) * st.expert_bytes()


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


def test_no_room_for_one_expert_leaves_the_call_to_the_cpu(monkeypatch):
    from llmarch.runtime.experts import upload

    st, _, act, E, d = _store_and_reference("int4", "qwen3_moe", torch.Generator().manual_seed(1))
    monkeypatch.setattr(upload, "UPLOAD_CHUNK_BYTES", 4 * 3 * 64 * 192 - 1)
    assert upload.experts_per_chunk(st, "cpu") == 0
    idx = torch.zeros(40, 2, dtype=torch.long)
    idx[:, 1] = 1
    assert upload.compute_uploaded(st, torch.randn(40, d), idx, torch.rand(40, 2), act, False) is None
    assert st.bytes_read == 0


@pytest.mark.parametrize("chunk_experts", [2.5, 100])
def test_fit_shows_the_chunk_the_upload_takes(tiny, chunk_experts, monkeypatch):
    """`llmarch fit`'s upload bound (plan.memory.upload_chunk_bytes, from the spec alone) is the float32
    bytes of the experts the runtime's upload takes in one chunk from a loaded model's store: a chunk
    bound between two experts' sizes, and one above all of a layer's experts."""
    from llmarch.api import load_spec
    from llmarch.plan import memory as mem
    from llmarch.runtime.experts import upload
    from llmarch.runtime.experts.report import offloaded
    from llmarch.runtime.load import load_runtime

    path = str(tiny("qwen3_moe", hidden_size=128, moe_intermediate_size=64, num_experts=8))
    st = offloaded(load_runtime(path, "cpu", "float32", experts="cpu", expert_bits=4).model)[0]
    one = 4 * 3 * st.inter * st.d
    for module in (mem, upload):
        monkeypatch.setattr(module, "UPLOAD_CHUNK_BYTES", int(chunk_experts * one))
    per = min(upload.experts_per_chunk(st, "cpu"), st.E)
    assert per == min(int(chunk_experts), 8)
    assert mem.upload_chunk_bytes(load_spec(path)) == per * one


def test_only_long_calls_on_a_gpu_upload():
    from llmarch.runtime.experts.upload import UPLOAD_TOKENS, worth_uploading

    assert not worth_uploading(torch.zeros(UPLOAD_TOKENS, 8))  # on the CPU there is nothing to move
    if torch.cuda.is_available():
        assert worth_uploading(torch.zeros(UPLOAD_TOKENS, 8, device="cuda"))
        assert not worth_uploading(torch.zeros(UPLOAD_TOKENS - 1, 8, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("bits,dtype", [(16, "float32"), (4, "float32"), (4, "bfloat16")])
def test_long_prompt_on_a_gpu_gives_the_resident_logits(tiny, bits, dtype):
    """A tiny Qwen3-MoE with its experts on the host prefills a 40-token prompt on a GPU through
    the upload path: the resident model's logits (16-bit: the same weights; 4-bit: the resident
    model holding the same int4 experts, --experts gpu --expert-bits 4). In bf16 (the grouped
    products where torch._grouped_mm runs) no further from the float32 logits than the resident
    bf16 model, 1.5x."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    from test_offload import SLICE, _logits

    from llmarch.runtime.experts.host import OffloadedExperts
    from llmarch.runtime.load import load_runtime

    path = tiny("qwen3_moe", **SLICE)
    seq = torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(5)).tolist()

    def logits(experts, dt):
        rt = load_runtime(str(path), "cuda", dt, experts=experts, expert_bits=bits)
        out = _logits(rt, seq, "cuda", getattr(torch, dt)).float()
        return out, [m for m in rt.model.modules() if isinstance(m, OffloadedExperts)]

    got, stores = logits("cpu", dtype)
    assert stores and all(s.bytes_read > 0 for s in stores)  # the upload path counts what it copied
    want = logits("gpu", dtype)[0]
    top = want.abs().max().item()
    if dtype == "float32":
        assert (got - want).abs().max().item() < 1e-4 * top
    else:
        ref = logits("gpu", "float32")[0]
        assert (got - ref).abs().max().item() <= 1.5 * (want - ref).abs().max().item() + 1e-3 * top

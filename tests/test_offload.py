"""Expert offload on the CPU path (no GPU needed): a small Qwen3-MoE slice (4 MoE layers, 16
experts, 4 per token, hidden 128) generated with experts resident vs offloaded.

16-bit: the offloaded path (host store, also memory-mapped from disk, also with hot experts
copied back to the "GPU" device) gives the same greedy tokens as everything on one device.
8/4-bit: the C kernel equals torch on the same quantized weights dequantized, with the inputs
rounded as the kernel rounds them (int8 per 64, fake_quant_activations); against the float model,
top-1 agreement and logit error are measured and bounded.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

SLICE = dict(
    hidden_size=128,
    intermediate_size=128,
    moe_intermediate_size=64,
    num_hidden_layers=4,
    mlp_only_layers=[],
    num_experts=16,
    num_experts_per_tok=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    norm_topk_prob=True,
)
PROMPT, STEPS = 12, 32


@pytest.fixture(scope="module")
def ckpt(tiny):
    return tiny("qwen3_moe", **SLICE)


def _generate(path, **kw):
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime

    rt = load_runtime(str(path), "cpu", "float32", **kw)
    ids = torch.randint(3, 128, (PROMPT,), generator=torch.Generator().manual_seed(5)).tolist()
    res = Generator(rt, PROMPT + STEPS + 1).generate(ids, STEPS, Sampling())
    return rt, ids, res


def _logits(rt, seq, device="cpu", dtype=torch.float32):
    from llmarch.runtime.kv_cache import KVCache

    a = rt.spec.attention
    cache = KVCache(rt.spec.schedule, len(seq), a.kv_heads, a.head_dim, a.head_dim, dtype, device)
    rt.model.setup(len(seq), device, dtype)
    with torch.inference_mode():
        ids, pos = torch.tensor([seq], device=device), torch.arange(len(seq), device=device)
        return rt.model(ids, pos, cache, limit=len(seq), last_only=False)[0].cpu()


@pytest.fixture(scope="module")
def reference(ckpt):
    rt, ids, res = _generate(ckpt, experts="gpu", expert_bits=16)
    assert len(set(res.tokens)) > 3  # a sequence that exercises routing, not one repeated token
    return ids, res.tokens, _logits(rt, ids + res.tokens)


@pytest.mark.parametrize("experts,hot", [("cpu", 0), ("disk", 0), ("cpu", 4)])
def test_16bit_offload_same_greedy_tokens(ckpt, reference, experts, hot):
    from llmarch.runtime.experts.host import OffloadedExperts
    from llmarch.runtime.experts.report import offloaded

    rt, _, res = _generate(ckpt, experts=experts, expert_bits=16, gpu_experts=hot)
    stores = offloaded(rt.model)
    assert len(stores) == 4 and all(isinstance(s, OffloadedExperts) for s in stores)
    if hot:
        assert all(len(s.hot) == hot for s in stores)
    if experts == "disk":  # the experts are views of a file mapping, not heap copies
        for s in stores:
            base = s._mm.ctypes.data
            assert base <= s.gu.data_ptr() < base + s._mm.nbytes
    assert res.tokens == reference[1]


@pytest.mark.parametrize("bits,min_agree,max_err", [(8, 0.95, 0.01), (4, 0.85, 0.1)])
def test_quantized_experts_accuracy(ckpt, reference, bits, min_agree, max_err):
    ids, toks, ref_logits = reference
    rt, _, _ = _generate(ckpt, experts="cpu", expert_bits=bits)
    q = _logits(rt, ids + toks)
    agree = (q.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    err = (q - ref_logits).abs().max().item()
    print(
        f"int{bits}: top-1 agreement {agree:.3f}, max logit error {err:.4f}, "
        f"logit range {ref_logits.abs().max().item():.3f}"
    )
    assert agree >= min_agree and err <= max_err


def test_report_counts_selected_expert_bytes(ckpt):
    """Decode reads each selected expert once per layer per token: 4 layers x 4 experts."""
    from llmarch.runtime.experts.report import offloaded, report, reset_counters
    from llmarch.runtime.generate import Generator

    rt, _, _ = _generate(ckpt, experts="cpu", expert_bits=4)
    g = Generator(rt, PROMPT + 8)
    with torch.inference_mode():
        rt.model(torch.arange(3, 3 + PROMPT)[None], torch.arange(PROMPT), g.cache, limit=PROMPT)
        reset_counters(rt.model)  # count decode steps only
        tok = torch.tensor([[7]])
        for i in range(4):
            tok = rt.model(tok, torch.tensor([PROMPT + i]), g.cache, limit=PROMPT + i + 1)[:, -1].argmax(
                -1, keepdim=True
            )
    one = offloaded(rt.model)[0].expert_bytes()  # int4: (2I*d + d*I)/2 bytes + fp16 scale and min per 64
    assert one == (2 * 64 * 128 + 128 * 64) // 2 + 2 * 2 * (2 * 64 * 128 + 128 * 64) // 64
    r = report(rt.model, 4, 1.0, torch.device("cpu"), bandwidth=10e9)
    assert r["expert_bytes_per_token"] == 4 * 4 * one
    assert r["bound_tok_s"] == pytest.approx(10e9 / (16 * one), rel=1e-3)


def _decode_both_ways(path, device: str, bits: int, ids):
    """Greedy tokens of the plain layer-by-layer decode and of the SegmentedDecoder (CUDA graphs on
    a GPU, eager on the CPU), same checkpoint and placement."""
    from llmarch.runtime.experts.decode import attach_decoder
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime

    plain = load_runtime(str(path), device, "float32", experts="cpu", expert_bits=bits)
    want = Generator(plain, PROMPT + STEPS + 1, cuda_graph=False).generate(ids, STEPS, Sampling()).tokens
    rt = load_runtime(str(path), device, "float32", experts="cpu", expert_bits=bits)
    gen = Generator(rt, PROMPT + STEPS + 1)
    assert attach_decoder(gen)
    dec = gen._step_eager.__self__
    assert dec.graphs == (device == "cuda")
    got = gen.generate(ids, STEPS, Sampling()).tokens
    if device == "cuda" and dec.step_loop == "c":  # the step ran in moe_step, not the Python loop
        assert dec.plan is not None
        assert dec.early_launch == (os.environ.get("LLMARCH_NO_MOE_EARLY_LAUNCH") == "0")
    return want, got


@pytest.fixture(scope="module")
def glm_ckpt(tiny):
    """GLM-4.5 layout: first layer dense, then MoE with a shared expert (widths the int kernel takes)."""
    return tiny("glm4_moe", hidden_size=128, intermediate_size=128, moe_intermediate_size=64)


@pytest.fixture(scope="module")
def ds_ckpt(tiny):
    """DeepSeek-V3 layout: MLA (latent cache, absorbed decode), first layer dense, shared expert."""
    return tiny("deepseek_v3", hidden_size=128, intermediate_size=128, moe_intermediate_size=64)


def test_segmented_decoder_mla_same_tokens(ds_ckpt, reference):
    """MLA decode attends over the whole static latent cache under the mask (no host read of the
    position, so its segments can be CUDA graphs): same tokens as the plain offloaded path."""
    want, got = _decode_both_ways(ds_ckpt, "cpu", 4, reference[0])
    assert got == want and len(set(want)) > 3


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_segmented_decoder_same_tokens(ckpt, reference, bits):
    """The decode step split at the host round trips (CUDA graphs on a GPU; eager here) changes nothing."""
    want, got = _decode_both_ways(ckpt, "cpu", bits, reference[0])
    if bits == 16:
        assert want == reference[1]
    assert got == want


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_segmented_decoder_tied_quantized_table_same_logits(tiny, reference, device):
    """--keep-quantized on tied embeddings: one quantized table serves the first segment's lookup
    and the last one's head; the segments (CUDA graphs on a GPU) give the plain decode's logits at
    every position of a fixed sequence (the same kernels on the same inputs: equal up to float
    summation order)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from llmarch.runtime.experts.decode import attach_decoder
    from llmarch.runtime.generate import Generator
    from llmarch.runtime.load import load_runtime

    path = tiny("qwen3_moe", **SLICE, tie_word_embeddings=True)
    seq = reference[0] + reference[1]
    gens = []
    for segmented in (False, True):
        rt = load_runtime(str(path), device, "float32", quant_bits=8, experts="cpu", expert_bits=8)
        assert rt.model.tied_quant is not None
        gens.append(Generator(rt, len(seq) + 1, cuda_graph=segmented))
        assert not segmented or attach_decoder(gens[-1])
    assert gens[1]._step_eager.__self__.graphs == (device == "cuda")
    with torch.inference_mode():
        for pos, t in enumerate(seq):
            a, b = (g._step_eager(torch.tensor([[t]], device=device), pos).float().cpu() for g in gens)
            assert (a - b).abs().max().item() < 1e-5 * a.abs().max().item(), pos


class TorchShare:
    """A GPU share's arithmetic in torch, as moe_cpu.c rounds its inputs (int8 per 64 values, the
    input and the activation): the experts of the first `slots` router slots, dequantized by the
    store's float path, weighted and added to the residual."""

    def __init__(self, store, moe, slots: int):
        self.store, self.moe, self.slots = store, moe, slots

    def __call__(self, ids, w, x, h):
        from llmarch.runtime.experts.formats import fake_quant_activations as fq

        for s in range(self.slots):
            gu, dn, gu_b, dn_b = self.store.expert(int(ids[0, s]))
            a = fq(self.moe.act(fq(x.float()) @ gu.float().T))
            h.add_((w[0, s] * (a @ dn.float().T)).view_as(h).to(h.dtype))


def test_segmented_decoder_splits_experts_between_share_and_cpu(ckpt, reference, monkeypatch):
    """With a GPU share of 2 router slots (here its arithmetic in torch, rounded as the kernel rounds:
    the Triton products are tested in tests/test_gpu_share.py), the CPU kernel computes the other 2
    from a pack of 2 ids and weights, and the logits are the kernel's alone for all 4 up to float
    summation order and the int8 rounding it moves, position by position through a fixed sequence.
    A slot given to both sides, to neither, or a weight paired with the wrong id is off by a whole
    expert's share."""
    from llmarch.runtime.experts.decode import SegmentedDecoder, attach_decoder
    from llmarch.runtime.generate import Generator
    from llmarch.runtime.load import load_runtime

    seq = reference[0] + reference[1]
    gens = []
    for slots in (0, 2):
        if slots:
            monkeypatch.setattr(
                SegmentedDecoder,
                "_gpu_shares",
                lambda self, device: (
                    [TorchShare(st, self.model.layers[i].mlp, 2) for i, st in zip(self.cuts, self.stores)],
                    None,
                ),
            )
        rt = load_runtime(str(ckpt), "cpu", "float32", experts="cpu", expert_bits=8)
        gens.append(Generator(rt, len(seq) + 1))
        assert attach_decoder(gens[-1])
    dec = gens[1]._step_eager.__self__
    assert (dec.slots, dec.kc, dec.pack.shape[1]) == (2, 2, 2 * 2 + 128)
    # the kernel rounds its inputs to int8 per 64 values: where its float sums run in another order
    # than torch's (the host's SIMD width) a value on a rounding boundary moves one step, 3e-4 of the
    # largest logit on an AVX-512 host (5e-7 on AVX2); one weight paired with the wrong id is 2e-2
    with torch.inference_mode():
        for pos, t in enumerate(seq):
            a, b = (g._step_eager(torch.tensor([[t]]), pos) for g in gens)
            assert (a - b).abs().max().item() < 2e-3 * a.abs().max().item(), pos


def test_segmented_decoder_shared_expert_same_logits(glm_ckpt, reference):
    """The shared expert as its own step after the copy to the host (on a GPU it overlaps the CPU's
    routed experts): the same logits at every position, token by token through a fixed sequence.
    16-bit experts: with int8-rounded kernel inputs, the sums' different association (h + s) + y
    vs h + (s + y) can flip a rounding and the comparison would measure that instead."""
    from llmarch.runtime.experts.decode import attach_decoder
    from llmarch.runtime.generate import Generator
    from llmarch.runtime.load import load_runtime

    seq = reference[0] + reference[1]
    gens = []
    for segmented in (False, True):
        rt = load_runtime(str(glm_ckpt), "cpu", "float32", experts="cpu", expert_bits=16)
        gens.append(Generator(rt, len(seq) + 1))
        assert not segmented or attach_decoder(gens[-1])
    assert gens[1]._step_eager.__self__.shared[1] is not None  # layer 1 has a shared expert
    with torch.inference_mode():
        for pos, t in enumerate(seq):
            a, b = (g._step_eager(torch.tensor([[t]]), pos) for g in gens)
            assert (a - b).abs().max().item() < 1e-5, pos


@pytest.mark.parametrize("fmt", ["int8", "int4", "mxfp4"])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "llama4"])
def test_cpu_kernel_equals_torch_dequant(fmt, family):
    """The kernel against ResidentExperts on the same dequantized weights, its inputs rounded as the
    kernel rounds them: plain SwiGLU, gpt-oss (biases, clamped SwiGLU) and Llama 4 (router weight
    applied to the expert input). MXFP4: blocks as gpt-oss ships them (random codes and
    e8m0 scales), dequantized by the same code as the float load path."""
    from fixtures.expert_kernel import check_store_equals_reference, random_float_experts
    from llmarch.runtime.experts.formats import ExpertFormat, dequantize
    from llmarch.runtime.experts.host import OffloadedExperts
    from llmarch.runtime.experts.placement import Placement
    from llmarch.runtime.experts.stores import ResidentExperts

    fmt = ExpertFormat(fmt)
    g = torch.Generator().manual_seed(7)
    E, d, inter, k, T = 6, 192, 64, 2, 5  # 3 and 1 groups of 64: paired and lone groups in the kernel
    act, gu, dn, bias, moe = random_float_experts(family, E, d, inter, g)
    if fmt is ExpertFormat.MXFP4:

        def mx(rows, k):  # [E, rows, k/2] fp4 codes, [E, rows, k/32] scales around 2^-3
            return (
                torch.randint(0, 256, (E, rows, k // 2), dtype=torch.uint8, generator=g),
                torch.randint(122, 126, (E, rows, k // 32), dtype=torch.uint8, generator=g),
            )

        st = OffloadedExperts.from_quantized(
            moe, (*mx(2 * inter, d), *mx(d, inter)), Placement("cpu", fmt), torch.float32, bias
        )
    else:
        st = OffloadedExperts(moe, gu, dn, bias, Placement("cpu", fmt), torch.float32)
    ref = ResidentExperts(E, d, inter, bias[0] is not None)
    ref.gate_up.data, ref.down.data = dequantize(st.gu, st.gu_s, fmt), dequantize(st.dn, st.dn_s, fmt)
    if bias[0] is not None:
        ref.gate_up_bias.data, ref.down_bias.data = bias
    check_store_equals_reference(st, ref, act, E, d, k, T, g, weight_input=family == "llama4")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "which,loop",
    [
        ("ckpt", "python"),
        ("ckpt", "c"),
        ("ckpt", "c_early"),
        ("glm_ckpt", "python"),
        ("glm_ckpt", "c_early"),
        ("ds_ckpt", "c"),
        ("ds_ckpt", "c_early"),
    ],
)
def test_graph_decoder_on_gpu_same_tokens(request, reference, which, loop, monkeypatch):
    """On a GPU each segment between host round trips is a CUDA graph (the copies to and from pinned
    memory inside it, the shared expert after an event the host waits on): same greedy tokens as the
    eager layer-by-layer path, with the step's loop in Python or in moe_cpu.c (moe_step, the CUDA
    driver's graph launch and event wait; c_early: each next segment launched before the kernel,
    behind a stream wait on a flag the host raises)."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    monkeypatch.setenv("LLMARCH_MOE_STEP_LOOP", "python" if loop == "python" else "c")
    monkeypatch.setenv("LLMARCH_NO_MOE_EARLY_LAUNCH", "0" if loop == "c_early" else "1")
    want, got = _decode_both_ways(request.getfixturevalue(which), "cuda", 4, reference[0])
    assert got == want


@pytest.mark.gpu
def test_graph_decoder_bf16_early_launch_same_tokens(ckpt, reference, monkeypatch):
    """A bfloat16 model as the loader leaves it on a GPU (the Triton decode GEMVs and attention kernel
    inside the captured segments): moe_step with early launch gives the very tokens of moe_step
    launching after each kernel, on the same model (a copy back released too early would read the
    layer before's sum)."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    from llmarch.runtime.experts.decode import attach_decoder
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime

    monkeypatch.setenv("LLMARCH_MOE_STEP_LOOP", "c")
    rt = load_runtime(str(ckpt), "cuda", "bfloat16", experts="cpu", expert_bits=4)
    tokens = []
    for early in ("1", "0", "1", "0"):  # LLMARCH_NO_MOE_EARLY_LAUNCH: off, on, off, on
        monkeypatch.setenv("LLMARCH_NO_MOE_EARLY_LAUNCH", early)
        gen = Generator(rt, PROMPT + STEPS + 1)
        assert attach_decoder(gen)
        dec = gen._step_eager.__self__
        tokens.append(gen.generate(reference[0], STEPS, Sampling()).tokens)
        assert dec.plan is not None and dec.early_launch == (early == "0")
    assert tokens[1] == tokens[0] and tokens[2] == tokens[0] and tokens[3] == tokens[0]
    assert len(set(tokens[0])) > 3


def _mapped_rss(folder) -> int:
    """Resident bytes of this process's mappings of files under `folder` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        parts = line.split()
        if parts and "-" in parts[0] and len(parts) >= 5:  # a mapping's header line
            inside = len(parts) >= 6 and parts[5].startswith(str(folder))
        elif inside and parts and parts[0] == "Rss:":
            total += int(parts[1]) * 1024
    return total


@pytest.mark.parametrize("cache_gib,resident", [(0.0, False), (1.0, True)])
def test_disk_experts_leave_rss_past_the_cache_budget(ckpt, reference, tmp_path, cache_gib, resident):
    """--experts disk: expert pages touched while generating stay mapped up to the cache budget, then
    are dropped (MADV_DONTNEED). Budget 0: nothing of the expert files stays resident after a call;
    a large budget keeps what was read. Tokens are the same either way."""
    from llmarch.runtime.experts.report import offloaded
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime

    rt = load_runtime(
        str(ckpt),
        "cpu",
        "float32",
        experts="disk",
        expert_bits=16,
        expert_cache_gib=cache_gib,
        expert_dir=str(tmp_path),
    )
    ids = reference[0]
    assert Generator(rt, PROMPT + STEPS + 1).generate(ids, STEPS, Sampling()).tokens == reference[1]
    rss = _mapped_rss(tmp_path)
    stores = offloaded(rt.model)
    assert sum(s.bytes_read for s in stores) > 0
    if resident:
        assert rss > 0 and stores[0].cache.drops == 0
    else:
        assert rss == 0 and stores[0].cache.drops > 0


def test_gpt_oss_mxfp4_experts_stay_mxfp4_on_the_cpu(tiny, tmp_path):
    """gpt-oss's MXFP4 experts on the CPU without --expert-bits: kept as shipped (4.25 bits per
    weight, no requantization). Against the same blocks dequantized to float (the resident path,
    which test_run_moe ties to transformers): top-1 agreement and logit error of the kernel's int8
    input rounding; the segmented decoder gives the plain offloaded path's tokens."""
    import shutil

    from safetensors.torch import load_file, save_file

    from llmarch.runtime.experts.decode import attach_decoder
    from llmarch.runtime.experts.formats import ExpertFormat
    from llmarch.runtime.experts.report import offloaded
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime

    src = tiny("gpt_oss", hidden_size=128, intermediate_size=128)
    mx = tmp_path / "mx"
    shutil.copytree(src, mx)
    sd = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    for name in [n for n in sd if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        E, K, R = sd.pop(name).shape  # transformers' layout [E, in, out]
        sd[name + "_blocks"] = torch.randint(0, 256, (E, R, K // 32, 16), dtype=torch.uint8, generator=g)
        sd[name + "_scales"] = torch.randint(121, 125, (E, R, K // 32), dtype=torch.uint8, generator=g)
    save_file(sd, mx / "model.safetensors", metadata={"format": "pt"})

    ref_rt = load_runtime(str(mx), "cpu", "float32", experts="gpu")
    rt = load_runtime(str(mx), "cpu", "float32", experts="cpu")
    stores = offloaded(rt.model)
    assert stores and all(s.format is ExpertFormat.MXFP4 for s in stores)
    assert stores[0].expert_bytes() == (3 * 128 * 128) // 2 + (3 * 128 * 128) // 32  # 4.25 bits per weight
    ids = torch.randint(3, 128, (PROMPT,), generator=torch.Generator().manual_seed(5)).tolist()
    seq = ids + Generator(ref_rt, PROMPT + STEPS + 1).generate(ids, STEPS, Sampling()).tokens
    a, b = _logits(ref_rt, seq), _logits(rt, seq)
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    err = (a - b).abs().amax(-1)  # per position: where a nudged router picks another expert, it jumps
    print(
        f"mxfp4 on the CPU: top-1 agreement {agree:.3f}, logit error median {err.median().item():.4f}, "
        f"max {err.max().item():.4f}, logit range {a.abs().max().item():.3f}"
    )
    assert agree >= 0.9 and err.median().item() < 0.05 * a.abs().max().item()
    want = Generator(rt, PROMPT + STEPS + 1).generate(ids, STEPS, Sampling()).tokens
    gen = Generator(load_runtime(str(mx), "cpu", "float32", experts="cpu"), PROMPT + STEPS + 1)
    assert attach_decoder(gen)
    assert gen.generate(ids, STEPS, Sampling()).tokens == want

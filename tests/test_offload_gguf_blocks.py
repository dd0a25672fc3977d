"""--experts cpu|disk from a GGUF: Q8_0 / Q4_0 expert blocks are read by the CPU kernel as stored,
views of the file's memory map (nothing dequantized, requantized or copied); other types take the
dequantizing path, and the run report says which was used.

- the kernel on ggml blocks made by gguf-py's own quantizer (the reference for the layout) against
  torch on gguf-py's dequantization of them, inputs rounded as the kernel rounds them; gated
  (gate and up as two tensors, as a GGUF stores them) and non-gated experts.
- a tiny Qwen3-MoE converted by `llmarch convert --to gguf` (q8_0, q4_0): greedy tokens with the
  experts on the host equal the same GGUF's all on one device; from disk and through the
  segmented decoder too; the stores hold views of the GGUF mapping.
- q5_0 (no kernel layout): dequantized, 16-bit on the host, the resident tokens; the note says why.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from tests.test_offload import SLICE  # noqa: E402

PROMPT, STEPS = 12, 32


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("gated", [True, False])
def test_cpu_kernel_reads_ggml_blocks(qtype, gated):
    from types import SimpleNamespace

    import numpy as np
    from gguf.quants import dequantize as gg_dequant
    from gguf.quants import quantize as gg_quant

    from fixtures.expert_kernel import check_store_equals_reference
    from llmarch.runtime.experts.formats import ExpertFormat
    from llmarch.runtime.experts.host import OffloadedExperts
    from llmarch.runtime.experts.placement import Placement
    from llmarch.runtime.experts.stores import ResidentExperts
    from llmarch.runtime.ops.moe import ExpertAct

    fmt = ExpertFormat.from_ggml(qtype)
    qt = gguf.GGMLQuantizationType[qtype]
    g = torch.Generator().manual_seed(13)
    E, d, inter, k, T = 5, 192, 128, 2, 6
    act = ExpertAct(
        SimpleNamespace(
            moe=SimpleNamespace(swiglu_alpha=None, swiglu_limit=None),
            activation="silu" if gated else "relu2",
            ffn_gated=gated,
        ),
        inter,
    )

    def blocks(rows, cols):  # gguf-py's quantizer: [E, rows, cols] float -> uint8 [E, rows, row bytes]
        w = (torch.randn(E, rows, cols, generator=g) * 0.2).numpy()
        q = gg_quant(w, qt)
        return torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy(gg_dequant(q, qt).copy())

    parts = [blocks(inter, d) for _ in range(2 if gated else 1)]
    dn, dn_f = blocks(d, inter)
    moe = SimpleNamespace(E=E, d=d, inter=inter, index=0, gated=gated)
    st = OffloadedExperts.from_quantized(
        moe, (parts[0][0], None, dn, None), Placement("cpu", fmt), torch.float32, up=parts[1][0] if gated else None
    )
    ref = ResidentExperts(E, d, inter, False, gated=gated)
    ref.gate_up.data = torch.cat([p[1] for p in parts], dim=1).float()
    ref.down.data = dn_f.float()
    check_store_equals_reference(st, ref, act, E, d, k, T, g)
    with torch.no_grad():
        # the float path of the same store (hot experts on a GPU use it) dequantizes the blocks alike
        for e in range(E):
            assert torch.equal(st.expert(e)[0], ref.gate_up[e]) and torch.equal(st.expert(e)[1], ref.down[e])


@pytest.fixture(scope="module")
def ggufs(tiny, tmp_path_factory):
    from llmarch.convert.to_gguf import convert_to_gguf

    src = tiny("qwen3_moe", **SLICE)
    d = tmp_path_factory.mktemp("expert_blocks")
    files = {q: d / f"qwen3_moe-{q}.gguf" for q in ("q8_0", "q4_0", "q5_0")}
    for q, out in files.items():  # what `llmarch convert --to gguf --dtype q` runs, in process
        convert_to_gguf(str(src), out, q)
    return files


def _run(path, **kw):
    from llmarch.runtime.experts.decode import attach_decoder
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime

    segmented = kw.pop("segmented", False)
    rt = load_runtime(str(path), "cpu", "float32", **kw)
    gen = Generator(rt, PROMPT + STEPS + 1)
    if segmented:
        assert attach_decoder(gen)
    ids = torch.randint(3, 128, (PROMPT,), generator=torch.Generator().manual_seed(5)).tolist()
    return rt, gen.generate(ids, STEPS, Sampling()).tokens


@pytest.mark.parametrize("q", ["q8_0", "q4_0"])
def test_gguf_blocks_on_the_host_give_the_resident_tokens(ggufs, q, tmp_path):
    from llmarch.runtime.experts.formats import ExpertFormat
    from llmarch.runtime.experts.report import offloaded
    from llmarch.runtime.weights import _memmap

    path = ggufs[q]
    _, want = _run(path, experts="gpu")
    assert len(set(want)) > 3
    fmt = ExpertFormat.from_ggml(q.upper())
    for experts, segmented in (("cpu", False), ("cpu", True), ("disk", False)):
        rt, got = _run(path, experts=experts, expert_dir=str(tmp_path), segmented=segmented)
        assert got == want, (experts, segmented)
        assert any(f"the GGUF's {q.upper()} blocks used as stored" in n for n in rt.notes)
        stores = offloaded(rt.model)
        assert len(stores) == 4 and all(s.format is fmt and s.up is not None for s in stores)
        for s in stores:  # views of the GGUF's mapping: the run's shared one, or (disk) the store's own
            mm = _memmap(path) if experts == "cpu" else s._mm
            base = mm.ctypes.data
            for t in (s.gu, s.up, s.dn):
                assert base <= t.data_ptr() < base + mm.nbytes
        assert stores[0].expert_bytes() == 3 * 128 * 64 // 32 * (34 if q == "q8_0" else 18)


def test_requested_bits_and_unreadable_blocks_take_the_dequantizing_path(ggufs):
    """--expert-bits 8 on a Q8_0 GGUF: dequantized and requantized (asked for). Q5_0 has no kernel
    layout: dequantized to 16-bit on the host, exactly the resident model's tokens."""
    from llmarch.runtime.experts.formats import ExpertFormat
    from llmarch.runtime.experts.report import offloaded

    rt, _ = _run(ggufs["q8_0"], experts="cpu", expert_bits=8)
    assert offloaded(rt.model)[0].format is ExpertFormat.INT8
    assert any(
        "Q8_0 blocks dequantized, then requantized to int8 (--expert-bits 8 asks for that)" in n for n in rt.notes
    )
    _, want = _run(ggufs["q5_0"], experts="gpu")
    rt, got = _run(ggufs["q5_0"], experts="cpu")
    assert got == want
    assert offloaded(rt.model)[0].format is ExpertFormat.FLOAT
    assert any("the CPU expert kernel reads Q8_0/Q4_0 blocks, not Q5_0" in n for n in rt.notes), rt.notes


def test_run_reports_which_path_the_experts_took(ggufs, capsys):
    """`llmarch run X.gguf --experts cpu` (its library call, in process): the notes say the blocks were
    used as stored, and the offload summary and JSON name the format."""
    from llmarch.runtime.run import RunOptions, run

    o = RunOptions(source=str(ggufs["q8_0"]), prompt_ids="5,6,7", max_tokens=3, device="cpu", experts="cpu")
    doc = run(o)
    err = capsys.readouterr().err
    assert "llmarch: routed experts: the GGUF's Q8_0 blocks used as stored (memory-mapped, not copied)" in err, err
    assert "gguf q8_0 experts" in err and doc["offload"]["expert_format"] == "gguf q8_0", err


def test_mla_gguf_experts_as_stored_give_the_resident_tokens(tiny, tmp_path):
    """DeepSeek V3's layout from a GGUF (llama.cpp's deepseek2: MLA, a dense first layer, a shared
    expert): its Q8_0 expert blocks on the host, through the segmented decoder, give the same GGUF's
    resident tokens."""
    from llmarch.convert.to_gguf import convert_to_gguf
    from llmarch.runtime.experts.formats import ExpertFormat
    from llmarch.runtime.experts.report import offloaded

    path = tmp_path / "deepseek_v3-q8_0.gguf"
    convert_to_gguf(
        str(tiny("deepseek_v3", hidden_size=128, intermediate_size=128, moe_intermediate_size=64)), path, "q8_0"
    )
    _, want = _run(path, experts="gpu")
    rt, got = _run(path, experts="cpu", segmented=True)
    assert got == want and len(set(want)) > 3
    assert offloaded(rt.model) and all(s.format is ExpertFormat.Q8_0 for s in offloaded(rt.model))


def _mapping_rss(mm) -> int:
    """Resident bytes of the mapping that holds the numpy memmap mm (/proc/self/smaps)."""
    lo = mm.ctypes.data
    hi, total, inside = lo + mm.nbytes, 0, False
    for line in open("/proc/self/smaps"):
        parts = line.split()
        if parts and "-" in parts[0] and len(parts) >= 5:  # a mapping's header line
            a, b = (int(x, 16) for x in parts[0].split("-"))
            inside = a < hi and b > lo
        elif inside and parts and parts[0] == "Rss:":
            total += int(parts[1]) * 1024
    return total


@pytest.mark.parametrize("cache_gib,resident", [(0.0, False), (1.0, True)])
def test_disk_experts_map_the_gguf_and_leave_rss_past_the_budget(ggufs, tmp_path, cache_gib, resident):
    """--experts disk on a Q8_0 GGUF writes no expert file: each store maps the GGUF itself, and the
    disk cache drops that mapping's pages past --expert-cache-gib (0: none stay resident)."""
    from llmarch.runtime.experts.report import offloaded

    rt, _ = _run(ggufs["q8_0"], experts="disk", expert_dir=str(tmp_path), expert_cache_gib=cache_gib)
    assert not list(tmp_path.rglob("*.bin"))
    stores = offloaded(rt.model)
    assert all(s.bytes_read > 0 for s in stores)
    rss = sum(_mapping_rss(s._mm) for s in stores)
    assert (rss > 0) == resident and (stores[0].cache.drops > 0) != resident, (rss, stores[0].cache.drops)


def test_gpt_oss_q8_0_gguf_biases_and_clamped_swiglu(tiny, tmp_path):
    """gpt-oss from a q8_0 GGUF (expert biases, clamped SwiGLU), its Q8_0 blocks on the host against
    the same GGUF resident, teacher-forced over a random sequence: top-1 agreement and the median
    logit error of the kernel's int8 input rounding (where a nudged router picks another expert the
    logits jump, as in test_offload's MXFP4 test)."""
    from llmarch.convert.to_gguf import convert_to_gguf
    from llmarch.runtime.experts.formats import ExpertFormat
    from llmarch.runtime.experts.report import offloaded

    path = tmp_path / "gpt_oss-q8_0.gguf"
    convert_to_gguf(str(tiny("gpt_oss", hidden_size=128, intermediate_size=128)), path, "q8_0")
    seq = torch.randint(3, 128, (PROMPT + STEPS,), generator=torch.Generator().manual_seed(1)).tolist()
    logits, rt = _teacher_forced(path, seq)
    stores = offloaded(rt.model)
    assert stores and all(s.format is ExpertFormat.Q8_0 and s.gu_b is not None and s.dn_b is not None for s in stores)
    assert rt.spec.moe.swiglu_limit is not None
    a, b = logits["gpu"], logits["cpu"]
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    err = (a - b).abs().amax(-1)
    print(f"gpt-oss q8_0 GGUF experts on the CPU: top-1 {agree:.3f}, logit error median {err.median().item():.4f}")
    assert agree >= 0.9 and err.median().item() < 0.02 * a.abs().max().item()


def test_gemma4_fused_gate_up_blocks(tiny, tmp_path):
    """Gemma 4's GGUF holds each layer's gate and up experts in one ffn_gate_up_exps tensor (gate rows
    then up rows): the kernel reads it as one matrix, GeGLU from the spec. Against the same GGUF
    resident, teacher-forced: top-1 agreement and median logit error bounded loosely, as this tiny
    Gemma 4 amplifies the kernel's int8 input rounding (measured on its safetensors: int8 experts in
    torch vs the same in the kernel, top-1 0.82, median error 3.4% of the logit range; here 0.93 and 2.4%);
    a misread row layout falls far below."""
    from llmarch.convert.to_gguf import convert_to_gguf
    from llmarch.runtime.experts.formats import ExpertFormat
    from llmarch.runtime.experts.report import offloaded

    src = tiny(
        "gemma4_text",
        hidden_size=128,
        intermediate_size=128,
        enable_moe_block=True,
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=64,
    )
    path = tmp_path / "gemma4-q8_0.gguf"
    convert_to_gguf(str(src), path, "q8_0")
    seq = torch.randint(3, 256, (44,), generator=torch.Generator().manual_seed(1)).tolist()
    logits, rt = _teacher_forced(path, seq)
    stores = offloaded(rt.model)
    assert stores and all(s.format is ExpertFormat.Q8_0 and s.up is None for s in stores)
    assert tuple(stores[0].gu.shape) == (8, 2 * 64, 128 // 32 * 34)
    a, b = logits["gpu"], logits["cpu"]
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    err = (a - b).abs().amax(-1).median().item()
    print(f"gemma4 q8_0 GGUF fused experts on the CPU: top-1 {agree:.3f}, median logit error {err:.4f}")
    assert agree >= 0.85 and err < 0.05 * a.abs().max().item()


def _teacher_forced(path, seq: list[int]):
    """Logits at every position of `seq` from the GGUF with its experts resident ("gpu") and in the
    CPU kernel's stores ("cpu"), and the offloaded runtime."""
    from fixtures.parity import kv_cache
    from llmarch.runtime.load import load_runtime

    logits = {}
    for experts in ("gpu", "cpu"):
        rt = load_runtime(str(path), "cpu", "float32", experts=experts)
        cache = kv_cache(rt.spec, len(seq), "cpu", torch.float32)
        rt.model.setup(len(seq), "cpu", torch.float32)
        with torch.inference_mode():
            logits[experts] = rt.model(
                torch.tensor([seq]), torch.arange(len(seq)), cache, limit=len(seq), last_only=False
            )[0]
    return logits, rt

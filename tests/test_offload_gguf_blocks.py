"""--experts cpu|disk from a GGUF: Q8_0 / Q4_0 / MXFP4 / Q4_K / Q5_K / Q6_K expert blocks are read by
the CPU kernel as stored, views of the file's memory map (nothing dequantized, requantized or
copied), each matrix in its own type (Q4_K_M: Q4_K gate/up, Q6_K or Q4_K down); other types take
the dequantizing path, and the run report says which was used.

- the kernel on ggml blocks (gguf-py's quantizer where it has one, else random blocks in the
  documented layout) against torch on gguf-py's dequantization of them, inputs rounded as the
  kernel rounds them; gated (gate and up as two tensors, as a GGUF stores them) and non-gated.
- a tiny Qwen3-MoE converted by `llmarch convert --to gguf` (q8_0, q4_0): greedy tokens with the
  experts on the host equal the same GGUF's all on one device; from disk and through the
  segmented decoder too; the stores hold views of the GGUF mapping.
- the same with K-quant (Q4_K_M's mix, Q5_K) and MXFP4 experts, against a twin GGUF holding
  gguf-py's dequantization of those blocks as F32, resident.
- q5_0 (no kernel layout): dequantized, 16-bit on the host, the resident tokens; the note says why.
  Cut files and types nothing reads: one line naming the file, exit 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from tests.test_offload import SLICE  # noqa: E402

PROMPT, STEPS = 12, 32


def ggml_blocks(qtype: str, shape: tuple, g) -> tuple:
    """Random weights of `shape` [..., rows, cols] as ggml blocks of qtype (uint8 [..., rows, row
    bytes]) and gguf-py's dequantization of them (the reference). gguf-py quantizes Q8_0, Q4_0 and
    MXFP4; it has no K-quant quantizer, so K-quant blocks are random bytes in the documented layout
    (ggml-quants.c's block_q4_K / q5_K / q6_K) with finite fp16 super-block scales of either sign put
    in place (llama.cpp writes Q6_K with a negative d)."""
    import numpy as np
    from gguf.quants import dequantize as gg_dequant
    from gguf.quants import quantize as gg_quant

    qt = gguf.GGMLQuantizationType[qtype]
    *lead, rows, cols = shape
    if qtype in ("Q8_0", "Q4_0", "MXFP4"):
        q = gg_quant((torch.randn(*shape, generator=g) * 0.2).numpy(), qt)
    else:
        per, nbytes = gguf.GGML_QUANT_SIZES[qt]
        q = torch.randint(0, 256, (*lead, rows, cols // per, nbytes), dtype=torch.uint8, generator=g).numpy()
        fp16 = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[qtype]  # d (and dmin) offsets in the block
        for o in fp16:  # d * scale * q spans about +-0.2 like the other types' weights
            v = (
                (torch.rand(*q.shape[:-1], generator=g) - 0.5) * 0.4 / (63 * 15 if qtype != "Q6_K" else 127 * 32)
            ).numpy()
            q[..., o : o + 2] = v.astype(np.float16)[..., None].view(np.uint8)
        q = q.reshape(*lead, rows, -1)
    return torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy(gg_dequant(q, qt).copy()).float()


def ggml_store(types: tuple, E: int, d: int, inter: int, g) -> tuple:
    """An OffloadedExperts of ggml blocks, (gate, up, down) each of its type (up None: not gated),
    gate and up apart as a GGUF stores them; and gguf-py's dequantization of them as (gate_up, down)."""
    from types import SimpleNamespace

    from llmarch.runtime.experts.formats import ExpertFormat
    from llmarch.runtime.experts.host import OffloadedExperts
    from llmarch.runtime.experts.placement import Placement

    gate_t, up_t, down_t = types
    gate = ggml_blocks(gate_t, (E, inter, d), g)
    up = None if up_t is None else ggml_blocks(up_t, (E, inter, d), g)
    dn = ggml_blocks(down_t, (E, d, inter), g)
    fmts = tuple(None if t is None else ExpertFormat.from_ggml(t) for t in types)
    moe = SimpleNamespace(E=E, d=d, inter=inter, index=0, gated=up is not None)
    st = OffloadedExperts.from_quantized(
        moe,
        (gate[0], None, dn[0], None),
        Placement("cpu", fmts[0]),
        torch.float32,
        up=None if up is None else up[0],
        formats=fmts,
    )
    return st, torch.cat([gate[1]] + ([] if up is None else [up[1]]), dim=1), dn[1]


BLOCK_CASES = [("Q8_0",) * 3, ("Q4_0",) * 3, ("MXFP4",) * 3, ("Q4_K",) * 3, ("Q5_K",) * 3, ("Q6_K",) * 3]
BLOCK_CASES += [("Q4_K", "Q4_K", "Q6_K"), ("Q5_K", "Q4_K", "Q8_0")]  # Q4_K_M's mix; each matrix its own type


@pytest.mark.parametrize("types", BLOCK_CASES, ids=lambda t: "-".join(dict.fromkeys(t)))
@pytest.mark.parametrize("gated", [True, False])
def test_cpu_kernel_reads_ggml_blocks(types, gated):
    """The kernel on ggml blocks (gate, up, down each of its type) against torch on gguf-py's
    dequantization of the same blocks, inputs rounded as the kernel rounds them: float summation
    order is all that differs (1e-4). d and the expert width are whole K-quant super-blocks (512,
    256); E experts of which k per token, decode and prefill rows."""
    from types import SimpleNamespace

    from fixtures.expert_kernel import check_store_equals_reference
    from llmarch.runtime.experts.stores import ResidentExperts
    from llmarch.runtime.ops.moe import ExpertAct

    g = torch.Generator().manual_seed(13)
    E, d, inter, k, T = 5, 512, 256, 2, 6
    act = ExpertAct(
        SimpleNamespace(
            moe=SimpleNamespace(swiglu_alpha=None, swiglu_limit=None),
            activation="silu" if gated else "relu2",
            ffn_gated=gated,
        ),
        inter,
    )
    st, gate_up, down = ggml_store(types if gated else (types[1], None, types[2]), E, d, inter, g)
    ref = ResidentExperts(E, d, inter, False, gated=gated)
    ref.gate_up.data, ref.down.data = gate_up, down
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
    return rt, gen.generate(_prompt(), STEPS, Sampling()).tokens


def _prompt() -> list[int]:
    return torch.randint(3, 128, (PROMPT,), generator=torch.Generator().manual_seed(5)).tolist()


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
    assert any("the CPU expert kernel reads Q8_0/Q4_0/MXFP4/Q4_K/Q5_K/Q6_K blocks, not Q5_0" in n for n in rt.notes), (
        rt.notes
    )


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


# --------------------------------------------------------------- K-quant and MXFP4 experts in a model

KQ_SLICE = dict(SLICE, hidden_size=256, moe_intermediate_size=256, num_hidden_layers=3, num_experts=8, head_dim=64)
# per layer (gate, up, down): Q4_K_M's pattern (Q6_K down in some layers, Q4_K in others), Q5_K, MXFP4
MIXES = {
    "q4_k_m": [("Q4_K", "Q4_K", "Q6_K"), ("Q4_K", "Q4_K", "Q4_K"), ("Q4_K", "Q4_K", "Q6_K")],
    "q5_k": [("Q5_K",) * 3] * 3,
    "mxfp4": [("MXFP4",) * 3] * 3,
}


def _expert_names(layer: int) -> list[str]:
    return [f"blk.{layer}.ffn_{r}_exps.weight" for r in ("gate", "up", "down")]


def quantized_twins(f32: Path, folder: Path, mix: list, seed: int = 0) -> tuple[Path, Path]:
    """From an f32 GGUF: a copy whose routed experts are ggml blocks of the mix's types (ggml_blocks:
    MXFP4 quantized from the weights by gguf-py, K-quants random blocks of the weights' scale), and
    its dequantized_twin."""
    from fixtures.gguf_edit import rewrite_gguf

    reader = gguf.GGUFReader(f32)
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    g = torch.Generator().manual_seed(seed)
    blocks = {}
    for layer, types in enumerate(mix):
        for name, qtype in zip(_expert_names(layer), types):
            blocks[name] = (ggml_blocks(qtype, shapes[name], g)[0].numpy(), gguf.GGMLQuantizationType[qtype])
    stem = f32.stem.replace("-f32", "")
    quantized = rewrite_gguf(f32, folder / f"{stem}-blocks.gguf", drop=list(blocks), add=blocks)
    return quantized, dequantized_twin(quantized, folder / f"{stem}-dequantized.gguf")


def dequantized_twin(path: Path, out: Path) -> Path:
    """The GGUF at `path` with its routed expert tensors dequantized by gguf-py and stored as F32:
    the same model, its experts readable resident."""
    from gguf.quants import dequantize as gg_dequant

    from fixtures.gguf_edit import rewrite_gguf

    experts = {
        t.name: gg_dequant(t.data, t.tensor_type).astype("float32")
        for t in gguf.GGUFReader(path).tensors
        if "_exps." in t.name
    }
    return rewrite_gguf(path, out, drop=list(experts), add=experts)


class RoundedInputs(torch.nn.Module):
    """Resident float experts with the CPU kernel's int8 input rounding (fake_quant_activations on the
    experts' input and on the activation before down), computed in torch: the kernel's arithmetic
    but for float summation order."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, idx, w, act, weight_input=False):
        from llmarch.runtime.experts.formats import fake_quant_activations as fq

        return self.inner(fq(x), idx, w, lambda h: fq(act(h)), weight_input)


@pytest.fixture(scope="module")
def kquant_ggufs(tiny, tmp_path_factory):
    from llmarch.convert.to_gguf import convert_to_gguf

    folder = tmp_path_factory.mktemp("kquant_experts")
    f32 = folder / "qwen3_moe-f32.gguf"
    convert_to_gguf(str(tiny("qwen3_moe", **KQ_SLICE)), f32, "f32")
    out = {"f32": f32}
    for mix, types in MIXES.items():
        sub = folder / mix
        sub.mkdir()
        out[mix] = quantized_twins(f32, sub, types)
    return out


@pytest.mark.parametrize("mix", list(MIXES))
def test_kquant_and_mxfp4_gguf_experts_as_stored(kquant_ggufs, mix, tmp_path):
    """A Qwen3-MoE GGUF whose experts are Q4_K / Q6_K (Q4_K_M's mix), Q5_K or MXFP4 blocks, on the
    host as stored (--experts cpu, disk, and through the segmented decoder) against its twin with
    the blocks dequantized by gguf-py, resident:
    - teacher-forced, each token's experts' output in each layer (44 tokens x 3 layers) equals
      torch's on the same input over the dequantized experts with the kernel's int8 input rounding
      (RoundedInputs): median 1e-5 relative (float summation order; measured 3e-7), max 1/127 (an
      intermediate on a rounding boundary, one int8 step the other way; measured up to 3e-3);
    - the greedy tokens of the twin with RoundedInputs;
    - printed, not bounded: against the unrounded experts, the int8 inputs' own effect on the
      logits (top-1 agreement 0.95 / 0.95 / 0.91, median error 2.3% / 2.1% / 1.9% of the logit
      range for q4_k_m / q5_k / mxfp4, as torch's rounding gives within 0.1%). The logits are not
      compared position by position with torch's rounded run: one intermediate rounded the other
      way early in the sequence moves every later position a little (measured up to 1%)."""
    check_stored_against_twin(*kquant_ggufs[mix], MIXES[mix], tmp_path, mix)


@pytest.mark.llamacpp
@pytest.mark.parametrize(
    "family,ftype",
    [("qwen3_moe", "Q4_K_M"), ("qwen3_moe", "MXFP4_MOE"), ("gpt_oss", "MXFP4_MOE"), ("deepseek_v3", "Q4_K_M")],
)
def test_llamacpp_quantized_experts_as_stored(kquant_ggufs, tiny, family, ftype, tmp_path):
    """An f32 GGUF quantized by llama.cpp's own llama_model_quantize (Q4_K_M: Q4_K gate/up, Q6_K down
    in some layers and Q4_K in others, its K-quant attention, also on DeepSeek V3's MLA layout;
    MXFP4_MOE: the expert type of gpt-oss GGUFs, also on gpt-oss itself with its expert biases and
    clamped SwiGLU): the same checks against its dequantized twin (measured: per token and layer
    median 3-4e-7, max 8e-4; top-1 agreement with the unrounded experts 1.0, median logit error
    0.16-0.81% of the range)."""
    import ctypes

    from llmarch.convert.to_gguf import convert_to_gguf

    llama_cpp = pytest.importorskip("llama_cpp")
    f32 = kquant_ggufs["f32"]
    sources = {  # gpt-oss: expert biases, clamped SwiGLU; DeepSeek V3 (llama.cpp's deepseek2): MLA, a
        # dense first layer, a shared expert, widths of whole K-quant super-blocks
        "gpt_oss": dict(hidden_size=128, intermediate_size=128),
        "deepseek_v3": dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=256),
    }
    if family in sources:
        f32 = tmp_path / f"{family}-f32.gguf"
        convert_to_gguf(str(tiny(family, **sources[family])), f32, "f32")
    out = tmp_path / f"{family}-{ftype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) == 0
    tensors = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    layers = sorted({int(n.split(".")[1]) for n in tensors if "_exps." in n})
    kinds = [tuple(tensors[n] for n in _expert_names(layer)) for layer in layers]
    if ftype == "Q4_K_M":  # what makes it the case of interest: down experts of two types
        assert {k[2] for k in kinds} == {"Q4_K", "Q6_K"} and {k[0] for k in kinds} == {"Q4_K"}, kinds
    else:
        assert {t for k in kinds for t in k} == {"MXFP4"}
    check_stored_against_twin(out, dequantized_twin(out, tmp_path / "twin.gguf"), kinds, tmp_path, f"{family} {ftype}")


def check_stored_against_twin(blocks: Path, twin: Path, kinds: list, tmp_path: Path, label: str) -> None:
    """The checks of test_kquant_and_mxfp4_gguf_experts_as_stored; kinds: (gate, up, down) types per layer."""
    from llmarch.runtime.experts.formats import ExpertFormat
    from llmarch.runtime.experts.report import offloaded
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime

    seq = torch.randint(3, 128, (PROMPT + STEPS,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = load_runtime(str(twin), "cpu", "float32", experts="gpu")
    plain = _forced(ref, seq)
    moe_layers = [layer.mlp for layer in ref.model.layers if hasattr(layer.mlp, "experts")]
    resident = [m.experts for m in moe_layers]
    for m in moe_layers:
        m.experts = RoundedInputs(m.experts)
    rounded = _forced(ref, seq)
    want = Generator(ref, PROMPT + STEPS + 1).generate(_prompt(), STEPS, Sampling()).tokens
    for experts, segmented in (("cpu", False), ("cpu", True), ("disk", False)):
        rt, got = _run(blocks, experts=experts, expert_dir=str(tmp_path), segmented=segmented)
        assert got == want, (experts, segmented)
        stores = offloaded(rt.model)
        assert [(s.format, s.up_format, s.down_format) for s in stores] == [
            tuple(ExpertFormat.from_ggml(t) for t in types) for types in kinds
        ]
        stored = "/".join(sorted({t for types in kinds for t in types}))
        assert any(f"the GGUF's {stored} blocks used as stored" in n for n in rt.notes), rt.notes
    rt = load_runtime(str(blocks), "cpu", "float32", experts="cpu")
    moe_layers = [layer.mlp for layer in rt.model.layers if hasattr(layer.mlp, "experts")]
    checked = [SideBySide(m.experts, r) for m, r in zip(moe_layers, resident)]
    for m, c in zip(moe_layers, checked):
        m.experts = c
    logits = _forced(rt, seq)
    # each token of each call: the kernel's output against torch's on its own input; float order
    # apart, an intermediate on a rounding boundary may go one int8 step (1/127 of its group's
    # largest) the other way: measured up to 3e-3 of the output; a misread block is of order 1
    diffs = torch.tensor([d for c in checked for d in c.diffs])
    print(
        f"{label}: per token and layer, kernel vs torch: median {diffs.median().item():.1e}, max {diffs.max().item():.1e}"
    )
    assert len(diffs) == len(seq) * len(checked) and diffs.median().item() < 1e-5 and diffs.max().item() < 1 / 127
    span = plain.abs().max().item()
    agree = (logits.argmax(-1) == plain.argmax(-1)).float().mean().item()
    err, err_rounding = ((t - plain).abs().amax(-1).median().item() / span for t in (logits, rounded))
    print(
        f"{label} GGUF experts as stored vs dequantized resident: top-1 {agree:.3f}, median logit error "
        f"{err:.2%} of the range (int8 rounding in torch: {err_rounding:.2%})"
    )


class SideBySide(torch.nn.Module):
    """A CPU-kernel store that also computes each call in torch (RoundedInputs over the twin's resident
    experts, same input) and keeps the relative difference; returns the kernel's output."""

    def __init__(self, store, resident):
        super().__init__()
        self.store, self.reference, self.diffs = store, RoundedInputs(resident), []

    def forward(self, x, idx, w, act, weight_input=False):
        got = self.store(x, idx, w, act, weight_input)
        want = self.reference(x, idx, w, act, weight_input)
        self.diffs += ((got - want).abs().amax(-1) / want.abs().amax(-1)).tolist()  # per token
        return got


def _forced(rt, seq: list[int]) -> torch.Tensor:
    """rt's logits at every position of seq, teacher-forced in one pass."""
    from fixtures.parity import kv_cache

    cache = kv_cache(rt.spec, len(seq), "cpu", torch.float32)
    rt.model.setup(len(seq), "cpu", torch.float32)
    with torch.inference_mode():
        return rt.model(torch.tensor([seq]), torch.arange(len(seq)), cache, limit=len(seq), last_only=False)[0]


def test_expert_blocks_bad_input(kquant_ggufs, tmp_path, capsys):
    """`llmarch run X.gguf --experts cpu` (in process): a GGUF cut short inside its expert blocks, experts
    of a type llmarch reads neither as stored nor dequantized (IQ4_NL), MXFP4 experts placed where
    they would have to be dequantized (on the device, or requantized): exit 2 and one line naming
    the file and the problem. Q4_K experts beside Q5_0 down experts (no kernel layout for Q5_0, a
    torch dequantizer): the dequantizing path, the note says why, and the tokens are the resident ones."""
    import numpy as np

    from fixtures.gguf_edit import rewrite_gguf
    from llmarch.runtime.experts.formats import ExpertFormat
    from llmarch.runtime.experts.report import offloaded
    from tests.test_run_cli import cli

    blocks = kquant_ggufs["q4_k_m"][0]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(blocks.read_bytes()[:-4096])  # rewrite_gguf adds the expert tensors last
    shapes = {t.name: t.shape for t in gguf.GGUFReader(kquant_ggufs["f32"]).tensors}
    g = np.random.default_rng(0)

    def retyped(name: str, qtype: str, down_only: bool = False):
        Q = gguf.GGMLQuantizationType[qtype]
        per, nbytes = gguf.GGML_QUANT_SIZES[Q]
        add = {}
        for layer in range(len(MIXES["q4_k_m"])):
            for n in _expert_names(layer)[2 if down_only else 0 :]:
                cols, rows, E = (int(x) for x in shapes[n])
                add[n] = (g.integers(0, 256, (E, rows, cols // per * nbytes), dtype=np.uint8), Q)
        return rewrite_gguf(blocks if down_only else kquant_ggufs["f32"], tmp_path / name, drop=list(add), add=add)

    cases = [
        (cut, "cpu", "runs past the end of the file"),
        (retyped("iq4nl.gguf", "IQ4_NL"), "cpu", "blk.0.ffn_gate_exps.weight: routed experts stored as IQ4_NL"),
        (kquant_ggufs["mxfp4"][0], "gpu", "routed experts stored as MXFP4, which llmarch run reads only as stored"),
    ]
    for path, experts, problem in cases:
        code, err = cli(
            ["run", path, "--prompt-ids", "5,6,7", "-n", "2", "--device", "cpu", "--experts", experts], capsys
        )
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and str(path) in lines[0] and problem in lines[0], err
    q5_0 = retyped("q5_0-down.gguf", "Q5_0", down_only=True)
    _, want = _run(q5_0, experts="gpu")
    rt, got = _run(q5_0, experts="cpu")
    assert got == want and all(s.format is ExpertFormat.FLOAT for s in offloaded(rt.model))
    assert any(
        "the GGUF's Q4_K/Q5_0 blocks dequantized (the CPU expert kernel reads" in n and "not Q5_0" in n
        for n in rt.notes
    )

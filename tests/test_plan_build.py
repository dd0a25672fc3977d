"""plan_build: a GGUF's CPU decode plan made without torch must be the plan the torch path saves.

The reference is plan_file.save() over the torch path's own C step (cpu_decode.py, proven against
the module path in test_cpu_decode.py, which is proven against transformers in test_run_gguf.py):
both files must be equal byte for byte (header values, notes, every array bit, RoPE tables included,
so a native first run and a torch run give the same tokens). Where the torch path builds no C step,
the builder must refuse too; and a run decoding from the built plan must give the torch step's logits.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from llmarch.api import load_checkpoint_spec
from llmarch.runtime import gguf_matmul, plan_build, plan_file
from llmarch.runtime.generate import Generator
from llmarch.runtime.load import load_runtime
from llmarch.runtime.native_run import open_decoder

pytestmark = pytest.mark.skipif(
    not gguf_matmul.available(), reason="no AVX2 or no C compiler: the kernels are not built"
)
GEMMA = {"n_layers": 6, "head_dim": 32}  # 5 sliding layers (window 16) and a global one, two RoPE bases
# (fixture arch, make_gguf options, spec edits both paths then read): QK-norm, sandwich (1 + w) norms,
# tied Q8_0 head; only sliding layers (one cache group, one RoPE table); llama's permuted Q/K rows,
# GQA, pre-norms, own Q8_0 head, F16 embedding; a final soft-cap; a softmax scale; linear and llama3 RoPE
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
CASES = {
    "gemma3": ("gemma3", GEMMA, {}),
    "gemma3 sliding only": ("gemma3", {"n_layers": 2, "head_dim": 32}, {}),
    "llama": ("llama", {}, {}),
    "gemma3 soft-cap": ("gemma3", GEMMA, {"final_softcap": 30.0}),
    "llama scale": ("llama", {"n_layers": 3}, {"attention.scale": 0.125}),
    "llama linear rope": ("llama", {}, {"rope.scaling": {"rope_type": "linear", "factor": 4.0}}),
    # wavelengths from 6 to ~600k positions: kept, blended and divided frequencies
    "llama llama3 rope": ("llama", {}, {"rope.scaling": {**LLAMA3, "original_max_position_embeddings": 64}}),
}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMARCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _opened(tiny_gguf, arch, options, edits):
    ckpt, spec = load_checkpoint_spec(str(tiny_gguf(arch, **options)))
    for key, value in edits.items():
        owner, _, field = key.rpartition(".")
        setattr(getattr(spec, owner) if owner else spec, field, value)
    return ckpt, spec


def _torch_plan(ckpt, spec, max_seq=40):
    rt = load_runtime(str(ckpt.path), "cpu", None, None, opened=(ckpt, spec), stored_blocks=True)
    return Generator(rt, max_seq), rt


@pytest.mark.parametrize("case", list(CASES))
def test_the_built_plan_is_the_torch_paths_byte_for_byte(tiny_gguf, cache, case):
    ckpt, spec = _opened(tiny_gguf, *CASES[case])
    built = plan_file.encode(*plan_build.build(ckpt, spec))
    gen, rt = _torch_plan(ckpt, spec)
    assert gen.cpu_step is not None
    assert plan_file.save(gen.cpu_step, rt.model, ckpt, spec, list(rt.notes)) is None
    saved = plan_file.plan_path(ckpt).read_bytes()
    assert bytes(built) == saved
    # the torch model's own RoPE tables (what its C step reads) are the plan's rows
    plan = plan_file.Plan(plan_file.plan_path(ckpt), ckpt, spec)
    ropes = list({id(m.attn.rope): m.attn.rope for m in rt.model.layers if m.attn.rope is not None}.values())
    assert len(ropes) == len(plan.header["ropes"])
    for r, rope in zip(plan.header["ropes"], ropes):
        assert np.array_equal(plan.array(r["cos"], (None, r["rot"]))[: rope.cos.shape[0]], rope.cos.numpy())


def test_a_native_first_run_gives_the_torch_steps_logits(tiny_gguf, cache):
    """From the built plan (not saved: its bytes in memory), 24 positions one at a time, then a
    prompt through the native prefill: equal logits to the torch path's C step, bit for bit."""
    ckpt, spec = _opened(tiny_gguf, *CASES["llama"])
    encoded = plan_file.encode(*plan_build.build(ckpt, spec))
    decoder, notes = open_decoder(ckpt, spec, 40, 1, encoded)
    assert not plan_file.plan_path(ckpt).exists() and "stored blocks" in notes[0]
    gen, _ = _torch_plan(ckpt, spec)
    ids = torch.randint(4, spec.vocab_size, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    gen.cache.reset()
    with torch.inference_mode():
        for pos, tok in enumerate(ids):
            want = gen.cpu_step(torch.tensor([[tok]]), pos)[0].numpy()
            assert decoder.step(tok, pos) == gen.cpu_step.next_token()
            assert np.array_equal(decoder.logits, want), pos
        decoder.generate(ids, 1, set(), None)
        assert np.array_equal(decoder.logits, want)


# each: a change the C step or the builder's bit-equality cannot take -> refused (torch path as today)
def _retyped(ckpt, name, dtype):
    t = ckpt.tensors[name]
    return dataclasses.replace(ckpt, tensors={**ckpt.tensors, name: t._replace(dtype=dtype)})


def _without(ckpt, name):
    return dataclasses.replace(ckpt, tensors={k: v for k, v in ckpt.tensors.items() if k != name})


REFUSED = {
    "a norm missing": (lambda c: _without(c, "blk.1.ffn_norm.weight"), {}, "missing"),
    "a float16 norm": (lambda c: _retyped(c, "blk.0.attn_q_norm.weight", "F16"), {}, "float32"),
    "an embedding of another type": (lambda c: _retyped(c, "token_embd.weight", "Q4_1"), {}, "embedding type"),
    "attention soft-capping": (None, {"attention.softcap": 50.0}, "attention.softcap"),
    "attention sinks": (None, {"attention.sinks": True}, "attention.sinks"),
    "biases": (None, {"attention.bias": True}, "attention.bias"),
    "a layer norm": (None, {"norm.kind": "layer"}, "norm.kind"),
    "YaRN RoPE (computed in torch)": (
        None,
        {"rope.scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
        "computed in torch",
    ),
    "an unknown activation": (None, {"activation": "relu2"}, "activation"),
    "MTP layers": (None, {"mtp_layers": 1}, "mtp_layers"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_the_builder_is_not_sure_of_is_refused(tiny_gguf, case):
    edit_ckpt, edits, message = REFUSED[case]
    ckpt, spec = _opened(tiny_gguf, "gemma3", GEMMA, edits)
    if edit_ckpt is not None:
        ckpt = edit_ckpt(ckpt)
    with pytest.raises(plan_build.NotBuilt, match=message):
        plan_build.build(ckpt, spec)


@pytest.mark.parametrize("qtype", plan_build.EMBED_TYPES)
def test_both_dequantizers_give_the_same_embedding_bits(qtype):
    """The native run reads embedding rows with gguf-py's dequantizer, the torch path with llmarch's:
    for each type the builder takes they must agree bit for bit, on random blocks (non-finite scales
    included), or a first native run and a torch run could differ."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    from llmarch.runtime.quant import dequantize as torch_dequantize

    per, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    width = 256 * per if per > 1 else 256
    raw = np.random.default_rng(0).integers(0, 256, size=(64, width // per * nbytes), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        want = dequantize(raw, GGMLQuantizationType[qtype]).reshape(64, width).astype(np.float32)
    got = torch_dequantize(torch.from_numpy(raw.reshape(-1).copy()), qtype, (64, width)).float().numpy()
    assert np.array_equal(want, got, equal_nan=True)


def test_matrices_the_c_step_cannot_read_take_the_torch_path(tiny_gguf, cache):
    """float16 matrices: the torch path builds no C step, and the builder refuses."""
    ckpt, spec = load_checkpoint_spec(str(tiny_gguf("llama", quant="f16")))
    with pytest.raises(plan_build.NotBuilt, match="stored-block type"):
        plan_build.build(ckpt, spec)
    assert _torch_plan(ckpt, spec)[0].cpu_step is None


def test_files_the_builder_refuses_keep_the_torch_paths_behaviour(tiny_gguf, tmp_path, monkeypatch, capsys):
    """Through the CLI: a GGUF with a norm missing, or of the wrong length, still gets the torch
    path's one-line error and exit status 2, with no plan left behind; one whose norms are float16
    (which the builder does not take) runs on the torch path, which saves the plan from its C step."""
    import sys

    from fixtures.gguf_edit import rewrite_gguf
    from llmarch import cli

    src = tiny_gguf("gemma3", **GEMMA)
    monkeypatch.setenv("LLMARCH_CACHE", str(tmp_path / "cache"))
    plans = tmp_path / "cache" / "plans"

    def run(path) -> int:
        args = [str(path), "--prompt-ids", "2,40,41", "-n", "4", "--device", "cpu", "--json"]
        monkeypatch.setattr(sys, "argv", ["llmarch", "run", *args])
        try:
            cli.main()
        except SystemExit as e:
            return int(e.code or 0)
        return 0

    missing = rewrite_gguf(src, tmp_path / "missing.gguf", drop=["blk.2.ffn_norm.weight"])
    short = rewrite_gguf(
        src,
        tmp_path / "short.gguf",
        drop=["blk.0.attn_q_norm.weight"],
        add={"blk.0.attn_q_norm.weight": np.ones(16, dtype=np.float32)},
    )
    for path, message in ((missing, "blk.2.ffn_norm.weight"), (short, "shape")):
        capsys.readouterr()
        assert run(path) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and path.name in lines[0] and message in lines[0], lines
        assert not list(plans.glob("*.plan")) and not list(plans.glob(".*.tmp"))
    f16 = {n: w.astype(np.float16) for n, w in _norms(src).items()}
    half = rewrite_gguf(src, tmp_path / "half.gguf", drop=list(f16), add=f16)
    ckpt, spec = load_checkpoint_spec(str(half))
    with pytest.raises(plan_build.NotBuilt, match="float32"):
        plan_build.build(ckpt, spec)
    assert run(half) == 0 and len(list(plans.glob("*.plan"))) == 1  # the torch path's, from its C step


def _norms(path) -> dict:
    """The GGUF's norm tensors as float32 arrays."""
    import gguf

    r = gguf.GGUFReader(path)
    return {t.name: np.array(t.data, dtype=np.float32) for t in r.tensors if t.name.endswith("norm.weight")}

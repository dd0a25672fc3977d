"""native_run + plan_file: a GGUF's CPU decode plan saved by a torch run and decoded from without torch.

The reference is the torch path's own C decode step (cpu_decode.py, itself proven bit for bit against
the module path in test_cpu_decode.py, which is proven against transformers in test_run_gguf.py):
the native decoder calls the same C function over a plan rebuilt from the file, so its logits must
be equal bit for bit, not close. A plan that does not fit (edited, truncated, another llmarch, another
model file) must never be used: the run then takes the torch path and saves a good one.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_run_startup import SCRIPT  # runs `llmarch run ARGS`, then prints the modules it imported

from llmarch.api import load_checkpoint_spec
from llmarch.runtime import gguf_matmul, plan_file
from llmarch.runtime.generate import Generator
from llmarch.runtime.load import load_runtime
from llmarch.runtime.native_run import NativeDecoder, open_decoder

pytestmark = pytest.mark.skipif(
    not gguf_matmul.available(), reason="no AVX2 or no C compiler: the kernels are not built"
)
ROOT = Path(__file__).resolve().parents[1]
# as test_cpu_decode: gemma3 with 5 sliding layers (window 16: the ring wraps), QK-norm, sandwich norms,
# two RoPE bases, tied Q8_0 embedding; llama with GQA and llama.cpp's permuted Q/K rows
MODELS = {"gemma3": {"n_layers": 6, "head_dim": 32}, "llama": {}}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMARCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def saved(tiny_gguf, arch: str, max_seq: int):
    """(torch Generator with its C step, checkpoint, spec) after saving the step's plan."""
    ckpt, spec = load_checkpoint_spec(str(tiny_gguf(arch, **MODELS[arch])))
    rt = load_runtime(str(ckpt.path), "cpu", None, None, opened=(ckpt, spec), stored_blocks=True)
    gen = Generator(rt, max_seq)
    assert gen.cpu_step is not None
    assert plan_file.save(gen.cpu_step, rt.model, ckpt, spec, ["a note"]) is None
    return gen, ckpt, spec


@pytest.mark.parametrize("arch", list(MODELS))
def test_native_logits_equal_the_torch_step(tiny_gguf, cache, arch):
    """40 positions, one token at a time through both (past the 16-slot ring): equal logits, equal argmax."""
    gen, ckpt, spec = saved(tiny_gguf, arch, 48)
    decoder, notes = open_decoder(ckpt, spec, 48, 1)
    assert notes == ["a note"]
    ids = torch.randint(4, spec.vocab_size, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    gen.cache.reset()
    with torch.inference_mode():
        for pos, tok in enumerate(ids):
            want = gen.cpu_step(torch.tensor([[tok]]), pos)[0].numpy()
            got = decoder.step(tok, pos)
            assert np.array_equal(decoder.logits, want), pos
            assert got == gen.cpu_step.next_token()


def test_generate_gives_the_torch_steps_tokens(tiny_gguf, cache):
    """Greedy generation: the prompt fed one token at a time through each, then each one's argmax."""
    gen, ckpt, spec = saved(tiny_gguf, "gemma3", 40)
    decoder, _ = open_decoder(ckpt, spec, 40, 1)
    prompt = [2, 40, 41, 42, 43]
    want = []
    gen.cache.reset()
    with torch.inference_mode():
        for pos, tok in enumerate(prompt):
            gen.cpu_step(torch.tensor([[tok]]), pos)
        for pos in range(len(prompt), len(prompt) + 29):
            want.append(gen.cpu_step.next_token())
            gen.cpu_step(torch.tensor([[want[-1]]]), pos)
    streamed: list[int] = []
    res = decoder.generate(prompt, 30, set(), streamed.append)
    assert res.tokens == streamed == [*want, gen.cpu_step.next_token()]
    assert res.stopped_by == "max_tokens" and res.prompt_tokens == 5
    eos = want[3]  # stops at its first occurrence; the second call starts from a fresh cache
    assert decoder.generate(prompt, 30, {eos}, None).tokens == want[: want.index(eos) + 1]
    assert decoder.generate(prompt, 30, set(), None).tokens == res.tokens


def _rewrite(path: Path, edit) -> None:
    """Apply `edit` to the plan's JSON header, the arrays kept at their offsets after it."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[8:16])
    header = json.loads(data[16 : 16 + n])
    edit(header)
    text = json.dumps(header).encode()
    pad = lambda k: (16 + k + 63) // 64 * 64  # noqa: E731
    head = plan_file.MAGIC + struct.pack("<Q", len(text)) + text
    path.write_bytes(head + bytes(pad(len(text)) - len(head)) + data[pad(n) :])


def _part(h):
    return h["layers"][0]["qkv"]["parts"][0]


EDITS = {
    "part past its tensor": lambda h: _part(h).update(at=_part(h)["at"] + 10**9),
    "part of another type": lambda h: _part(h).update(type="Q4_0" if _part(h)["type"] != "Q4_0" else "Q8_0"),
    "unknown tensor": lambda h: _part(h).update(tensor="blk.99.attn_q.weight"),
    "rows that do not add up": lambda h: _part(h).update(rows=_part(h)["rows"] - 1),
    "array past the end": lambda h: h["arrays"][0].update(offset=10**12),
    "array index out of range": lambda h: h["layers"][0]["attn_norm"]["w"].update(array=10**6),
    "fewer layers": lambda h: h["layers"].pop(),
    "kv heads not dividing heads": lambda h: h["layers"][0].update(kv_heads=h["layers"][0]["heads"] + 1),
    "negative eps": lambda h: h["layers"][0]["attn_norm"].update(eps=-1.0),
    "nan scale": lambda h: h["layers"][0].update(scale=float("nan")),
    "unknown group": lambda h: h["layers"][0].update(group=7),
    "string where a number goes": lambda h: h["layers"][0].update(heads="4"),
    "too few RoPE rows": lambda h: h.update(positions=8),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_plan_that_does_not_fit_is_not_used(tiny_gguf, cache, edit):
    _, ckpt, spec = saved(tiny_gguf, "gemma3", 40)
    path = plan_file.plan_path(ckpt)
    _rewrite(path, EDITS[edit])
    assert open_decoder(ckpt, spec, 40, 1) is None


def test_truncated_or_foreign_files_and_a_changed_model(tiny_gguf, cache, tmp_path):
    _, ckpt, spec = saved(tiny_gguf, "gemma3", 40)
    path = plan_file.plan_path(ckpt)
    data = path.read_bytes()
    for bad in (data[: len(data) // 2], data[:20], b"not a plan at all", b"LLMPLAN1" + struct.pack("<Q", 1 << 60)):
        path.write_bytes(bad)
        assert plan_file.load(ckpt, spec) is None
    path.write_bytes(data)
    assert isinstance(plan_file.load(ckpt, spec), plan_file.Plan)
    os.utime(ckpt.files[0], ns=(1, 1))  # the model file changed: another plan's name, none saved under it
    assert plan_file.plan_path(ckpt) != path and plan_file.load(ckpt, spec) is None


def test_saving_keeps_the_newest_plans_of_a_model(tiny_gguf, cache, monkeypatch):
    """Plans of the same model by other llmarch versions: the newest KEEP_PER_MODEL stay, older go;
    another model's plans are left alone."""
    gen, ckpt, spec = saved(tiny_gguf, "gemma3", 40)
    folder = plan_file.plan_path(ckpt).parent
    other = folder / "0123456789abcdef-0123456789abcdef.plan"
    other.write_bytes(b"x")
    names = [plan_file.plan_path(ckpt).name]
    for version in range(plan_file.KEEP_PER_MODEL + 1):
        monkeypatch.setattr(plan_file, "_code_stamp", lambda v=version: [f"llmarch {v}"])
        os.utime(folder / names[-1], ns=(version, version))  # saved in this order
        assert plan_file.save(gen.cpu_step, gen.model, ckpt, spec, []) is None
        names.append(plan_file.plan_path(ckpt).name)
    want = sorted([other.name, *names[-plan_file.KEEP_PER_MODEL :]])
    assert sorted(p.name for p in folder.iterdir()) == want


def test_more_positions_than_saved_rows(tiny_gguf, cache):
    _, ckpt, spec = saved(tiny_gguf, "gemma3", 40)
    plan = plan_file.load(ckpt, spec)
    with pytest.raises(plan_file.PlanMismatch):
        NativeDecoder(plan, plan.header["positions"] + 1, 1)


def test_cli_second_run_imports_no_torch(tiny_gguf, tmp_path):
    """The first run saves the plan; the second decodes from it without importing torch and gives the
    same tokens and report lines (the prompt here is one token: both paths compute it as one step)."""
    path = tiny_gguf("gemma3", **MODELS["gemma3"])
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env["LLMARCH_CACHE"] = str(tmp_path / "cache")
    args = [str(path), "--prompt-ids", "2", "-n", "12", "--device", "cpu", "--json"]
    runs = []
    for _ in range(2):
        r = subprocess.run(
            [sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
        )
        assert r.returncode == 0, r.stderr
        lines = r.stdout.strip().splitlines()
        runs.append((json.loads(lines[0]), "torch" in json.loads(lines[-1]), r.stderr.splitlines()))
    (doc1, torch1, err1), (doc2, torch2, err2) = runs
    assert torch1 is True and torch2 is False
    assert doc1["tokens"] == doc2["tokens"] and len(doc2["tokens"]) == 12
    assert err1[:-1] == err2[:-1]  # header and notes; the closing line has timings and RSS
    assert "stored blocks" in "".join(err2) and err2[-1].endswith("cpu float32 · stop: max_tokens")
    env["LLMARCH_NO_NATIVE"] = "1"  # asked for the torch path: it runs there
    r = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0 and "torch" in json.loads(r.stdout.strip().splitlines()[-1])

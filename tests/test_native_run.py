"""native_run + plan_file: a GGUF's CPU decode plan saved by a torch run and decoded from without torch.

The reference is the torch path's own C decode step (cpu_decode.py, itself proven bit for bit against
the module path in test_cpu_decode.py, which is proven against transformers in test_run_gguf.py):
the native decoder calls the same C function over a plan rebuilt from the file, so its logits must
be equal bit for bit, not close. A plan that does not fit (edited, truncated, another llmarch, another
model file) must never be used: the run then takes the torch path and saves a good one.
"""

from __future__ import annotations

import hashlib
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


def test_a_long_prompt_on_two_threads(tiny_gguf, cache):
    """140 prompt tokens (past the 16-slot ring, over one 128-token prefill chunk) through the native
    prefill with two threads, against the torch path's C step fed one token at a time."""
    gen, ckpt, spec = saved(tiny_gguf, "gemma3", 160)
    decoder, _ = open_decoder(ckpt, spec, 160, 2)
    prompt = torch.randint(4, spec.vocab_size, (140,), generator=torch.Generator().manual_seed(7)).tolist()
    gen.cache.reset()
    with torch.inference_mode():
        for pos, tok in enumerate(prompt):
            want = gen.cpu_step(torch.tensor([[tok]]), pos)[0].numpy().copy()
    first = decoder.generate(prompt, 1, set(), None).tokens
    assert np.array_equal(decoder.logits, want) and first == [gen.cpu_step.next_token()]


def _rewrite(path: Path, edit, arrays=None, text=None) -> None:
    """Apply `edit` to the plan's JSON header (`arrays` to the bytes after it, the checksum then
    recomputed; `text` to the header's JSON text), the arrays kept at their offsets."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[8:16])
    header = json.loads(data[16 : 16 + n])
    pad = lambda k: (16 + k + 63) // 64 * 64  # noqa: E731
    body = bytearray(data[pad(n) :])
    if arrays is not None:
        arrays(header, body)
        header["sha256"] = hashlib.sha256(body).hexdigest()
    edit(header)
    raw = json.dumps(header).encode()
    raw = text(raw) if text is not None else raw
    head = plan_file.MAGIC + struct.pack("<Q", len(raw)) + raw
    path.write_bytes(head + bytes(pad(len(raw)) - len(head)) + body)


def _parts(h, layer=0, matrix="qkv"):
    return h["layers"][layer][matrix]["parts"]


def _set(d: dict, **kw):
    d.update(kw)


# each edit passes every check but the one named by its message (tiny gemma3: layer 0's q/k/v are
# Q8_0 parts of 128/64/64 rows of 68 bytes, sliding window 16, 256 RoPE rows)
EDITS = {
    "part past its tensor": (lambda h: _set(_parts(h)[0], at=64 * 68), "part outside the tensor"),
    "part not on a row": (lambda h: _set(_parts(h)[1], at=34, rows=63), "part outside the tensor"),
    "part of another type": (lambda h: _set(_parts(h)[0], type="Q4_0"), "missing or of another type"),
    "another layer's tensor": (lambda h: _set(_parts(h)[0], tensor="blk.1.attn_q.weight"), "another type"),
    "a tensor of another width": (lambda h: _set(_parts(h)[0], tensor="blk.0.attn_output.weight"), "width"),
    "rows that do not add up": (lambda h: _set(_parts(h)[2], rows=63), "do not add up"),
    "too many parts": (lambda h: _parts(h).extend(_parts(h) * 5), "too many"),
    "a name that is not a string": (lambda h: _set(_parts(h)[0], tensor=[1]), "not a name"),
    "array past the end": (lambda h: _set(h["arrays"][0], offset=h["arrays"][-1]["offset"] + 64), "past the end"),
    "array not aligned": (lambda h: _set(h["arrays"][0], offset=h["arrays"][0]["offset"] + 4), "not aligned"),
    "array index out of range": (lambda h: _set(h["layers"][0]["attn_norm"]["w"], array=10**6), "array index"),
    "norm one value short": (lambda h: _set(h["layers"][0]["attn_norm"]["w"], shape=[63]), "an array of shape"),
    "fewer layers": (lambda h: h["layers"].pop(), "layer count"),
    "kv heads not the spec's": (lambda h: _set(h["layers"][0], kv_heads=4), "sizes differ"),
    "head width not the spec's": (lambda h: _set(h["layers"][0], head_dim=16, v_dim=64), "sizes differ"),
    "a number as a string": (lambda h: _set(h["layers"][0], heads="4"), "sizes differ"),
    "negative eps": (lambda h: _set(h["layers"][0]["attn_norm"], eps=-1.0), "norm eps"),
    "huge integer eps": (lambda h: _set(h["layers"][0]["attn_norm"], eps=10**400), "norm eps"),
    "nan scale": (lambda h: _set(h["layers"][0], scale=float("nan")), "attention scale"),
    "unknown group": (lambda h: _set(h["layers"][0], group=7), "cache group"),
    "more groups than layers": (lambda h: h["groups"].extend([{"window": 0}] * 10), "more cache groups"),
    "a group no layer uses": (lambda h: h["groups"].append({"window": 0}), "no layer uses"),
    "window not the spec's": (lambda h: _set(h["groups"][0], window=8), "window differs"),
    "no RoPE on a RoPE layer": (lambda h: _set(h["layers"][0], rope=None), "RoPE differs"),
    "odd rotated dims": (lambda h: _set(h["ropes"][0], rot=31), "an array of shape"),
    "fewer positions than asked": (lambda h: _set(h, positions=8), "more positions"),
    "fewer RoPE rows than asked": (lambda h: _set(h, positions=10**6), "RoPE tables of the wrong shape"),
    "embedding from another tensor": (lambda h: _set(h["embed"], tensor="output.weight"), "no embedding"),
    "nan embedding scale": (lambda h: _set(h["embed"], scale=float("nan")), "scale"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_plan_that_does_not_fit_is_not_used(tiny_gguf, cache, edit):
    """Each edit is refused by its own check (the message says which), and the run is not native."""
    _, ckpt, spec = saved(tiny_gguf, "gemma3", 40)
    path = plan_file.plan_path(ckpt)
    change, message = EDITS[edit]
    _rewrite(path, change)
    max_seq = 257 if "RoPE rows" in edit else 40  # one past the 256 saved rows
    with pytest.raises(plan_file.PlanMismatch, match=message):
        NativeDecoder(plan_file.Plan(path, ckpt, spec), max_seq, 1)
    assert open_decoder(ckpt, spec, max_seq, 1) is None


def test_a_row_order_that_is_not_a_permutation(tiny_gguf, cache):
    """llama's Q/K rows come in llama.cpp's order: a duplicated index (checksum recomputed) is refused."""
    _, ckpt, spec = saved(tiny_gguf, "llama", 40)
    path = plan_file.plan_path(ckpt)

    def duplicate(h, body):
        ref = h["layers"][0]["qkv"]["order"]
        at = h["arrays"][ref["array"]]["offset"]
        body[at : at + 8] = body[at + 8 : at + 16]

    _rewrite(path, lambda h: None, duplicate)
    with pytest.raises(plan_file.PlanMismatch, match="not a permutation"):
        NativeDecoder(plan_file.Plan(path, ckpt, spec), 40, 1)


def test_edited_arrays_deep_nesting_and_notes(tiny_gguf, cache):
    _, ckpt, spec = saved(tiny_gguf, "gemma3", 40)
    path = plan_file.plan_path(ckpt)
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one bit of the last array
    with pytest.raises(plan_file.PlanMismatch, match="checksum"):
        plan_file.Plan(path, ckpt, spec)
    path.write_bytes(good)
    deep = b'"notes": ' + b"[" * 100_000 + b"]" * 100_000
    _rewrite(path, lambda h: None, text=lambda raw: raw.replace(b'"notes": ["a note"]', deep))
    with pytest.raises(RecursionError):
        plan_file.Plan(path, ckpt, spec)
    assert plan_file.load(ckpt, spec) is None  # however a cache file fails, it is just not used
    path.write_bytes(good)
    _rewrite(path, lambda h: _set(h, notes=["\x1b[2Jcleared", 5]))
    _, notes = open_decoder(ckpt, spec, 40, 1)
    assert notes == ["\\x1b[2Jcleared"]  # escaped for the terminal; the number dropped


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


def test_cli_first_run_imports_no_torch(tiny_gguf, tmp_path):
    """A GGUF's first run builds its plan without torch (plan_build.py) and decodes natively; it gives
    the torch path's tokens and report lines (LLMARCH_NO_NATIVE=1: its C step), saves the plan after
    its output, and the second run decodes from the saved plan (the prompt is one token here and four
    below: the torch path computes them through its C prefill as the native run does)."""
    path = tiny_gguf("gemma3", **MODELS["gemma3"])
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env["LLMARCH_CACHE"] = str(tmp_path / "cache")

    def run(args, **extra):
        r = subprocess.run(
            [sys.executable, "-c", SCRIPT, *args],
            capture_output=True,
            text=True,
            env={**env, **extra},
            cwd=ROOT,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        lines = r.stdout.strip().splitlines()
        return json.loads(lines[0]), "torch" in json.loads(lines[-1]), r.stderr.splitlines()

    for prompt in ("2", "2,40,41,42"):
        args = [str(path), "--prompt-ids", prompt, "-n", "12", "--device", "cpu", "--json"]
        plans = tmp_path / "cache" / "plans"
        doc0, torch0, err0 = run(args, LLMARCH_NO_NATIVE="1")  # asked for the torch path: it runs there
        assert torch0 is True and not list(plans.glob("*.plan"))  # and saves no plan
        doc1, torch1, err1 = run(args)
        assert torch1 is False and len(list(plans.glob("*.plan"))) == 1
        doc2, torch2, err2 = run(args) if prompt == "2" else (doc1, False, err1)  # from the saved plan
        assert torch2 is False
        assert doc0["tokens"] == doc1["tokens"] == doc2["tokens"] and len(doc2["tokens"]) == 12
        assert err0[:-1] == err1[:-1] == err2[:-1]  # header and notes; the closing line has timings and RSS
        assert "stored blocks" in "".join(err1) and err1[-1].endswith("cpu float32 · stop: max_tokens")
        for f in plans.glob("*.plan"):
            f.unlink()
    args = [str(path), "--prompt-ids", "2", "-n", "12", "--device", "cpu", "--json"]
    run(args)
    plan = next((tmp_path / "cache" / "plans").glob("*.plan"))
    _rewrite(plan, lambda h: _set(h["groups"][0], window=8))  # loads, but the native run refuses it
    for want in (True, False):  # the torch path runs and saves a good plan again; then the native one
        assert run(args)[1] is want

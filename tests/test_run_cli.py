"""`llmarch run` as a user runs it (a subprocess): output, --json, and bad input = one line, exit 2."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]


def run(*args, env_extra=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LLMARCH_DEBUG"}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "llmarch", "run", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "internal error" not in lines[0]
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


def _rewrite_safetensors(src: Path, dst: Path, edit) -> Path:
    """Copy a tiny checkpoint folder, passing its tensors through edit(dict) -> dict."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    save_file(edit(load_file(f)), f, metadata={"format": "pt"})
    return dst


def test_prompt_ids_json_output(tiny):
    r = run(tiny("llama"), "--prompt-ids", "1,2,3", "--max-tokens", "5", "--ignore-eos", "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == {"text", "tokens", "prompt_tokens", "prefill_tok_s", "decode_tok_s"}
    assert len(doc["tokens"]) == 5 and doc["prompt_tokens"] == 3 and doc["text"] is None
    assert "decode" in r.stderr and "tok/s" in r.stderr and "peak" in r.stderr


def test_same_seed_same_sample(tiny):
    args = (
        tiny("qwen3"),
        "--prompt-ids",
        "5,6,7",
        "-n",
        "8",
        "--ignore-eos",
        "--json",
        "--temperature",
        "1.0",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--seed",
        "7",
    )
    a, b = run(*args), run(*args)
    assert a.returncode == b.returncode == 0, a.stderr
    assert json.loads(a.stdout)["tokens"] == json.loads(b.stdout)["tokens"]


def test_prompt_longer_than_context(tiny):
    ids = ",".join(["5"] * 65)  # tiny gpt2 has n_positions = 64
    one_line_error(run(tiny("gpt2"), "--prompt-ids", ids, "--device", "cpu"), "65 tokens", "context of 64")


def test_unknown_family(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"weird.weight": np.zeros((4, 4), np.float32)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    one_line_error(run(tmp_path, "--prompt-ids", "1,2"), "unknown model family")


def test_missing_tokenizer(tiny):
    one_line_error(run(tiny("llama"), "--prompt", "hello"), "no tokenizer.json", "--prompt-ids")


def test_missing_weight(tiny, tmp_path):
    def drop(sd):
        sd.pop("model.layers.1.self_attn.o_proj.weight")
        return sd

    d = _rewrite_safetensors(tiny("llama"), tmp_path / "m", drop)
    one_line_error(run(d, "--prompt-ids", "1,2", "--device", "cpu"), "weight missing", "layers.1.attn.o")


def test_wrong_shape_weight(tiny, tmp_path):
    import torch

    def shrink(sd):
        sd["model.layers.0.mlp.down_proj.weight"] = torch.zeros(32, 60)
        return sd

    d = _rewrite_safetensors(tiny("llama"), tmp_path / "m", shrink)
    one_line_error(run(d, "--prompt-ids", "1,2", "--device", "cpu"), "shape (32, 60)", "needs (32, 64)")


def test_cuda_without_gpu(tiny):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    one_line_error(run(tiny("llama"), "--prompt-ids", "1,2", "--device", "cuda"), "no CUDA GPU")


def test_unsupported_gguf_quant_type(tiny_gguf, tmp_path):
    """token_embd.weight re-labelled IQ4_NL (a real GGML type llmarch run cannot decode)."""
    import gguf

    src = tiny_gguf("llama", quant="f16")
    data = bytearray(src.read_bytes())
    name = b"token_embd.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    type_at = at + 4 + 8 * n_dims
    assert struct.unpack_from("<I", data, type_at)[0] == gguf.GGMLQuantizationType.F16
    struct.pack_into("<I", data, type_at, gguf.GGMLQuantizationType.IQ4_NL)
    bad = tmp_path / "iq4nl.gguf"
    bad.write_bytes(bytes(data))
    one_line_error(run(bad, "--prompt-ids", "2,5", "--device", "cpu"), "IQ4_NL is not supported")


def test_gguf_tiny_runs(tiny_gguf):
    """The GGUF path end to end on a tiny llama (Q8_0, Q/K permutation undone, tokenizer from the vocab)."""
    r = run(
        tiny_gguf("llama"),
        "--prompt",
        "tok70 tok71",
        "-n",
        "4",
        "--ignore-eos",
        "--json",
        "--device",
        "cpu",
        env_extra={"LLMARCH_CACHE": str(ROOT / ".pytest_cache" / "llmarch")},
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert len(doc["tokens"]) == 4 and isinstance(doc["text"], str)
    transformers = pytest.importorskip("transformers")
    path = tiny_gguf("llama")
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert doc["prompt_tokens"] == len(ref("tok70 tok71")["input_ids"])

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
    assert set(doc) == {"text", "tokens", "prompt_tokens", "prefill_tok_s", "decode_tok_s", "stop"}
    assert len(doc["tokens"]) == 5 and doc["prompt_tokens"] == 3 and doc["text"] is None
    assert doc["stop"] == "max_tokens"
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


def test_context_full_is_the_stop_reason(tiny):
    """More tokens asked for than the context holds (tiny gpt2: n_positions = 64): generation
    fills the context and says so, rather than claiming --max-tokens stopped it."""
    ids = ",".join(["5"] * 60)
    r = run(tiny("gpt2"), "--prompt-ids", ids, "-n", "5000", "--ignore-eos", "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert len(doc["tokens"]) == 64 - 60 and doc["stop"] == "context full"
    assert "stop: context full" in r.stderr


# ------------------------------------------------------------------ options refused before any load


def cli(args, capsys) -> tuple[int, str]:
    """`llmarch ARGS` in this process: (exit status, stderr)."""
    from llmarch import cli as cli_module

    capsys.readouterr()  # what came before (a fixture's own output) is not the command's
    argv = sys.argv
    sys.argv = ["llmarch", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as e:
            cli_module.main()
    finally:
        sys.argv = argv
    return e.value.code, capsys.readouterr().err


@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if weights are loaded or the runtime is built."""
    import llmarch.runtime.load as load
    import llmarch.runtime.weights as weights

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the options were checked")

    monkeypatch.setattr(load, "load_runtime", refuse)
    monkeypatch.setattr(weights, "open_weights", refuse)


BAD_OPTIONS = [
    (["--prompt-ids", "1,2,x"], "comma-separated integers"),
    (["--prompt-ids", "1,2", "--device", "gpu"], "unknown --device 'gpu'"),
    (["--prompt-ids", "1,2", "-t", "-1"], "--temperature must be 0"),
    (["--prompt-ids", "1,2", "-t", "1", "--top-p", "2"], "--top-p must be in (0, 1]"),
    (["--prompt-ids", "1,2", "-t", "1", "--top-k", "-3"], "--top-k must be 0 (off) or positive"),
    (["--prompt-ids", "1,2", "--top-k", "5"], "--top-k only applies when sampling"),
    (["--prompt", "hi", "--prompt-ids", "1,2"], "--prompt and --prompt-ids are exclusive"),
    (["--prompt-ids", "1,2", "--experts", "disk"], "--experts only applies to MoE models"),
    (["--prompt-ids", "1,2", "--dtype", "float64"], "unknown --dtype"),
    (["--prompt-ids", "1,2", "--quant-bits", "4"], "--quant-bits applies with --keep-quantized"),
    (["--prompt-ids", "1,2", "--system", "be brief"], "--system is the system message of --chat"),
    (["--prompt-ids", "1,5000"], "token id 5000 is outside the vocabulary (0..127)"),  # tiny llama: vocab 128
    (["--prompt-ids", "1,2", "-n", "0"], "--max-tokens must be positive"),
]


@pytest.mark.parametrize("args,needle", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_refused_before_loading(tiny, no_weights, capsys, args, needle):
    code, err = cli(["run", tiny("llama"), *args], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err


def test_cuda_and_compile_refused_before_loading(tiny, no_weights, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    for args, needle in ((["--device", "cuda"], "no CUDA GPU"), (["--compile"], "--compile compiles the CUDA")):
        code, err = cli(["run", tiny("llama"), "--prompt-ids", "1,2", *args], capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_chat_without_template_refused_before_loading(tiny_gguf, no_weights, capsys):
    """The tiny GGUF carries a tokenizer but no tokenizer.chat_template key."""
    import gguf

    path = tiny_gguf("llama")
    assert "tokenizer.chat_template" not in gguf.GGUFReader(path).fields
    code, err = cli(["run", path, "--chat", "--prompt", "hi"], capsys)
    assert code == 2 and "no chat template" in err and len(err.strip().splitlines()) == 1, err


def test_unsupported_family_named_with_the_generated_list(tmp_path, no_weights, capsys):
    """A tiny Phi-3 (a family no recipe supports for run): refused by family, before any weight is
    read, naming every family whose recipe (recipes/*.toml, read here with tomllib) lists run."""
    import tomllib

    transformers = pytest.importorskip("transformers")
    cfg = transformers.Phi3Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
    )
    transformers.Phi3ForCausalLM(cfg).save_pretrained(tmp_path)
    code, err = cli(["run", tmp_path, "--prompt-ids", "1,2"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "family 'phi3' is not supported by llmarch run" in err
    listed = err.split("llmarch run supports ", 1)[1]
    for recipe in sorted((ROOT / "recipes").glob("*.toml")):
        data = tomllib.loads(recipe.read_text())
        family = data.get("family", recipe.stem)
        named = f" {family}," in f" {listed}" or f" {family} (" in f" {listed}"
        assert named == ("run" in data.get("supports", [])), (family, listed)
    assert "qwen3 (qwen2)" in listed  # qwen3's recipe runs Qwen2 checkpoints too


def test_dtype_any_case(tiny):
    r = run(tiny("llama"), "--prompt-ids", "1,2", "-n", "2", "--dtype", "FLOAT32", "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    assert "cpu float32" in r.stderr

"""`llmarch fit`'s llama.cpp figures against what llama.cpp itself allocates for the same file.

GGUFs written by `llmarch convert` (dense, sliding window, MLA, MoE, gpt-oss's SWA + MoE + sinks,
Gated DeltaNet hybrids) and the real Gemma 3 270M Q4_K_M file are loaded by llama-cpp-python with
its defaults for the cache (f16, swa_full off as llama-server runs it, ubatch 512, one sequence);
its log lines "model buffer size", "llama_kv_cache: size" and "llama_memory_recurrent: size" are
the reference. Weights, KV cache and recurrent state must agree within 5%.
Marked `llamacpp`: skipped when llama-cpp-python is not installed.
"""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import sys

import pytest

from tests.test_convert import add_tokenizer

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llamacpp

VOCAB = 384
CONTEXT = 8192
# widths large enough that llama.cpp's two-decimal MiB figures are precise to well under 1%
WIDE = dict(vocab_size=VOCAB, hidden_size=256, max_position_embeddings=CONTEXT)
FAMILIES = {
    "llama": dict(intermediate_size=512),
    "gemma3_text": dict(intermediate_size=512),
    "deepseek_v3": dict(kv_lora_rank=64, moe_intermediate_size=64, intermediate_size=512),
    "qwen3_moe": dict(moe_intermediate_size=64, mlp_only_layers=[], norm_topk_prob=True),
    "gpt_oss": dict(intermediate_size=64),
}
# Gated DeltaNet hybrids (3 linear layers, then full attention), with state widths large enough
# that llama.cpp's two-decimal MiB figure for it is precise to under 1% (1.57 MiB)
HYBRIDS = ("qwen3_next", "qwen3_5_text")
WIDE_STATE = dict(linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=128, linear_value_head_dim=128)
MIB = 2**20
_LINES: list[str] = []


@llama_cpp.llama_log_callback
def _log(level, text, user_data):
    _LINES.append(text.decode(errors="replace"))


def llama_allocations(path, n_ctx: int) -> dict:
    """llama.cpp's own figures for a file at n_ctx, read from its log: the model buffers (the
    CPU_REPACK buffer is a second, repacked copy of some tensors for the CPU's kernels, not the
    file's weights), the KV cache buffers and the recurrent layers' state (conv window R and
    recurrent matrix S, which llama.cpp keeps apart from the KV cache), in bytes."""
    _LINES.clear()
    llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, swa_full=False, n_threads=1, verbose=True)
    del llm
    log = "".join(_LINES)
    model = [
        float(m.group(2))
        for m in re.finditer(r"(\S+) model buffer size = +([\d.]+) MiB", log)
        if "REPACK" not in m.group(1)
    ]
    kv = [float(x) for x in re.findall(r"llama_kv_cache: size = +([\d.]+) MiB", log)]
    state = [float(x) for x in re.findall(r"llama_memory_recurrent: size = +([\d.]+) MiB", log)]
    assert model and kv, log[-3000:]
    return {"weights": sum(model) * MIB, "kv_cache": sum(kv) * MIB, "state": sum(state) * MIB}


def fit_doc(capsys, path, context: int) -> dict:
    from llmarch.cli import main

    argv, sys.argv = sys.argv, ["llmarch", "fit", str(path), "--memory", "80GiB", "--context", str(context), "--json"]
    try:
        main()
    finally:
        sys.argv = argv
    return json.loads(capsys.readouterr().out)


def agree(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / theirs


@pytest.mark.parametrize("name", FAMILIES)
def test_fit_matches_llamacpp_allocation(tiny, tmp_path, capsys, name):
    from llmarch.convert.to_gguf import convert_to_gguf

    src = tmp_path / name
    shutil.copytree(tiny(name, **WIDE, **FAMILIES[name]), src)
    add_tokenizer(src, VOCAB)
    gguf = tmp_path / f"{name}.gguf"
    convert_to_gguf(str(src), gguf, "f16")
    theirs = llama_allocations(gguf, CONTEXT)
    lc = fit_doc(capsys, gguf, CONTEXT)["llama_cpp"]
    w, kv = agree(lc["weights"], theirs["weights"]), agree(lc["kv_cache"], theirs["kv_cache"])
    print(
        f"{name}: weights {lc['weights']} vs {theirs['weights']:.0f} ({w:.2%}), kv {lc['kv_cache']} vs {theirs['kv_cache']:.0f} ({kv:.2%})"
    )
    assert w < 0.05 and kv < 0.05


@pytest.mark.parametrize("name", HYBRIDS)
def test_fit_matches_llamacpp_on_hybrid(tiny, tmp_path, capsys, name):
    """Gated DeltaNet + full attention: llama.cpp caches the full layer's K/V for the context and
    keeps the linear layers' conv window and recurrent matrix in f32 in one cell per sequence.
    fit reads the widths from the GGUF's ssm.* keys; the safetensors source must give the same
    KV cache and state (what `fit` says before a user converts)."""
    from llmarch.convert.to_gguf import convert_to_gguf

    src = tmp_path / name
    shutil.copytree(tiny(name, **WIDE, **WIDE_STATE), src)
    add_tokenizer(src, VOCAB)
    gguf = tmp_path / f"{name}.gguf"
    convert_to_gguf(str(src), gguf, "f16")
    theirs = llama_allocations(gguf, CONTEXT)
    assert theirs["state"] > MIB  # the log line was found and the state is wide enough to measure
    lc = fit_doc(capsys, gguf, CONTEXT)["llama_cpp"]
    before = fit_doc(capsys, src, CONTEXT)["llama_cpp"]
    w, kv, st = (agree(lc[k], theirs[k]) for k in ("weights", "kv_cache", "state"))
    print(
        f"{name}: weights {lc['weights']} vs {theirs['weights']:.0f} ({w:.2%}), kv {lc['kv_cache']} vs "
        f"{theirs['kv_cache']:.0f} ({kv:.2%}), state {lc['state']} vs {theirs['state']:.0f} ({st:.2%})"
    )
    assert w < 0.05 and kv < 0.05 and st < 0.05
    assert agree(before["kv_cache"], theirs["kv_cache"]) < 0.05 and agree(before["state"], theirs["state"]) < 0.05


@pytest.mark.parametrize("context", [4096, 32768])
def test_fit_matches_llamacpp_on_real_gemma3_270m(capsys, context):
    """The real Q4_K_M file: Q4_K/Q6_K/Q8_0 weights, 5:1 sliding window 512, MQA."""
    from llmarch.default_model import default_model_path

    path = default_model_path()
    theirs = llama_allocations(path, context)
    lc = fit_doc(capsys, path, context)["llama_cpp"]
    w, kv = agree(lc["weights"], theirs["weights"]), agree(lc["kv_cache"], theirs["kv_cache"])
    print(f"gemma3 270M @ {context}: weights {w:.2%}, kv {kv:.2%}")
    assert w < 0.05 and kv < 0.05

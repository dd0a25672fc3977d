"""`llmarch diff`: pairs built from transformers configs, expected differences read from the configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmarch.api import diff_sources
from llmarch.cli import app
from llmarch.report.diff import exit_status

ROOT = Path(__file__).resolve().parents[1]


def cfg(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def run_cli(*args: str):
    """The real entry point in a subprocess: exit codes and stderr as a user sees them."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "llmarch", *args], capture_output=True, text=True, env=env, cwd=ROOT)


def row(d: dict, section: str, fact: str) -> dict:
    return next(r for r in d["rows"] + d["storage"] if r["section"] == section and r["fact"] == fact)


def test_qwen3_vs_qwen3_moe(tiny):
    a, b = tiny("qwen3"), tiny("qwen3_moe")
    ca, cb = cfg(a), cfg(b)
    d, _, _ = diff_sources(str(a), str(b), tensors=True)
    assert exit_status(d) == 1 and d["verdict"] == "different architecture"
    assert row(d, "identity", "family")["a"] == "qwen3" and row(d, "identity", "family")["b"] == "qwen3_moe"
    assert row(d, "size", "layers") == dict(
        row(d, "size", "layers"), a=str(ca["num_hidden_layers"]), b=str(cb["num_hidden_layers"]), differs=True
    )
    n_exp = cb.get("num_experts", cb.get("num_local_experts"))  # transformers 5 writes num_local_experts
    experts = row(d, "MoE", "experts")
    assert experts["a"] is None
    assert experts["b"] == f"{n_exp} routed, {cb['num_experts_per_tok']} per token"
    # MoE layers per the qwen3_moe rule; layers past A's depth exist only in B
    moe = [
        i
        for i in range(cb["num_hidden_layers"])
        if i not in cb["mlp_only_layers"] and (i + 1) % cb["decoder_sparse_step"] == 0
    ]
    both = range(min(ca["num_hidden_layers"], cb["num_hidden_layers"]))
    sched = {s["ranges"]: s["text"] for s in d["schedule"]}
    from llmarch.arch.ranges import index_ranges

    assert sched[index_ranges([i for i in both if i in moe])] == "ffn dense in A, moe in B"
    assert sched[index_ranges(list(range(ca["num_hidden_layers"], cb["num_hidden_layers"])))] == "only in B"
    # tensors: stacked experts only in B (experts, expert width, hidden), lm_head only in B (A ties)
    t = d["tensors"]
    gate = next(e for e in t["only_in_b"] if e["tensor"] == "blk.*.ffn_gate_exps.weight")
    assert gate["layers"] == index_ranges(moe)
    assert gate["detail"].startswith(str([n_exp, cb["moe_intermediate_size"], cb["hidden_size"]]))
    assert ca["tie_word_embeddings"] and not cb.get("tie_word_embeddings", False)
    assert any(e["tensor"] == "output.weight" for e in t["only_in_b"])
    dense_gate = next(e for e in t["only_in_a"] if e["tensor"] == "blk.*.ffn_gate.weight")
    assert dense_gate["layers"] == index_ranges([i for i in both if i in moe])


def test_gemma3_window_change(tiny):
    a = tiny("gemma3_text")
    b = tiny("gemma3_text", sliding_window=32)
    ca, cb = cfg(a), cfg(b)
    assert ca["sliding_window"] != cb["sliding_window"]
    d, _, _ = diff_sources(str(a), str(b))
    assert exit_status(d) == 1
    sliding = [i for i, t in enumerate(ca["layer_types"]) if t == "sliding_attention"]
    n_full = len(ca["layer_types"]) - len(sliding)
    sw = row(d, "schedule", "sliding local:global")
    assert sw["a"] == f"{len(sliding)}:{n_full} @ {ca['sliding_window']}"
    assert sw["b"] == f"{len(sliding)}:{n_full} @ {cb['sliding_window']}"
    from llmarch.arch.ranges import index_ranges

    assert [(s["ranges"], s["text"]) for s in d["schedule"]] == [
        (index_ranges(sliding), f"mixer sliding({ca['sliding_window']}) in A, sliding({cb['sliding_window']}) in B")
    ]
    # everything else about the two is the same: only window-driven rows differ
    differing = {(r["section"], r["fact"]) for r in d["rows"] if r["differs"]}
    assert differing <= {("schedule", "pattern"), ("schedule", "sliding local:global"), ("memory", "KV cache")}


def test_llama_vs_smollm3(tiny):
    a, b = tiny("llama"), tiny("smollm3")
    cb = cfg(b)
    nope = [i for i, flag in enumerate(cb["no_rope_layers"]) if flag == 0]
    assert nope, "smollm3 fixture must have NoPE layers"
    d, _, _ = diff_sources(str(a), str(b))
    assert exit_status(d) == 1
    from llmarch.arch.ranges import index_ranges

    assert row(d, "positions", "NoPE layers")["b"] == index_ranges(nope)
    assert row(d, "positions", "NoPE layers")["a"] == "none"
    texts = [s["text"] for s in d["schedule"]]
    # layers both have: NoPE layers of B show up as a positions change
    n_a = cfg(a)["num_hidden_layers"]
    shared_nope = [i for i in nope if i < n_a]
    if shared_nope:
        assert any("positions RoPE in A, NoPE in B" in t for t in texts)
    assert any(s["text"] == "only in B" for s in d["schedule"]) == (cb["num_hidden_layers"] > n_a)


# ----------------------------------------------------------------------------- GGUF vs source


def _llama_gguf_from(src: Path, out: Path) -> Path:
    """Convert a tiny llama checkpoint the way llama.cpp's convert_hf_to_gguf.py does: names from
    gguf-py's TensorNameMap, Q/K rows permuted for its RoPE, matrices f16, norms f32."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    c = cfg(src)
    sd = {}
    for f in sorted(src.glob("*.safetensors")):
        sd.update(load_file(f))
    n_layers, heads, kv = c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    theta = (c.get("rope_parameters") or {}).get("rope_theta") or c.get("rope_theta")
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(n_layers)
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_freq_base(theta)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(c["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)

    def permute(x, n_head):  # llama.cpp's LlamaModel.permute
        return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    for name, arr in sd.items():
        new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new, name
        if name.endswith("q_proj.weight"):
            arr = permute(arr, heads)
        elif name.endswith("k_proj.weight"):
            arr = permute(arr, kv)
        w.add_tensor(new, arr.astype(np.float32 if arr.ndim == 1 else np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def llama_pair(tiny, tmp_path_factory):
    # default RoPE: llama.cpp stores llama3 scaling as a rope_freqs tensor, not as metadata
    src = tiny("llama", rope_parameters=dict(rope_type="default", rope_theta=500000.0))
    return src, _llama_gguf_from(src, tmp_path_factory.mktemp("conv") / "tiny-llama-f16.gguf")


def test_gguf_vs_its_source_is_same_architecture(llama_pair):
    src, gg = llama_pair
    d, _, _ = diff_sources(str(src), str(gg), tensors=True)
    assert [r for r in d["rows"] if r["differs"]] == []
    assert d["schedule"] == []
    assert d["same_architecture"] and d["verdict"] == "same architecture; storage differs"
    fmt = row(d, "storage", "format")
    assert (fmt["a"], fmt["b"], fmt["differs"]) == ("safetensors", "gguf", True)
    t = d["tensors"]
    assert t["only_in_a"] == [] and t["only_in_b"] == [] and t["shape_changes"] == []
    assert t["common"] == t["count_a"] == t["count_b"]
    n = cfg(src)["num_hidden_layers"]
    q = next(e for e in t["dtype_changes"] if e["tensor"] == "blk.*.attn_q.weight")
    assert (q["layers"], q["detail"]) == (f"0-{n - 1}", "F32 -> F16")
    # CLI: exit 0, and the storage table says what changed
    r = run_cli("diff", str(src), str(gg))
    assert r.returncode == 0, r.stderr
    assert "same architecture; storage differs" in r.stdout


def test_self_diff_identical_and_json_schema(llama_pair):
    src, gg = llama_pair
    r = run_cli("diff", str(gg), str(gg), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["verdict"] == "identical" and d["identical"] and d["same_architecture"] and d["same_source"]
    for key in ("schema", "a", "b", "rows", "schedule", "storage", "tensors", "warnings"):
        assert key in d
    for side in ("a", "b"):
        assert set(d[side]) == {"source", "format", "family"}
    assert d["rows"] and all(
        set(x) == {"section", "fact", "a", "b", "differs", "kind"} for x in d["rows"] + d["storage"]
    )
    assert {x["kind"] for x in d["rows"]} == {"architecture"} and {x["kind"] for x in d["storage"]} == {"storage"}
    assert not any(x["differs"] for x in d["rows"] + d["storage"])
    r = run_cli("diff", str(gg), str(gg))
    assert r.returncode == 0 and "identical" in r.stdout


def test_exit_codes_and_bad_input(llama_pair, tiny, tmp_path):
    src, gg = llama_pair
    assert run_cli("diff", str(src), str(tiny("qwen3"))).returncode == 1
    missing = run_cli("diff", str(src), str(tmp_path / "nope"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and "nope" in missing.stderr
    bad = run_cli("diff", str(gg), str(gg), "--kv-dtype", "int3")
    assert bad.returncode == 2 and "kv-dtype" in bad.stderr
    assert run_cli("diff", str(gg), str(gg), "--diagram", str(tmp_path / "x.jpg")).returncode == 2


def test_markdown_and_all(tiny):
    a, b = tiny("qwen3"), tiny("qwen3_moe")
    res = CliRunner().invoke(app, ["diff", str(a), str(b), "--markdown"])
    assert res.exit_code == 1
    assert "| section | fact | A | B |" in res.stdout and "**Verdict: different architecture**" in res.stdout
    assert "| MoE | experts | **(absent)** |" in res.stdout
    folded = CliRunner().invoke(app, ["diff", str(a), str(b), "--json"])
    every = CliRunner().invoke(app, ["diff", str(a), str(b), "--markdown", "--all"])
    n_rows = len(json.loads(folded.stdout)["rows"])
    table_rows = [l for l in every.stdout.splitlines() if l.startswith("| ") and not l.startswith("| section")]
    assert len(table_rows) == n_rows + len(json.loads(folded.stdout)["storage"])


def test_diff_opens_each_checkpoint_once_and_no_torch(llama_pair, monkeypatch):
    src, gg = llama_pair
    import llmarch.api as api

    calls = []
    real = api.open_checkpoint
    monkeypatch.setattr(api, "open_checkpoint", lambda s: calls.append(s) or real(s))
    diff_sources(str(src), str(gg), tensors=True)
    assert calls == [str(src), str(gg)]
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "llmarch", "diff", str(src), str(gg), "--tensors"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    modules = {
        line.split("|")[-1].strip().split(".")[0] for line in r.stderr.splitlines() if line.startswith("import time:")
    }
    assert "typer" in modules  # the import log is really there
    assert "torch" not in modules and "transformers" not in modules


@pytest.mark.parametrize("name", ["llama", "olmo2", "gemma3_text", "smollm3", "qwen3"])
def test_gguf_from_llmarch_convert_is_same_architecture(tiny, tmp_path, name):
    """Real pairs: `llmarch convert --to gguf` output vs its source (Llama 3 RoPE scaling, OLMo 2
    post-norms, Gemma 3 sandwich norms and SWA, SmolLM3 NoPE, Qwen3 tied embeddings)."""
    src = tiny(name)
    out = tmp_path / f"{name}.gguf"
    conv = CliRunner().invoke(app, ["convert", str(src), "--to", "gguf", "-o", str(out), "--dtype", "q8_0"])
    if conv.exit_code != 0 and "not supported" in (conv.output or ""):
        pytest.skip(conv.output.strip())
    assert out.is_file(), conv.output
    d, _, _ = diff_sources(str(src), str(out), tensors=True)
    assert [(r["fact"], r["a"], r["b"]) for r in d["rows"] if r["differs"]] == [] and d["schedule"] == []
    assert d["verdict"] == "same architecture; storage differs"
    t = d["tensors"]
    assert (t["only_in_a"], t["only_in_b"], t["shape_changes"]) == ([], [], [])
    assert any(e["detail"].endswith("-> Q8_0") for e in t["dtype_changes"])

"""`llmarch fit`: memory figures against expectations computed here by hand from config values
(never from llmarch's own output), the placements they imply, and option checks.

Tiny fixtures (dense, sliding window, MLA, MoE, hybrid) check the per-part figures exactly;
full-size shapes are safetensors headers written here with no data (sparse files), so the
placement choices are checked at real sizes: Qwen3-30B-A3B on a 24 GiB GPU, DeepSeek-V3 over
hosts of 8 x 80 GiB, and gpt-oss-20b's published "3.6B active" parameters.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.make import write_safetensors_header

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


def fit(capsys, *args) -> dict:
    from llmarch.cli import main

    argv = sys.argv
    sys.argv = ["llmarch", "fit", *map(str, args), "--json"]
    try:
        main()
    finally:
        sys.argv = argv
    return json.loads(capsys.readouterr().out)


def config(folder) -> dict:
    cfg = json.loads((Path(folder) / "config.json").read_text())
    return cfg.get("text_config", cfg)


def pad256(n: int) -> int:
    return -(-n // 256) * 256


# --- per-part figures on the tiny fixtures -------------------------------------------------------


def test_dense_parts_and_kv(tiny, capsys):
    src = tiny("llama")
    c = config(src)
    V, H, L, kvh = c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["num_key_value_heads"]
    hd = H // c["num_attention_heads"]
    doc = fit(capsys, src, "--memory", "8GiB", "--host-memory", "8GiB", "--context", 200, "--kv-dtype", "f16")
    assert doc["params"]["embeddings"] == V * H
    assert doc["params"]["output_head"] == V * H  # untied
    assert doc["params"]["routed_experts"] == 0
    # every tensor's bytes land in exactly one part
    stored = sum(f.stat().st_size for f in Path(src).glob("*.safetensors"))
    assert 0 < stored - doc["weights_total"] < 64 * 1024  # the difference is the safetensors headers
    assert doc["kv_cache"] == L * 2 * kvh * hd * 2 * 200
    assert doc["llama_cpp"]["kv_cache"] == L * 2 * kvh * hd * 2 * pad256(200)
    assert doc["fits"] and doc["llama_cpp"]["all_layers"] and doc["llmarch_run"]["experts"] is None
    assert "llama-server -m" in doc["llama_cpp"]["command"] and "-ngl 999" in doc["llama_cpp"]["command"]


def test_sliding_window_layers_cap_at_the_window(tiny, capsys):
    src = tiny("gemma3_text")
    c = config(src)
    kvh, hd, W = c["num_key_value_heads"], c["head_dim"], c["sliding_window"]
    sliding = c["layer_types"].count("sliding_attention")
    full = c["num_hidden_layers"] - sliding
    per = 2 * kvh * hd * 2  # K and V, f16
    ctx = 256
    doc = fit(capsys, src, "--memory", "8GiB", "--context", ctx, "--kv-dtype", "f16")
    assert doc["kv_cache"] == full * per * ctx + sliding * per * min(W, ctx)
    # llama.cpp (swa_full off, its default): sliding layers hold window + ubatch (512) cells, rounded to 256
    assert doc["llama_cpp"]["kv_cache"] == full * per * pad256(ctx) + sliding * per * min(pad256(W + 512), pad256(ctx))
    assert doc["params"]["output_head"] == 0  # tied
    assert doc["params"]["embeddings"] == c["vocab_size"] * c["hidden_size"]


def test_mla_caches_the_latent(tiny, capsys):
    src = tiny("deepseek_v3")
    c = config(src)
    per_layer = (c["kv_lora_rank"] + c["qk_rope_head_dim"]) * 2
    doc = fit(capsys, src, "--memory", "8GiB", "--context", 1000, "--kv-dtype", "bf16")
    assert doc["kv_cache"] == c["num_hidden_layers"] * per_layer * 1000
    # the MTP layer is not loaded for text generation: its bytes are reported apart, not as weights
    assert doc["params"]["mtp"] > 0 and "mtp" not in doc["weights"]


def test_moe_routed_experts_part(tiny, capsys):
    src = tiny("qwen3_moe")
    c = config(src)
    moe_layers = c["num_hidden_layers"] - len(c["mlp_only_layers"])
    routed = (
        moe_layers
        * c.get("num_experts", c.get("num_local_experts"))
        * 3
        * c["hidden_size"]
        * c["moe_intermediate_size"]
    )
    doc = fit(capsys, src, "--memory", "8GiB", "--context", 64)
    assert doc["params"]["routed_experts"] == routed
    bytes_per = doc["weights"]["dense"] / doc["params"]["dense"]
    assert doc["weights"]["routed_experts"] == routed * bytes_per


def test_hybrid_recurrent_state(tiny, capsys):
    src = tiny("qwen3_next")
    c = config(src)
    interval = c.get("full_attention_interval", 4)
    layers = c["num_hidden_layers"]
    linear = sum(1 for i in range(layers) if (i + 1) % interval)
    nv, nk = c["linear_num_value_heads"], c["linear_num_key_heads"]
    dk, dv = c["linear_key_head_dim"], c["linear_value_head_dim"]
    conv = c.get("linear_conv_kernel_dim", 4)
    # Qwen3NextGatedDeltaNet: recurrent state [nv, dk, dv] kept in f32; conv window over the q, k, v
    # channels (kernel - 1 past inputs) in the cache dtype
    recurrent, conv_window = nv * dk * dv, (2 * nk * dk + nv * dv) * (conv - 1)
    doc = fit(capsys, src, "--memory", "8GiB", "--context", 100, "--kv-dtype", "bf16")
    assert doc["recurrent_state"] == linear * (recurrent * 4 + conv_window * 2)
    full = layers - linear
    assert doc["kv_cache"] == full * 2 * c["num_key_value_heads"] * c["head_dim"] * 2 * 100
    assert doc["llama_cpp"]["state"] == linear * (recurrent + conv_window) * 4  # llama.cpp: both in f32


def test_ple_table_placement_and_shared_kv(tiny, capsys):
    """Gemma 3n: the per-layer embedding table is its own part and goes to --ple gpu, cpu or disk;
    the last num_kv_shared_layers layers reuse earlier caches and add none."""
    from llmarch.api import load_spec
    from llmarch.plan import memory as mem
    from llmarch.plan.run_placement import Option, footprint, plan_run

    src = tiny("gemma3n")
    c = config(src)
    L, H, w = c["num_hidden_layers"], c["hidden_size"], c["hidden_size_per_layer_input"]
    # the table, embed_tokens_per_layer [vocab, L * w]; its projection [L * w, H] and norm [w] run
    # with the blocks (dense) but count in per_layer_embeddings.params
    ple = c["vocab_size_per_layer_input"] * L * w
    own = c["layer_types"][: L - c["num_kv_shared_layers"]]
    per = 2 * c["num_key_value_heads"] * c["head_dim"] * 2
    doc = fit(capsys, src, "--memory", "8GiB", "--context", 200, "--kv-dtype", "f16")
    assert doc["params"]["ple"] == ple
    from llmarch.api import inspect_source

    assert inspect_source(str(src))["per_layer_embeddings"]["params"] == ple + L * w * H + w
    assert doc["kv_cache"] == per * (own.count("full_attention") * 200 + own.count("sliding_attention") * 16)
    spec = load_spec(str(src))
    b = 4  # the fixture is float32
    on_gpu, _ = footprint(spec, Option(None, None, ple="gpu"), b)
    # a GPU that holds everything but the table: the table goes to host RAM, whole
    overhead = mem.CUDA_CONTEXT + mem.run_overhead(spec, b, False) + mem.kv_bytes(spec, 200, "f32")
    gpu = on_gpu - ple * b + overhead + 1024
    run = plan_run(spec, str(src), gpu, 2**30, 200, 256)
    assert run["ple"] == "cpu" and run["host_bytes"] == ple * b and "--ple cpu" in run["command"]
    run = plan_run(spec, str(src), gpu, ple * b // 2, 200, 256)  # nor in host RAM: read per step
    assert run["ple"] == "disk" and run["host_bytes"] == 0


# --- placements at full size (headers only) ------------------------------------------------------


def qwen3_30b_a3b(folder: Path) -> dict:
    """Qwen3-30B-A3B's shapes as the Hub names them (bf16), data-less."""
    from fixtures.hub_shapes import QWEN3_30B_A3B

    c = dict(QWEN3_30B_A3B, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], torch_dtype="bfloat16")
    H, I, V, hd = c["hidden_size"], c["moe_intermediate_size"], c["vocab_size"], c["head_dim"]
    t = {"model.embed_tokens.weight": ((V, H), "BF16"), "lm_head.weight": ((V, H), "BF16")}
    t["model.norm.weight"] = ((H,), "BF16")
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = ((32 * hd, H), "BF16")
        t[p + "self_attn.k_proj.weight"] = ((4 * hd, H), "BF16")
        t[p + "self_attn.v_proj.weight"] = ((4 * hd, H), "BF16")
        t[p + "self_attn.o_proj.weight"] = ((H, 32 * hd), "BF16")
        t[p + "self_attn.q_norm.weight"] = ((hd,), "BF16")
        t[p + "self_attn.k_norm.weight"] = ((hd,), "BF16")
        t[p + "input_layernorm.weight"] = ((H,), "BF16")
        t[p + "post_attention_layernorm.weight"] = ((H,), "BF16")
        t[p + "mlp.gate.weight"] = ((128, H), "BF16")
        for e in range(128):
            t[p + f"mlp.experts.{e}.gate_proj.weight"] = ((I, H), "BF16")
            t[p + f"mlp.experts.{e}.up_proj.weight"] = ((I, H), "BF16")
            t[p + f"mlp.experts.{e}.down_proj.weight"] = ((H, I), "BF16")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(c))
    write_safetensors_header(folder / "model.safetensors", t)
    return c


@pytest.fixture(scope="module")
def qwen30b(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3-30b-a3b") / "model"
    return folder, qwen3_30b_a3b(folder)


def test_qwen3_30b_a3b_expert_placement(qwen30b, capsys):
    folder, c = qwen30b
    H, L, V = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    routed = L * 128 * 3 * H * c["moe_intermediate_size"]
    attn = L * (2 * 32 * 128 * H + 2 * 4 * 128 * H + 2 * 128 + 2 * H + 128 * H)
    doc = fit(capsys, folder, "--memory", "24GiB", "--host-memory", "128GiB", "--context", 8192)
    assert doc["params"]["routed_experts"] == routed
    assert doc["params"]["dense"] == attn + H
    assert doc["weights"]["routed_experts"] == 2 * routed
    kv = L * 2 * 4 * 128 * 2 * 8192
    assert doc["kv_cache"] == kv
    assert not doc["fits"]  # 61 GB of bf16 weights
    # llmarch run: bf16 (58.0 GB) and int8 (29.9 GB) experts do not fit 24 GiB; int4 (16.3 GB) does,
    # beside 3.1 GB of dense weights and 0.8 GB of cache
    int4 = routed * (0.5 + 4 / 64)
    dense = 2 * (attn + H + 2 * V * H)
    # beside: the CUDA context (512 MiB) and a 512-token bf16 prefill (8 activations of the widest
    # layer, 6144, per token; the last token's f32 logits; one int8/int4 expert dequantized)
    prefill = 2 * 512 * 8 * 6144 + 4 * V + 3 * H * c["moe_intermediate_size"] * 2
    assert dense + int4 + kv < 24 * GiB - 512 * 2**20 - prefill < dense + routed * (1 + 2 / 64)
    run = doc["llmarch_run"]
    assert (run["experts"], run["expert_bits"]) == ("gpu", 4)
    assert "--experts gpu --expert-bits 4" in run["command"]

    # a 12 GiB GPU: experts to host RAM, 16-bit when the host holds 58 GB, int8 when it holds 32 GiB
    # the same header, planned again without re-reading it
    from llmarch.api import load_spec
    from llmarch.plan.fit import plan_fit

    spec = load_spec(str(folder))
    doc = plan_fit(spec, str(folder), 12 * GiB, 1, 64 * GiB, 8192)
    assert (doc["llmarch_run"]["experts"], doc["llmarch_run"]["expert_bits"]) == ("cpu", 16)
    doc = plan_fit(spec, str(folder), 12 * GiB, 1, 32 * GiB, 8192)
    assert (doc["llmarch_run"]["experts"], doc["llmarch_run"]["expert_bits"]) == ("cpu", 8)

    # llama.cpp at bf16 on 24 GiB: the first N layers' experts stay in host RAM, N the smallest
    # that leaves the rest (all but the input embedding, which llama.cpp keeps on the CPU) in budget
    per_layer_experts = 2 * routed / L
    rest = 2 * (attn + H + V * H) + L * 2 * 4 * 128 * 2 * pad256(8192)
    budget = 24 * GiB - 512 * 2**20 - 4 * 512 * (V + 4 * 6144)
    n = math.ceil((rest + 2 * routed - budget) / per_layer_experts)
    lc = plan_fit(spec, str(folder), 24 * GiB, 1, 128 * GiB, 8192)["llama_cpp"]
    assert lc["all_layers"] and lc["n_cpu_moe"] == n, (lc, n)
    assert f"--n-cpu-moe {n}" in lc["command"] and "-c 8192" in lc["command"]


def test_largest_context_is_the_edge(qwen30b, capsys):
    """With all of it on 8 x 24 GiB, the largest context c is the last one whose bytes fit."""
    folder, c = qwen30b
    doc = fit(capsys, folder, "--memory", "24GiB", "--gpus", 8)
    per_token = c["num_hidden_layers"] * 2 * 4 * 128 * 2
    room = 8 * 24 * GiB - doc["weights_total"] - doc["overhead"]
    assert doc["largest_context"] == min(room // per_token, c["max_position_embeddings"])
    assert doc["fits"]


def test_deepseek_v3_needs_hosts(deepseek_v3_skeleton, capsys):
    """DeepSeek-V3 in bf16 (1.34 TB without its MTP layer) over 8 x 80 GiB hosts: tensor parallel 8
    inside a host, as many hosts as the bytes need."""
    c = config(deepseek_v3_skeleton)
    doc = fit(capsys, deepseek_v3_skeleton, "--memory", "80GiB", "--gpus", 8, "--context", 32768)
    s = doc["serving"]
    assert s["needed"] and s["tensor_parallel"] == 8
    per_gpu = 0.9 * 80 * GiB - 512 * 2**20
    kv = c["num_hidden_layers"] * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) * 2 * 32768
    assert doc["kv_cache"] == kv
    need = doc["weights_total"] + kv + 4 * 512 * (c["vocab_size"] + 4 * c["intermediate_size"])
    assert s["hosts"] == math.ceil(math.ceil(need / per_gpu) / 8)
    assert 1.3e12 < doc["weights_total"] < 1.4e12
    assert "--tensor-parallel-size 8" in s["vllm"] and f"--pipeline-parallel-size {s['hosts']}" in s["vllm"]
    assert "--enable-expert-parallel" in s["vllm"] and "--max-model-len 32768" in s["vllm"]
    assert f"--tp {8 * s['hosts']}" in s["sglang"] and f"--nnodes {s['hosts']}" in s["sglang"]


# --- params readings ---------------------------------------------------------------------------


def gpt_oss_20b(folder: Path) -> dict:
    """gpt-oss-20b as the Hub ships it: MXFP4 experts (U8 *_blocks of 16 bytes = 32 fp4 codes and
    U8 *_scales per block), everything else bf16; config values from its config.json."""
    c = dict(
        model_type="gpt_oss",
        architectures=["GptOssForCausalLM"],
        vocab_size=201088,
        hidden_size=2880,
        intermediate_size=2880,
        num_hidden_layers=24,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        num_local_experts=32,
        num_experts_per_tok=4,
        experts_per_token=4,
        sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * 12,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        rope_theta=150000,
        rope_scaling=dict(
            rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, original_max_position_embeddings=4096
        ),
    )
    H, I, E, V = c["hidden_size"], c["intermediate_size"], c["num_local_experts"], c["vocab_size"]
    q, kv = 64 * 64, 8 * 64
    t = {"model.embed_tokens.weight": ((V, H), "BF16"), "lm_head.weight": ((V, H), "BF16")}
    t["model.norm.weight"] = ((H,), "BF16")
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for n, shape in (("q_proj", (q, H)), ("k_proj", (kv, H)), ("v_proj", (kv, H)), ("o_proj", (H, q))):
            t[p + f"self_attn.{n}.weight"] = (shape, "BF16")
            t[p + f"self_attn.{n}.bias"] = ((shape[0],), "BF16")
        t[p + "self_attn.sinks"] = ((64,), "BF16")
        t[p + "input_layernorm.weight"] = ((H,), "BF16")
        t[p + "post_attention_layernorm.weight"] = ((H,), "BF16")
        t[p + "mlp.router.weight"] = ((E, H), "BF16")
        t[p + "mlp.router.bias"] = ((E,), "BF16")
        t[p + "mlp.experts.gate_up_proj_blocks"] = ((E, 2 * I, H // 32, 16), "U8")
        t[p + "mlp.experts.gate_up_proj_scales"] = ((E, 2 * I, H // 32), "U8")
        t[p + "mlp.experts.gate_up_proj_bias"] = ((E, 2 * I), "BF16")
        t[p + "mlp.experts.down_proj_blocks"] = ((E, H, I // 32, 16), "U8")
        t[p + "mlp.experts.down_proj_scales"] = ((E, H, I // 32), "U8")
        t[p + "mlp.experts.down_proj_bias"] = ((E, H), "BF16")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(c))
    write_safetensors_header(folder / "model.safetensors", t)
    return c


def test_gpt_oss_20b_active_readings(tmp_path, capsys):
    from llmarch.cli import main

    c = gpt_oss_20b(tmp_path / "gpt-oss-20b")
    H, I, E, k, V, L = (
        c[x]
        for x in (
            "hidden_size",
            "intermediate_size",
            "num_local_experts",
            "experts_per_token",
            "vocab_size",
            "num_hidden_layers",
        )
    )
    q, kv = 64 * 64, 8 * 64
    attn = (q * H + q) + 2 * (kv * H + kv) + (H * q + H) + 64
    experts = E * (2 * I * H + 2 * I + H * I + H)
    per_layer_active = attn + 2 * H + (E * H + E) + experts * k // E
    without_input = L * per_layer_active + V * H + H  # + LM head + final norm
    sys.argv, argv = ["llmarch", "inspect", str(tmp_path / "gpt-oss-20b"), "--json"], sys.argv
    try:
        main()
    finally:
        sys.argv = argv
    p = json.loads(capsys.readouterr().out)["params"]
    assert p["total"] == L * (attn + 2 * H + E * H + E + experts) + 2 * V * H + H  # 20.9B, as OpenAI's card
    assert p["active_without_input_embedding"] == without_input
    assert round(p["active_without_input_embedding"] / 1e9, 1) == 3.6  # OpenAI's published "3.6B active"
    assert p["active"] == without_input + V * H
    assert p["active_non_embedding"] == without_input - V * H
    assert p["embeddings"] == p["output_head"] == V * H


def test_tied_embedding_readings(tiny, capsys):
    """A tied table is also the LM head: left out only by the non-embedding reading (Qwen's cards)."""
    src = tiny("gemma3_text")
    c = config(src)
    from llmarch.api import inspect_source

    p = inspect_source(str(src))["params"]
    assert p["output_head"] == 0
    assert p["active_without_input_embedding"] == p["active"]
    assert p["active_non_embedding"] == p["active"] - c["vocab_size"] * c["hidden_size"]


# --- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--memory", "24"], "--memory wants a size with a unit"),
        (["--memory", "lots"], "--memory wants a size"),
        (["--memory", "0GiB"], "--memory must be positive"),
        (["--gpus", "0"], "--gpus must be at least 1"),
        (["--context", "0"], "--context must be positive"),
        (["--context", "999999"], "beyond the model's context of 256"),
        (["--kv-dtype", "int3"], "unknown --kv-dtype"),
    ],
)
def test_bad_options_one_line_exit_2(tiny, capsys, args, message):
    from llmarch.cli import main

    src = tiny("llama")
    argv, sys.argv = sys.argv, ["llmarch", "fit", str(src), *args]
    try:
        with pytest.raises(SystemExit) as e:
            main()
    finally:
        sys.argv = argv
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_fit_is_header_only(qwen30b):
    """fit reads headers only: no torch (the 60 GB model above is a sparse file with no data)."""
    folder, _ = qwen30b
    code = (
        "import sys; from llmarch.cli import main; sys.argv = ['llmarch', 'fit', sys.argv[1], '--memory', '24GiB'];\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\nprint('ok', file=sys.stderr)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(folder)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
        timeout=60,
    )
    assert r.returncode == 0 and r.stderr.strip().endswith("ok"), r.stderr
    assert "--n-cpu-moe" in r.stdout and "--experts gpu --expert-bits 4" in r.stdout


def test_embedded_model_llama_cpp_command_names_a_real_file():
    """The embedded model is read from its package's chunks; llama.cpp needs one file, so fit's
    llama-server line asks `python -m llmarch.default_model` for the joined copy's path."""
    import subprocess
    import sys

    from llmarch.plan.fit import fit_source

    command = fit_source(None, "8GiB")["llama_cpp"]["command"]
    assert command.startswith('llama-server -m "$(python -m llmarch.default_model)" '), command
    out = subprocess.run([sys.executable, "-m", "llmarch.default_model"], capture_output=True, text=True, check=True)
    with open(out.stdout.strip(), "rb") as f:
        assert f.read(4) == b"GGUF"

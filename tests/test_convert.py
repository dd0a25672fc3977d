"""llmarch convert: HF <-> GGUF round trips checked against transformers and the source files.

Expected values come from the transformers-written fixtures (tensors, logits) and from GGUF files
written by gguf-py directly (fixtures.make.make_gguf), never from llmarch's own output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# family -> fixture overrides. qwen3_moe: llama.cpp's qwen3moe has no dense-FFN layers and
# hard-codes renormalised top-k (the real Qwen3 MoE checkpoints: mlp_only_layers [], norm_topk_prob true)
FAMILIES = {
    "llama": {},
    "mistral": {},
    "qwen3": {},
    "qwen3_moe": {"mlp_only_layers": [], "norm_topk_prob": True},
    "gemma3_text": {},
    "gpt2": {},
    "smollm3": {},
    "olmo2": {},
    "deepseek_v3": {},
    "glm4_moe": {},
    "gpt_oss": {},
    "olmo3": {},
    "minimax_m2": {},
    "gemma3n": {},  # GEMMA3N_LLAMACPP below
}
# Gemma 3n as llama.cpp's gemma3n can hold it: it hard-codes 4 AltUp streams, LAuReL rank 64,
# 256-wide per-layer inputs, KV in the first 20 layers (so no sharing in a 10-layer model) and
# 0.95 activation sparsity on the first 10 layers (llama-hparams.h, models/gemma3n.cpp)
GEMMA3N_LLAMACPP = dict(
    hidden_size_per_layer_input=256, laurel_rank=64, num_kv_shared_layers=0, activation_sparsity_pattern=[0.95] * 10
)
FAMILIES["gemma3n"] = GEMMA3N_LLAMACPP


def load_st(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run_cli(*args, env=None):
    e = dict(os.environ, **(env or {}))
    e.pop("LLMARCH_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "llmarch", *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=e, timeout=300
    )


def hf_logits(folder, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "The capital of France is Paris.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "In 1969, the first humans landed on the Moon.",
] * 20


def add_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer.json + tokenizer_config.json sized to the fixture's vocab."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS, trainer)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "add_bos_token": False,
                "chat_template": CHAT_TEMPLATE,
            }
        )
    )


IDS = [1, 5, 9, 17, 33, 65, 100, 7, 3, 42, 11, 99]


@pytest.mark.parametrize("name", FAMILIES)
def test_hf_gguf_hf_f32_identical_and_same_logits(tiny, tmp_path, name):
    from llmarch.convert.from_gguf import convert_from_gguf
    from llmarch.convert.to_gguf import convert_to_gguf

    src = tiny(name, **FAMILIES[name])
    gg = tmp_path / "m.gguf"
    convert_to_gguf(str(src), gg, "f32")
    back = tmp_path / "back"
    convert_from_gguf(str(gg), back, "f32")

    a, b = load_st(src), load_st(back)
    n_layers = json.loads((src / "config.json").read_text()).get("num_hidden_layers")
    mtp = [k for k in a if k.startswith("model.layers.") and int(k.split(".")[2]) >= (n_layers or 1 << 30)]
    for k in mtp:  # DeepSeek MTP layers: llama.cpp's GGUF has none, transformers ignores them
        del a[k]
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        if name == "gemma3_text" and k.endswith("norm.weight"):
            # llama.cpp stores Gemma's (1 + w): w + 1 - 1 in float32 is exact to 1 ulp of 1.0
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=2.0**-23, err_msg=k)
        else:
            assert np.array_equal(a[k], b[k]), k
    # transformers loads the rebuilt config.json + weights and computes the same function
    np.testing.assert_allclose(hf_logits(back, IDS), hf_logits(src, IDS), rtol=1e-5, atol=1e-5)


def test_llama4_wrapper_text_model_round_trip(tiny, tmp_path):
    """Llama4ForConditionalGeneration -> GGUF(f32) -> the text-only Llama4ForCausalLM: the text tensors
    come back identical (fused experts re-fused, vision left out) and compute the wrapper's text logits.
    attention_chunk_size 8192: the value llama.cpp's llama4 hard-codes (the real checkpoints' value)."""
    import torch

    from fixtures.reference import reference_model
    from llmarch.convert.from_gguf import convert_from_gguf
    from llmarch.convert.to_gguf import convert_to_gguf

    src = tiny("llama4", attention_chunk_size=8192)
    convert_to_gguf(str(src), tmp_path / "m.gguf", "f32")
    back = tmp_path / "back"
    convert_from_gguf(str(tmp_path / "m.gguf"), back, "f32")
    a = {k.replace("language_model.", "", 1): v for k, v in load_st(src).items() if k.startswith("language_model.")}
    b = load_st(back)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), k
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["architectures"] == ["Llama4ForCausalLM"] and cfg["interleave_moe_layer_step"] == 2
    wrapper = reference_model("llama4", src, eager=False)  # the wrapper's text model
    with torch.no_grad():
        ref = wrapper(input_ids=torch.tensor([IDS])).logits[0].numpy()
    np.testing.assert_allclose(hf_logits(back, IDS), ref, rtol=1e-5, atol=1e-5)


def test_gguf_names_and_layouts_follow_gguf_py(tiny, tmp_path):
    """Names from gguf-py's tables; experts stacked to 3-D; llama Q/K permuted; norms F32."""
    import gguf

    from llmarch.checkpoint import open_checkpoint
    from llmarch.convert.to_gguf import convert_to_gguf

    src = tiny("qwen3_moe", **FAMILIES["qwen3_moe"])
    cfg = json.loads((src / "config.json").read_text())
    out = tmp_path / "moe.gguf"
    convert_to_gguf(str(src), out, "bf16")
    r = gguf.GGUFReader(out)
    t = {x.name: x for x in r.tensors}
    exps = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_GATE_EXP].format(bid=0) + ".weight"
    # ggml order is reversed: (n_embd, n_ff, n_expert)
    assert list(t[exps].shape) == [cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_local_experts"]]
    assert t[exps].tensor_type == gguf.GGMLQuantizationType.BF16
    assert t["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert t["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    src_st = load_st(src)
    import torch

    want = (
        torch.stack(
            [
                torch.from_numpy(src_st[f"model.layers.0.mlp.experts.{i}.gate_proj.weight"])
                for i in range(cfg["num_local_experts"])
            ]
        )
        .to(torch.bfloat16)
        .view(torch.int16)
        .numpy()
    )
    got = np.asarray(t[exps].data).view(np.int16).reshape(want.shape)
    assert np.array_equal(got, want)

    # llama: Q rows permuted exactly as llama.cpp's LlamaModel.permute
    lsrc = tiny("llama")
    lcfg = json.loads((lsrc / "config.json").read_text())
    convert_to_gguf(str(lsrc), tmp_path / "l.gguf", "f32")
    lt = {x.name: x for x in gguf.GGUFReader(tmp_path / "l.gguf").tensors}
    q = load_st(lsrc)["model.layers.0.self_attn.q_proj.weight"]
    n = lcfg["num_attention_heads"]
    want_q = q.reshape(n, 2, q.shape[0] // n // 2, q.shape[1]).swapaxes(1, 2).reshape(q.shape)
    assert np.array_equal(np.asarray(lt["blk.0.attn_q.weight"].data).reshape(q.shape), want_q)
    assert "rope_freqs.weight" in lt  # llama3 rope scaling lives in a tensor for llama.cpp
    ck = open_checkpoint(str(tmp_path / "l.gguf"))
    assert ck.metadata["llama.rope.freq_base"] == lcfg["rope_parameters"]["rope_theta"]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gguf_hf_gguf_keeps_metadata(tiny_gguf, tmp_path, arch):
    """Start from a GGUF written by gguf-py itself; the model and tokenizer keys survive."""
    from llmarch.checkpoint import open_checkpoint
    from llmarch.convert.from_gguf import convert_from_gguf
    from llmarch.convert.to_gguf import convert_to_gguf

    src = tiny_gguf(arch)
    convert_from_gguf(str(src), tmp_path / "hf", "f32")
    convert_to_gguf(str(tmp_path / "hf"), tmp_path / "again.gguf", "q8_0")
    a, b = open_checkpoint(str(src)), open_checkpoint(str(tmp_path / "again.gguf"))
    keys = [
        k
        for k in a.metadata
        if k.startswith(f"{arch}.")
        or k.startswith("tokenizer.ggml.")
        and k not in ("tokenizer.ggml.scores", "tokenizer.ggml.pre")
    ]
    assert keys
    for k in keys:
        va, vb = a.metadata[k], b.metadata.get(k)
        assert va == pytest.approx(vb) if isinstance(va, float) else va == vb, (k, va, vb)
    from llmarch.checkpoint.gguf import read_skipped_array

    def read(c, k):
        return c.metadata[k] if k in c.metadata else read_skipped_array(c, k)

    for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        assert read(a, k) == read(b, k), k
    assert sorted(a.tensors) == sorted(b.tensors)
    for name, t in a.tensors.items():
        assert b.tensors[name].shape == t.shape, name


def test_q8_0_logit_nmse(tiny, tmp_path):
    """q8_0 -> dequantized back: transformers' logits stay within llama.cpp's q8_0 bar."""
    from llmarch.convert.from_gguf import convert_from_gguf
    from llmarch.convert.to_gguf import convert_to_gguf
    from llmarch.convert.verify import nmse

    src = tiny("qwen3")
    convert_to_gguf(str(src), tmp_path / "q.gguf", "q8_0")
    convert_from_gguf(str(tmp_path / "q.gguf"), tmp_path / "back", "f32")
    ref, got = hf_logits(src, IDS), hf_logits(tmp_path / "back", IDS)
    err = nmse(ref, got)
    assert 0 < err < 1e-3, err  # llama.cpp expects ~2e-4 for q8_0; exactly 0 would mean no quantization
    assert (ref.argmax(-1) == got.argmax(-1)).mean() >= 0.9


def test_dry_run_prints_plan_writes_nothing(tiny, tmp_path):
    src = tiny("qwen3")
    out = tmp_path / "x.gguf"
    r = run_cli("convert", src, "--to", "gguf", "-o", out, "--dtype", "q8_0", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    cfg = json.loads((src / "config.json").read_text())
    by = {t["name"]: t for t in doc["tensors"]}
    assert by["blk.0.attn_q.weight"]["type"] == "Q8_0"
    assert by["blk.0.attn_q.weight"]["shape"] == [cfg["num_attention_heads"] * cfg["head_dim"], cfg["hidden_size"]]
    assert by["blk.0.attn_q_norm.weight"]["type"] == "F32"
    assert doc["metadata"]["qwen3.block_count"] == cfg["num_hidden_layers"]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _one_line_exit_2(r):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmarch: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_bad_input_existing_output(tiny, tmp_path):
    src = tiny("llama")
    out = tmp_path / "exists.gguf"
    out.write_bytes(b"keep me")
    line = _one_line_exit_2(run_cli("convert", src, "-o", out))
    assert "--force" in line and out.read_bytes() == b"keep me"
    r = run_cli("convert", src, "-o", out, "--force", "--dtype", "f16")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.gguf"]  # no temp file left


def _tiny_olmo_hybrid(folder: Path) -> Path:
    """Olmo hybrid (Gated DeltaNet + attention): llama.cpp has no architecture for it."""
    from transformers import OlmoHybridConfig, OlmoHybridForCausalLM

    sizes = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4)
    config = OlmoHybridConfig(**sizes, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    OlmoHybridForCausalLM(config).save_pretrained(str(folder))
    return folder


def test_bad_input_unsupported_family_and_blocking_tensors(tiny, tmp_path):
    src = _tiny_olmo_hybrid(tmp_path.parent / f"{tmp_path.name}-olmo-hybrid")
    line = _one_line_exit_2(run_cli("convert", src, "-o", tmp_path / "d.gguf"))
    assert "olmo_hybrid" in line and "not supported" in line
    # Qwen3-Next whose full-attention layers llama.cpp's qwen3next cannot place (it makes every
    # interval-th layer full attention) or whose value heads are wider than its key heads
    odd = ["full_attention"] + ["linear_attention"] * 3
    line = _one_line_exit_2(run_cli("convert", tiny("qwen3_next", layer_types=odd), "-o", tmp_path / "n.gguf"))
    assert "qwen3next" in line and "every n-th layer" in line
    line = _one_line_exit_2(run_cli("convert", tiny("qwen3_next", linear_value_head_dim=16), "-o", tmp_path / "n.gguf"))
    assert "qwen3next" in line and "16 vs 8" in line
    # qwen3_moe with a dense first layer: llama.cpp's qwen3moe has no dense FFN tensors
    line = _one_line_exit_2(run_cli("convert", tiny("qwen3_moe"), "-o", tmp_path / "q.gguf"))
    assert "model.layers.0.mlp" in line and "qwen3moe" in line
    # a feature llama.cpp hard-codes differently
    line = _one_line_exit_2(
        run_cli("convert", tiny("qwen3_moe", mlp_only_layers=[], norm_topk_prob=False), "-o", tmp_path / "q.gguf")
    )
    assert "norm_topk_prob" in line
    # Gemma 3 with a sliding pattern llama.cpp's gemma3 cannot express (it hard-codes 5 local : 1 global)
    line = _one_line_exit_2(
        run_cli(
            "convert",
            tiny("gemma3_text", layer_types=["sliding_attention"] * 3 + ["full_attention"] * 3),
            "-o",
            tmp_path / "g.gguf",
        )
    )
    assert "sliding" in line and "gemma3" in line
    # Llama 4 with attention chunks other than the 8192 llama.cpp's llama4 hard-codes
    line = _one_line_exit_2(run_cli("convert", tiny("llama4"), "-o", tmp_path / "l4.gguf"))
    assert "attention_chunk_size" in line and "llama4" in line
    assert list(tmp_path.iterdir()) == []


def test_bad_input_gguf_without_config_metadata(tmp_path):
    import gguf

    path = tmp_path / "bare.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_embedding_length(32)  # no block_count, no head_count
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    out = tmp_path / "hf"
    line = _one_line_exit_2(run_cli("convert", path, "--to", "safetensors", "-o", out))
    assert "block_count" in line or "num_hidden_layers" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.gguf"]


def test_gguf_kind_without_hf_name_names_the_file():
    """A GGUF tensor kind the family has no Hugging Face spelling for is refused naming the GGUF."""
    from gguf import MODEL_TENSOR

    from llmarch.arch.recipe_book import read_recipe
    from llmarch.convert.layout import _family, hf_name_for
    from llmarch.errors import LlmarchError

    llama = read_recipe(ROOT / "recipes" / "llama.toml")
    with pytest.raises(LlmarchError) as err:
        hf_name_for(_family(llama, "llama"), MODEL_TENSOR.ATTN_OUT_NORM, 0, ".weight", 2, path="model.gguf")
    assert str(err.value).startswith("model.gguf: no Hugging Face name known for GGUF tensor kind ATTN_OUT_NORM")


def test_unknown_pre_tokenizer_names_the_fix(tiny, tmp_path):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    src = tmp_path / "src"
    import shutil

    shutil.copytree(tiny("qwen3"), src)
    tk = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\w+|\s+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.save(str(src / "tokenizer.json"))
    line = _one_line_exit_2(run_cli("convert", src, "-o", tmp_path / "t.gguf"))
    assert "--pre-tokenizer" in line
    r = run_cli("convert", src, "-o", tmp_path / "t.gguf", "--pre-tokenizer", "qwen2")
    assert r.returncode == 0, r.stderr
    from llmarch.checkpoint import open_checkpoint

    assert open_checkpoint(str(tmp_path / "t.gguf")).metadata["tokenizer.ggml.pre"] == "qwen2"


def test_tokenizer_round_trip_hf_gguf_hf(tiny, tmp_path):
    """tokenizer.json -> GGUF vocab -> tokenizer.json encodes the same; chat template and specials kept."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from llmarch.convert.from_gguf import convert_from_gguf
    from llmarch.convert.to_gguf import convert_to_gguf

    src = tmp_path / "src"
    import shutil

    shutil.copytree(tiny("qwen3", vocab_size=384), src)
    add_tokenizer(src, 384)
    convert_to_gguf(str(src), tmp_path / "t.gguf", "f32")
    convert_from_gguf(str(tmp_path / "t.gguf"), tmp_path / "back", "f32")
    a, b = Tokenizer.from_file(str(src / "tokenizer.json")), Tokenizer.from_file(str(tmp_path / "back/tokenizer.json"))
    for text in CORPUS[:4] + ["  spaces\n\nand\ttabs 12345 <s> </s>", "Ünïcödé 🙂"]:
        assert a.encode(text).ids == b.encode(text).ids, text
    ta, tb = AutoTokenizer.from_pretrained(str(src)), AutoTokenizer.from_pretrained(str(tmp_path / "back"))
    assert (tb.bos_token, tb.eos_token, tb.pad_token) == (ta.bos_token, ta.eos_token, ta.pad_token)
    msgs = [{"role": "user", "content": "hi"}]
    assert tb.apply_chat_template(msgs, tokenize=False) == ta.apply_chat_template(msgs, tokenize=False)


def test_cli_verify_reports_agreement_and_nmse(tiny, tmp_path):
    """--verify runs source and output; q8_0 must land between 'identical' and llama.cpp's pass bar."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny("llama", vocab_size=384), src)
    add_tokenizer(src, 384)
    r = run_cli("convert", src, "-o", tmp_path / "v.gguf", "--dtype", "q8_0", "--verify", "--json")
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)["verify"]
    assert v["prompts"] == 3 and v["backend"]
    assert 0 < v["nmse"] < 1e-2 and v["verdict"] in ("excellent", "pass")
    assert 0.5 <= v["token_agreement"] <= 1.0


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_quantized_bytes_equal_gguf_quants(qtype):
    """The writer's block-group quantization gives exactly gguf.quants.quantize's bytes, from f32 and bf16."""
    import gguf

    from llmarch.convert.plan import DTYPES
    from llmarch.convert.writer import encode

    q = DTYPES[qtype][0]
    x = (np.random.default_rng(1).standard_normal((700, 96)) * 0.05).astype(np.float32)
    x[3] = 0.0  # all-zero blocks
    bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)
    assert np.array_equal(encode(x, "F32", q).reshape(-1), gguf.quants.quantize(x, q).reshape(-1))
    as_f32 = (bf16.astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(encode(bf16, "BF16", q).reshape(-1), gguf.quants.quantize(as_f32, q).reshape(-1))


def test_deepseek_v3_gguf_layout(tiny, tmp_path):
    """MLA as llama.cpp's deepseek2 wants it: kv_b split per head into k_b (transposed) and v_b,
    one latent KV head, MTP layers dropped; values from the transformers-written checkpoint."""
    import gguf

    from llmarch.checkpoint import open_checkpoint
    from llmarch.convert.to_gguf import convert_to_gguf

    src = tiny("deepseek_v3")
    cfg = json.loads((src / "config.json").read_text())
    out = tmp_path / "ds.gguf"
    convert_to_gguf(str(src), out, "f32")
    meta = open_checkpoint(str(out)).metadata
    assert meta["deepseek2.block_count"] == cfg["num_hidden_layers"]
    assert meta["deepseek2.attention.head_count_kv"] == 1
    assert meta["deepseek2.attention.key_length"] == cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    assert meta["deepseek2.attention.key_length_mla"] == cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    assert meta["deepseek2.leading_dense_block_count"] == cfg["first_k_dense_replace"]
    assert meta["deepseek2.expert_gating_func"] == gguf.ExpertGatingFuncType.SIGMOID
    t = {x.name: x for x in gguf.GGUFReader(out).tensors}
    assert not any(n.startswith(f"blk.{cfg['num_hidden_layers']}.") for n in t)  # MTP layer not written
    h, nope, v, r = (cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"])
    kv_b = load_st(src)["model.layers.0.self_attn.kv_b_proj.weight"].reshape(h, nope + v, r)
    k_b = np.asarray(t["blk.0.attn_k_b.weight"].data).reshape(h, r, nope)
    v_b = np.asarray(t["blk.0.attn_v_b.weight"].data).reshape(h, v, r)
    assert np.array_equal(k_b, kv_b[:, :nope, :].transpose(0, 2, 1))
    assert np.array_equal(v_b, kv_b[:, nope:, :])
    assert "blk.1.exp_probs_b.bias" in t


def test_no_space_left_fails_cleanly(tiny, tmp_path):
    """A file-size limit below the model (EFBIG, as a full disk gives ENOSPC): one line, no file left."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the error instead of the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (48 * 1024, 48 * 1024))

    src = tiny("qwen3")
    out = tmp_path / "big.gguf"
    r = subprocess.run(
        [sys.executable, "-m", "llmarch", "convert", str(src), "-o", str(out), "--dtype", "f32"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        preexec_fn=limit,
        timeout=120,
    )
    line = _one_line_exit_2(r)
    assert "cannot reserve" in line
    assert list(tmp_path.iterdir()) == []


def test_real_gemma3_270m_gguf_to_hf_same_architecture(tmp_path, request):
    """The embedded Gemma 3 270M Q4_K_M file -> HF: transformers loads it, llmarch diff sees the
    same architecture as the original GGUF, and the vocab survives (262144 tokens, Gemma's ids)."""
    from transformers import AutoConfig, AutoTokenizer

    from llmarch.checkpoint import open_checkpoint
    from llmarch.default_model import default_model_path

    gg = default_model_path()
    out = tmp_path / "gemma-hf"
    again = tmp_path / "again.gguf"
    # ~800 MiB of outputs: removed when the test ends, pass or fail, so pytest's kept folders stay small
    request.addfinalizer(lambda: (shutil.rmtree(out, ignore_errors=True), again.unlink(missing_ok=True)))
    r = run_cli("convert", gg, "--to", "safetensors", "-o", out, "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    meta = open_checkpoint(str(gg)).metadata
    cfg = AutoConfig.from_pretrained(str(out))
    assert cfg.model_type == "gemma3_text" and cfg.num_hidden_layers == meta["gemma3.block_count"]
    assert cfg.sliding_window == meta["gemma3.attention.sliding_window"]
    assert cfg.layer_types.count("full_attention") == meta["gemma3.block_count"] // 6
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 262144
    assert (tok.bos_token_id, tok.eos_token_id) == (
        meta["tokenizer.ggml.bos_token_id"],
        meta["tokenizer.ggml.eos_token_id"],
    )
    d = run_cli("diff", gg, out)
    assert d.returncode == 0, d.stdout + d.stderr  # 0 = same architecture

    # and back to GGUF: the model and tokenizer keys, tokens and token types of the original survive
    from llmarch.checkpoint.gguf import read_skipped_array

    r = run_cli("convert", out, "--to", "gguf", "-o", again, "--dtype", "q8_0")
    assert r.returncode == 0, r.stderr
    b = open_checkpoint(str(again))
    a = open_checkpoint(str(gg))
    keys = [
        k
        for k in a.metadata
        if k.startswith(("gemma3.", "tokenizer.ggml.")) and k not in ("tokenizer.ggml.add_sep_token",)
    ]  # False, llama.cpp's default when absent
    for k in keys:
        assert b.metadata.get(k) == pytest.approx(a.metadata[k]), k
    for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        assert read_skipped_array(b, k) == read_skipped_array(a, k), k


def test_gemma3n_narrow_per_layer_table_padded_as_transformers_reads_it(tiny, tmp_path):
    """Gemma 3n's per-layer table covers the text tokens only (vocab_size_per_layer_input < vocab);
    llama.cpp needs a row per token, so convert pads it with copies of row 0, the row transformers
    reads for ids past the table: back in transformers, the same logits for ids on both sides."""
    import torch

    from llmarch.convert.from_gguf import convert_from_gguf
    from llmarch.convert.to_gguf import convert_to_gguf

    src = tiny("gemma3n", **GEMMA3N_LLAMACPP, vocab_size_per_layer_input=200)
    gg, back = tmp_path / "m.gguf", tmp_path / "back"
    convert_to_gguf(str(src), gg, "f32")
    convert_from_gguf(str(gg), back, "f32")
    a = load_st(src)["model.embed_tokens_per_layer.weight"]
    b = load_st(back)["model.embed_tokens_per_layer.weight"]
    assert a.shape == (200, 2560) and b.shape == (256, 2560)
    assert np.array_equal(b[:200], a) and (b[200:] == a[0]).all()
    ids = torch.randint(3, 256, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    assert max(ids) >= 200
    np.testing.assert_allclose(hf_logits(back, ids), hf_logits(src, ids), rtol=1e-5, atol=1e-5)


def test_run_ple_disk_from_converted_gguf(tiny, tmp_path):
    """llmarch run --ple disk reads Gemma 3n's per-layer rows from a GGUF that convert wrote: at f32
    the same greedy tokens as from the safetensors source; at q8_0 (rows stored as quant blocks,
    read by pread and dequantized per step) the same tokens as that file's table held resident."""
    import torch

    from llmarch.convert.to_gguf import convert_to_gguf
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime
    from llmarch.runtime.ple import find_store

    src = tiny("gemma3n", **GEMMA3N_LLAMACPP)
    # longer than the 16-token sliding window
    prompt = torch.randint(3, 256, (20,), generator=torch.Generator().manual_seed(0)).tolist()

    def greedy(path, ple):
        rt = load_runtime(str(path), "cpu", "float32", ple=ple)
        tokens = Generator(rt, 48).generate(prompt, 16, Sampling()).tokens
        return tokens, find_store(rt.model).report()

    want, _ = greedy(src, "disk")
    assert len(set(want)) > 3  # a sequence that depends on the inputs, not one repeated token
    for dtype, ref in (("f32", want), ("q8_0", None)):
        gg = tmp_path / f"m-{dtype}.gguf"
        convert_to_gguf(str(src), gg, dtype)
        got, report = greedy(gg, "disk")
        assert report["mode"] == "disk" and report["where"] == f"file {gg}" and report["rows_read"] > 0
        assert got == (ref if ref is not None else greedy(gg, "cpu")[0]), dtype


def test_gemma3n_llama_cpp_cannot_express_is_refused(tiny, tmp_path):
    """llama.cpp's gemma3n hard-codes LAuReL rank 64, KV in the first 20 layers and 0.95 sparsity on
    the first 10 (models/gemma3n.cpp): a model that differs is one line naming the file, exit 2,
    nothing written; each per-layer rule is checked on the spec of a model that fits otherwise."""
    import dataclasses

    from llmarch.api import load_checkpoint_spec
    from llmarch.convert.gguf_meta import _check_hard_coded
    from llmarch.convert.to_gguf import convert_to_gguf
    from llmarch.errors import LlmarchError

    out, src = tmp_path / "m.gguf", tiny("gemma3n")  # the run tests' fixture: LAuReL rank 4, KV sharing
    line = _one_line_exit_2(run_cli("convert", src, "--to", "gguf", "-o", out))
    assert (
        line
        == f"llmarch: {src}: llama.cpp's gemma3n hard-codes laurel_rank = 64; this model has 4, so GGUF cannot express it"
    )
    assert not out.exists()

    _, spec = load_checkpoint_spec(str(tiny("gemma3n", **GEMMA3N_LLAMACPP)))
    _check_hard_coded(spec, spec.recipe, "gemma3n", None)  # as converted by the tests above
    shared = dataclasses.replace(spec, schedule=[dataclasses.replace(l) for l in spec.schedule])
    shared.schedule[9].kv_shared_from = 4  # the last layer reuses layer 4's KV, as transformers would
    with pytest.raises(LlmarchError, match="first 20 layers"):
        _check_hard_coded(shared, spec.recipe, "gemma3n", None)
    dense = dataclasses.replace(spec, schedule=[dataclasses.replace(l, ffn_sparsity=None) for l in spec.schedule])
    with pytest.raises(LlmarchError, match="activation sparsity 0.95 on the first 10 layers"):
        _check_hard_coded(dense, spec.recipe, "gemma3n", None)

    # a per-layer table under half the vocabulary is not padded (the padding would outgrow the table)
    short = tiny("gemma3n", **GEMMA3N_LLAMACPP, vocab_size_per_layer_input=100)
    with pytest.raises(LlmarchError, match="has 100 rows, less than half of the token embedding's 256"):
        convert_to_gguf(str(short), tmp_path / "short.gguf", "f32")
    assert not (tmp_path / "short.gguf").exists()


@pytest.mark.parametrize("name", ["qwen3_next", "qwen3_5_text"])
def test_gated_deltanet_tensors_as_llama_cpp_converter_writes_them(tiny, tmp_path, name):
    """Each linear-layer tensor in the GGUF equals the source under the transforms llama.cpp's
    converter applies (conversion/qwen.py: Qwen3NextModel.modify_tensors, and for Qwen3.5
    _LinearAttentionVReorderBase._reorder_v_heads), recomputed here with torch from the source;
    the llamacpp-marked tests prove llama.cpp computes transformers' logits from these files."""
    import gguf
    import torch

    from llmarch.convert.to_gguf import convert_to_gguf

    src = tiny(name)
    cfg = json.loads((src / "config.json").read_text())
    out = tmp_path / "m.gguf"
    convert_to_gguf(str(src), out, "f32")
    got = {t.name: np.array(t.data) for t in gguf.GGUFReader(out).tensors}
    hf = {k: torch.from_numpy(v) for k, v in load_st(src).items()}
    nk, nv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    dk, dv = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    tiled = name != "qwen3_next"

    def reorder(t, dim, head_dim):  # _reorder_v_heads: grouped by key head -> tiled
        if not tiled:
            return t
        shape = list(t.shape)
        t = t.reshape(*shape[:dim], nk, nv // nk, head_dim, *shape[dim + 1 :])
        return t.transpose(dim, dim + 1).contiguous().reshape(shape)

    def v_rows(t):  # q and k rows stay, the value rows are reordered
        return torch.cat([t[: 2 * nk * dk], reorder(t[2 * nk * dk :], 0, dv)])

    p = "model.layers.0.linear_attn."
    want = {
        "blk.0.ssm_a": reorder(-torch.exp(hf[p + "A_log"].double()).float(), 0, 1),
        "blk.0.ssm_dt.bias": reorder(hf[p + "dt_bias"], 0, 1),
        "blk.0.ssm_conv1d.weight": v_rows(hf[p + "conv1d.weight"].squeeze()),
        "blk.0.ssm_norm.weight": hf[p + "norm.weight"],  # the gated norm: no +1
        "blk.0.ssm_out.weight": reorder(hf[p + "out_proj.weight"], 1, dv),
        "blk.0.attn_norm.weight": hf["model.layers.0.input_layernorm.weight"] + 1,
    }
    if tiled:
        want["blk.0.attn_qkv.weight"] = v_rows(hf[p + "in_proj_qkv.weight"])
        want["blk.0.attn_gate.weight"] = reorder(hf[p + "in_proj_z.weight"], 0, dv)
        want["blk.0.ssm_beta.weight"] = reorder(hf[p + "in_proj_b.weight"], 0, 1)
        want["blk.0.ssm_alpha.weight"] = reorder(hf[p + "in_proj_a.weight"], 0, 1)
    else:  # llama.cpp's legacy ssm_in path reads HF's per-key-head [q k v z] rows as they are
        want["blk.0.ssm_in.weight"] = hf[p + "in_proj_qkvz.weight"]
        want["blk.0.ssm_ba.weight"] = hf[p + "in_proj_ba.weight"]
    for gname, w in want.items():
        np.testing.assert_array_equal(got[gname].reshape(w.shape), w.numpy(), err_msg=gname)


@pytest.mark.parametrize("name", ["qwen3_next", "qwen3_5_text"])
def test_gated_deltanet_state_read_back_from_gguf(tiny, tmp_path, name):
    """llama.cpp keeps a Gated DeltaNet's widths in the ssm.* keys (group count = key heads,
    time-step rank = value heads, state size = key head width, inner size = value heads x value
    head width): read back, the GGUF's recurrent state is the config's, per linear layer a
    key x value matrix per value head plus the conv window over [q k v] (kernel - 1 inputs)."""
    from llmarch.api import load_spec
    from llmarch.convert.to_gguf import convert_to_gguf

    src = tiny(name)
    cfg = json.loads((src / "config.json").read_text())
    out = tmp_path / "m.gguf"
    convert_to_gguf(str(src), out, "f32")
    nk, nv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    dk, dv = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    per_layer = nv * dk * dv + (2 * nk * dk + nv * dv) * (cfg["linear_conv_kernel_dim"] - 1)
    linear = cfg["layer_types"].count("linear_attention")
    assert load_spec(str(out)).recurrent_state_bytes(4) == linear * per_layer * 4

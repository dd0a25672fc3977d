"""llama.cpp loads what `llmarch convert` writes and computes what transformers computes.

Marked `llamacpp`: skipped when llama-cpp-python is not installed. Tiny random fixtures get a
small byte-level BPE tokenizer (trained here with `tokenizers`, Qwen2 pre-tokenizer regex) so the
GGUF carries a real vocab; the reference for logits and greedy tokens is transformers on the
same HF checkpoint, and for the real Gemma 3 270M file, llama.cpp on the original GGUF.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.test_convert import GEMMA3N_LLAMACPP, add_tokenizer, load_st

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llamacpp

VOCAB = 384
FAMILIES = {
    "llama": {},
    "qwen3": {},
    "gemma3_text": {},
    "qwen3_moe": {"mlp_only_layers": [], "norm_topk_prob": True},
    "mistral": {},
    "smollm3": {},
    "olmo2": {},
    "gpt2": {},
    "mistral3": {},  # Mistral Small 3.x wrapper: its text model, as llama
    "gemma3": {},  # the multimodal wrapper: its text model converts, the vision tower is left out
    "gpt_oss": {},  # sinks, biases, fused interleaved gate/up experts, SWA every other layer, yarn
    "glm4_moe": {},  # partial RoPE, attention bias, shared expert, dense first layer, MTP dropped
    "deepseek_v3": {},  # MLA (kv_b split into k_b / v_b), sigmoid group-limited router, shared expert, MTP dropped
    "minimax_m2": {},  # whole-projection QK-norm, partial RoPE (rotary_dim), sigmoid router + correction bias
    "llama4": {
        "attention_chunk_size": 8192
    },  # wrapper's text model; fused halves experts, shared expert, NoPE 4th, rope_freqs
    "olmo3": {},  # as llama.cpp's olmo2 + per-layer SWA pattern; YaRN on the global layers only
    # per-layer inputs (a row of the vocab x layers*256 table), AltUp, LAuReL, sparse FFN gates, v-norm
    # llama.cpp's Gaussian top-k divides the gate's variance by n - 1, transformers' by n: a wide FFN
    # (2048) makes that 0.02 % of the cutoff, where the fixture's 64 gave an NMSE of 5e-5. The per-layer
    # table stops short of the vocabulary, as Gemma 3n's does: convert pads it to llama.cpp's shape
    "gemma3n": {**GEMMA3N_LLAMACPP, "vocab_size_per_layer_input": VOCAB - 96, "intermediate_size": 2048},
    # per-layer inputs, wider heads and proportional RoPE (rope_freqs) on the full layers, KV sharing,
    # layer scalars
    "gemma4_text": {"vocab_size_per_layer_input": VOCAB},
    # Gated DeltaNet 3:1 with gated full attention, partial RoPE, MoE + gated shared expert
    # (ssm_in in HF's per-key-head [q k v z] rows, A as -exp(A_log), conv squeezed, (1 + w) norms shifted)
    "qwen3_next": {},
    # the same mixers from split in_proj_qkv / _z / _b / _a, value heads tiled across key heads for
    # llama.cpp (4 value heads on 2 key heads, so the reordering is exercised); dense and MoE
    "qwen3_5_text": {},
    "qwen3_5_moe_text": {},
}
# llama.cpp's default f16 KV cache rounds K/V: on the tiny Gemma 4 that alone is an NMSE of 1.2e-5
# (7.6e-7 with an f32 cache), so these families are compared with an f32 cache
F32_KV = {"gemma4_text"}

# Gemma 3n's sparse FFN gates keep the top 5 %, which magnifies rounding: transformers itself on
# the q8_0-rounded weights (dequantized by gguf-py) is at NMSE 6e-3 from f32, llama.cpp at 1.1e-2;
# the tiny Gemma 4: transformers on the rounded weights 1.5e-2, llama.cpp 1.7e-2
Q8_BAR = {"gemma3n": 2e-2, "gemma4_text": 3e-2}


@pytest.fixture(scope="module")
def with_tokenizer(tiny, tmp_path_factory):
    made = {}

    def build(name):
        if name not in made:
            dst = tmp_path_factory.mktemp(name) / name
            shutil.copytree(tiny(name, vocab_size=VOCAB, **FAMILIES[name]), dst)
            add_tokenizer(dst, VOCAB)
            made[name] = dst
        return made[name]

    return build


def load_llama(path, n_ctx=64, f32_kv=False):
    kv = {"type_k": 0, "type_v": 0} if f32_kv else {}  # GGML_TYPE_F32
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, n_threads=2, **kv
    )


def llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_greedy(llm, ids, n):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def hf_model(folder, name=None):
    """The fixture's own transformers class (multimodal wrappers name theirs), else AutoModelForCausalLM."""
    from fixtures.reference import reference_model

    return reference_model(name, folder, eager=False)


@pytest.mark.parametrize("name", FAMILIES)
def test_llamacpp_matches_transformers(with_tokenizer, tmp_path, name):
    src = with_tokenizer(name)
    table = FAMILIES[name].get("vocab_size_per_layer_input")
    ids = check_llamacpp_matches_transformers(src, tmp_path, name, name in F32_KV, Q8_BAR.get(name, 1e-2))
    assert table in (None, VOCAB) or max(ids) >= table  # Gemma 3n: ids past its per-layer table (padded rows) are read


def check_llamacpp_matches_transformers(src, tmp_path, name, f32_kv=False, q8_bar=1e-2, arch=None) -> list[int]:
    """`src` (a tiny checkpoint with the test tokenizer) converted to f32 and q8_0 GGUF: llama.cpp's
    tokenization equals the tokenizers library's, its f32 logits are within NMSE 1e-5 of
    transformers' with the same top-1 everywhere and 8 greedy tokens equal, q8_0 within q8_bar.
    `name` picks the fixture's transformers class; returns the token ids compared."""
    import torch
    from tokenizers import Tokenizer

    from llmarch.convert.to_gguf import convert_to_gguf
    from llmarch.convert.verify import nmse

    out = tmp_path / f"{name}.gguf"
    doc = convert_to_gguf(str(src), out, "f32")
    assert doc["tokenizer"] == "gpt2"
    assert arch is None or doc["arch"] == arch
    llm = load_llama(out, f32_kv=f32_kv)

    # tokenizer: llama.cpp's tokenization of our GGUF vocab == the tokenizers library's
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    for text in ["The capital of France is", "def fibonacci(n):", "In 1969, 42 humans!"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text).ids, text

    ids = tok.encode("The capital of France is Paris. In 1969").ids
    model = hf_model(src, name)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        hf_greedy = model.generate(
            torch.tensor([ids]), max_new_tokens=8, do_sample=False, min_new_tokens=8, eos_token_id=None, pad_token_id=0
        )[0, len(ids) :].tolist()
    got = llama_logits(llm, ids)
    assert nmse(ref, got) < 1e-5
    assert (ref.argmax(-1) == got.argmax(-1)).all()
    assert llama_greedy(llm, ids, 8) == hf_greedy

    # q8_0: within llama.cpp's pass bar
    q = tmp_path / f"{name}-q8.gguf"
    convert_to_gguf(str(src), q, "q8_0")
    assert nmse(ref, llama_logits(load_llama(q), ids)) < q8_bar
    return ids


@pytest.mark.slow
def test_real_gemma3_270m_to_hf_matches_llamacpp(tmp_path):
    """The real Gemma 3 270M Q4_K_M GGUF -> HF: transformers on our output vs llama.cpp on the file."""
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoTokenizer

    from llmarch.convert.from_gguf import convert_from_gguf
    from llmarch.convert.verify import nmse
    from llmarch.default_model import default_model_path

    gg = default_model_path()
    out = tmp_path / "gemma-hf"
    convert_from_gguf(str(gg), out, "f32")
    llm = load_llama(gg, n_ctx=128)
    tok = AutoTokenizer.from_pretrained(str(out))
    for text in ["The capital of France is", "Hello,   world!\n\tdef f(x): return x**2", "Ünïcödé 日本語 🙂"]:
        assert tok(text)["input_ids"] == llm.tokenize(text.encode(), add_bos=True, special=False), text
    ids = tok("The capital of France is")["input_ids"]
    model = hf_model(out)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = llama_logits(llm, ids)
    # llama.cpp multiplies Q4_K/Q6_K weights by q8-quantized activations; transformers runs the
    # dequantized weights in f32: close, not identical
    assert nmse(got, ref) < 1e-2
    assert ref[-1].argmax() == got[-1].argmax()

    # back to GGUF: llama.cpp tokenizes with our re-derived SentencePiece scores as with the original
    from llmarch.convert.to_gguf import convert_to_gguf

    convert_to_gguf(str(out), tmp_path / "again.gguf", "q8_0")
    again = llama_cpp.Llama(model_path=str(tmp_path / "again.gguf"), vocab_only=True, verbose=False)
    for text in [
        "antidisestablishmentarianism supercalifragilistic",
        "<start_of_turn>user\nhi<end_of_turn>",
        "Hello,   world!\n\tdef f(x): return x**2",
        "Ünïcödé 日本語 🙂",
    ]:
        assert again.tokenize(text.encode(), add_bos=True, special=True) == llm.tokenize(
            text.encode(), add_bos=True, special=True
        ), text


@pytest.mark.parametrize("hub_layout", [True, False])
def test_gemma3n_kv_sharing_matches_transformers(tmp_path, hub_layout):
    """llama.cpp's gemma3n gives KV caches to the first 20 layers; the later ones reuse layer 18's
    (sliding) or 19's (full), as transformers' num_kv_shared_layers does. A 22-layer Gemma 3n with 2
    shared layers: with the shared layers' own (random, unused) k/v projections as the Hub files
    keep them, and without them as transformers saves it (convert writes the zeros llama.cpp
    requires; back in transformers, the same logits)."""
    import torch
    from tokenizers import Tokenizer

    from fixtures.make import make_tiny
    from llmarch.convert.from_gguf import convert_from_gguf
    from llmarch.convert.to_gguf import convert_to_gguf
    from llmarch.convert.verify import nmse

    layer_types = (["sliding_attention"] * 4 + ["full_attention"]) * 4 + ["sliding_attention"] * 2
    overrides = {
        **FAMILIES["gemma3n"],
        "num_hidden_layers": 22,
        "layer_types": layer_types,
        "num_kv_shared_layers": 2,
        "activation_sparsity_pattern": [0.95] * 10 + [0.0] * 12,
    }
    src = make_tiny("gemma3n", tmp_path / "gemma3n-22", hub_layout=hub_layout, vocab_size=VOCAB, **overrides)
    add_tokenizer(src, VOCAB)
    assert hub_layout == any(".layers.21.self_attn.k_proj" in n for n in load_st(src))
    out = tmp_path / "m.gguf"
    convert_to_gguf(str(src), out, "f32")
    llm = load_llama(out)
    ids = Tokenizer.from_file(str(src / "tokenizer.json")).encode("The capital of France is Paris. In 1969").ids
    model = hf_model(src, "gemma3n")
    assert model.config.num_kv_shared_layers == 2
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        hf_greedy = model.generate(
            torch.tensor([ids]), max_new_tokens=8, do_sample=False, min_new_tokens=8, eos_token_id=None, pad_token_id=0
        )[0, len(ids) :].tolist()
    got = llama_logits(llm, ids)
    # 22 layers of llama.cpp's f32 kernels (its GELU, the n - 1 variance): 3.5e-5 measured
    assert nmse(ref, got) < 1e-4
    assert (ref.argmax(-1) == got.argmax(-1)).all()
    assert llama_greedy(llm, ids, 8) == hf_greedy
    back = tmp_path / "back"
    convert_from_gguf(str(out), back, "f32")
    with torch.no_grad():
        again = hf_model(back, "gemma3n")(input_ids=torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_array_equal(again, ref)


def test_gemma4_per_layer_widths_match_transformers(tiny, tmp_path):
    """Gemma 4 with values = keys on the full layers (one global KV head, no v_proj) and double-wide
    FFNs on the KV-shared layers: convert writes the FFN widths and KV head counts per layer, as
    llama.cpp's gemma4 reads them (it refused the file with scalars); transformers' logits and tokens."""
    wide = {"attention_k_eq_v": True, "num_global_key_value_heads": 1, "use_double_wide_mlp": True}
    src = tmp_path / "gemma4"
    shutil.copytree(tiny("gemma4_text", vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, **wide), src)
    add_tokenizer(src, VOCAB)
    check_llamacpp_matches_transformers(src, tmp_path, "gemma4_text", True, Q8_BAR.get("gemma4_text", 1e-2))

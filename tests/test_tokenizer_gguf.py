"""The GGUF tokenizer (llmarch/runtime/tokenizer.py's GGUFTokenizer, which encodes each text with a
BPE of the part of the vocabulary that text can use) against the tokenizers library loading the
tokenizer.json the GGUF was written from: same ids and same decoded text on seeded random strings
mixing the training corpus's words, the byte-level alphabet's edge cases and the special tokens.
The Gemma (merges recovered from the vocabulary) and SentencePiece-style paths are checked against
transformers in test_run_gemma.py and test_run_gguf.py."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("tokenizers")

VOCAB = 384  # the byte-level test tokenizer's size, as in test_convert_llamacpp.py


def random_texts(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pool = "abcdefgh xyz  \n\t.,;:'\"!?-()<>/0123456789éü日本🤖\u00a0\r"
    out = []
    for _ in range(n):
        parts = [rng.choice(words) if rng.random() < 0.4 else rng.choice(pool) for _ in range(rng.randint(0, 40))]
        out.append("".join(parts))
    return out


@pytest.mark.parametrize("whole_vocab", [False, True], ids=["sub_vocabulary", "whole_vocabulary"])
def test_byte_level_gguf_tokenizer_matches_its_tokenizer_json(tiny, tmp_path, whole_vocab, monkeypatch):
    # a text past WHOLE_VOCAB_AT characters is encoded by the whole vocabulary's BPE instead
    monkeypatch.setattr("llmarch.runtime.tokenizer.WHOLE_VOCAB_AT", -1 if whole_vocab else 10**9)
    from tokenizers import Tokenizer

    from llmarch.checkpoint import open_checkpoint
    from llmarch.convert.to_gguf import convert_to_gguf
    from llmarch.runtime.tokenizer import load_tokenizer
    from tests.test_convert import CORPUS, add_tokenizer

    src = tmp_path / "qwen3"
    shutil.copytree(tiny("qwen3", vocab_size=VOCAB), src)
    add_tokenizer(src, VOCAB)
    out = tmp_path / "qwen3.gguf"
    convert_to_gguf(str(src), out, "f32")
    ours = load_tokenizer(open_checkpoint(str(out)))
    ref = Tokenizer.from_file(str(src / "tokenizer.json"))
    words = [w for line in CORPUS for w in line.split()] + ["<s>", "</s>", "<pad>", " ", "  ", "\n\n"]
    texts = ["", "The capital of France is Paris.", "<s>hi</s>", "  two  spaces ", *CORPUS]
    for text in texts + random_texts(words, 200, seed=15):
        ids = ref.encode(text).ids
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    every = list(range(ref.get_vocab_size()))  # the GGUF pads the vocabulary to the model's with [PADn] tokens
    assert ours.decode(every) == ref.decode(every, skip_special_tokens=True)
    assert (ours.bos_token, ours.eos_token) == ("<s>", "</s>")


def write_vocab_gguf(path, **arrays):
    """A GGUF holding only tokenizer metadata, written by gguf-py (which types each array by its values)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("tokenizer.ggml.model", "gpt2" if "merges" in arrays else "llama")
    for key, values in arrays.items():
        w.add_array(f"tokenizer.ggml.{key}", values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"tokens": [1, 2, 3]}, "tokenizer.ggml.tokens must be an array of strings"),
        ({"tokens": ["a", "b", "ab"], "scores": [0.0]}, "tokenizer.ggml.scores must be 3 numbers"),
        ({"tokens": ["a", "b", "ab"], "scores": [0.0, float("nan"), 1.0]}, "tokenizer.ggml.scores must be 3 numbers"),
        ({"tokens": ["a", "b", "ab"], "merges": ["a b c"]}, "tokenizer.ggml.merges must be"),
    ],
)
def test_malformed_gguf_vocabulary_is_one_clear_error(tmp_path, arrays, message):
    from llmarch.checkpoint import open_checkpoint
    from llmarch.errors import LlmarchError
    from llmarch.runtime.tokenizer import load_tokenizer

    path = write_vocab_gguf(tmp_path / "vocab.gguf", **arrays)
    with pytest.raises(LlmarchError, match=message) as e:
        load_tokenizer(open_checkpoint(str(path)))
    assert e.value.path is not None and Path(e.value.path).name == "vocab.gguf"

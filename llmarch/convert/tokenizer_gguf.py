"""tokenizer.json <-> GGUF vocab (tokenizer.ggml.*).

HF -> GGUF: tokens, token types and scores from tokenizer.json; merges, special token ids,
add_bos/eos and the chat template through gguf-py's SpecialVocab. llama.cpp picks its
pre-tokenizer by name; convert_hf_to_gguf.py finds it by hashing a test encoding and fails on
unknown hashes. Here the name comes from the pre-tokenizer regex itself (KNOWN_PRE below, from
llama.cpp's llama-vocab.cpp), or from --pre-tokenizer.
GGUF -> HF: a `tokenizers` BPE tokenizer (byte-level for "gpt2" vocabs; byte-fallback with merges
recovered from the scores, as transformers does for SentencePiece, for "llama" vocabs).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
from gguf import TokenType

from llmarch.errors import LlmarchError

# pre-tokenizer regex as tokenizer.json writes it -> llama.cpp's tokenizer.ggml.pre name
KNOWN_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)": "gpt-2",
}
PRE_REGEX = {v: k for k, v in KNOWN_PRE.items()}


def _walk(node):
    """Every pre-tokenizer/decoder node of a (possibly nested Sequence) tokenizer.json entry."""
    if isinstance(node, dict):
        yield node
        for child in node.get("pretokenizers", []) + node.get("decoders", []) + node.get("normalizers", []):
            yield from _walk(child)


def pre_tokenizer_name(tj: dict, path) -> str:
    nodes = list(_walk(tj.get("pre_tokenizer")))
    for n in nodes:
        if n.get("type") == "Split":
            regex = (n.get("pattern") or {}).get("Regex")
            if regex in KNOWN_PRE:
                return KNOWN_PRE[regex]
            raise LlmarchError(
                f"unknown pre-tokenizer regex {regex!r}; name llama.cpp's pre-tokenizer for it with "
                f"--pre-tokenizer NAME (e.g. {', '.join(sorted(PRE_REGEX))})",
                path,
            )
    if any(n.get("type") == "ByteLevel" and n.get("use_regex", True) for n in nodes):
        return "gpt-2"
    raise LlmarchError("cannot tell llama.cpp's pre-tokenizer from tokenizer.json; pass --pre-tokenizer NAME", path)


def add_tokenizer_to_gguf(writer: gguf.GGUFWriter, folder: Path, vocab_size: int, pre: str | None = None) -> str | None:
    """Write tokenizer.ggml.* from folder/tokenizer.json. Returns the GGUF tokenizer model, or None."""
    path = folder / "tokenizer.json"
    if not path.is_file():  # no vocab: still carry bos/eos/pad ids from config.json
        gguf.SpecialVocab(folder, load_merges=False, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
        return None
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LlmarchError(f"cannot read tokenizer.json: {e}", path) from e
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise LlmarchError(f"tokenizer model {model.get('type')!r} is not supported yet (BPE only)", path)
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    n = max(vocab_size, max(vocab.values()) + 1)
    byte_level = any(x.get("type") == "ByteLevel" for x in _walk(tj.get("pre_tokenizer"))) or any(
        x.get("type") == "ByteLevel" for x in _walk(tj.get("decoder"))
    )
    by_id = {i: s for s, i in vocab.items()}
    tokens, types, scores = [], [], []
    merge_rank = {}
    if not byte_level:
        for r, m in enumerate(model.get("merges") or []):
            left, right = m.split(" ", 1) if isinstance(m, str) else m
            merge_rank.setdefault(left + right, r)
    for i in range(n):
        s = by_id.get(i)
        if s is None:
            tokens.append(f"[PAD{i}]"), types.append(TokenType.UNUSED), scores.append(-1e9)
            continue
        tokens.append(s)
        if i in added:
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        elif not byte_level and len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
        # SentencePiece-style vocabs: llama.cpp merges the pair whose result scores highest
        scores.append(-float(merge_rank.get(s, 0)) if not byte_level else 0.0)
    if byte_level:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre or pre_tokenizer_name(tj, path))
    else:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        normalizers = [x.get("type") for x in _walk(tj.get("normalizer"))]
        writer.add_add_space_prefix("Prepend" in normalizers)
        writer.add_token_scores(scores)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    special = gguf.SpecialVocab(folder, load_merges=byte_level, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    return "gpt2" if byte_level else "llama"


# ----------------------------------------------------------------------------- GGUF -> HF


def _array(ckpt, key: str):
    from llmarch.checkpoint.gguf import read_skipped_array

    if key in ckpt.metadata:
        return ckpt.metadata[key]
    if key in ckpt.skipped_arrays:
        return read_skipped_array(ckpt, key)
    return None


def merges_from_scores(tokens: list[str], scores: list[float], skip: set[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score order (transformers' generate_merges rule)."""
    vocab = {t: i for i, t in enumerate(tokens) if i not in skip}
    merges = []
    for tok, i in vocab.items():
        for k in range(1, len(tok)):
            left, right = tok[:k], tok[k:]
            if left in vocab and right in vocab:
                merges.append((scores[i], vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    return [(m[3], m[4]) for m in merges]


def _check_list(ckpt, key: str, value, kind, length: int) -> None:
    """tokenizer.ggml.KEY must be a list of `kind`, one entry per token."""
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise LlmarchError(
            f"inconsistent GGUF vocabulary: tokenizer.ggml.{key} is not a list of the right type", ckpt.path
        )
    if len(value) != length:
        raise LlmarchError(
            f"inconsistent GGUF vocabulary: tokenizer.ggml.{key} has {len(value)} entries for {length} tokens",
            ckpt.path,
        )


def _merges(ckpt, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """tokenizer.ggml.merges as pairs, each part and its merge a token of the vocab (the tokenizers
    library panics on a merge whose result it cannot find)."""
    raw = _array(ckpt, "tokenizer.ggml.merges") or []
    _check_list(ckpt, "merges", raw, str, len(raw) if isinstance(raw, list) else 0)
    merges = []
    for i, m in enumerate(raw):
        left, _, right = m.partition(" ")
        missing = next((t for t in (left, right, left + right) if t not in vocab), None)
        if not left or not right:
            raise LlmarchError(
                f"inconsistent BPE vocabulary: tokenizer.ggml.merges[{i}] {m!r} is not two tokens joined by a space",
                ckpt.path,
            )
        if missing is not None:
            raise LlmarchError(
                f"inconsistent BPE vocabulary: tokenizer.ggml.merges[{i}] {m!r} needs {missing!r}, "
                "which is not in tokenizer.ggml.tokens",
                ckpt.path,
            )
        merges.append((left, right))
    return merges


def build_hf_tokenizer(ckpt) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_config.json dict) from a GGUF vocab."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    meta = ckpt.metadata
    kind = meta.get("tokenizer.ggml.model")
    tokens = _array(ckpt, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise LlmarchError("GGUF has no tokenizer (tokenizer.ggml.model / tokens)", ckpt.path)
    _check_list(ckpt, "tokens", tokens, str, len(tokens) if isinstance(tokens, list) else 0)
    types = _array(ckpt, "tokenizer.ggml.token_type") or [int(TokenType.NORMAL)] * len(tokens)
    _check_list(ckpt, "token_type", types, int, len(tokens))
    special_ids = {
        i for i, t in enumerate(types) if t in (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)
    }

    def tok(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    if kind == "gpt2":
        vocab = {t: i for i, t in enumerate(tokens)}
        merges = _merges(ckpt, vocab)
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        pre = meta.get("tokenizer.ggml.pre", "gpt-2")
        regex = PRE_REGEX.get(pre)
        if regex is None:
            raise LlmarchError(
                f"pre-tokenizer {pre!r} is not known here (known: {', '.join(sorted(PRE_REGEX))})", ckpt.path
            )
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tk.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = _array(ckpt, "tokenizer.ggml.scores")
        if scores is None:
            raise LlmarchError("SentencePiece-style GGUF vocab has no tokenizer.ggml.scores", ckpt.path)
        _check_list(ckpt, "scores", scores, (int, float), len(tokens))
        skip = special_ids | {i for i, t in enumerate(types) if t in (TokenType.BYTE, TokenType.UNUSED)}
        vocab = {t: i for i, t in enumerate(tokens)}
        unk = tok("unknown")
        tk = Tokenizer(
            models.BPE(
                vocab=vocab,
                merges=merges_from_scores(tokens, scores, skip),
                unk_token=unk,
                fuse_unk=True,
                byte_fallback=True,
            )
        )
        space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        norm = [normalizers.Replace(" ", "▁")]
        tk.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if space_prefix else []) + norm)
        dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        tk.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    else:
        raise LlmarchError(f"GGUF tokenizer model {kind!r} is not supported yet (gpt2, llama)", ckpt.path)

    # CONTROL tokens are special (skipped when decoding); USER_DEFINED ones are plain added tokens
    tk.add_special_tokens(
        [
            AddedToken(tokens[i], special=True, normalized=False)
            for i in sorted(special_ids)
            if types[i] != TokenType.USER_DEFINED
        ]
    )
    tk.add_tokens(
        [
            AddedToken(tokens[i], special=False, normalized=False)
            for i in sorted(special_ids)
            if types[i] == TokenType.USER_DEFINED
        ]
    )
    bos, eos = tok("bos"), tok("eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        pair = single + (["$B:1"] + ([f"{eos}:1"] if add_eos else []))
        special = [(t, tokens.index(t)) for t in dict.fromkeys(([bos] if add_bos else []) + ([eos] if add_eos else []))]
        tk.post_processor = processors.TemplateProcessing(
            single=" ".join(single), pair=" ".join(pair), special_tokens=special
        )
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "model_max_length": meta.get(f"{meta['general.architecture']}.context_length", 1 << 30),
    }
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
        if tok(key) is not None:
            cfg[name] = tok(key)
    if meta.get("tokenizer.chat_template"):
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return tk.to_str(), cfg

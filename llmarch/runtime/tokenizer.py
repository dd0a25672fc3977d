"""Tokenizers: tokenizer.json through the `tokenizers` library, or one rebuilt from a GGUF vocab.

The GGUF rebuild follows transformers' GGUF converter (so tokens match it): `llama` models are
byte-fallback BPE whose merges are recovered from the vocabulary (ranked by score, or for Gemma by
file order, with Gemma's all-space tokens respelled with U+2581), `gpt2` models byte-level BPE
with the file's merges; control tokens become special added tokens, user-defined ones plain added
tokens. Building merges for a 262k vocab takes seconds, so the result is cached as tokenizer.json.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from llmarch.checkpoint.base import Checkpoint
from llmarch.errors import LlmarchError
from llmarch.runtime.cbuild import cache_dir

SPIECE = "\u2581"
CONTROL, USER_DEFINED = 3, 4
# pre-tokenizer split regexes of byte-level GGUF vocabularies, by tokenizer.ggml.pre
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
GEMMA_ARCHS = ("gemma", "gemma2", "gemma3", "gemma3n")


@dataclass
class Tok:
    tokenizer: object  # tokenizers.Tokenizer
    bos_id: int | None = None
    add_bos: bool = False  # prepend BOS ourselves (GGUF); tokenizer.json post-processors do it themselves
    eos_ids: set[int] = field(default_factory=set)
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    chat_template_source: Path | None = None  # the file the template came from, named in its errors

    def encode(self, text: str, special: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=special).ids
        if special and self.add_bos and self.bos_id is not None:  # even before a literal "<bos>", as transformers
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _cache_dir() -> Path:
    return cache_dir("tokenizers")


def gpt2_bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def merges_from_vocab(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary tokens is a merge, ranked by the token's score
    (transformers' generate_merges, so the ranking ties break identically)."""
    merges = []
    for token, score in scores.items():
        local = []
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in vocab and right in vocab:
                local.append((left, right, score))
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def build_gguf_tokenizer(ckpt: Checkpoint):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    from llmarch.checkpoint.gguf import read_skipped_array

    meta = ckpt.metadata

    def array(key):
        if key in ckpt.skipped_arrays:
            return read_skipped_array(ckpt, key)
        return meta.get(key)

    tokens = array("tokenizer.ggml.tokens")
    if not tokens:
        raise LlmarchError("the GGUF has no tokenizer (tokenizer.ggml.tokens); pass --prompt-ids", ckpt.path)
    types = array("tokenizer.ggml.token_type") or []
    model = meta.get("tokenizer.ggml.model")
    arch = meta.get("general.architecture")
    if model == "llama":
        if arch in GEMMA_ARCHS:
            tokens = [SPIECE * len(t) if " " in t and not t.strip() else t for t in tokens]
            vocab = {t: i for i, t in enumerate(tokens)}
            ranks = {t: -i for i, t in enumerate(tokens)}
        else:
            vocab = {t: i for i, t in enumerate(tokens)}
            ranks = dict(zip(tokens, array("tokenizer.ggml.scores") or [0.0] * len(tokens)))
        # Gemma's BPE maps unknown pieces to <unk>; transformers' LlamaTokenizer has no unk (drops them)
        unk = tokens[meta.get("tokenizer.ggml.unknown_token_id", 3)] if arch in GEMMA_ARCHS else None
        tok = Tokenizer(
            BPE(
                vocab=vocab,
                merges=merges_from_vocab(vocab, ranks),
                fuse_unk=True,
                unk_token=unk,
                byte_fallback=True,
                dropout=None,
            )
        )
        if arch in GEMMA_ARCHS:
            tok.normalizer = normalizers.Replace(" ", SPIECE)
            tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
            tok.decoder = decoders.Sequence([decoders.Replace(SPIECE, " "), decoders.ByteFallback(), decoders.Fuse()])
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE, prepend_scheme="first", split=False)
            tok.decoder = decoders.Sequence(
                [
                    decoders.Replace(SPIECE, " "),
                    decoders.ByteFallback(),
                    decoders.Fuse(),
                    decoders.Strip(content=" ", left=1),
                ]
            )
    elif model == "gpt2":
        spelling = gpt2_bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ")) for m in (array("tokenizer.ggml.merges") or [])]
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False))
        split = SPLITS.get(meta.get("tokenizer.ggml.pre"))
        if split:
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:
        raise LlmarchError(f"GGUF tokenizer model {model!r} is not supported (llama, gpt2)", ckpt.path)
    byte_level = model == "gpt2"
    spelled = set(gpt2_bytes_to_unicode().values()) if byte_level else None
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(tokens, types)
        if ty == CONTROL and (spelled is None or set(t) <= spelled)
    ]
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    if user:
        tok.add_tokens(user)
    return tok, tokens


def _gguf_tok(ckpt: Checkpoint) -> Tok:
    from tokenizers import Tokenizer

    meta = ckpt.metadata
    st = ckpt.files[0].stat()
    key = hashlib.sha256(f"{ckpt.files[0].resolve()}|{st.st_size}|{st.st_mtime_ns}|v2".encode()).hexdigest()[:20]
    cached = _cache_dir() / f"{key}.json"
    if cached.is_file():
        tok = Tokenizer.from_file(str(cached))
    else:
        tok, _ = build_gguf_tokenizer(ckpt)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tok.save(str(tmp))
        os.replace(tmp, cached)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eos_ids = {eos} if eos is not None else set()
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None:
        eos_ids.add(eot)
    if meta.get("general.architecture") in GEMMA_ARCHS:
        eot_id = tok.token_to_id("<end_of_turn>")  # Gemma ends chat turns with it; llama.cpp stops there too
        if eot_id is not None:
            eos_ids.add(eot_id)
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:
        add_bos = meta.get("tokenizer.ggml.model") == "llama"
    return Tok(
        tok,
        bos,
        bool(add_bos),
        eos_ids,
        meta.get("tokenizer.chat_template"),
        tok.id_to_token(bos) if bos is not None else None,
        tok.id_to_token(eos) if eos is not None else None,
        ckpt.path,
    )


def _token_str(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _json_tok(folder: Path, ckpt: Checkpoint) -> Tok:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:
        raise LlmarchError(f"cannot read tokenizer.json: {e}", folder / "tokenizer.json") from e
    cfg = {}
    if (folder / "tokenizer_config.json").is_file():
        try:
            cfg = json.loads((folder / "tokenizer_config.json").read_text())
        except ValueError:
            cfg = {}
    template = cfg.get("chat_template")
    template_source = folder / "tokenizer_config.json"
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
        template_source = folder / "chat_template.jinja"
    bos_tok, eos_tok = _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token"))
    eos_ids: set[int] = set()
    gen_cfg = folder / "generation_config.json"
    sources = [ckpt.config or {}]
    if gen_cfg.is_file():
        try:
            sources.insert(0, json.loads(gen_cfg.read_text()))
        except ValueError:
            pass
    for src in sources:
        for key in ("eos_token_id",):
            v = src.get(key)
            eos_ids.update(v if isinstance(v, list) else [v] if isinstance(v, int) else [])
        text = src.get("text_config")
        if isinstance(text, dict) and isinstance(text.get("eos_token_id"), (int, list)):
            v = text["eos_token_id"]
            eos_ids.update(v if isinstance(v, list) else [v])
    if eos_tok and tok.token_to_id(eos_tok) is not None:
        eos_ids.add(tok.token_to_id(eos_tok))
    bos_id = tok.token_to_id(bos_tok) if bos_tok else None
    return Tok(tok, bos_id, False, eos_ids, template, bos_tok, eos_tok, template_source)


def load_tokenizer(ckpt: Checkpoint) -> Tok:
    if ckpt.format == "gguf":
        return _gguf_tok(ckpt)
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    if (folder / "tokenizer.json").is_file():
        return _json_tok(folder, ckpt)
    raise LlmarchError("no tokenizer.json beside the checkpoint; pass --prompt-ids 1,2,3 to run without one", folder)

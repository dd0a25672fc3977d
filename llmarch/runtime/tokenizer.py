"""Tokenizers: tokenizer.json through the `tokenizers` library, or one rebuilt from a GGUF vocab
(GGUFTokenizer: each text encoded by a BPE of the part of the vocabulary it can use)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from llmarch.checkpoint.base import Checkpoint
from llmarch.errors import LlmarchError

SPIECE = "\u2581"
WHOLE_VOCAB_AT = 50_000  # characters of text from which the whole vocabulary's BPE is built instead
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


class GGUFTokenizer:
    """A GGUF's vocabulary as transformers' GGUF converter reads it (so tokens match it): `llama`
    models are byte-fallback BPE whose merges are recovered from the vocabulary (ranked by score,
    or for Gemma by file order, with Gemma's all-space tokens respelled with U+2581), `gpt2` models
    byte-level BPE with the file's merges; control tokens are special added tokens, user-defined
    ones plain added tokens.

    The whole BPE of a 262k vocabulary (515k merges for Gemma 3) costs the `tokenizers` library
    seconds and ~350 MB while it loads and ~100 MB after, for a prompt that uses a few dozen
    tokens. So each text is encoded by a BPE of its own sub-vocabulary: every vocabulary token that
    is a substring of the text's symbol string (the text as the normalizer and pre-tokenizer spell
    it, unknown characters spelled by their byte-fallback or unknown token), the merges among them
    in the whole list's order, and the added tokens that occur in the text. Any merge the whole BPE
    can apply to this text joins two adjacent symbols into a substring of that string, so it is in
    the sub-vocabulary with the same rank order, and both apply the same merges in the same order.
    Decoding maps ids to their vocabulary strings through the same decoder."""

    def __init__(self, ckpt: Checkpoint):
        from tokenizers import decoders

        from llmarch.checkpoint.gguf import read_skipped_array

        meta = ckpt.metadata

        def array(key):
            if key in ckpt.skipped_arrays:
                return read_skipped_array(ckpt, key)
            return meta.get(key)

        tokens = array("tokenizer.ggml.tokens")
        if not tokens:
            raise LlmarchError("the GGUF has no tokenizer (tokenizer.ggml.tokens); pass --prompt-ids", ckpt.path)
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise LlmarchError("tokenizer.ggml.tokens must be an array of strings", ckpt.path)
        types = array("tokenizer.ggml.token_type") or []
        self.model = meta.get("tokenizer.ggml.model")
        self.gemma = meta.get("general.architecture") in GEMMA_ARCHS
        self.unk: str | None = None
        self.scores: list[float] | None = None
        self.merges: list[tuple[str, str]] = []
        if self.model == "llama":
            if self.gemma:
                tokens = [SPIECE * len(t) if " " in t and not t.strip() else t for t in tokens]
                # Gemma's BPE maps unknown pieces to <unk>; transformers' LlamaTokenizer has no unk (drops them)
                unk_id = meta.get("tokenizer.ggml.unknown_token_id", 3)
                self.unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
            else:
                self.scores = array("tokenizer.ggml.scores") or [0.0] * len(tokens)
                if (
                    not isinstance(self.scores, list)
                    or len(self.scores) != len(tokens)
                    or not all(isinstance(v, (int, float)) and not math.isnan(v) for v in self.scores)
                ):  # they rank the merges: a NaN has no place in that order (an infinity has)
                    raise LlmarchError(f"tokenizer.ggml.scores must be {len(tokens)} numbers, one per token", ckpt.path)
            self.decoder = decoders.Sequence(
                [decoders.Replace(SPIECE, " "), decoders.ByteFallback(), decoders.Fuse()]
                + ([] if self.gemma else [decoders.Strip(content=" ", left=1)])
            )
        elif self.model == "gpt2":
            self.spelling = gpt2_bytes_to_unicode()
            alphabet = set(self.spelling.values())
            # added tokens keep the file's spelling; a control token outside the byte alphabet is not one
            added = [
                (t, ty) for t, ty in zip(tokens, types) if ty == USER_DEFINED or (ty == CONTROL and set(t) <= alphabet)
            ]
            tokens = [t if set(t) <= alphabet else "".join(self.spelling[b] for b in t.encode()) for t in tokens]
            merges = array("tokenizer.ggml.merges") or []
            if not isinstance(merges, list) or not all(isinstance(m, str) and m.count(" ") == 1 for m in merges):
                raise LlmarchError('tokenizer.ggml.merges must be an array of strings "left right"', ckpt.path)
            self.merges = [tuple(m.split(" ")) for m in merges]  # type: ignore[misc]
            self.split = SPLITS.get(meta.get("tokenizer.ggml.pre"))
            self.decoder = decoders.ByteLevel()
        else:
            raise LlmarchError(f"GGUF tokenizer model {self.model!r} is not supported (llama, gpt2)", ckpt.path)
        if self.model == "llama":
            added = [(tokens[i], ty) for i, ty in enumerate(types) if ty == CONTROL or ty == USER_DEFINED]
        self.tokens = tokens
        self.vocab = dict(zip(tokens, range(len(tokens))))  # a repeated string takes its last id, as in tokenizers
        # the merge list's order is the tokens' first appearance: their ids unless a string repeats
        self.first = {} if len(self.vocab) == len(tokens) else {t: i for i, t in reversed(list(enumerate(tokens)))}
        self.longest = max(map(len, tokens))
        self.control = [t for t, ty in added if ty == CONTROL]
        # a user token spelled outside the vocabulary (a byte-level file's, with a space) would get an
        # id past it: it is left out
        self.user = [t for t, ty in added if ty == USER_DEFINED and t in self.vocab]
        self.special_ids = {self.vocab[t] for t in self.control if t in self.vocab}
        self._whole = None  # the whole vocabulary's BPE, once a text long enough needs it

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tokens[i] if 0 <= i < len(self.tokens) and self.vocab[self.tokens[i]] == i else None

    def _symbols(self, text: str) -> str:
        """The string whose substrings hold every token the BPE can make of `text`."""
        if self.model == "gpt2":
            return "".join(self.spelling[b] for b in text.encode())
        s = text.replace(" ", SPIECE)
        if not self.gemma:
            s = SPIECE + s  # Metaspace prepends it to the first piece
        out = []
        for c in s:
            if c in self.vocab:
                out.append(c)
                continue
            fallback = [f"<0x{b:02X}>" for b in c.encode()]
            out.append("".join(fallback) if all(f in self.vocab for f in fallback) else (self.unk or ""))
        return "".join(out)

    def _tokenizer_for(self, text: str):
        """The sub-vocabulary BPE of `text`; past WHOLE_VOCAB_AT characters, where finding the
        sub-vocabulary (~30-80 us a character) costs more than the whole BPE's one-off build, the
        whole vocabulary's BPE, built once and kept."""
        if len(text) <= WHOLE_VOCAB_AT:
            s, vocab, longest = self._symbols(text), self.vocab, self.longest
            found = {
                t for i in range(len(s)) for j in range(i + 1, min(len(s), i + longest) + 1) if (t := s[i:j]) in vocab
            }
            return self._bpe(found, [t for t in self.control if t in text], [t for t in self.user if t in text])
        if self._whole is None:
            self._whole = self._bpe(set(self.vocab), self.control, self.user)
        return self._whole

    def _bpe(self, found: set[str], control: list[str], user: list[str]):
        """A BPE of the tokens `found` (plus the added tokens given and the unknown token), their
        merges in the whole list's order."""
        from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        vocab = self.vocab
        found.update(t for t in control + user + [self.unk] if t in vocab)
        order = self.first.__getitem__ if self.first else vocab.__getitem__
        sub = {t: vocab[t] for t in sorted(found, key=order)}
        if self.model == "llama":
            ranks = {t: (-i if self.gemma else self.scores[i]) for t, i in sub.items()}  # type: ignore[index]
            tok = Tokenizer(
                BPE(
                    vocab=sub,
                    merges=merges_from_vocab(sub, ranks),
                    fuse_unk=True,
                    unk_token=self.unk,
                    byte_fallback=True,
                    dropout=None,
                )
            )
            if self.gemma:
                tok.normalizer = normalizers.Replace(" ", SPIECE)
                tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
            else:
                tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE, prepend_scheme="first", split=False)
        else:
            merges = [(a, b) for a, b in self.merges if a in sub and b in sub and a + b in sub]
            tok = Tokenizer(BPE(vocab=sub, merges=merges, dropout=None, fuse_unk=False))
            if self.split:
                tok.pre_tokenizer = pre_tokenizers.Sequence(
                    [
                        pre_tokenizers.Split(Regex(self.split), behavior="isolated"),
                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                    ]
                )
            else:
                tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        if control:
            tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
        if user:
            tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
        return tok

    def encode(self, text: str, add_special_tokens: bool = True):
        return self._tokenizer_for(text).encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        skip = self.special_ids if skip_special_tokens else set()
        pieces = [p for i in ids if i not in skip and (p := self.id_to_token(i)) is not None]
        return self.decoder.decode(pieces)


def _gguf_tok(ckpt: Checkpoint) -> Tok:
    meta = ckpt.metadata
    tok = GGUFTokenizer(ckpt)
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

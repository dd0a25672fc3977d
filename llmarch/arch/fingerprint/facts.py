"""Shared by every section: a config view that records evidence, and tensor-name lookups per layer."""

from __future__ import annotations

import re
from collections import defaultdict

from llmarch.arch.tensor_roles import has_role, is_vision, layer_of
from llmarch.checkpoint.base import Checkpoint
from llmarch.errors import CheckpointError

EXPERTS_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts", "n_experts")


TOPK_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k", "experts_per_token", "top_k_experts")


SHARED_KEYS = ("n_shared_experts", "num_shared_experts", "shared_experts")
# Nemotron-H block letters / names -> (mixer, ffn) of a single-op layer


class Facts:
    """A config view that remembers which key each value came from."""

    def __init__(self, config: dict, evidence: dict[str, str], source: str):
        self.config, self.evidence, self.source = config, evidence, source
        self.used: dict[str, str] = {}

    def get(self, *keys: str, default=None, fact: str | None = None):
        for key in keys:
            value = self.config.get(key)
            if value is not None:
                if fact:
                    self.used[fact] = self.cite(key)
                return value
        return default

    def cite(self, key: str, detail: str = "") -> str:
        """Where a config key came from: the GGUF metadata or tensors a GGUF's key was rebuilt
        from, else `config.json:key` (detail: the part of the key's value meant, e.g. `.compress`)."""
        return self.evidence.get(key) or f"{self.source}:{key}{detail}"


def expert_key(name: str) -> str:
    """The name with a per-expert index collapsed: `...mlp.experts.17.up_proj.weight` ->
    `...mlp.experts.*.up_proj.weight`. No role pattern looks at the expert index, so one name
    per key answers every role question for all of them (DeepSeek-V3: 91k tensors -> ~2k keys)."""
    head, sep, tail = name.partition("experts.")
    if sep:
        idx, dot, rest = tail.partition(".")
        if dot and idx.isdigit():
            return f"{head}experts.*.{rest}"
    return name


# projections and embeddings: the fingerprint reads their rows / columns, so they have a shape
MATRIX_RE = re.compile(
    r"(_proj|attn_[qkv]|attn_output|ffn_(up|down|gate)(_exps|_shexp)?|embed_tokens|token_embd)\.weight$"
)


def tensors_by_layer(ckpt: Checkpoint) -> dict[int, list[str]]:
    """Layer index -> tensor names, one name per expert key (see expert_key). A projection
    without dimensions is refused here, where the fingerprint first reads the tensor index."""
    out: dict[int, list[str]] = defaultdict(list)
    seen: set[str] = set()
    tensors = ckpt.tensors
    for name in tensors:
        if "experts." in name:
            key = expert_key(name)
            if key in seen:
                continue
            seen.add(key)
        if is_vision(name):
            continue
        i = layer_of(name)
        if i is not None:
            out[i].append(name)
            if not tensors[name].shape and MATRIX_RE.search(name):
                raise CheckpointError(f"tensor {name!r}: a projection matrix with no dimensions", tensors[name].file)
    return out


def layer_has(layer_tensors: dict[int, list[str]], i: int, role: str) -> bool:
    return any(has_role(n, role) for n in layer_tensors.get(i, ()))


def any_layer_has(layer_tensors, role: str) -> str | None:
    for names in layer_tensors.values():
        for n in names:
            if has_role(n, role):
                return n
    return None


def find_tensor(ckpt: Checkpoint, suffixes: tuple[str, ...]):
    for name, t in ckpt.tensors.items():
        if not is_vision(name) and name.endswith(suffixes) and "per_layer" not in name:
            return t
    return None

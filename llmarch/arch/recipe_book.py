"""Family knowledge that files do not carry, loaded from the declarative recipes/*.toml files."""

from __future__ import annotations

import tomllib
from functools import lru_cache
from importlib.resources import files


@lru_cache(maxsize=1)
def _all() -> list[dict]:
    out = []
    for entry in files("llmarch.recipes").iterdir():
        if entry.name.endswith(".toml"):
            recipe = tomllib.loads(entry.read_text(encoding="utf-8"))
            recipe.setdefault("family", entry.name[: -len(".toml")])
            out.append(recipe)
    return out


def for_model_type(model_type: str | None) -> dict:
    for recipe in _all():
        if model_type and model_type in recipe.get("model_types", [recipe["family"]]):
            return recipe
    return {}


def for_gguf_arch(arch: str, meta: dict | None = None) -> dict:
    """The recipe for a GGUF arch; families llama.cpp writes under another family's arch (Olmo 3
    as olmo2) are told apart by their `convert.gguf_marker` key being present in `meta`."""
    for recipe in _all():
        conv = recipe.get("convert", {})
        marker = conv.get("gguf_marker")
        if conv.get("gguf_arch") == arch and marker and marker.format(arch=arch) in (meta or {}):
            return recipe
    for recipe in _all():
        if arch in recipe.get("gguf_archs", []):
            return recipe
    return {}


def gguf_arch_for(recipe: dict, model_type: str | None) -> str | None:
    """The GGUF arch llama.cpp converts this model_type to: the [convert] gguf_arch rule, else the
    gguf_archs entry paired with the model_type (lists of equal length), else the first."""
    types, archs = recipe.get("model_types", []), recipe.get("gguf_archs", [])
    paired = archs[types.index(model_type)] if len(types) == len(archs) and model_type in types else None
    default = paired or (archs[0] if archs else None)
    rule = recipe.get("convert", {}).get("gguf_arch")
    if isinstance(rule, dict):
        return rule.get(model_type, default)
    return rule or default

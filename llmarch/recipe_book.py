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


def for_gguf_arch(arch: str) -> dict:
    for recipe in _all():
        if arch in recipe.get("gguf_archs", []):
            return recipe
    return {}


def all_recipes() -> list[dict]:
    return list(_all())

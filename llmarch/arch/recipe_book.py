"""Family knowledge that files do not carry: the recipes/*.toml files, loaded against their schema
(recipe_schema.py). Only the fingerprint looks recipes up; consumers read spec.recipe (and ask
families_supporting for the list a refusal names)."""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from llmarch.arch.recipe_schema import Recipe, parse_recipe
from llmarch.errors import LlmarchError

# what a model no recipe knows gets: every field at its default
NO_RECIPE = Recipe(family="")


def read_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    return parse_recipe(path.read_text(encoding="utf-8"), path.stem, path)


def _recipe_folder():
    """llmarch.recipes as installed; a source checkout used without installing (PYTHONPATH=.) has
    no such package, only the top-level recipes/ folder beside llmarch/."""
    try:
        return files("llmarch.recipes")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "recipes"


@lru_cache(maxsize=1)
def all_recipes() -> tuple[Recipe, ...]:
    folder = _recipe_folder()
    entries = sorted((e for e in folder.iterdir() if e.name.endswith(".toml")), key=lambda e: e.name)
    if not entries:  # every family would silently lose what its recipe says
        raise LlmarchError(f"no family recipes (*.toml) in {folder}; reinstall llmarch")
    return tuple(parse_recipe(e.read_text(encoding="utf-8"), e.name[: -len(".toml")], e) for e in entries)


def for_model_type(model_type: str | None) -> Recipe | None:
    return next((r for r in all_recipes() if model_type and model_type in r.model_types), None)


def for_gguf_arch(arch: str, meta: dict | None = None) -> Recipe | None:
    """The recipe for a GGUF arch; families llama.cpp writes under another family's arch (Olmo 3
    as olmo2) are told apart by their `convert.gguf_marker` key being present in `meta`."""
    for recipe in all_recipes():
        marker = recipe.convert.gguf_marker
        if recipe.convert.gguf_arch == arch and marker and marker.format(arch=arch) in (meta or {}):
            return recipe
    return next((r for r in all_recipes() if arch in r.gguf_archs), None)


def families_supporting(command: str) -> list[str]:
    """The families whose recipe lists `command` (run, convert, from_gguf) in `supports`: the one
    list every refusal of that command names."""
    return [r.family for r in all_recipes() if command in r.supports]


def supported_names(command: str) -> list[str]:
    """families_supporting(command) as a refusal shows it: each family with the other model types
    its recipe covers (qwen3 runs qwen2 too), so a user with a qwen2 checkpoint finds it listed."""
    names = []
    for recipe in all_recipes():
        if command in recipe.supports:
            also = [m for m in recipe.model_types if m != recipe.family]
            names.append(f"{recipe.family} ({', '.join(also)})" if also else recipe.family)
    return names

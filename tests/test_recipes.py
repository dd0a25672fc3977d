"""Family recipes (recipes/*.toml): a schema that refuses unknown keys, every declared key read
somewhere, and one lookup (the fingerprint's) whose result the spec carries."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from llmarch.arch import recipe_schema
from llmarch.arch.recipe_book import all_recipes, read_recipe
from llmarch.errors import LlmarchError

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = [recipe_schema.Recipe, recipe_schema.MoERecipe, recipe_schema.ConvertRecipe, recipe_schema.QkNormRule]


def test_every_shipped_recipe_loads():
    names = sorted(p.stem for p in (ROOT / "recipes").glob("*.toml"))
    assert [r.family for r in all_recipes()] == names


@pytest.mark.parametrize("text,names", [
    ('model_types = ["x"]\nrouter = "sigmoid"\n', ["'router'", "known:"]),  # [moe]'s key at the top level
    ('[moe]\nroutr = "sigmoid"\n', ["'routr'", "[moe]"]),
    ('[convert]\nhf_names = { X = 1 }\n', ["'convert.hf_names.X'", "str"]),
    ('[gguf_defaults]\nsliding_window_patern = 6\n', ["'sliding_window_patern'", "[gguf_defaults]"]),
    ('qk_norm = "per-head"\n', ["'qk_norm'", "per_head"]),
    ('sinks = "yes"\n', ["'sinks'", "bool"]),
    ('family = "other"\n', ["'family'", "file's name"]),
    ('model_types = "x"\n', ["'model_types'", "list"]),
    ('model_types = [\n', ["not valid TOML"]),
])
def test_bad_recipe_names_the_file_and_the_key(tmp_path, text, names):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(LlmarchError) as e:
        read_recipe(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    for part in names:
        assert part in msg, msg


def _names_read_in_llmarch() -> tuple[set[str], set[str]]:
    """(attribute names, string constants) in llmarch/, the schema module left out."""
    attrs, strings = set(), set()
    for path in (ROOT / "llmarch").rglob("*.py"):
        if path.name == "recipe_schema.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute):
                attrs.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.add(node.value)
    return attrs, strings


def test_every_declared_key_is_read():
    """A key no code reads is a promise nothing keeps. Section keys are read as attributes;
    [gguf_defaults] keys are config keys, read by the fingerprint under their own names."""
    attrs, strings = _names_read_in_llmarch()
    unread = [f"{cls.__name__}.{f.name}" for cls in SECTIONS for f in dataclasses.fields(cls) if f.name not in attrs]
    unread += [f"GgufDefaults.{f.name}" for f in dataclasses.fields(recipe_schema.GgufDefaults) if f.name not in strings]
    assert unread == []


def test_every_declared_key_is_set_by_some_recipe():
    """The other half: a key no recipe sets is a branch no family takes (defaults excepted: a
    field whose default is what every family wants is still read)."""
    used: set[str] = set()
    import tomllib

    for p in (ROOT / "recipes").glob("*.toml"):
        table = tomllib.loads(p.read_text())
        for key, value in table.items():
            used.add(key)
            if isinstance(value, dict):
                used.update(f"{key}.{k}" for k in value)
    declared = {f.name for f in dataclasses.fields(recipe_schema.Recipe)} - {"family"}
    for section, cls in (("moe", recipe_schema.MoERecipe), ("convert", recipe_schema.ConvertRecipe),
                         ("gguf_defaults", recipe_schema.GgufDefaults)):
        declared.discard(section)
        declared |= {f"{section}.{f.name}" for f in dataclasses.fields(cls)}
    assert sorted(declared - used) == []


def _importers_of_recipe_book() -> list[str]:
    out = []
    for path in sorted((ROOT / "llmarch").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (
                    node.module == "llmarch.arch.recipe_book"
                    or (node.module == "llmarch.arch" and any(a.name == "recipe_book" for a in node.names))):
                out.append(str(path.relative_to(ROOT)))
            elif isinstance(node, ast.Import) and any(a.name == "llmarch.arch.recipe_book" for a in node.names):
                out.append(str(path.relative_to(ROOT)))
    return out


def test_only_the_fingerprint_looks_recipes_up():
    """Consumers (report, runtime, convert) read spec.family and spec.recipe; a second lookup could
    resolve another recipe (an Olmo 3 GGUF is written under olmo2's arch)."""
    assert _importers_of_recipe_book() == ["llmarch/arch/fingerprint/__init__.py"]


def test_olmo3_gguf_spec_carries_the_olmo3_recipe(tiny, tmp_path):
    """llama.cpp writes Olmo 3 under its olmo2 arch plus a sliding-window key: the spec names the
    family olmo3 and carries olmo3's recipe, which the GGUF weight source reads."""
    from llmarch.api import load_checkpoint_spec
    from llmarch.convert.to_gguf import convert_to_gguf

    out = tmp_path / "olmo3.gguf"
    convert_to_gguf(str(tiny("olmo3")), out, dtype="f32")
    ckpt, spec = load_checkpoint_spec(str(out))
    assert ckpt.metadata["general.architecture"] == "olmo2"
    assert (spec.family, spec.gguf_arch, spec.model_type) == ("olmo3", "olmo2", None)
    assert spec.recipe.family == "olmo3"

"""Family recipes (recipes/*.toml): resolved once, by the fingerprint, and carried by the spec."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
    assert spec.recipe["family"] == "olmo3"

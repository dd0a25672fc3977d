"""Family recipes (recipes/*.toml): a schema that refuses unknown keys, every declared key read
somewhere, and one lookup (the fingerprint's) whose result the spec carries."""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
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


@pytest.mark.parametrize(
    "text,names",
    [
        ('model_types = ["x"]\nrouter = "sigmoid"\n', ["'router'", "known:"]),  # [moe]'s key at the top level
        ('[moe]\nroutr = "sigmoid"\n', ["'routr'", "[moe]"]),
        ("[convert]\nhf_names = { X = 1 }\n", ["'convert.hf_names.X'", "str"]),
        ("[gguf_defaults]\nsliding_window_patern = 6\n", ["'sliding_window_patern'", "[gguf_defaults]"]),
        ('qk_norm = "per-head"\n', ["'qk_norm'", "per_head"]),
        ('sinks = "yes"\n', ["'sinks'", "bool"]),
        ('family = "other"\n', ["'family'", "file's name"]),
        ('model_types = "x"\n', ["'model_types'", "list"]),
        ("model_types = [\n", ["not valid TOML"]),
    ],
)
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
    unread += [
        f"GgufDefaults.{f.name}" for f in dataclasses.fields(recipe_schema.GgufDefaults) if f.name not in strings
    ]
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
    for section, cls in (
        ("moe", recipe_schema.MoERecipe),
        ("convert", recipe_schema.ConvertRecipe),
        ("gguf_defaults", recipe_schema.GgufDefaults),
    ):
        declared.discard(section)
        declared |= {f"{section}.{f.name}" for f in dataclasses.fields(cls)}
    assert sorted(declared - used) == []


def _recipe_book_imports() -> dict[str, set[str]]:
    """llmarch module -> what it imports from the recipe book ({"recipe_book"}: the whole module)."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / "llmarch").rglob("*.py")):
        where = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module == "llmarch.arch.recipe_book":
                out.setdefault(where, set()).update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module == "llmarch.arch":
                out.setdefault(where, set()).update(a.name for a in node.names if a.name == "recipe_book")
            elif isinstance(node, ast.Import) and any(a.name == "llmarch.arch.recipe_book" for a in node.names):
                out.setdefault(where, set()).add("recipe_book")
    return {k: v for k, v in out.items() if v}


def test_only_the_fingerprint_looks_recipes_up():
    """Consumers (report, runtime, convert) read spec.family and spec.recipe; a second lookup could
    resolve another recipe (an Olmo 3 GGUF is written under olmo2's arch). What they may ask the
    book for is the generated list of families a command supports, for their refusals, and
    `llmarch families` lists every recipe (a listing, not a lookup)."""
    allowed = {"llmarch/report/families.py": {"all_recipes"}}
    imports = _recipe_book_imports()
    lookups = [
        p for p, names in imports.items() if names - {"families_supporting", "supported_names"} - allowed.get(p, set())
    ]
    assert lookups == ["llmarch/arch/fingerprint/__init__.py"]


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


COMMANDS = ("run", "convert", "from_gguf")


def _declared_support() -> dict[str, list[str]]:
    """command -> the recipes (by file name) whose `supports` lists it, read with tomllib."""
    import tomllib

    out: dict[str, list[str]] = {c: [] for c in COMMANDS}
    for p in sorted((ROOT / "recipes").glob("*.toml")):
        for command in tomllib.loads(p.read_text()).get("supports", []):
            out[command].append(p.stem)
    return out


def test_support_lists_are_what_the_recipes_declare():
    from llmarch.arch.recipe_book import families_supporting

    declared = _declared_support()
    assert {c: families_supporting(c) for c in COMMANDS} == declared
    assert all(declared.values())


def _one_line_refusal(*args) -> str:
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("LLMARCH_DEBUG", None)
    p = subprocess.run(
        [sys.executable, "-m", "llmarch", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


def _bare_gguf(path: Path, arch: str) -> Path:
    """A GGUF of an arch no recipe converts back, with just enough metadata to fingerprint."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1), w.add_embedding_length(8), w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def test_refusals_name_the_supported_families(tiny, tmp_path):
    declared = _declared_support()
    # a Llama checkpoint under a model_type no recipe knows: inspect reads it, run and convert refuse
    src = tmp_path / "unknown"
    shutil.copytree(tiny("llama"), src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(cfg, model_type="no_recipe_family")))
    refusals = {
        "run": _one_line_refusal("run", src, "--prompt-ids", "1,2", "--device", "cpu"),
        "convert": _one_line_refusal("convert", src, "-o", tmp_path / "q.gguf"),
        "from_gguf": _one_line_refusal(
            "convert", _bare_gguf(tmp_path / "phi3.gguf", "phi3"), "--to", "safetensors", "-o", tmp_path / "back"
        ),
    }
    assert "no_recipe_family" in refusals["run"] and "no_recipe_family" in refusals["convert"]
    assert "phi3" in refusals["from_gguf"]
    for command, line in refusals.items():
        assert "not supported" in line, line
        named = line[line.index("support") :]
        assert all(f in named for f in declared[command]), (command, line)


def test_runtime_and_convert_never_branch_on_a_family_name():
    """run and convert ask the spec for facts (router kind, clamped SwiGLU, gated FFN, supports),
    never which family a model is: no comparison with, and no table lookup by, a family name."""
    labels = {"family", "model_type", "text_family"}
    offenders = []
    for folder in ("runtime", "convert"):
        for path in sorted((ROOT / "llmarch" / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                operands = []
                if isinstance(node, ast.Compare):
                    operands = [node.left, *node.comparators]
                elif isinstance(node, ast.Subscript):
                    operands = [node.slice]
                if any(isinstance(o, ast.Attribute) and o.attr in labels for o in operands):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_readme_family_table_is_the_generated_one():
    """README's table of families and supported commands is `llmarch families --markdown`'s output."""
    import re

    from llmarch.report.families import markdown_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    found = re.search(r"<!-- families:begin -->\n(.*?)<!-- families:end -->", readme, re.S)
    assert found and found.group(1) == markdown_table(), "regenerate with: llmarch families --markdown"


def test_families_command_lists_every_recipe():
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "llmarch", "families", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = {r["family"]: r for r in json.loads(out.stdout)}
    declared = {p.stem for p in (Path(__file__).resolve().parents[1] / "recipes").glob("*.toml")}
    assert set(rows) == declared
    both = subprocess.run(
        [sys.executable, "-m", "llmarch", "families", "--json", "--markdown"], capture_output=True, text=True
    )
    assert both.returncode == 2 and both.stderr.count("\n") == 1 and "exclusive" in both.stderr

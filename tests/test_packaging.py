"""The package as installed: every subpackage listed, the recipes (a top-level folder in the
repository) and the C kernel source shipped inside it, for an editable and a plain install."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib.resources import files
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_table() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_subpackage_is_listed():
    table = _setuptools_table()
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "llmarch").rglob("__init__.py")}
    mapped = set(table.get("package-dir", {}))
    assert set(table["packages"]) == on_disk | mapped


def test_installed_package_finds_every_recipe():
    """Whatever way llmarch is installed here (CI: `pip install -e`), the recipe book reads the
    top-level recipes/ folder's files."""
    installed = sorted(e.name for e in files("llmarch.recipes").iterdir() if e.name.endswith(".toml"))
    assert installed == sorted(p.name for p in (ROOT / "recipes").glob("*.toml"))


@pytest.mark.slow
def test_plain_install_ships_recipes_and_kernel_source(tmp_path):
    build = ["--no-build-isolation"] if _has_setuptools() else []
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", *build, "--target", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    pkg = tmp_path / "llmarch"
    assert sorted(p.name for p in (pkg / "recipes").glob("*.toml")) == sorted(
        p.name for p in (ROOT / "recipes").glob("*.toml")
    )
    shipped_c = {p.relative_to(pkg) for p in pkg.rglob("*.c")}
    assert shipped_c == {p.relative_to(ROOT / "llmarch") for p in (ROOT / "llmarch").rglob("*.c")} and shipped_c
    # and a fresh interpreter on that copy finds them as package resources, as the recipe book does
    code = "import llmarch.recipes as r; from importlib.resources import files; print(r.__file__, len(list(files(r).iterdir())))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert out.stdout.startswith(str(pkg / "recipes"))


def _has_setuptools() -> bool:
    try:
        import setuptools  # noqa: F401
    except ImportError:
        return False
    return True

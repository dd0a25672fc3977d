"""cbuild: a library of several translation units compiled side by side links into one .so; a unit
that does not compile leaves nothing in the cache (no library, no temporary folder)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from llmarch.runtime import cbuild

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc)")

MAIN = "int twice(int x);\nint four_times(int x) { return twice(twice(x)); }\n"
PART = "int twice(int x) { return 2 * x; }\n"


def test_units_compiled_side_by_side_link_into_one_library(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMARCH_CACHE", str(tmp_path))
    lib = cbuild.build("two_units", MAIN, ["-O1"], (PART,))
    assert lib.four_times(3) == 12 and lib.twice(5) == 10
    assert [p.suffix for p in (tmp_path / "kernels").iterdir()] == [".so"]
    again = cbuild.build("two_units", MAIN, ["-O1"], (PART,))  # from the cache: same file, no compile
    assert again._name == lib._name


def test_a_unit_that_fails_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMARCH_CACHE", str(tmp_path))
    with pytest.raises(subprocess.CalledProcessError):
        cbuild.build("broken", MAIN, ["-O1"], ("int twice(int x) { return x +; }\n",))
    assert list((tmp_path / "kernels").iterdir()) == []

"""Session fixtures: tiny checkpoints of every family, built at most once per session.

    tiny(name) -> Path          tiny random checkpoint of fixtures/families.py's `name`
                                (pytest.skip when the installed transformers lacks the family)
    deepseek_v3_skeleton        full-size DeepSeek-V3 header-only checkpoint (sparse files)
    tiny_gguf(arch) -> Path     tiny GGUF written with gguf-py (arch "llama" or "gemma3")
    device                      LLMARCH_TEST_DEVICE for the parity tests (default cpu)

Building all ~24 families takes a few seconds on 2 cores (transformers' import dominates).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fixtures.families import FAMILIES, available  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Factory: tiny(name, **overrides) -> checkpoint folder, cached per session."""
    cache: dict[tuple, Path] = {}
    base = tmp_path_factory.mktemp("tiny")

    def build(name: str, **overrides) -> Path:
        if name not in FAMILIES:
            raise KeyError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
        ok, why = available(name)
        if not ok:
            pytest.skip(f"{name}: {why}")
        key = (name, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            from fixtures.make import make_tiny

            out = base / (name if not overrides else f"{name}-{len(cache)}")
            cache[key] = make_tiny(name, out, **overrides)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def device():
    """The parity tests' device: LLMARCH_TEST_DEVICE (default cpu), skipped where it names a GPU
    this machine lacks."""
    import torch

    from fixtures.parity import DEVICE

    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("LLMARCH_TEST_DEVICE=cuda but no GPU")
    return DEVICE


@pytest.fixture(scope="session")
def deepseek_v3_skeleton(tmp_path_factory) -> Path:
    """DeepSeek-V3 (671B + 14B MTP) as 163 sparse BF16 shards: headers only, no disk used."""
    ok, why = available("deepseek_v3")
    if not ok:
        pytest.skip(why)
    from fixtures.make import make_skeleton

    return make_skeleton("deepseek_v3", tmp_path_factory.mktemp("deepseek_v3_skeleton"), shards=163)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    cache: dict[str, Path] = {}
    base = tmp_path_factory.mktemp("gguf")

    def build(arch: str = "llama", **kw) -> Path:
        key = arch + repr(sorted(kw.items()))
        if key not in cache:
            from fixtures.make import make_gguf

            cache[key] = make_gguf(base / f"tiny-{arch}-{len(cache)}.gguf", arch=arch, **kw)
        return cache[key]

    return build

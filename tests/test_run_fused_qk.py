"""The GPU prefill's fused q/k path (ops/attention.py: q and k heads through their per-head norms
and RoPE as one tensor) against transformers, run on the CPU by letting the CPU take it: prefill
logits and 32 cached decode steps within 1e-4, the same greedy tokens (fixtures/parity.py). The
GPU runs the same code (LLMARCH_TEST_DEVICE=cuda runs test_run_parity.py through it)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fixtures.parity import check_parity  # noqa: E402


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3_text"])  # plain, per-head QK-norm, + sliding window
def test_fused_qk_prefill_matches_transformers(tiny, name, monkeypatch):
    from fixtures.reference import reference_model
    from llmarch.runtime.ops import attention

    calls = []
    fused = attention.Attention.forward_fused_qk
    monkeypatch.setattr(attention, "FUSED_QK_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(attention.Attention, "forward_fused_qk", lambda *a: calls.append(1) or fused(*a))
    path = tiny(name)
    check_parity(path, reference_model(name, path, "cpu"), "cpu", 24, 32)
    assert calls, "the prefill did not take the fused path"

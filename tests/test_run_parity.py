"""llmarch run vs transformers on tiny random float32 checkpoints, one per dense family.

For each family: prefill logits and the logits of every cached decode step match transformers'
forward on the same ids within 1e-4 (max abs), and 32 greedy tokens are identical. Sliding-window
families (window 16) run prompt + generation well past the window. LLMARCH_TEST_DEVICE=cuda runs
the same checks on a GPU (the decode there goes through the captured CUDA graph as well).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fixtures.parity import DEVICE, check_generator, check_parity  # noqa: E402

STEPS = 32
PROMPT = 24  # > the tiny sliding window (16); prompt + 32 steps = 56 positions

CASES = {
    "gpt2": ("gpt2", {}),
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "mistral3": ("mistral3", {}),
    "qwen3": ("qwen3", {}),
    "seed_oss": ("seed_oss", {}),
    "smollm3": ("smollm3", {}),
    "olmo2": ("olmo2", {}),
    "olmo3": ("olmo3", {}),
    "gemma3_text": ("gemma3_text", {}),
    "gemma3": ("gemma3", {}),
    # soft-capping where configured: Gemma 3's final-logit cap (attention caps: test_run_ops.py)
    "gemma3_text-softcap": ("gemma3_text", {"attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0}),
}


def _reference(name: str, path):
    from fixtures.reference import reference_model

    return reference_model(name, path, DEVICE)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_match_transformers(tiny, device, case):
    name, overrides = CASES[case]
    path = tiny(name, **overrides)
    spec = check_parity(path, _reference(name, path), device, PROMPT, STEPS).spec
    if overrides:  # Gemma 3 applies the final cap only (its attention ignores attn_logit_softcapping)
        assert spec.attention.softcap is None
        assert spec.final_softcap == overrides["final_logit_softcapping"]


@pytest.mark.parametrize("case", ["llama", "gemma3_text", "olmo3"])
def test_generator_greedy_matches_transformers(tiny, device, case):
    """The Generator path (chunked prefill; CUDA graph decode on a GPU) gives transformers' greedy tokens."""
    name, overrides = CASES[case]
    path = tiny(name, **overrides)
    check_generator(path, _reference(name, path), device, PROMPT, STEPS)

"""llmarch run vs transformers on tiny random float32 checkpoints, one per dense family.

For each family: prefill logits and the logits of every cached decode step match transformers'
forward on the same ids within 1e-4 (max abs), and 32 greedy tokens are identical. Sliding-window
families (window 16) run prompt + generation well past the window. LLMARCH_TEST_DEVICE=cuda runs
the same checks on a GPU (the decode there goes through the captured CUDA graph as well).
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


DEVICE = os.environ.get("LLMARCH_TEST_DEVICE", "cpu")
TOL = 1e-4
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


@pytest.fixture(scope="module")
def device():
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("LLMARCH_TEST_DEVICE=cuda but no GPU")
    return DEVICE


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_match_transformers(tiny, device, case):
    from llmarch.runtime.kv_cache import KVCache
    from llmarch.runtime.load import load_runtime

    name, overrides = CASES[case]
    path = tiny(name, **overrides)
    rt = load_runtime(str(path), device, "float32")
    ref = _reference(name, path)
    spec, model = rt.spec, rt.model
    a = spec.attention
    if overrides:  # Gemma 3 applies the final cap only (its attention ignores attn_logit_softcapping)
        assert spec.attention.softcap is None
        assert spec.final_softcap == overrides["final_logit_softcapping"]
    max_seq = PROMPT + STEPS
    cache = KVCache(spec.schedule, max_seq, a.kv_heads, a.head_dim, a.v_head_dim or a.head_dim, torch.float32, device)
    model.setup(max_seq, device, torch.float32)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, spec.vocab_size, (1, PROMPT), generator=gen).to(device)

    with torch.inference_mode():
        mine = model(ids, torch.arange(PROMPT, device=device), cache, limit=PROMPT, last_only=False)
        theirs = ref(ids).logits
        assert mine.shape == theirs.shape
        err = (mine - theirs).abs().max().item()
        assert err < TOL, f"prefill logits differ by {err}"
        seq = ids
        worst = 0.0
        for step in range(STEPS):
            mine_tok = mine[0, -1].argmax().item()
            their_tok = theirs[0, -1].argmax().item()
            assert mine_tok == their_tok, f"greedy token {step} differs: {mine_tok} vs {their_tok}"
            seq = torch.cat([seq, torch.tensor([[mine_tok]], device=device)], dim=1)
            n = seq.shape[1]
            mine = model(seq[:, -1:], torch.tensor([n - 1], device=device), cache, limit=n)
            theirs = ref(seq).logits[:, -1:]
            worst = max(worst, (mine - theirs).abs().max().item())
        assert worst < TOL, f"cached decode logits differ by up to {worst}"
    if any(l.mixer == "sliding" for l in spec.schedule):
        assert seq.shape[1] > 2 * min(l.window for l in spec.schedule if l.mixer == "sliding")


@pytest.mark.parametrize("case", ["llama", "gemma3_text", "olmo3"])
def test_generator_greedy_matches_transformers(tiny, device, case):
    """The Generator path (chunked prefill; CUDA graph decode on a GPU) gives transformers' greedy tokens."""
    from llmarch.runtime import generate as g
    from llmarch.runtime.load import load_runtime

    name, overrides = CASES[case]
    path = tiny(name, **overrides)
    rt = load_runtime(str(path), device, "float32")
    ref = _reference(name, path)
    prompt = torch.randint(3, rt.spec.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    old = g.PREFILL_CHUNK
    g.PREFILL_CHUNK = 10  # several prefill chunks, one longer than nothing but shorter than the window
    try:
        res = g.Generator(rt, PROMPT + STEPS).generate(prompt[0].tolist(), STEPS, g.Sampling())
    finally:
        g.PREFILL_CHUNK = old
    seq = prompt.to(device)
    with torch.inference_mode():
        for _ in range(STEPS):
            nxt = ref(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert res.tokens == seq[0, PROMPT:].tolist()

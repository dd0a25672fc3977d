"""The CUDA-graph prefill (runtime/prefill_graph.py): a prompt padded at its end to a captured
length gives the logits and greedy tokens of transformers on the unpadded prompt (the oracle:
transformers' eager model, float32, recomputed over the whole sequence), on the CPU through the
padded eager prefill (the same forward the graph records), and on a GPU (LLMARCH_TEST_DEVICE=cuda)
through captured graphs and their replays; and the models where padding is not exact (ring
windows, MoE, linear attention) keep the eager prefill."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fixtures.parity import TOL, reference_tokens  # noqa: E402


def _runtime(path, device):
    from llmarch.runtime.load import load_runtime

    return load_runtime(str(path), device, "float32")


def _prompt(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# name, prompt length, decode steps: gemma3_text's room (prompt + steps) stays within its 16-token
# window, so its sliding layers are plain buffers; its bucket is capped at that room (15, not 16)
CASES = [("llama", 11, 8), ("qwen3", 40, 6), ("gemma3_text", 11, 4)]


@pytest.mark.parametrize(("name", "n", "steps"), CASES)
def test_padded_prefill_matches_transformers(tiny, name, n, steps):
    from fixtures.reference import reference_model
    from llmarch.runtime import prefill_graph
    from llmarch.runtime.generate import Generator, Sampling

    path = tiny(name)
    rt = _runtime(path, "cpu")
    ref = reference_model(name, path, "cpu")
    prompt = _prompt(rt.spec.vocab_size, n, 3)
    g = Generator(rt, n + steps, cuda_graph=False)
    assert prefill_graph.padding_exact(rt.spec, g.cache, rt.model)
    b = prefill_graph.bucket(n, n + steps)
    assert b > n, "the case must pad"
    g.prefill_graphs = pg = prefill_graph.PrefillGraphs(rt.model, g.cache, "cpu", capture=False)
    with torch.inference_mode():
        assert pg.run(prompt) == (None, False), "a bucket's first prompt prefills unpadded"
        logits, pending = pg.run(prompt)
        want = ref(torch.tensor([prompt])).logits[:, -1]
    assert not pending
    err = (logits - want).abs().max().item()
    assert err < TOL, f"padded prefill logits differ from transformers' by {err}"
    want_tokens = reference_tokens(ref, torch.tensor([prompt]), steps)
    g.prefill_graphs = prefill_graph.PrefillGraphs(rt.model, g.cache, "cpu", capture=False)
    for _ in range(2):  # unpadded, then padded: the pads' cache slots are overwritten as it decodes
        assert g.generate(prompt, steps, Sampling()).tokens == want_tokens


def test_bucket_lengths():
    from llmarch.runtime.prefill_graph import BUCKETS, bucket

    assert bucket(1, 1000) == BUCKETS[0]
    assert bucket(BUCKETS[0] + 1, 1000) == BUCKETS[1]
    assert bucket(BUCKETS[-1], 1000) == BUCKETS[-1]
    assert bucket(BUCKETS[-1] + 1, 10_000) is None  # longer prompts: the eager chunks
    assert bucket(5, 9) == 9  # never past the cache
    assert bucket(10, 9) is None


@pytest.mark.parametrize(
    ("name", "max_seq", "why"),
    [
        ("gemma3_text", 64, "ring"),  # window 16 < 64 positions: a ring buffer
        ("qwen3_moe", 32, "moe"),
        ("qwen3_next", 32, "linear attention state"),
    ],
)
def test_padding_not_exact_keeps_eager(tiny, name, max_seq, why):
    from llmarch.runtime import prefill_graph
    from llmarch.runtime.generate import Generator

    rt = _runtime(tiny(name), "cpu")
    g = Generator(rt, max_seq, cuda_graph=False)
    assert not prefill_graph.padding_exact(rt.spec, g.cache, rt.model), why


def test_cuda_graph_prefill_replays_match_transformers(tiny, device, monkeypatch):
    """Prompts of two buckets in turn: each gives transformers' greedy tokens; a bucket's first
    prompt runs unpadded and eagerly, its second padded and then captured, later ones replay."""
    if not device.startswith("cuda"):
        pytest.skip("needs LLMARCH_TEST_DEVICE=cuda")
    from fixtures.reference import reference_model
    from llmarch.runtime.generate import Generator, Sampling

    path = tiny("llama")
    rt = _runtime(path, device)
    ref = reference_model("llama", path, "cpu")
    steps = 6
    g = Generator(rt, 64 + steps)
    assert g.prefill_graphs is not None
    prompts = [_prompt(rt.spec.vocab_size, n, s) for n, s in ((20, 1), (27, 2), (9, 3), (20, 4), (9, 5), (12, 6))]
    captured = []
    for p in prompts:
        res = g.generate(p, steps, Sampling())
        assert "prefill_capture_failed" not in res.extra, res.extra
        captured.append("prefill_capture_s" in res.extra)
        assert res.tokens == reference_tokens(ref, torch.tensor([p]), steps)
    assert captured == [False, True, False, False, True, False]
    assert set(g.prefill_graphs.graphs) == {16, 32}

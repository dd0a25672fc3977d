"""The captured decode step's greedy choice (generate.greedy_choice: the argmax as per-row maxima,
then the best row) against torch.argmax, the definition: random logits of real vocabulary sizes,
equal maxima far apart, many ties, a masked half, a size with no divisor to split by."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("V", [128256, 151936, 262144, 32000, 151665, 100])
def test_greedy_choice_is_argmax(V):
    from llmarch.runtime.generate import greedy_choice

    gen = torch.Generator().manual_seed(V)
    for trial in range(12):
        x = torch.randn(1, V, generator=gen)
        if trial % 3 == 0:  # two equal maxima: argmax takes the first
            i, j = sorted(torch.randint(0, V, (2,), generator=gen).tolist())
            x[0, i] = x[0, j] = 100.0
        if trial % 3 == 1:
            x = x.round()  # many ties
        if trial % 4 == 3:
            x[0, : V // 2] = float("-inf")
        got = greedy_choice(x)
        assert got.shape == (1, 1)
        assert got.item() == x.argmax(-1).item(), f"V={V} trial {trial}"
        x16 = x.to(torch.bfloat16)  # the captured step's dtype: more ties
        assert greedy_choice(x16).item() == x16.argmax(-1).item(), f"V={V} trial {trial} (bf16)"


def test_greedy_choice_inside_a_cuda_graph():
    """Captured and replayed on a GPU (the decode step's use): no host read during capture, and
    each replay gives argmax of the logits then in the static buffer."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from llmarch.runtime.generate import greedy_choice

    logits = torch.zeros(1, 128256, device="cuda", dtype=torch.bfloat16)
    greedy_choice(logits)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = greedy_choice(logits)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(5):
        logits.copy_(torch.randn(logits.shape, device="cuda", generator=gen))
        graph.replay()
        assert out.item() == logits.argmax(-1).item()

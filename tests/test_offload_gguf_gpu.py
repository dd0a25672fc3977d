"""A MoE GGUF run as `llmarch run FILE --experts cpu` runs it on a GPU: the routed experts' blocks
as stored on the host, the other matrices from the file's own blocks on CUDA (gguf_cuda), and the
decode step as CUDA graphs between host round trips (the SegmentedDecoder). The graphs must give
the tokens of the same runtime stepped eagerly, with no graph."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")
pytest.importorskip("transformers")
pytestmark = pytest.mark.gpu

from tests.test_offload import PROMPT, SLICE, STEPS  # noqa: E402


def tiny_moe_ggufs(tiny, folder) -> dict:
    """test_offload's tiny Qwen3-MoE as q8_0 and q4_0 GGUFs in folder, by quant name."""
    from llmarch.convert.to_gguf import convert_to_gguf

    src = tiny("qwen3_moe", **SLICE)
    files = {q: folder / f"qwen3_moe-{q}.gguf" for q in ("q8_0", "q4_0")}
    for q, out in files.items():
        convert_to_gguf(str(src), out, q)
    return files


@pytest.fixture(scope="module")
def ggufs(tiny, tmp_path_factory):
    return tiny_moe_ggufs(tiny, tmp_path_factory.mktemp("moe_gguf_gpu"))


@pytest.mark.parametrize("q", ["q8_0", "q4_0"])
def test_stored_blocks_in_segment_graphs_give_the_eager_tokens(ggufs, q):
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    from llmarch.runtime.experts.decode import attach_decoder
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime

    ids = torch.randint(3, 128, (PROMPT,), generator=torch.Generator().manual_seed(5)).tolist()

    def tokens(graphs: bool) -> tuple[list[int], list[str]]:
        rt = load_runtime(str(ggufs[q]), "cuda", "bfloat16", experts="cpu", stored_blocks=True)
        gen = Generator(rt, PROMPT + STEPS + 1, cuda_graph=None if graphs else False)
        if graphs:
            assert attach_decoder(gen)
            assert gen._step_eager.__self__.graphs
        return gen.generate(ids, STEPS, Sampling()).tokens, list(rt.notes)

    want, notes = tokens(False)
    assert len(set(want)) > 3
    assert any(f"the GGUF's {q.upper()} blocks used as stored" in n for n in notes)
    assert any("stored blocks on CUDA" in n for n in notes), notes
    got, _ = tokens(True)
    assert got == want

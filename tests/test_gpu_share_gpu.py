"""The GPU share in a decode step on a GPU (experts/gpu_share.py through the SegmentedDecoder): a
tiny Qwen3-MoE GGUF (Q4_0, Q8_0) with its experts on the host, LLMARCH_MOE_GPU_SLOTS forcing a share
(its experts are far under MIN_EXPERT_BYTES). Teacher-forced decode steps, logits against the same
file with its experts resident on the GPU in float (the reference): with 2 of the 4 experts on the
GPU (float input) the logits are no further from the reference than the CPU kernel alone (int8
input) is, give or take; a wrong slot, weight or pack layout lands a whole expert away. The host
memory the GPU reads is pinned once for any number of decoders and unpinned with the last."""

from __future__ import annotations

import gc

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")
pytest.importorskip("transformers")
pytestmark = pytest.mark.gpu

from tests.test_offload import PROMPT  # noqa: E402
from tests.test_offload_gguf_gpu import tiny_moe_ggufs  # noqa: E402

STEPS = 12


@pytest.fixture(scope="module")
def ggufs(tiny, tmp_path_factory):
    return tiny_moe_ggufs(tiny, tmp_path_factory.mktemp("gpu_share"))


def forced_logits(path, experts: str, slots: str | None, monkeypatch) -> tuple[torch.Tensor, object]:
    from llmarch.runtime.experts.decode import attach_decoder
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime

    if slots is not None:
        monkeypatch.setenv("LLMARCH_MOE_GPU_SLOTS", slots)
    rt = load_runtime(str(path), "cuda", "bfloat16", experts=experts, stored_blocks=True)
    gen = Generator(rt, PROMPT + STEPS + 8, cuda_graph=False)
    dec = None
    if experts == "cpu":
        assert attach_decoder(gen)
        dec = gen._step_eager.__self__
    g = torch.Generator().manual_seed(11)
    prompt = torch.randint(3, 128, (PROMPT,), generator=g).tolist()
    feed = torch.randint(3, 128, (STEPS,), generator=g).tolist()
    gen.generate(prompt, 2, Sampling())  # prefill, warm-up, capture
    gen.generate(prompt, 1, Sampling())  # the cache holds the prompt again, from position 0
    out = []
    with torch.inference_mode():
        for i, t in enumerate(feed):
            logits = gen._step_eager(torch.tensor([[t]], device="cuda"), PROMPT + i)
            out.append(logits.float().clone())
    monkeypatch.delenv("LLMARCH_MOE_GPU_SLOTS", raising=False)
    return torch.cat(out), (dec, rt)


@pytest.mark.parametrize("q", ["q4_0", "q8_0"])
def test_share_logits_match_the_cpu_kernels(ggufs, q, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    ref, _ = forced_logits(ggufs[q], "gpu", None, monkeypatch)
    cpu, (dec0, _) = forced_logits(ggufs[q], "cpu", "0", monkeypatch)
    share, (dec2, rt) = forced_logits(ggufs[q], "cpu", "2", monkeypatch)
    assert dec0.slots == 0 and dec2.slots == 2 and dec2.kc == 2 and dec2.graphs
    assert any("the GPU reads 2 of a token's 4 experts" in n for n in rt.notes), rt.notes
    scale = ref.abs().max().item()
    err_cpu = (cpu - ref).abs().max().item() / scale
    err_share = (share - ref).abs().max().item() / scale
    assert err_cpu < 0.1, err_cpu
    assert err_share < 1.5 * err_cpu + 0.01, (err_share, err_cpu)


def test_pinned_once_for_two_decoders(ggufs, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    from llmarch.runtime.experts import gpu_share
    from llmarch.runtime.experts.decode import SegmentedDecoder
    from llmarch.runtime.generate import Generator
    from llmarch.runtime.load import load_runtime

    monkeypatch.setenv("LLMARCH_MOE_GPU_SLOTS", "1")
    rt = load_runtime(str(ggufs["q4_0"]), "cuda", "bfloat16", experts="cpu", stored_blocks=True)
    gen = Generator(rt, 32, cuda_graph=False)
    before = dict(gpu_share._PINNED)
    a = SegmentedDecoder(rt.model, gen.cache, rt.device)
    b = SegmentedDecoder(rt.model, gen.cache, rt.device)
    assert a.slots == b.slots == 1
    mine = {r: n for r, n in gpu_share._PINNED.items() if r not in before}
    assert mine and all(n == 2 for n in mine.values())
    del a
    gc.collect()
    assert all(gpu_share._PINNED[r] == 1 for r in mine)
    del b
    gc.collect()
    assert not any(r in gpu_share._PINNED for r in mine)

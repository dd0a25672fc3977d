"""The sync-free resident-experts path (stores.routed_static) that lets a MoE decode step be one
CUDA graph, and the segmented decoder's graphs over hybrid mixers.

On this machine's CPU: both forms of routed_static (gathered weights + bmm, torch._grouped_mm with
empty groups) equal the grouped expert loop within float32 rounding (gated / non-gated, biases,
weights on the input, one expert chosen by several tokens, experts nobody chose); the model with
the static path forced gives transformers' logits within 1e-4 at prefill and 32 cached decode steps
and its greedy tokens (softmax router; gpt-oss's top-k-then-softmax router, clamped SwiGLU and
biases; GLM-4.5's grouped sigmoid router with correction bias and shared expert); which models
`llmarch run` captures whole. With LLMARCH_TEST_DEVICE=cuda: the Generator's captured decode gives
transformers' greedy tokens for MoE, MLA and hybrid MoE families, and the segmented decoder
replays its segments as graphs over Gated DeltaNet, KDA and Mamba-2 layers with the experts on
the host, giving the tokens of all experts on the device.
"""

from __future__ import annotations

from unittest.mock import patch

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from fixtures.parity import check_parity, own_cache, reference_tokens  # noqa: E402
from tests.test_offload_nemotron import SIZES as NEMOTRON_SIZES  # noqa: E402

PROMPT, STEPS = 24, 32
HYBRID = {
    "qwen3_next": dict(num_hidden_layers=8),
    "qwen3_5_moe_text": dict(num_hidden_layers=8),
    "kimi_linear": dict(
        num_hidden_layers=8,
        linear_attn_config=dict(
            head_dim=8, num_heads=4, short_conv_kernel_size=4, kda_layers=[1, 2, 3, 5, 6, 7], full_attn_layers=[4, 8]
        ),
    ),
    "nemotron_h": NEMOTRON_SIZES,  # widths of 64 multiples, as the host expert stores need
    # sparse attention that selects: 8 of the 24-token prompt's keys (8 indexer heads, as
    # tests/test_run_dsa.py explains)
    "deepseek_v32": dict(index_n_heads=8, index_topk=8),
    "glm_moe_dsa": dict(index_n_heads=8, index_topk=8),
}
OWN_CACHE = {"kimi_linear": "cache", "nemotron_h": "cache"}  # as their own parity tests decode them


def _reference(name, path, device):
    from fixtures.reference import reference_model

    ref = reference_model(name, path, device)
    return own_cache(ref, OWN_CACHE[name]) if name in OWN_CACHE else ref


def _store(E, d, inter, bias, gated, seed=0):
    from llmarch.runtime.experts.stores import ResidentExperts

    g = torch.Generator().manual_seed(seed)
    rows = 2 * inter if gated else inter
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    biases = (r(E, rows), r(E, d)) if bias else (None, None)
    return ResidentExperts(E, d, inter, bias, gated).load(r(E, rows, d), r(E, d, inter), biases, torch.float32, "cpu")


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("bias,gated,weight_input", [(False, True, False), (True, True, False), (True, False, True)])
def test_static_forms_equal_the_grouped_loop(grouped, bias, gated, weight_input):
    import torch.nn.functional as F

    from llmarch.runtime.experts.stores import ExpertStore

    E, d, inter = 8, 32, 16
    st = _store(E, d, inter, bias, gated)
    act = (lambda gu: F.silu(gu[..., :inter]) * gu[..., inter:]) if gated else torch.relu
    g = torch.Generator().manual_seed(1)
    for T, k in ((1, 4), (5, 3)):
        x = torch.randn(T, d, generator=g)
        # k distinct experts per token out of the first 6: the last two chosen by nobody (empty
        # groups), and with 5 tokens some expert chosen by several
        idx = torch.stack([torch.randperm(E - 2, generator=g)[:k] for _ in range(T)])
        assert T == 1 or len(set(idx.flatten().tolist())) < idx.numel()
        w = torch.rand(T, k, generator=g)
        want = ExpertStore.forward(st, x, idx, w, act, weight_input)
        got = st.static(x, idx, w, act, weight_input, grouped=grouped)
        assert got.shape == want.shape
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < 1e-6, f"T={T}: relative difference {err}"


def _static_everywhere(grouped: bool):
    """ResidentExperts.forward taking routed_static for decode-sized calls on any device (the CPU
    keeps the grouped loop otherwise)."""
    from llmarch.runtime.experts import stores

    def forward(self, x, idx, w, act, weight_input=False):
        if idx.numel() <= stores.STATIC_ROWS:
            return self.static(x, idx, w, act, weight_input, grouped=grouped)
        return stores.ExpertStore.forward(self, x, idx, w, act, weight_input)

    return patch.object(stores.ResidentExperts, "forward", forward)


@pytest.mark.parametrize("name,grouped", [("qwen3_moe", True), ("gpt_oss", False), ("glm4_moe", True)])
def test_static_path_matches_transformers(tiny, name, grouped):
    """Prefill (24 tokens x k rows: the grouped loop) then 32 decode steps through routed_static."""
    path = tiny(name)
    calls = []
    with _static_everywhere(grouped):
        from llmarch.runtime.experts.stores import ResidentExperts

        static = ResidentExperts.static
        with patch.object(ResidentExperts, "static", lambda *a, **kw: calls.append(1) or static(*a, **kw)):
            check_parity(path, own_cache(_reference(name, path, "cpu")), "cpu", PROMPT, STEPS)
    assert calls  # the decode steps took it


@pytest.mark.parametrize(
    "name,kw,whole",
    [
        ("qwen3_moe", {}, True),
        ("qwen3_moe", dict(experts="cpu", expert_bits=16), False),  # host experts: segmented decoder
        ("qwen3_next", {}, True),  # Gated DeltaNet + gated attention
        ("nemotron_h", {}, True),  # Mamba-2, FFN-only layers
        ("llama4", {}, False),  # chunked attention reads the position on the host
        ("deepseek_v3", {}, True),  # MLA
        ("kimi_linear", {}, True),  # KDA + NoPE MLA
        ("deepseek_v32", {}, True),  # MLA with a sparse-attention indexer: static top-k and gather
    ],
)
def test_which_models_run_captures_whole(tiny, name, kw, whole):
    from llmarch.runtime.experts.decode import whole_step_capturable
    from llmarch.runtime.load import load_runtime

    rt = load_runtime(str(tiny(name, **HYBRID.get(name, {}))), "cpu", "float32", **kw)
    assert whole_step_capturable(rt.model) is whole


def _cuda(device):
    if not device.startswith("cuda"):
        pytest.skip("needs LLMARCH_TEST_DEVICE=cuda")


@pytest.mark.parametrize(
    "name",
    [
        "qwen3_moe",
        "gpt_oss",
        "glm4_moe",
        "minimax_m2",
        "mimo_v2_flash",
        "qwen3_next",
        "qwen3_5_moe_text",
        "nemotron_h",
        "deepseek_v3",  # MLA
        "mistral4",  # MLA, softmax router with groups
        "kimi_linear",  # KDA + NoPE MLA
        "deepseek_v32",  # MLA + sparse-attention indexer: top-k and gather inside the graph
        "glm_moe_dsa",
    ],
)
def test_graph_decode_matches_transformers(tiny, device, name):
    """`llmarch run`'s Generator for a MoE model with resident experts captures the step and its
    greedy tokens are transformers', twice on one cache (capture warm-up left the state as it was)."""
    _cuda(device)
    from llmarch.runtime.experts.decode import whole_step_capturable
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime

    path = tiny(name, **HYBRID.get(name, {}))
    ids = torch.randint(3, 128, (1, PROMPT), generator=torch.Generator().manual_seed(4))
    expected = reference_tokens(_reference(name, path, device), ids.to(device), STEPS)
    rt = load_runtime(str(path), device, "float32")
    assert whole_step_capturable(rt.model)
    gen = Generator(rt, PROMPT + STEPS)
    for _ in range(2):
        assert gen.generate(ids[0].tolist(), STEPS, Sampling()).tokens == expected
    assert gen.graph is not None


@pytest.mark.parametrize("name", ["qwen3_next", "qwen3_5_moe_text", "kimi_linear", "nemotron_h"])
def test_segmented_graphs_over_hybrid_mixers(tiny, device, name):
    """--experts cpu (16-bit): the segments between host round trips are captured graphs over the
    linear mixers, and the tokens are those of all experts on the device, twice on one cache."""
    _cuda(device)
    from llmarch.runtime.experts.decode import attach_decoder
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime

    path = str(tiny(name, **HYBRID.get(name, {})))
    ids = torch.randint(3, 128, (PROMPT,), generator=torch.Generator().manual_seed(4)).tolist()
    resident = Generator(load_runtime(path, device, "float32"), PROMPT + STEPS, cuda_graph=False)
    want = resident.generate(ids, STEPS, Sampling()).tokens
    gen = Generator(load_runtime(path, device, "float32", experts="cpu", expert_bits=16), PROMPT + STEPS)
    assert attach_decoder(gen)
    decoder = gen._step_eager.__self__
    assert decoder.graphs
    for _ in range(2):
        assert gen.generate(ids, STEPS, Sampling()).tokens == want
    assert decoder.captured


@pytest.mark.parametrize("name,kw,captured", [("qwen3_moe", {}, True), ("qwen3_moe", dict(experts="cpu"), False)])
def test_run_captures_resident_experts(tiny, device, name, kw, captured):
    """`llmarch run` on a GPU: with the experts resident the Generator captures the step (once) and
    gives transformers' greedy tokens; with them on the host it does not (segmented decoder)."""
    _cuda(device)
    from llmarch.runtime import generate as g
    from llmarch.runtime.run import RunOptions, run

    path = tiny(name)
    ids = torch.randint(3, 128, (1, PROMPT), generator=torch.Generator().manual_seed(4))
    expected = reference_tokens(_reference(name, path, device), ids.to(device), 8)
    capture = g.Generator._capture
    calls = []
    with patch.object(g.Generator, "_capture", lambda self, pos: calls.append(pos) or capture(self, pos)):
        doc = run(
            RunOptions(
                source=str(path),
                prompt_ids=",".join(map(str, ids[0].tolist())),
                max_tokens=8,
                device=device,
                dtype="float32",
                as_json=True,
                ignore_eos=True,
                experts=kw.get("experts"),
                expert_bits=16 if kw else None,
            )
        )
    assert doc["tokens"] == expected
    assert calls == ([PROMPT] if captured else [])

"""llmarch run vs transformers for DeepSeek Sparse Attention (DeepSeek V3.2, GLM-5): MLA whose keys
a lightning indexer selects per query (tiny random float32 checkpoints).

Prefill logits and every one of 32 cached decode steps within 1e-4 max abs of transformers' eager
forward (its own cache, indexer keys included), and identical greedy tokens:
- index_topk 8 with a 40-token prompt, so each query attends a strict subset of what it may see;
  the same run with the selection dropped (dense MLA) must fail the check, so the mask is tested;
- index_topk larger than the whole context: the same logits as transformers' dense DeepSeek V3
  on the same weights.
The fixtures use 8 indexer heads (the released models: 64 and 32). With 2, many keys score exactly
0 after the ReLU, and which of the tied keys top-k keeps depends on the length of the row it
scans, so even transformers with and without a static cache disagree on those steps.
GLM-5's layers that share an earlier layer's selection ("shared" in indexer_types) match too.
inspect's KV bytes (latent + rope key + indexer key per layer) equal what run allocates.
"""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fixtures.parity import check_generator, check_parity, own_cache  # noqa: E402
from fixtures.reference import reference_model  # noqa: E402

STEPS = 32
PROMPT = 40
DSA = ["deepseek_v32", "glm_moe_dsa"]
HEADS = 8  # indexer heads: see the module docstring


def _parity(path, ref, device="cpu"):
    """check_parity against ref's own cached decode (its indexer keys included); returns the
    runtime and its cache."""
    p = check_parity(path, own_cache(ref), device, PROMPT, STEPS)
    return p.rt, p.cache


@pytest.mark.parametrize("name", DSA)
def test_sparse_attention_matches_transformers(tiny, device, name):
    path = tiny(name, index_n_heads=HEADS, index_topk=8)
    rt, cache = _parity(path, reference_model(name, path, device), device)
    spec = rt.spec
    a = spec.attention
    assert (a.index_heads, a.index_head_dim, a.index_topk) == (HEADS, 16, 8)  # the fixture's config
    # inspect's figure for this context is what run allocated: latent, rope key and indexer key
    assert cache.nbytes() == spec.kv_cache(context=PROMPT + STEPS, kv_dtype="f32")["bytes"]
    per_token = {c.k.shape[-1] + c.v.shape[-1] + c.index_k.shape[-1] for c in cache.layers.values()}
    assert per_token == {a.kv_lora_rank + a.qk_rope_head_dim + a.index_head_dim}


def test_layers_sharing_a_selection(tiny, device):
    """GLM-5's "shared" indexer layers attend the keys the previous full layer's indexer chose and
    cache no indexer keys of their own (transformers builds them without an indexer)."""
    path = tiny("glm_moe_dsa", index_n_heads=HEADS, index_topk=8, indexer_types=["full", "shared", "full"])
    rt, cache = _parity(path, reference_model("glm_moe_dsa", path, device), device)
    assert [l.index_from for l in rt.spec.schedule] == [None, 0, None]
    assert [c.index_k is not None for c in cache.layers.values()] == [True, False, True]
    assert cache.nbytes() == rt.spec.kv_cache(context=PROMPT + STEPS, kv_dtype="f32")["bytes"]


def test_scores_summed_a_few_heads_at_a_time(tiny, monkeypatch):
    """Long prompts score the indexer heads a group at a time (bounded memory): at prefill here,
    groups of 3 of the 8 heads, the last one short, give transformers' logits too."""
    from llmarch.runtime.ops import sparse_indexer

    monkeypatch.setattr(sparse_indexer, "HEAD_GROUP_ELEMS", 3 * PROMPT * PROMPT)
    path = tiny("glm_moe_dsa", index_n_heads=HEADS, index_topk=8)
    _parity(path, reference_model("glm_moe_dsa", path))


def test_dropping_the_selection_fails_the_check(tiny, monkeypatch):
    """With the indexer's mask replaced by the causal one (dense MLA), the same comparison fails:
    the selection changes the logits, so the test above checks it."""
    from llmarch.runtime.ops import sparse_indexer

    path = tiny("deepseek_v32", index_n_heads=HEADS, index_topk=8)
    ref = reference_model("deepseek_v32", path)
    keep = sparse_indexer.LightningIndexer.forward

    def every_visible_key(*a):  # keys still cached; the selection dropped
        keep(*a)
        return None

    monkeypatch.setattr(sparse_indexer.LightningIndexer, "forward", every_visible_key)
    with pytest.raises(AssertionError, match="prefill logits differ"):
        _parity(path, ref)


def test_topk_beyond_the_context_is_dense_mla(tiny, device, tmp_path):
    """index_topk above the context keeps every visible key: the logits are transformers' dense
    DeepSeek V3 on the same weights (its config is V3.2's without the indexer keys)."""
    src = tiny("deepseek_v32", index_n_heads=HEADS, index_topk=4 * (PROMPT + STEPS))
    dense = tmp_path / "deepseek_v3"
    shutil.copytree(src, dense)
    cfg = json.loads((dense / "config.json").read_text())
    cfg.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"])
    (dense / "config.json").write_text(json.dumps(cfg))
    _parity(src, reference_model("deepseek_v3", dense, device), device)


@pytest.mark.parametrize("name", DSA)
def test_generator_greedy_matches_transformers(tiny, device, name):
    """The Generator path gives transformers' greedy tokens with index_topk 8 under a 40-token
    prompt: prefill in chunks of 10 (later chunks select among the earlier ones' keys), then decode
    steps that gather the 8 selected latents; on a GPU each step is one captured CUDA graph, the
    indexer's scores over the whole static cache, its top-k and the gather inside it."""
    path = tiny(name, index_n_heads=HEADS, index_topk=8)
    check_generator(path, reference_model(name, path, device), device, PROMPT, STEPS)


def test_offloaded_experts_same_tokens(tiny, device):
    """Routed experts on the host (the segmented decoder: on a GPU the attention, the indexer's
    top-k and the gather between two host round trips are replayed as CUDA graphs) give
    transformers' greedy tokens with index_topk 8 under the 40-token prompt. Widths of 64
    multiples, as the host stores need; 16-bit experts, so nothing is rounded."""
    from fixtures.parity import reference_tokens
    from llmarch.runtime.experts.decode import attach_decoder
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime

    path = tiny("deepseek_v32", index_n_heads=HEADS, index_topk=8, hidden_size=128, moe_intermediate_size=64)
    ids = torch.randint(3, 128, (1, PROMPT), generator=torch.Generator().manual_seed(5))
    want = reference_tokens(reference_model("deepseek_v32", path, device), ids.to(device), STEPS)
    assert len(set(want)) > 3
    gen = Generator(load_runtime(str(path), device, "float32", experts="cpu", expert_bits=16), PROMPT + STEPS + 1)
    assert attach_decoder(gen)
    assert gen.generate(ids[0].tolist(), STEPS, Sampling()).tokens == want


def _bad(command, path):
    import subprocess
    import sys

    args = [sys.executable, "-m", "llmarch", command, str(path)]
    if command == "run":
        args += ["--prompt-ids", "1,2,3", "--device", "cpu", "-n", "2"]
    p = subprocess.run(args, capture_output=True, text=True)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


@pytest.mark.parametrize(
    "edit,expect,commands",
    [
        (
            {"index_head_dim": 12},
            "model.safetensors: indexer tensor model.layers.0.self_attn.indexer.w",
            ["inspect", "run"],
        ),
        ({"index_n_heads": 3}, "model.safetensors: indexer tensor model.layers.0.self_attn.indexer.w", ["inspect"]),
        ({"index_topk": 0}, "config.json: index_topk is 0", ["inspect", "run"]),
        ({"indexer_types": ["shared", "full", "full"]}, "config.json: indexer_types must give 3 layers", ["inspect"]),
    ],
)
def test_bad_indexer_one_line(tiny, tmp_path, edit, expect, commands):
    """The fingerprint refuses these, so inspect (no torch: fast) and run say the same line."""
    src = tiny("glm_moe_dsa")
    dst = tmp_path / "bad"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(edit)
    (dst / "config.json").write_text(json.dumps(cfg))
    for command in commands:
        assert expect in _bad(command, dst)

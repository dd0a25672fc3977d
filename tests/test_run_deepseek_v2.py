"""DeepSeek-V2: llmarch run vs transformers 5.24 (tiny random float32 checkpoints), and the routing
facts inspect reads.

The expected facts come from transformers' modeling_deepseek_v2.py (DeepseekV2TopkRouter): a
softmax over all experts; under topk_method "group_limited_greedy" each group of
n_routed_experts / n_group experts ranks by its best score and only the topk_group best groups
are kept ("greedy" ignores n_group); the chosen scores are never renormalised (the router does
not read norm_topk_prob) and are multiplied by routed_scaling_factor. The fixture has 4 groups of
2 with 2 kept, norm_topk_prob true in its config and a scaling of 2.5, so each of these choices
shows in the logits: the parity test checks llmarch's logits against transformers' own cached
decode (within 1e-4 at prefill and 32 steps, same greedy tokens), and a router ranking groups as
DeepSeek V3 does (sum of the top two) is shown to miss.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from fixtures.parity import TOL, check_parity, kv_cache, own_cache  # noqa: E402
from fixtures.reference import reference_model  # noqa: E402


def test_deepseek_v2_inspect_reads_the_routing(tiny):
    from llmarch.api import load_spec

    spec = load_spec(str(tiny("deepseek_v2")))
    m = spec.moe
    # the fixture's config: 8 experts, 2 per token, 4 groups with 2 kept, scaling 2.5, layer 0 dense
    assert (m.experts, m.experts_per_token, m.shared_experts) == (8, 2, 1)
    assert (m.router, m.n_group, m.topk_group, m.group_score) == ("softmax", 4, 2, "max")
    assert m.norm_topk_prob is False  # the config says true; the V2 router never renormalises
    assert m.routed_scaling_factor == 2.5 and not m.router_bias
    assert [l.ffn for l in spec.schedule] == ["dense", "moe", "moe"]
    assert spec.attention.mla and spec.attention.rope_interleave  # V2 rotates complex pairs
    assert spec.family == "deepseek_v2" and "run" in spec.supports


def test_deepseek_v2_matches_transformers(tiny):
    path = tiny("deepseek_v2")
    p = check_parity(path, own_cache(reference_model("deepseek_v2", path)), "cpu")
    assert p.spec.moe.group_score == "max"
    # the fixture can tell the rankings apart: V3's (sum of each group's top two) misses
    from llmarch.runtime.ops.moe import Router

    routers = [m for m in p.rt.model.modules() if isinstance(m, Router)]
    assert routers
    for r in routers:
        r.group_by_max = False
    ids, model = p.seq[:, :24], p.rt.model
    with torch.inference_mode():
        theirs = reference_model("deepseek_v2", path)(ids).logits
        model.setup(24, "cpu", torch.float32)
        mine = model(ids, torch.arange(24), kv_cache(p.spec, 24, "cpu"), limit=24, last_only=False)
    assert (mine - theirs).abs().max().item() > 10 * TOL


def test_deepseek_v2_greedy_ignores_groups(tiny):
    """topk_method "greedy" (DeepSeek-V2-Lite) takes the top-k over every expert even with n_group set."""
    path = tiny("deepseek_v2", topk_method="greedy")
    p = check_parity(path, own_cache(reference_model("deepseek_v2", path)), "cpu", steps=8)
    assert p.spec.moe.n_group is None

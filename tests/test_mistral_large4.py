"""Mistral Large 4 (transformers 5.24's mistral_large4): what llmarch reads today.

transformers runs a tiny random MistralLarge4ForConditionalGeneration (text model + a one-layer
Pixtral tower; there is no text-only causal-LM class). Its text model is MLA with no query
low-rank (q_proj), a DSA indexer whose queries come from the LayerNorm'd hidden state (no
q_resid), learned per-head query scaling by log(position + 1) (softmax_scaling, in attention and
indexer), RoPE frequencies scaled by a learned exp(alpha) ("LeRoPE"), NoPE layers whose rope dims
join the nope dims (indexer unrotated there too), latent KV shared across layers
(kv_source_layers) and a final logit soft-cap. `inspect` reads the checkpoint (the indexer's
wq_b takes the hidden size when there is no q_lora_rank); `run` refuses it, since
those mechanisms have no runtime path yet.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXT = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    kv_lora_rank=8,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    index_n_heads=8,
    index_head_dim=16,
    index_topk=8,
    max_position_embeddings=4096,
    kv_source_layers=[0, 1, 1, 3],  # layer 2 reads layer 1's latent cache
)
VISION = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = transformers.MistralLarge4Config(text_config=TEXT, vision_config=dict(VISION, head_dim=8))
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("mistral_large4") / "tiny"
    transformers.MistralLarge4ForConditionalGeneration(cfg).save_pretrained(out)
    return out


def test_inspect_reads_the_indexer_without_a_query_low_rank(checkpoint):
    from llmarch.api import load_spec

    spec = load_spec(str(checkpoint))
    a = spec.attention
    assert spec.family == "mistral_large4" and a.mla and a.indexer and a.q_lora_rank is None
    assert (a.index_heads, a.index_head_dim, a.index_topk) == (8, 16, 8)  # the config's
    assert "run" not in spec.supports


def test_run_refuses_it(checkpoint):
    """run's check on the spec (the command line turns it into one line, exit 2)."""
    from llmarch.api import load_spec
    from llmarch.errors import LlmarchError
    from llmarch.runtime.load import check_supported

    with pytest.raises(LlmarchError, match="'mistral_large4' is not supported by llmarch run"):
        check_supported(load_spec(str(checkpoint)), checkpoint)

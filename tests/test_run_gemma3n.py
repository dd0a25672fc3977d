"""Gemma 3n's text model (per-layer inputs, AltUp, LAuReL, KV sharing, Gaussian top-k activation
sparsity, q/k/v norms, sliding 4:1, final soft-cap) against transformers' Gemma3nForCausalLM on a
tiny random float32 checkpoint.

Expected values come from transformers: its logits at prefill and at every cached decode step
(within 1e-4), its greedy tokens, and its config's kv_sharing_modes for which layers own a cache.
The prompt (24) is longer than the sliding window (16), and prompt + 32 steps pass it twice.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fixtures.parity import DEVICE, check_generator, check_parity, kv_cache  # noqa: E402

STEPS = 32
PROMPT = 24


@pytest.fixture(scope="module")
def gemma3n(tiny):
    return tiny("gemma3n")


@pytest.fixture(scope="module")
def reference(gemma3n):
    from fixtures.reference import reference_model

    return reference_model("gemma3n", gemma3n, DEVICE)


@pytest.fixture(scope="module")
def wrapper(gemma3n, tmp_path_factory):
    """The same weights in the multimodal gemma3n layout (transformers cannot build the wrapper
    here: its vision tower needs timm)."""
    from fixtures.parity import text_in_wrapper

    return text_in_wrapper(
        gemma3n, tmp_path_factory.mktemp("gemma3n_wrapper"), "gemma3n", "Gemma3nForConditionalGeneration"
    )


def test_text_model_matches_transformers(gemma3n, reference, device):
    spec = check_parity(gemma3n, reference, device, PROMPT, STEPS, windowed=True).spec
    cfg = reference.config
    # every Gemma 3n feature is on in this checkpoint, so a parity pass covers each of them
    assert spec.altup.streams == cfg.altup_num_inputs > 1
    assert spec.laurel_rank == cfg.laurel_rank
    assert spec.per_layer_embeddings["dim"] == cfg.hidden_size_per_layer_input
    sparse = [i for i, s in enumerate(cfg.activation_sparsity_pattern) if s > 0]
    assert sparse and [l.index for l in spec.schedule if l.ffn_sparsity] == sparse
    assert spec.final_softcap == cfg.final_logit_softcapping


def test_wrapper_text_model_matches_transformers(wrapper, reference, device):
    spec = check_parity(wrapper, reference, device, PROMPT, STEPS, windowed=True).spec
    assert spec.family == "gemma3n" and spec.text_family == "gemma3n_text"


def test_only_kv_owner_layers_allocate(gemma3n, reference):
    """The layers transformers marks "reuse" get no cache; inspect's KV bytes are what run allocates."""
    from llmarch.api import load_checkpoint_spec

    _, spec = load_checkpoint_spec(str(gemma3n))
    modes = reference.config.kv_sharing_modes
    owners = [i for i, m in enumerate(modes) if m != "reuse"]
    assert len(owners) < len(modes)
    for max_seq in (12, 300):  # inside the sliding window, and past it (rings)
        cache = kv_cache(spec, max_seq, "cpu")
        assert sorted(cache.layers) == owners
        assert cache.nbytes() == spec.kv_cache(context=max_seq, kv_dtype="f32")["bytes"]


def test_generator_greedy_matches_transformers(gemma3n, reference, device):
    """The Generator path (prefill in chunks shorter than the window: a ring step over ring + new
    keys, which the KV-shared layers read too; CUDA graph decode on a GPU) gives transformers' tokens."""
    check_generator(gemma3n, reference, device, PROMPT, STEPS)

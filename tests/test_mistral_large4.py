"""Mistral Large 4 (transformers 5.24's mistral_large4): inspect and `llmarch run` against transformers.

transformers runs a tiny random MistralLarge4ForConditionalGeneration (text model + a one-layer
Pixtral tower; there is no text-only causal-LM class). Its text model is MLA with no query
low-rank (q_proj), a DSA indexer whose queries come from the LayerNorm'd hidden state (no
q_resid), learned per-head query scaling by log(position + 1) (softmax_scaling, in attention and
indexer), RoPE frequencies scaled by a learned exp(alpha) ("LeRoPE"), NoPE layers whose rope dims
join the nope dims (indexer unrotated there too), latent KV shared across layers
(kv_source_layers) and a final logit soft-cap. save_pretrained writes Mistral's own tensor names
(tok_embeddings, layers.N.attention.wq, lerope.alpha, ssmax_scaling.s / .b, ...), as the Hub
files have them; run reads them through the recipe's tensor_renames (transformers' own renames),
and a file with transformers' names (fused experts) reads unchanged.

transformers initialises alpha to 0 and the query scales to s = 0, b = 1 (no effect), so the
fixture draws them at random before saving: the checks below then fail if any is not applied
(test_learned_scales_change_the_logits). Run: prefill logits and each of 32 cached decode steps
within 1e-4 max abs of transformers' eager forward with its own cache, identical greedy tokens:
- index_topk 8 with a 40-token prompt (each query attends a strict subset of what it may see);
- index_topk above the whole context (every visible key);
- a layer sharing both the latent and the selection of the layer before;
- the Generator's chunked prefill (chunks of 10 over the 40-token prompt) gives transformers'
  greedy tokens.
inspect's KV bytes equal what run allocates: layer 2 reads layer 1's latent and allocates only
its indexer keys; NoPE layer 3 caches no rope key. Bad input: kv_source_layers that transformers
refuses or cannot run, and learned scales of the wrong shape, are one line; convert is refused.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fixtures.parity import check_generator, check_parity, own_cache  # noqa: E402

PROMPT, STEPS = 40, 32
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


def _make(out, **text):
    cfg = transformers.MistralLarge4Config(text_config=dict(TEXT, **text), vision_config=dict(VISION, head_dim=8))
    torch.manual_seed(0)
    model = transformers.MistralLarge4ForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the learned scales away from their no-op initial values
        for name, p in model.named_parameters():
            if name.endswith(("rotary_emb.alpha", "softmax_scaling.scale")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith("softmax_scaling.bias"):
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _make(tmp_path_factory.mktemp("mistral_large4") / "tiny")


def _reference(path, device="cpu"):
    return (
        transformers.MistralLarge4ForConditionalGeneration.from_pretrained(
            str(path), dtype=torch.float32, attn_implementation="eager"
        )
        .to(device)
        .eval()
    )


def _parity(path, device="cpu"):
    return check_parity(path, own_cache(_reference(path, device)), device, PROMPT, STEPS)


def test_inspect_reads_the_indexer_without_a_query_low_rank(checkpoint):
    from llmarch.api import load_spec

    spec = load_spec(str(checkpoint))
    a = spec.attention
    assert spec.family == "mistral_large4" and a.mla and a.indexer and a.q_lora_rank is None
    assert (a.index_heads, a.index_head_dim, a.index_topk) == (8, 16, 8)  # the config's
    assert a.query_log_scale and spec.rope.learned_freq_scale and spec.final_softcap == 30.0  # tensors, config
    # kv_source_layers [0, 1, 1, 3]; no_rope_layers' default makes every 4th layer NoPE
    assert [(l.kv_shared_from, l.rope) for l in spec.schedule] == [(None, True), (None, True), (1, True), (None, False)]


def test_run_matches_transformers_with_a_selection(checkpoint, device):
    p = _parity(checkpoint, device)
    spec, cache = p.spec, p.cache
    assert cache.nbytes() == spec.kv_cache(context=PROMPT + STEPS, kv_dtype="f32")["bytes"]
    a = spec.attention
    widths = {i: (c.k.shape[-1], c.v.shape[-1], c.index_k.shape[-1]) for i, c in cache.layers.items()}
    full = (a.kv_lora_rank, a.qk_rope_head_dim, a.index_head_dim)
    assert widths == {0: full, 1: full, 2: (0, 0, a.index_head_dim), 3: (a.kv_lora_rank, 0, a.index_head_dim)}


def test_a_layer_sharing_latent_and_selection(tmp_path):
    """Layer 2 reads layer 1's latent and its selection too ("shared" in indexer_types: transformers'
    "reuse" mode, no indexer): it allocates nothing at all."""
    p = _parity(_make(tmp_path / "shared", indexer_types=["full", "full", "shared", "full"]))
    assert [l.index_from for l in p.spec.schedule] == [None, None, 1, None]
    c = p.cache.layers[2]
    assert c.k.numel() == c.v.numel() == 0 and c.index_k is None
    assert p.cache.nbytes() == p.spec.kv_cache(context=PROMPT + STEPS, kv_dtype="f32")["bytes"]


def test_transformers_own_names_too(checkpoint, tmp_path):
    """The same weights saved under transformers' own names (model.language_model.*, fused experts)
    read unchanged: the recipe's renames leave them alone."""
    from safetensors.torch import save_file

    ref = _reference(checkpoint)
    out = tmp_path / "hf_names"
    out.mkdir()
    shutil.copy(checkpoint / "config.json", out / "config.json")
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert "model.language_model.layers.1.mlp.experts.gate_up_proj" in state
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    check_parity(out, own_cache(ref), "cpu", PROMPT, STEPS)


def test_topk_beyond_the_context(tmp_path, device):
    _parity(_make(tmp_path / "dense", index_topk=4 * (PROMPT + STEPS)), device)


def test_chunked_prefill_gives_the_reference_tokens(checkpoint, device):
    """On a GPU the decode is one captured CUDA graph (MLA, indexer top-k and gather, experts)."""
    check_generator(checkpoint, _reference(checkpoint, device), device, PROMPT, 16, chunk=10)


@pytest.mark.parametrize("part", ["lerope", "query_scale"])
def test_learned_scales_change_the_logits(checkpoint, monkeypatch, part):
    """With LeRoPE's factors or the query scales left out, the same check fails: the fixture's
    values matter, so the tests above check that run applies them."""
    from llmarch.runtime.ops import learned_rope, query_scaling

    if part == "lerope":
        monkeypatch.setattr(learned_rope.LearnedRopeScale, "factors", lambda self: torch.ones(self.alpha.shape))
    else:
        monkeypatch.setattr(query_scaling.LogPositionQueryScale, "forward", lambda self, q, pos: q)
    with pytest.raises(AssertionError, match="prefill logits differ"):
        _parity(checkpoint)


def _one_line(args):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "llmarch", *map(str, args)], capture_output=True, text=True)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


@pytest.mark.parametrize(
    "name,shape,expect",
    [
        ("lerope.alpha", (3,), "weight lerope.alpha has shape (3,), the spec needs (4,)"),
        ("layers.1.attention.ssmax_scaling.s", (5,), "layers.1.attention.ssmax_scaling.s has shape (5,)"),
        ("layers.0.attention.indexer.ssmax_scaling.b", (2,), "layers.0.attention.indexer.ssmax_scaling.b has"),
    ],
)
def test_learned_scale_of_the_wrong_shape(checkpoint, tmp_path, name, shape, expect):
    """run checks each learned scale's shape against the spec, naming the file's tensor (an
    LlmarchError: the command line's one line, exit 2, as for any weight)."""
    from safetensors.torch import load_file, save_file

    from llmarch.errors import LlmarchError
    from llmarch.runtime.load import load_runtime

    dst = tmp_path / "bad"
    shutil.copytree(checkpoint, dst)
    state = load_file(dst / "model.safetensors")
    state[name] = torch.zeros(shape)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LlmarchError, match=re.escape(expect)) as err:
        load_runtime(str(dst), "cpu", "float32")
    assert str(dst) in str(err.value.path)  # the checkpoint (for alpha: its file)


@pytest.mark.parametrize(
    "sources,expect",
    [
        ([0, 1, 3, 3], "layer 2 reads layer 3, which must be an earlier layer"),
        ([0, 0, 1, 3], "layer 2 reads layer 1, which must be an earlier layer"),
        ([0, 1, 1, 1], "layer 3 (NoPE) reads layer 1, which is RoPE"),
    ],
)
def test_bad_kv_source_layers_one_line(checkpoint, tmp_path, sources, expect):
    """transformers' config check refuses the first two; the third its model cannot run (a NoPE
    layer looks for a NoPE latent no layer stored)."""
    dst = tmp_path / "bad"
    shutil.copytree(checkpoint, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["text_config"]["kv_source_layers"] = sources
    (dst / "config.json").write_text(json.dumps(cfg))
    assert "config.json: kv_source_layers: " + expect in _one_line(["inspect", dst])


def test_convert_refused_in_one_line(checkpoint, tmp_path, capsys):
    """llama.cpp (llama-cpp-python 0.3.36: src/llama-arch.cpp, gguf-py's MODEL_ARCH) has mistral4
    but no architecture for Mistral Large 4: convert says so in one line, exit 2, writes nothing."""
    from tests.test_run_cli import cli

    out = tmp_path / "o.gguf"
    code, err = cli(["convert", checkpoint, "-o", out], capsys)
    err = err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "mistral_large4" in err and "llama.cpp has no architecture" in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []

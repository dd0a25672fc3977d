"""DeepSeek V4: llmarch run against transformers 5.24 (tiny random float32 checkpoints), and the
RoPE facts inspect reads.

Run: the fixture has one layer of each attention kind (sliding only; compressed 1/4 with the
lightning indexer, index_topk 4 so the selection matters from the 20th token; compressed 1/12, a
ratio that does not divide the context), hash-routed MoE in layers 0-1, learned routing after,
2 hyper-connection streams. Logits within 1e-4 of transformers' own cached decode at prefill and
32 steps, same greedy tokens; also with YaRN on the compressed layers and half of each head
rotated, and through the Generator (prefill in chunks of 10, shorter than a CSA window pair).
The run tests give the indexer 8 heads (the fixture has 2): an entry scores exactly 0 when every
head's ReLU'd product is, and with 2 heads such ties among the candidates for the top-k are
common; transformers breaks them one way in its batched (uncached) forward and another in its
cached decode (measured: up to ~5e-3 apart while the token that differs stays in the window).
With 8 heads both agree to ~1e-7, and so does llmarch; the reference is the cached decode.

Expected RoPE facts come from transformers, not from llmarch: DeepseekV4Config resolves
rope_parameters into a "main" entry (sliding-only layers: rope_theta, unscaled) and a "compress"
entry (layers with a compressor, window included: compress_rope_theta with the config's scaling,
YaRN with attention_factor 1.0), whether config.json nests them as transformers saves it or ships a
flat rope_scaling beside compress_rope_theta. The indexer's rotation is V4's own
apply_rotary_pos_emb, which pairs adjacent channels.
"""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fixtures.parity import check_generator, check_parity, own_cache  # noqa: E402
from fixtures.reference import reference_model  # noqa: E402
from tests.test_run_cli import cli  # noqa: E402

PROMPT, STEPS = 24, 32

YARN = dict(rope_type="yarn", factor=16.0, original_max_position_embeddings=16, beta_fast=32.0, beta_slow=1.0)


def _flat(src, dst):
    """The checkpoint with a Hub-style flat config: rope_scaling beside compress_rope_theta."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg["rope_scaling"] = {"type": "yarn", **{k: v for k, v in YARN.items() if k != "rope_type"}}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_compressed_layers_rotate_by_the_compress_rope(tiny, tmp_path, layout):
    from llmarch.api import inspect_source, load_spec

    path = tiny("deepseek_v4", rope_parameters=YARN)
    if layout == "flat":
        path = _flat(path, tmp_path / "flat")
    ref = transformers.AutoConfig.from_pretrained(str(path))
    spec = load_spec(str(path))
    for layer, kind in zip(spec.schedule, ref.layer_types, strict=True):
        # DeepseekV4Attention: rope_layer_type = "main" for sliding_attention, else "compress"
        own = ref.rope_parameters["main" if kind == "sliding_attention" else "compress"]
        assert (layer.rope_theta or spec.rope.theta) == own["rope_theta"], layer.index
        scaling = layer.rope_scaling if layer.rope_scaling is not None else spec.rope.scaling
        if own["rope_type"] == "default":
            assert scaling in (None, {"type": "default"}), layer.index
        else:
            assert scaling["type"] == own["rope_type"], layer.index
            keys = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor")
            assert {k: scaling.get(k) for k in keys} == {k: own.get(k) for k in keys}, layer.index
        assert spec.rope.partial == own["partial_rotary_factor"]
    compress = ref.rope_parameters["compress"]
    shown = inspect_source(str(path))["rope"]
    assert shown["theta"] == ref.rope_parameters["main"]["rope_theta"] and shown["scaling"] is None
    assert shown["compressed"]["theta"] == compress["rope_theta"]
    assert shown["compressed"]["scaling"]["factor"] == compress["factor"]


def test_indexer_rope_pairs_adjacent_channels(tiny):
    """What V4's apply_rotary_pos_emb does to a vector, against both layouts: it must be the one
    the spec says."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import apply_rotary_pos_emb

    from llmarch.api import load_spec

    x = torch.randn(1, 1, 1, 8, generator=torch.Generator().manual_seed(0))
    angle = torch.tensor([[[0.3, 0.7]]])  # one angle per rotated pair of the 4-channel rope slice
    out = apply_rotary_pos_emb(x, angle.cos(), angle.sin())
    rope, cos, sin = x[..., 4:], angle.cos()[0], angle.sin()[0]
    even, odd = rope[..., 0::2], rope[..., 1::2]
    pairs = torch.stack([even * cos - odd * sin, odd * cos + even * sin], -1).flatten(-2)
    halves = torch.cat([rope[..., :2] * cos - rope[..., 2:] * sin, rope[..., 2:] * cos + rope[..., :2] * sin], -1)
    assert torch.allclose(out[..., 4:], pairs, atol=1e-6) and not torch.allclose(out[..., 4:], halves, atol=1e-3)
    assert torch.equal(out[..., :4], x[..., :4])  # the leading channels are not rotated
    assert load_spec(str(tiny("deepseek_v4"))).attention.index_rope_interleave is True


INDEX_HEADS = 8  # few exact-zero ties in the indexer's scores (see above)


def test_deepseek_v4_matches_transformers(tiny):
    path = tiny("deepseek_v4", index_n_heads=INDEX_HEADS)
    p = check_parity(path, own_cache(reference_model("deepseek_v4", path)), "cpu", PROMPT, STEPS)
    spec = p.spec
    assert spec.hyper.streams == 2 and spec.moe.hash_layers == [0, 1]
    assert [l.compress_ratio for l in spec.schedule] == [None, 4, 12, 4]


def test_deepseek_v4_yarn_and_wider_rope_match_transformers(tiny):
    path = tiny("deepseek_v4", rope_parameters=YARN, partial_rotary_factor=0.5, index_n_heads=INDEX_HEADS)
    check_parity(path, own_cache(reference_model("deepseek_v4", path)), "cpu", PROMPT, STEPS)


def test_deepseek_v4_generator_in_chunks(tiny):
    path = tiny("deepseek_v4", index_n_heads=INDEX_HEADS)
    check_generator(path, own_cache(reference_model("deepseek_v4", path)), "cpu", PROMPT, STEPS, chunk=10)


def test_deepseek_v4_experts_offload_refused_in_one_line(tiny, capsys):
    """The CPU expert kernel computes gpt-oss's clamped SwiGLU, not V4's plain clamp: refused, not wrong."""
    code, err = cli(["run", tiny("deepseek_v4"), "--prompt-ids", "1,2", "--device", "cpu", "--experts", "cpu"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "clamped" in lines[0], err


def test_inspect_shows_the_run_facts(tiny):
    """The grouped output projection and the hyper-connections run needs, from transformers' config
    (DeepseekV4Attention's o_groups / o_lora_rank, DeepseekV4HyperConnection's hc_* keys)."""
    from llmarch.api import inspect_source

    path = tiny("deepseek_v4")
    ref = transformers.AutoConfig.from_pretrained(str(path))
    doc = inspect_source(str(path))
    assert doc["attention"]["out_proj"] == {"groups": ref.o_groups, "rank": ref.o_lora_rank}
    assert doc["hyper_connections"] == {
        "streams": ref.hc_mult,
        "sinkhorn_iters": ref.hc_sinkhorn_iters,
        "eps": ref.hc_eps,
    }


@pytest.mark.parametrize(
    "break_it,says",
    [
        (lambda sd, cfg: sd["model.layers.0.ffn.gate.tid2eid"].fill_(99), "tid2eid"),
        (lambda sd, cfg: sd.pop("model.hc_head.hc_fn"), "hc_head.hc_fn"),
        (lambda sd, cfg: cfg.pop("o_groups"), "o_groups"),
    ],
)
def test_bad_deepseek_v4_checkpoint_one_line(tiny, tmp_path, capsys, break_it, says):
    """An expert id past the experts, a missing hyper-connection tensor, a config without the grouped
    output projection: one line naming the checkpoint, exit 2."""
    from safetensors.torch import load_file, save_file

    dst = tmp_path / "bad"
    shutil.copytree(tiny("deepseek_v4"), dst)
    sd = load_file(dst / "model.safetensors")
    cfg = json.loads((dst / "config.json").read_text())
    break_it(sd, cfg)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg))
    code, err = cli(["run", dst, "--prompt-ids", "1,2", "--device", "cpu", "--max-tokens", "2"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and says in lines[0] and str(dst) in lines[0], err

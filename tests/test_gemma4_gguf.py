"""Gemma 4 from GGUF: `llmarch convert --to gguf` writes it as llama.cpp's converter does (its
proportional RoPE kept only as the rope_freqs divisors, the layer scalars as layer_output_scale,
the sliding layers' widths under the *_swa keys); `llmarch run` reads those facts back.

Expected values come from transformers' Gemma4ForCausalLM on the tiny float32 source checkpoint:
logits at prefill and every cached decode step within 1e-4 and the same greedy tokens, run from
the f32 GGUF; and the facts the converter wrote, read back, equal transformers' config.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from fixtures.parity import DEVICE, check_parity, reference_tokens  # noqa: E402
from tests import test_run_gemma4  # noqa: E402
from tests.test_run_gemma4 import CASES, PROMPT, STEPS  # noqa: E402

scaled = test_run_gemma4.scaled  # the fixture: layer scalars other than 1, the Hub's global_head_dim


def _reference(path):
    from fixtures.reference import reference_model

    return reference_model("gemma4_text", path, DEVICE)


def _gguf(src, tmp_path, name="m.gguf"):
    from llmarch.convert.to_gguf import convert_to_gguf

    out = tmp_path / name
    convert_to_gguf(str(src), out, "f32")
    return out


def test_run_from_gguf_matches_transformers(scaled, device, tmp_path):
    """Layer scalars other than 1, the full layers' wider heads and proportional RoPE (a quarter of
    the frequencies over the whole 32-wide head), all read back from the GGUF."""
    ref = _reference(scaled)
    gg = _gguf(scaled, tmp_path)
    spec = check_parity(gg, ref, device, PROMPT, STEPS, windowed=True).spec
    cfg = ref.config
    full = cfg.rope_parameters["full_attention"]
    assert spec.rope.scaling["type"] == full["rope_type"] == "proportional"
    assert spec.rope.scaling["partial_rotary_factor"] == full["partial_rotary_factor"]
    assert spec.rope.theta == full["rope_theta"]
    # the evidence names what the GGUF holds (there is no config.json beside it)
    assert "config.json" not in spec.evidence["rope.theta"] and "rope.freq_base" in spec.evidence["rope.theta"]
    assert spec.rope.local_theta == cfg.rope_parameters["sliding_attention"]["rope_theta"]
    assert spec.layer_scalar and any(float(m.layer_scalar) != 1.0 for m in ref.model.layers)
    widths = [l.head_dim or spec.attention.head_dim for l in spec.schedule]
    assert widths == [m.self_attn.head_dim for m in ref.model.layers]


def test_run_from_gguf_k_eq_v_double_wide(tiny, device, tmp_path):
    """Values = keys on the full layers (no attn_v there), one KV head on them (a per-layer
    head_count_kv), the KV-shared layers' FFNs twice as wide (per-layer feed_forward_length)."""
    src = tiny("gemma4_text", **CASES["k_eq_v-double_wide"])
    ref = _reference(src)
    spec = check_parity(_gguf(src, tmp_path), ref, device, PROMPT, STEPS, windowed=True).spec
    widths = [m.mlp.intermediate_size for m in ref.model.layers]
    assert [l.ffn_width or spec.intermediate_size for l in spec.schedule] == widths
    assert [l.v_from_k for l in spec.schedule] == [
        m.self_attn.use_alternative_attention and not m.self_attn.is_kv_shared_layer for m in ref.model.layers
    ]


def test_ple_modes_from_gguf_give_transformers_tokens(scaled, tmp_path):
    """--ple disk reads each step's per-layer rows from the GGUF itself; disk and cpu give
    transformers' greedy tokens."""
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime
    from llmarch.runtime.ple import find_store

    gg = _gguf(scaled, tmp_path)
    ids = torch.randint(3, 256, (1, PROMPT), generator=torch.Generator().manual_seed(4))
    want = reference_tokens(_reference(scaled).to("cpu"), ids, 16)
    assert len(set(want)) > 3  # tokens that depend on the inputs, not one repeated token
    for mode in ("disk", "cpu"):
        rt = load_runtime(str(gg), "cpu", "float32", ple=mode)
        got = Generator(rt, PROMPT + 16).generate(ids[0].tolist(), 16, Sampling()).tokens
        report = find_store(rt.model).report()
        assert report["mode"] == mode and got == want, mode
        if mode == "disk":
            assert report["where"] == f"file {gg}" and report["rows_read"] > 0


def test_bad_rope_freqs_is_one_line(scaled, tmp_path, capsys):
    """The divisors are read from the file and checked there: a NaN among them is one line naming
    the file, exit 2, for inspect as for run."""
    import struct

    from llmarch.checkpoint.open import open_checkpoint
    from tests.test_run_cli import cli

    gg = _gguf(scaled, tmp_path)
    t = open_checkpoint(str(gg)).tensors["rope_freqs.weight"]
    with open(gg, "r+b") as f:
        f.seek(t.offset + 4)
        f.write(struct.pack("<f", float("nan")))
    for cmd in (("inspect", gg), ("run", gg, "--prompt-ids", "1,2", "-n", "1")):
        code, err = cli(cmd, capsys)
        assert (code, err) == (
            2,
            f"llmarch: {gg}: tensor 'rope_freqs.weight' holds nan; RoPE frequency divisors must be finite and > 0\n",
        )


def test_gguf_to_safetensors_round_trip(scaled, tmp_path):
    """GGUF -> safetensors: transformers loads the folder and gives the source's logits (f32, ids
    past the sliding window); every tensor comes back equal and the config's RoPE per layer type
    and head widths are the source's, rebuilt from rope_freqs and the *_swa keys."""
    import json

    import numpy as np

    from llmarch.convert.from_gguf import convert_from_gguf
    from tests.test_convert import hf_logits, load_st

    back = tmp_path / "back"
    convert_from_gguf(str(_gguf(scaled, tmp_path)), back, "f32")
    ids = torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    np.testing.assert_allclose(hf_logits(back, ids), hf_logits(scaled, ids), rtol=0, atol=1e-6)
    a, b = load_st(scaled), load_st(back)
    assert b.keys() <= a.keys() and all(np.array_equal(a[k], b[k]) for k in b)
    src, got = (json.loads((p / "config.json").read_text()) for p in (scaled, back))
    assert got["rope_parameters"] == src["rope_parameters"]
    assert (got["head_dim"], got["global_head_dim"]) == (src["head_dim"], src["global_head_dim"])


def test_per_layer_facts_back_to_config_keys(tiny, tmp_path):
    """Values = keys on the full layers (no attn_v), their own KV head count and double-wide FFNs on
    the KV-sharing layers, stored as per-layer arrays in the GGUF, go back to transformers'
    attention_k_eq_v, num_global_key_value_heads and use_double_wide_mlp: the same tensors and
    logits. Per-layer widths those keys cannot explain are one line, exit 2, nothing written."""
    import json
    import struct

    import numpy as np

    from llmarch.convert.from_gguf import convert_from_gguf
    from tests.test_convert import _one_line_exit_2, hf_logits, load_st, run_cli

    src, back = tiny("gemma4_text", **CASES["k_eq_v-double_wide"]), tmp_path / "back"
    gg = _gguf(src, tmp_path)
    convert_from_gguf(str(gg), back, "f32")
    got, want = (json.loads((p / "config.json").read_text()) for p in (back, src))
    keys = ("attention_k_eq_v", "num_key_value_heads", "use_double_wide_mlp", "intermediate_size")
    assert {k: got[k] for k in keys} == {k: want[k] for k in keys}
    assert got["num_global_key_value_heads"] == CASES["k_eq_v-double_wide"]["num_global_key_value_heads"]
    a, b = load_st(src), load_st(back)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in b)
    ids = torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    np.testing.assert_allclose(hf_logits(back, ids), hf_logits(src, ids), rtol=0, atol=1e-6)

    # layer 1 (not a KV-sharing one) made twice as wide in the metadata: no key says that
    raw = bytearray(gg.read_bytes())
    key = b"gemma4.feed_forward_length"
    at = raw.index(key) + len(key) + 4 + 4 + 8  # value type (array), element type, count
    assert struct.unpack_from("<8I", raw, at) == (64, 64, 64, 64, 128, 128, 128, 128)
    struct.pack_into("<I", raw, at + 4, 128)
    gg.write_bytes(bytes(raw))
    out = tmp_path / "refused"
    line = _one_line_exit_2(run_cli("convert", gg, "--to", "safetensors", "-o", out))
    assert line == (
        f"llmarch: {gg}: the GGUF's intermediate_size differs by layer ([64, 128, 64, 64, 128, 128, 128, 128]); "
        "converting that back to config.json is not supported yet"
    )
    assert not out.exists()


VOCAB = 384  # the byte-level test tokenizer's size (tests/test_convert_llamacpp.py's VOCAB)


@pytest.fixture(scope="module")
def moe_scaled(tiny, tmp_path_factory):
    """The MoE variant (a dense MLP beside 4 routed experts, top 2, in every layer) with a tokenizer,
    its router input scale, per-expert scales and layer scalars drawn in [0.5, 2) and its router
    weights made 10x larger, so that routing depends on the input and a scale left out or
    misplaced changes the logits (x50 made a near-tie top-2 choice flip between transformers and
    llama.cpp: NMSE 1.6e-3 from the position where it flipped)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from tests.test_convert import add_tokenizer

    src = tmp_path_factory.mktemp("gemma4_moe") / "src"
    shutil.copytree(tiny("gemma4_text", vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, **CASES["moe"]), src)
    st = next(src.glob("*.safetensors"))
    sd, gen = load_file(st), torch.Generator().manual_seed(5)
    for name in sd:
        if name.endswith(("router.scale", "router.per_expert_scale", "layer_scalar")):
            sd[name] = 0.5 + 1.5 * torch.rand(sd[name].shape, generator=gen)
        elif name.endswith("router.proj.weight"):
            sd[name] = sd[name] * 10
    save_file(sd, st, metadata={"format": "pt"})
    add_tokenizer(src, VOCAB)
    return src


def test_moe_run_from_gguf_matches_transformers(moe_scaled, device, tmp_path):
    """The MoE variant run from its GGUF: the fused experts, the router's .scale tensors and the
    dense MLP's norms read back; logits within 1e-4 at prefill and 32 cached steps, same tokens."""
    spec = check_parity(_gguf(moe_scaled, tmp_path), _reference(moe_scaled), device, PROMPT, STEPS, True).spec
    m = spec.moe
    assert (m.experts, m.experts_per_token) == (CASES["moe"]["num_experts"], CASES["moe"]["top_k_experts"])
    assert m.dense_beside and m.router_input_scale and m.per_expert_scale


@pytest.mark.llamacpp
def test_moe_gguf_runs_in_llama_cpp_as_transformers(moe_scaled, tmp_path):
    """The MoE variant converted to GGUF as llama.cpp's Gemma4Model writes it: fused
    ffn_gate_up_exps / ffn_down_exps, router.scale as ffn_gate_inp.scale, per_expert_scale as
    ffn_down_exps.scale. llama.cpp (llama-cpp-python) loads it and gives transformers' logits (f32
    weights and KV cache: NMSE < 1e-5) and 8 greedy tokens (each scale set back to 1 in the GGUF
    gave NMSE 0.05 to 0.6 when this was written)."""
    import numpy as np
    from tokenizers import Tokenizer

    from llmarch.convert.verify import nmse
    from tests.test_convert_llamacpp import hf_model, llama_greedy, llama_logits, load_llama

    out = _gguf(moe_scaled, tmp_path)
    ids = Tokenizer.from_file(str(moe_scaled / "tokenizer.json")).encode("The capital of France is Paris. In 1969").ids
    model = hf_model(moe_scaled, "gemma4_text")
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        hf_greedy = model.generate(
            torch.tensor([ids]), max_new_tokens=8, do_sample=False, min_new_tokens=8, eos_token_id=None, pad_token_id=0
        )[0, len(ids) :].tolist()
    llm = load_llama(out, f32_kv=True)
    got = llama_logits(llm, ids)
    assert nmse(ref, got) < 1e-5
    assert (ref.argmax(-1) == got.argmax(-1)).all()
    assert llama_greedy(llm, ids, 8) == hf_greedy
    assert len(set(np.argmax(ref, -1))) > 3  # logits that depend on the input


def test_moe_gguf_to_safetensors_round_trip(tiny, tmp_path):
    """The MoE variant back from GGUF: the fused experts as one tensor each, the router's scales from
    the .scale tensors, enable_moe_block / top_k_experts in config.json; transformers gives the
    source's logits and every tensor comes back equal."""
    import json

    import numpy as np

    from llmarch.convert.from_gguf import convert_from_gguf
    from tests.test_convert import hf_logits, load_st

    src, back = tiny("gemma4_text", **CASES["moe"]), tmp_path / "back"
    convert_from_gguf(str(_gguf(src, tmp_path)), back, "f32")
    got, want = (json.loads((p / "config.json").read_text()) for p in (back, src))
    keys = ("enable_moe_block", "num_experts", "top_k_experts", "moe_intermediate_size")
    assert {k: got[k] for k in keys} == {k: want[k] for k in keys}
    a, b = load_st(src), load_st(back)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in b)
    ids = torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    np.testing.assert_allclose(hf_logits(back, ids), hf_logits(src, ids), rtol=0, atol=1e-6)

"""GGUF -> safetensors for the linear-attention hybrids: `llmarch convert --to safetensors` undoes
what the forward convert did for llama.cpp (value heads tiled across key heads, A stored as
-exp(A_log), squeezed convolutions, (1 + w) norms but not the gated one, Mamba-2's A and D as
columns and its norm per group), and the GGUF reader finds the layer kinds in llama.cpp's per-layer
head_count_kv / feed_forward_length arrays (Nemotron-H, Kimi Linear), so transformers loads
the folder with no missing or unexpected weight and computes the source checkpoint's logits.

The GGUFs are written by `llmarch convert --to gguf`, whose files llama.cpp is shown to load and
run like transformers in test_convert_llamacpp / test_convert_hybrid_gguf (the llamacpp-marked
tests); here the reference is transformers on the source checkpoint.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_convert import load_st

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

IDS = [1, 5, 9, 17, 33, 65, 100, 7, 3, 42, 11, 99]
CASES = {
    # name -> (fixture family, overrides)
    "qwen3_next": ("qwen3_next", {}),
    "qwen3_5_text": ("qwen3_5_text", {}),  # 4 value heads on 2 key heads: the tiling is undone
    "qwen3_5_moe_text": ("qwen3_5_moe_text", {}),
    # Mamba-2 (A as -exp(A_log) in a column, D a column, the gated norm one row per group), attention
    # and MLP blocks; the MoE variant is llama.cpp's nemotron_h_moe
    "nemotron_h": ("nemotron_h", {"hybrid_override_pattern": "M-*-M-"}),
    "nemotron_h_moe": ("nemotron_h", {"hybrid_override_pattern": "ME*ME*"}),
    # KDA : MLA 3:1 (kv_b rebuilt from k_b / v_b), layer kinds from head_count_kv, KDA sizes from
    # kda.head_dim; dense first layer, sigmoid router with correction bias, shared expert
    "kimi_linear": ("kimi_linear", {}),
}


def _logits(name, folder):
    from fixtures.reference import reference_model

    model = reference_model(name, folder, eager=False)
    with torch.no_grad():
        return model(input_ids=torch.tensor([IDS])).logits[0].numpy()


@pytest.mark.parametrize("name", CASES)
def test_hybrid_hf_gguf_hf_same_weights_and_logits(tiny, tmp_path, name):
    from transformers import AutoModelForCausalLM

    from llmarch.convert.from_gguf import convert_from_gguf
    from llmarch.convert.to_gguf import convert_to_gguf

    family, overrides = CASES[name]
    src = tiny(family, **overrides)
    gg = tmp_path / "m.gguf"
    convert_to_gguf(str(src), gg, "f32")
    back = tmp_path / "back"
    convert_from_gguf(str(gg), back, "f32")

    a, b = load_st(src), load_st(back)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        # (1 + w) - 1 and log(-(-exp(a))) in float32: within a few ulp of the source
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=k)
    _, info = AutoModelForCausalLM.from_pretrained(str(back), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    np.testing.assert_allclose(_logits(family, back), _logits(family, src), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_run_from_hybrid_gguf_matches_transformers(tiny, tmp_path, name):
    """`llmarch run` on the f32 GGUF (its tensors read through the GGUF -> HF view) against
    transformers on the source checkpoint: logits within 1e-4 at prefill (77 tokens, past one
    64-token chunk) and at each of 32 cached steps, the same greedy tokens."""
    from fixtures.parity import check_parity
    from fixtures.reference import reference_model
    from llmarch.convert.to_gguf import convert_to_gguf

    family, overrides = CASES[name]
    src = tiny(family, **overrides)
    gg = tmp_path / "m.gguf"
    convert_to_gguf(str(src), gg, "f32")
    p = check_parity(gg, reference_model(family, src), "cpu", 77, 32)
    assert p.rt.spec.format == "gguf" and p.rt.spec.linear_attention


def test_gguf_with_positive_a_is_one_line(tiny, tmp_path, capsys):
    """A GGUF whose ssm_a holds a value >= 0 (llama.cpp's A = -exp(A_log) is always negative) has no
    A_log: --to safetensors and run both stop with one line naming the file and the tensor, exit 2,
    and no output folder is left."""
    from llmarch.api import load_checkpoint_spec
    from llmarch.convert.to_gguf import convert_to_gguf
    from tests.test_run_cli import cli

    gg = tmp_path / "m.gguf"
    convert_to_gguf(str(tiny("qwen3_5_text")), gg, "f32")
    a = load_checkpoint_spec(str(gg))[0].tensors["blk.0.ssm_a"]
    with open(gg, "r+b") as f:  # the first value of layer 0's A, made positive
        f.seek(a.offset)
        f.write(np.float32(0.5).tobytes())
    for args in (["convert", gg, "--to", "safetensors", "-o", tmp_path / "back"], ["run", gg, "--prompt-ids", "1,2"]):
        code, err = cli(args, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert str(gg) in lines[0] and "blk.0.ssm_a" in lines[0]
    assert not (tmp_path / "back").exists()

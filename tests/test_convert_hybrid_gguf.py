"""llama.cpp loads what `llmarch convert --to gguf` writes for the linear-attention hybrids it has
arches for (kimi-linear, nemotron_h, nemotron_h_moe, lfm2, lfm2moe) and computes what transformers computes.

Marked `llamacpp`: skipped without llama-cpp-python. Tiny random transformers checkpoints with the
byte-level BPE tokenizer of test_convert; the references are transformers' logits and greedy tokens
on the same checkpoint, and llama.cpp's tokenization is compared with the tokenizers library's.
"""

from __future__ import annotations

import shutil

import pytest

from tests.test_convert import add_tokenizer
from tests.test_convert_llamacpp import check_llamacpp_matches_transformers
from tests.test_run_lfm import spread_lfm2_moe_routing

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llamacpp

VOCAB = 384
# name -> (fixture family, config overrides, llama.cpp arch)
CASES = {
    # KDA : MLA (NoPE) 3:1, dense first layer, sigmoid router + correction bias, shared expert
    "kimi_linear": ("kimi_linear", {}, "kimi-linear"),
    # Mamba-2, attention and relu2 MLP blocks, one mixer per block
    "nemotron_h": ("nemotron_h", {"hybrid_override_pattern": "M-*-M-"}, "nemotron_h"),
    # the same with MoE blocks (sigmoid router + correction bias, shared expert): llama.cpp's MoE arch
    "nemotron_h_moe": ("nemotron_h", {"hybrid_override_pattern": "ME*ME*"}, "nemotron_h_moe"),
    # gated short convolutions : full attention 2:1 (head_count_kv 0 on the conv layers), the FFN
    # width block_auto_adjust_ff_dim gives
    "lfm2": ("lfm2", {}, "lfm2"),
    # the same mixers, dense FFNs in the first 2 layers, then MoE (sigmoid router + expert_bias)
    "lfm2_moe": ("lfm2_moe", {}, "lfm2moe"),
}


def _widen_kda_qk(folder):
    """transformers' KDA L2-normalises q and k as x / sqrt(sum(x^2) + 1e-6), llama.cpp as
    x / max(|x|, eps): the same once sum(x^2) is far above 1e-6. The tiny random init gives
    sums near 2e-5 (an NMSE of 5e-3 from that alone), so the q/k conv weights are scaled by 30
    (sums near 2e-2; the NMSE left is 5e-8)."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    for name in tensors:
        if name.endswith(("self_attn.q_conv1d.weight", "self_attn.k_conv1d.weight")):
            tensors[name] = tensors[name] * 30
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def hybrid(tiny, tmp_path_factory):
    made = {}

    def build(name):
        if name not in made:
            family, overrides, _ = CASES[name]
            dst = tmp_path_factory.mktemp(name) / name
            shutil.copytree(tiny(family, vocab_size=VOCAB, **overrides), dst)
            add_tokenizer(dst, VOCAB)
            if family == "kimi_linear":
                _widen_kda_qk(dst)
            if family == "lfm2_moe":  # a random expert_bias and spread scores decide the experts
                spread_lfm2_moe_routing(dst)
            made[name] = dst
        return made[name]

    return build


@pytest.mark.parametrize("name", CASES)
def test_hybrid_gguf_matches_transformers(hybrid, tmp_path, name):
    """llama.cpp's arch, tokenization, f32 logits (NMSE < 1e-5), greedy tokens and q8_0 (< 1e-2),
    with an f32 KV cache, as test_convert_llamacpp checks the other families."""
    family, _, arch = CASES[name]
    check_llamacpp_matches_transformers(hybrid(name), tmp_path, family, f32_kv=True, arch=arch)

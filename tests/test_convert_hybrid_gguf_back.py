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

import shutil

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
    # short conv : full attention, layer kinds from head_count_kv (the conv layers' "conv" type), the
    # conv kernel from shortconv.l_cache, the adjusted FFN width kept (block_auto_adjust_ff_dim false)
    "lfm2": ("lfm2", {}),
    # the same with dense-first MoE: sigmoid router, expert_bias (exp_probs_b.bias, bare in HF; a
    # random one here, with spread router scores, so that it decides), per-expert w1/w3/w2 back
    "lfm2_moe": ("lfm2_moe", {}),
}


def _source(tiny, tmp_path, name):
    family, overrides = CASES[name]
    src = tiny(family, **overrides)
    if family != "lfm2_moe":
        return family, src
    from tests.test_run_lfm import spread_lfm2_moe_routing

    shutil.copytree(src, tmp_path / "src")
    spread_lfm2_moe_routing(tmp_path / "src")
    return family, tmp_path / "src"


def _back_to_source(gg, src, back):
    """`--to safetensors` of `gg` into `back` holds the source checkpoint's tensors, names and
    shapes: (1 + w) - 1 and log(-(-exp(a))) in float32 within a few ulp."""
    from llmarch.convert.from_gguf import convert_from_gguf

    convert_from_gguf(str(gg), back, "f32")
    a, b = load_st(src), load_st(back)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=k)


def _logits(name, folder):
    from fixtures.reference import reference_model

    model = reference_model(name, folder, eager=False)
    with torch.no_grad():
        return model(input_ids=torch.tensor([IDS])).logits[0].numpy()


@pytest.mark.parametrize("name", CASES)
def test_hybrid_hf_gguf_hf_same_weights_and_logits(tiny, tmp_path, name):
    from transformers import AutoModelForCausalLM

    from llmarch.convert.to_gguf import convert_to_gguf

    family, src = _source(tiny, tmp_path, name)
    gg = tmp_path / "m.gguf"
    convert_to_gguf(str(src), gg, "f32")
    back = tmp_path / "back"
    _back_to_source(gg, src, back)
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

    family, src = _source(tiny, tmp_path, name)
    gg = tmp_path / "m.gguf"
    convert_to_gguf(str(src), gg, "f32")
    p = check_parity(gg, reference_model(family, src), "cpu", 77, 32)
    assert p.rt.spec.format == "gguf" and p.rt.spec.linear_attention


@pytest.mark.parametrize("name", ["qwen3_5_moe_text", "nemotron_h_moe"])
def test_experts_on_cpu_from_hybrid_gguf_give_the_resident_tokens(tiny, tmp_path, name):
    """`--experts cpu` (16-bit experts on the host, run's decode step for host experts) from the
    f32 GGUF `llmarch convert` wrote: every MoE layer's experts leave the device, and the greedy
    tokens equal the resident run's from the same GGUF and transformers' on the source checkpoint
    (prefill in chunks of 10, so the linear layers' state carries across calls)."""
    from unittest.mock import patch

    from fixtures.parity import reference_tokens
    from fixtures.reference import reference_model
    from llmarch.convert.to_gguf import convert_to_gguf
    from llmarch.runtime import generate as g
    from llmarch.runtime.experts.decode import attach_decoder
    from llmarch.runtime.experts.report import offloaded
    from llmarch.runtime.load import load_runtime

    family, overrides = CASES[name]
    src = tiny(family, **overrides)
    gg = tmp_path / "m.gguf"
    convert_to_gguf(str(src), gg, "f32")
    prompt = torch.randint(3, 128, (1, 23), generator=torch.Generator().manual_seed(2))
    steps = 16
    expected = reference_tokens(reference_model(family, src), prompt, steps)
    with patch.object(g, "PREFILL_CHUNK", 10):
        resident = load_runtime(str(gg), "cpu", "float32")
        tokens = g.Generator(resident, 23 + steps, cuda_graph=False).generate(prompt[0].tolist(), steps, g.Sampling())
        assert tokens.tokens == expected
        host = load_runtime(str(gg), "cpu", "float32", experts="cpu", expert_bits=16)
        moe_layers = [l for l in host.spec.schedule if l.ffn == "moe"]
        assert host.spec.format == "gguf" and len(offloaded(host.model)) == len(moe_layers) > 0
        gen = g.Generator(host, 23 + steps, cuda_graph=False)
        assert attach_decoder(gen)
        assert gen.generate(prompt[0].tolist(), steps, g.Sampling()).tokens == expected
    assert len(set(expected)) > 3  # not one repeated token


@pytest.mark.parametrize("name", ["qwen3_5_moe_text", "nemotron_h_moe"])
def test_fit_places_the_hybrid_gguf_experts_on_the_host(tiny, tmp_path, name):
    """`fit`'s llmarch run plan for the GGUF (which run reads, as above): the routed experts are the
    source checkpoint's parameters, and a GPU that holds everything else but not them puts them
    on the host as 16-bit (--experts cpu --expert-bits 16), host bytes = routed params x 2 (run
    holds a GGUF in bf16)."""
    from llmarch.api import load_spec
    from llmarch.convert.to_gguf import convert_to_gguf
    from llmarch.plan import memory as mem
    from llmarch.plan.run_placement import Option, footprint, plan_run

    family, overrides = CASES[name]
    src = tiny(family, **overrides)
    gg = tmp_path / "m.gguf"
    convert_to_gguf(str(src), gg, "f32")
    spec = load_spec(str(gg))
    routed = mem.param_parts(spec)["routed_experts"]
    assert routed == mem.param_parts(load_spec(str(src)))["routed_experts"] > 0
    b = 2
    dense_gpu, _ = footprint(spec, Option("cpu", 16), b)
    fixed = mem.CUDA_CONTEXT + mem.run_overhead(spec, b, False)
    gpu = dense_gpu + fixed + mem.kv_bytes(spec, 64, "bf16") + mem.state_bytes(spec, "bf16") + 1024
    assert gpu < dense_gpu + routed * b + fixed  # the experts do not fit beside the rest
    run = plan_run(spec, str(gg), gpu, 2**30, 64, 64)
    assert run["supported"] and run["fits"], run
    assert (run["experts"], run["expert_bits"], run["host_bytes"]) == ("cpu", 16, routed * b)
    assert "--experts cpu --expert-bits 16" in run["command"] and str(gg) in run["command"]


def _split_as_llama_cpp(w: np.ndarray, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """in_proj_qkvz [rows, hidden] -> (attn_qkv, attn_gate), transcribed from llama.cpp 0.3.36's
    conversion/qwen.py Qwen3NextModel.modify_tensors ("original order: [q, k, v, z] * head_count,
    corrected order: [q * head_count, k * head_count, v * head_count, z * head_count]")."""
    dk, dv = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    nv, nk, hidden = cfg["linear_num_value_heads"], cfg["linear_num_key_heads"], cfg["hidden_size"]
    split = [dk, dk, nv // nk * dv, nv // nk * dv]
    data = torch.from_numpy(w).permute(1, 0).contiguous().view(-1, nk, sum(split))
    q, k, v, z = torch.split(data, split, dim=-1)
    q, k, v, z = (t.contiguous().view(hidden, -1) for t in (q, k, v, z))
    qkv = torch.cat([q, k, v], dim=-1).permute(1, 0).contiguous()
    return qkv.numpy(), z.permute(1, 0).contiguous().numpy()


def test_qwen3next_gguf_as_llama_cpp_converter_splits_qkvz(tiny, tmp_path):
    """llama.cpp's own converter writes Qwen3-Next's in_proj_qkvz as attn_qkv + attn_gate (llmarch's
    keeps it as ssm_in; llama.cpp loads both). Such a file, made here from llmarch's by llama.cpp's
    split, runs within 1e-4 of transformers over 77 + 32 steps with its greedy tokens, and back to
    HF gives the source's in_proj_qkvz (regrouped per key head). Checked by hand also on the file
    llama.cpp 0.3.36's convert_hf_to_gguf.py writes from this fixture (README)."""
    import json

    import gguf

    from fixtures.gguf_edit import rewrite_gguf
    from fixtures.parity import check_parity
    from fixtures.reference import reference_model
    from llmarch.api import load_checkpoint_spec
    from llmarch.convert.to_gguf import convert_to_gguf

    src = tiny("qwen3_next")
    cfg = json.loads((src / "config.json").read_text())
    ours = tmp_path / "ours.gguf"
    convert_to_gguf(str(src), ours, "f32")
    ckpt, _ = load_checkpoint_spec(str(ours))
    fused = [n for n in ckpt.tensors if n.endswith(".ssm_in.weight")]
    assert fused
    data = {t.name: np.array(t.data) for t in gguf.GGUFReader(ours).tensors if t.name in fused}
    add = {}
    for name in fused:
        add[name.replace("ssm_in", "attn_qkv")], add[name.replace("ssm_in", "attn_gate")] = _split_as_llama_cpp(
            data[name], cfg
        )
    split = rewrite_gguf(ours, tmp_path / "split.gguf", drop=fused, add=add)
    p = check_parity(split, reference_model("qwen3_next", src), "cpu", 77, 32)
    assert p.rt.spec.linear.projection == "grouped"
    _back_to_source(split, src, tmp_path / "back")


def test_kimi_gguf_with_convs_as_llama_cpp_converter_shapes_them(tiny, tmp_path):
    """llama.cpp's own KimiLinearModel writes the KDA q/k/v convolutions 4-D, [1, C, 1, K] (llmarch
    writes HF's [C, 1, K]; the same values). Such a file runs within 1e-4 of transformers over 77 +
    32 steps, and back to HF gives the source's tensors. Checked by hand also on the file llama.cpp
    0.3.36's convert_hf_to_gguf.py writes from this fixture (README)."""
    import gguf

    from fixtures.gguf_edit import rewrite_gguf
    from fixtures.parity import check_parity
    from fixtures.reference import reference_model
    from llmarch.convert.to_gguf import convert_to_gguf

    src = tiny("kimi_linear")
    ours = tmp_path / "ours.gguf"
    convert_to_gguf(str(src), ours, "f32")
    convs = {
        t.name: np.array(t.data)
        for t in gguf.GGUFReader(ours).tensors
        if t.name.endswith(("ssm_conv1d_q.weight", "ssm_conv1d_k.weight", "ssm_conv1d_v.weight"))
    }
    assert convs and all(a.ndim == 3 and a.shape[1] == 1 for a in convs.values())
    four_d = {n: a.reshape(1, a.shape[0], 1, a.shape[2]) for n, a in convs.items()}
    theirs = rewrite_gguf(ours, tmp_path / "theirs.gguf", drop=list(convs), add=four_d)
    check_parity(theirs, reference_model("kimi_linear", src), "cpu", 77, 32)
    _back_to_source(theirs, src, tmp_path / "back")


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

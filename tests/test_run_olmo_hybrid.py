"""llmarch run on Olmo hybrid (Gated DeltaNet : Olmo 3 attention 3:1) vs transformers 5.24.

A tiny random float32 checkpoint made by transformers (8 layers: 6 Gated DeltaNet, 2 full attention;
4 value heads on 2 key heads): prefill logits and each of 32 cached decode steps match transformers'
forward on the same ids within 1e-4 and the greedy tokens are identical; the prompt (77 tokens) is
odd and longer than one prefill chunk (32 tokens on the CPU, 64 on a GPU). transformers'
pure-PyTorch Gated DeltaNet is the reference. What differs from Qwen3-Next's mixer comes from the
config and the tensors, read into the spec: separate q/k/v/g/b/a projections, beta = 2 sigmoid(b)
(linear_allow_neg_eigval), the gated norm's own epsilon (the recipe: FLA's 1e-5), pre-norm linear
layers beside post-norm attention layers, NoPE when rope_theta is null. Also: the Generator (prefill
in chunks) gives transformers' tokens, the cache holds exactly the state bytes inspect reports, and
convert refuses it in one line (llama.cpp has no architecture for it).
"""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fixtures.parity import check_parity, kv_cache  # noqa: E402

STEPS = 32
PROMPT = 77  # odd, > one prefill chunk (32 tokens on the CPU, 64 on a GPU)


def test_logits_and_greedy_match_transformers(tiny, device):
    from fixtures.reference import reference_model

    path = tiny("olmo_hybrid")
    p = check_parity(path, reference_model("olmo_hybrid", path, device), device, PROMPT, STEPS)
    spec, cfg = p.spec, json.loads((path / "config.json").read_text())
    full = [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"]
    assert [l.index for l in spec.schedule if l.mixer == "full"] == full and len(full) == 2
    assert [l.linear_kind for l in spec.schedule if l.mixer == "linear"] == ["gated_deltanet"] * 6
    # the facts the mixer and the blocks were built from, as the config and modeling file say
    assert spec.linear.projection == "separate" and spec.linear.beta_scale == 2.0 and spec.linear.norm_eps == 1e-5
    assert spec.norm.placement == "pre" and {spec.schedule[i].norm_placement for i in full} == {"post"}
    assert len(set(p.seq[0, PROMPT:].tolist())) > 3  # a sequence that is not one repeated token


def test_nope_when_the_config_has_no_rope_theta(tiny, tmp_path, device):
    """With rope_parameters' rope_theta null (a missing one is the default base) OlmoHybridModel
    builds no rotary embedding and no layer rotates ("Released ckpt don't use any ROPE"); run
    must do the same."""
    from fixtures.reference import reference_model

    nope = tmp_path / "nope"
    shutil.copytree(tiny("olmo_hybrid"), nope)
    cfg = json.loads((nope / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": None}
    (nope / "config.json").write_text(json.dumps(cfg))
    ref = reference_model("olmo_hybrid", nope, device)
    assert ref.model.rotary_emb is None
    p = check_parity(nope, ref, device, PROMPT, 4)
    assert not any(l.rope for l in p.spec.schedule)


def test_hub_conv_split_loads_the_same(tiny, tmp_path):
    """The Hub files store the conv as q_conv1d / k_conv1d / v_conv1d of the q, k and v widths
    (transformers joins them on load; its save_pretrained writes three near-equal parts instead):
    both splits give the same logits."""
    from safetensors.torch import load_file, save_file

    from llmarch.runtime.load import load_runtime

    src = tiny("olmo_hybrid")
    cfg = json.loads((src / "config.json").read_text())
    key = cfg["linear_num_key_heads"] * cfg["linear_key_head_dim"]
    hub = tmp_path / "hub"
    shutil.copytree(src, hub)
    sd = load_file(hub / "model.safetensors")
    names = [n for n in sd if n.endswith("q_conv1d.weight")]
    assert names and sd[names[0]].shape[0] != key  # save_pretrained's even split, not the q width
    for q in names:
        stem = q[: -len("q_conv1d.weight")]
        joined = torch.cat([sd[stem + p + "_conv1d.weight"] for p in "qkv"])
        for part, w in zip("qkv", joined.split([key, key, joined.shape[0] - 2 * key])):
            sd[f"{stem}{part}_conv1d.weight"] = w.clone()
    save_file(sd, hub / "model.safetensors", metadata={"format": "pt"})

    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    logits = []
    for path in (src, hub):
        rt = load_runtime(str(path), "cpu", "float32")
        rt.model.setup(40, "cpu", torch.float32)
        with torch.inference_mode():
            logits.append(rt.model(ids, torch.arange(40), kv_cache(rt.spec, 40, "cpu"), limit=40, last_only=False))
    assert torch.equal(logits[0], logits[1])


def test_generator_matches_transformers(tiny, device):
    """The Generator as `llmarch run` drives it (prefill in chunks of 10, so the layers' state
    carries across calls; on a GPU the decode replays a captured CUDA graph) gives transformers'
    greedy tokens."""
    from fixtures.parity import check_generator
    from fixtures.reference import reference_model

    path = tiny("olmo_hybrid")
    check_generator(path, reference_model("olmo_hybrid", path, device), device, prompt=PROMPT, steps=8)


def test_neg_eigval_from_the_config_else_the_config_class_default(tiny, tmp_path):
    """beta = 2 sigmoid(b) follows linear_allow_neg_eigval; where config.json lacks the key, the
    default of transformers' OlmoHybridConfig (true) holds (the recipe says so)."""
    from transformers import OlmoHybridConfig

    from llmarch.api import load_spec

    for value, scale in ((False, 1.0), (None, 2.0 if OlmoHybridConfig().linear_allow_neg_eigval else 1.0)):
        folder = tmp_path / str(value)
        shutil.copytree(tiny("olmo_hybrid"), folder)
        cfg = json.loads((folder / "config.json").read_text())
        if value is None:
            del cfg["linear_allow_neg_eigval"]
        else:
            cfg["linear_allow_neg_eigval"] = value
        (folder / "config.json").write_text(json.dumps(cfg))
        assert load_spec(str(folder)).linear.beta_scale == scale == (1.0 if value is False else 2.0)


@pytest.mark.parametrize("dtype,kv", [(torch.float32, "f32"), (torch.bfloat16, "bf16")])
def test_state_bytes_inspect_equals_run(tiny, dtype, kv):
    """inspect's kv_cache.state_bytes is what run allocates for the 6 linear layers: a float32
    dk x dv matrix per value head and a conv window over [q k v] (kernel - 1 wide, cache dtype),
    here also computed from config.json by hand."""
    from llmarch.api import load_checkpoint_spec

    path = tiny("olmo_hybrid")
    c = json.loads((path / "config.json").read_text())
    kh, vh, dk, dv, k = (
        c[n]
        for n in (
            "linear_num_key_heads",
            "linear_num_value_heads",
            "linear_key_head_dim",
            "linear_value_head_dim",
            "linear_conv_kernel_dim",
        )
    )
    by_hand = 6 * (vh * dk * dv * 4 + (2 * kh * dk + vh * dv) * (k - 1) * dtype.itemsize)
    _, spec = load_checkpoint_spec(str(path))
    cache = kv_cache(spec, 64, "cpu", dtype)
    assert len(cache.linear) == 6
    assert cache.state_nbytes() == spec.kv_cache(kv_dtype=kv)["state_bytes"] == by_hand


def test_convert_refused_in_one_line(tiny, tmp_path, capsys):
    """llama.cpp (llama-cpp-python 0.3.36: src/llama-arch.cpp, gguf-py's MODEL_ARCH) has no
    architecture for Olmo hybrid: convert says so in one line, exit 2, and writes nothing."""
    from tests.test_run_cli import cli

    out = tmp_path / "o.gguf"
    code, err = cli(["convert", tiny("olmo_hybrid"), "-o", out], capsys)
    err = err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "olmo_hybrid" in err and "llama.cpp has no architecture" in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []

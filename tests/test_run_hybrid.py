"""llmarch run on Gated DeltaNet hybrids (Qwen3-Next, Qwen3.5 dense and MoE) vs transformers.

Tiny random float32 checkpoints made by transformers with 8 layers (6 linear, 2 gated full
attention): prefill logits and each of 32 cached decode steps match transformers' forward on the
same ids within 1e-4 (max abs) and the greedy tokens are identical; the prompt (77 tokens) is odd
and longer than one prefill chunk (32 tokens on the CPU, 64 on a GPU), so the chunked form
crosses a chunk boundary with padding.
transformers' pure-PyTorch Gated DeltaNet is the reference (its fast kernels are not installed).
Also: the chunked prefill form equals the token-by-token recurrence on long inputs, the cache
holds exactly the state bytes inspect reports, MTP layers are listed and skipped, and experts on
the CPU give the same greedy tokens as all on one device.
"""

from __future__ import annotations

import json
from unittest.mock import patch

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fixtures.parity import check_parity, kv_cache, reference_tokens  # noqa: E402

STEPS = 32
PROMPT = 77  # odd, > one prefill chunk (32 tokens on the CPU, 64 on a GPU)
HYBRID = dict(num_hidden_layers=8)  # layer_types: every 4th full -> 6 linear + 2 full attention
CASES = ["qwen3_next", "qwen3_5_text", "qwen3_5_moe_text"]


@pytest.mark.parametrize("name", CASES)
def test_logits_and_greedy_match_transformers(tiny, device, name):
    from fixtures.reference import reference_model

    path = tiny(name, **HYBRID)
    p = check_parity(path, reference_model(name, path, device), device, PROMPT, STEPS)
    mixers = [l.mixer for l in p.spec.schedule]
    assert mixers.count("full") >= 2 and mixers.count("linear") >= 4
    assert len(set(p.seq[0, PROMPT:].tolist())) > 3  # a sequence that is not one repeated token


def test_chunked_form_equals_recurrence_on_long_inputs():
    """The prefill form (chunks of 32 on the CPU, WY solve) and the one-token recurrence give the
    same outputs and final state over 300 tokens from a non-zero state, also when the prefill is cut
    into pieces that do not align with the chunks (as the Generator's prefill chunks cut a long
    prompt)."""
    from fixtures.recurrence import check_chunked_equals_recurrent
    from llmarch.runtime.ops.gated_deltanet import chunked, l2norm, recurrent_step

    g = torch.Generator().manual_seed(0)
    B, H, T, Dk, Dv = 1, 3, 300, 16, 8
    q = l2norm(torch.randn(B, H, T, Dk, generator=g)) * Dk**-0.5
    k = l2norm(torch.randn(B, H, T, Dk, generator=g))
    v = torch.randn(B, H, T, Dv, generator=g)
    decay = -torch.rand(B, H, T, generator=g) * 0.3  # log decay <= 0
    beta = torch.rand(B, H, T, generator=g)
    start = torch.randn(B, H, Dk, Dv, generator=g) * 0.1

    check_chunked_equals_recurrent(chunked, recurrent_step, [q, k, v, decay, beta], start)


@pytest.mark.parametrize("dtype,kv", [(torch.float32, "f32"), (torch.bfloat16, "bf16")])
def test_state_bytes_inspect_equals_run(tiny, dtype, kv):
    """inspect's kv_cache.state_bytes (from the config's linear-attention sizes) is what run allocates
    for the linear layers' conv windows and recurrent matrices."""
    from llmarch.api import load_checkpoint_spec

    _, spec = load_checkpoint_spec(str(tiny("qwen3_next", **HYBRID)))
    cache = kv_cache(spec, 64, "cpu", dtype)
    assert len(cache.linear) == 6
    assert cache.state_nbytes() == spec.kv_cache(kv_dtype=kv)["state_bytes"] > 0


def test_generator_reuses_cache_and_offloaded_experts_agree(tiny):
    """The Generator (prefill cut into chunks of 10, so linear state carries across calls) gives
    transformers' greedy tokens, twice in a row on one cache (reset clears the recurrent state),
    and with --experts cpu (16-bit) the same tokens as all experts on one device."""
    from fixtures.reference import reference_model
    from llmarch.runtime import generate as g
    from llmarch.runtime.load import load_runtime

    path = tiny("qwen3_next", **HYBRID)
    prompt = torch.randint(3, 128, (1, 23), generator=torch.Generator().manual_seed(2))
    expected = reference_tokens(reference_model("qwen3_next", path), prompt, STEPS)
    with patch.object(g, "PREFILL_CHUNK", 10):  # prefill in chunks, so state carries across calls
        rt = load_runtime(str(path), "cpu", "float32")
        gen = g.Generator(rt, 23 + STEPS)
        assert gen.generate(prompt[0].tolist(), STEPS, g.Sampling()).tokens == expected
        assert gen.generate(prompt[0].tolist(), STEPS, g.Sampling()).tokens == expected
        rt_cpu = load_runtime(str(path), "cpu", "float32", experts="cpu", expert_bits=16)
        from llmarch.runtime.experts.report import offloaded

        assert len(offloaded(rt_cpu.model)) == 8
        assert g.Generator(rt_cpu, 23 + STEPS).generate(prompt[0].tolist(), STEPS, g.Sampling()).tokens == expected


def test_generator_graph_decode_matches_transformers(tiny, device):
    """The Generator on the test device gives transformers' greedy tokens, twice on one cache. On a
    GPU its decode replays a captured CUDA graph: the capture's warm-up steps must leave the
    recurrent state as it was, and each replay must update it in place."""
    from fixtures.reference import reference_model
    from llmarch.runtime import generate as g
    from llmarch.runtime.load import load_runtime

    path = tiny("qwen3_5_text", **HYBRID)
    prompt = torch.randint(3, 128, (1, PROMPT), generator=torch.Generator().manual_seed(4))
    expected = reference_tokens(reference_model("qwen3_5_text", path, device), prompt.to(device), STEPS)
    rt = load_runtime(str(path), device, "float32")
    gen = g.Generator(rt, PROMPT + STEPS)
    for _ in range(2):
        assert gen.generate(prompt[0].tolist(), STEPS, g.Sampling()).tokens == expected
    assert (gen.graph is not None) == device.startswith("cuda")


def _with_mtp(src, dst):
    """A copy of a tiny Qwen3-Next with one MTP block the way the Hub checkpoints store it
    (mtp.fc, mtp.pre_fc_norm_embedding / _hidden, mtp.layers.0.* = a full-attention decoder
    layer, mtp.norm; config mtp_num_hidden_layers = 1); transformers ignores mtp.* on load."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    d = sd["model.norm.weight"].shape[0]
    gen = torch.Generator().manual_seed(3)
    full = next(i for i in range(64) if f"model.layers.{i}.self_attn.q_proj.weight" in sd)
    mtp = {
        "mtp.fc.weight": torch.randn(d, 2 * d, generator=gen) * 0.02,
        "mtp.pre_fc_norm_embedding.weight": torch.zeros(d),
        "mtp.pre_fc_norm_hidden.weight": torch.zeros(d),
        "mtp.norm.weight": torch.zeros(d),
    }
    pre = f"model.layers.{full}."
    mtp.update({"mtp.layers.0." + k[len(pre) :]: v.clone() for k, v in sd.items() if k.startswith(pre)})
    save_file({**sd, **mtp}, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["mtp_num_hidden_layers"] = 1
    (dst / "config.json").write_text(json.dumps(cfg))
    return sum(t.numel() for t in mtp.values())


def test_mtp_listed_by_inspect_and_skipped_by_run(tiny, tmp_path, capsys):
    from llmarch.api import load_checkpoint_spec
    from llmarch.runtime.run import RunOptions, run

    src = tiny("qwen3_next", **HYBRID)
    mtp_params = _with_mtp(src, tmp_path / "mtp")
    _, spec = load_checkpoint_spec(str(tmp_path / "mtp"))
    assert spec.mtp_layers == 1 and spec.params["mtp"] == mtp_params
    ids = "5,17,33,9,70,3,44"
    plain = run(RunOptions(source=str(src), prompt_ids=ids, max_tokens=6, device="cpu", dtype="float32"))
    capsys.readouterr()
    with_mtp = run(
        RunOptions(source=str(tmp_path / "mtp"), prompt_ids=ids, max_tokens=6, device="cpu", dtype="float32")
    )
    assert "1 MTP layer(s) skipped" in capsys.readouterr().err
    assert with_mtp["tokens"] == plain["tokens"]


def test_linear_sizes_disagreeing_with_the_tensors_is_refused(tiny, tmp_path):
    """A config whose linear-attention sizes the tensors do not have: an LlmarchError naming the
    checkpoint and the tensor (the CLI prints it as one line, exit 2), not a torch shape error."""
    import shutil

    from llmarch.errors import LlmarchError
    from llmarch.runtime.load import load_runtime

    bad = tmp_path / "bad"
    shutil.copytree(tiny("qwen3_5_text", **HYBRID), bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["linear_key_head_dim"] = 16
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlmarchError) as e:
        load_runtime(str(bad), "cpu", "float32")
    assert str(bad) in str(e.value.path) and "in_proj_qkv" in str(e.value)
    assert "linear-attention sizes need (96, 32)" in str(e.value)

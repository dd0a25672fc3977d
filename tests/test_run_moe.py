"""llmarch run vs transformers for the MoE / MLA families (tiny random float32 checkpoints).

Prefill logits and every cached decode step within 1e-4 max abs of transformers' eager forward
on the same ids, and 32 identical greedy tokens. Prompts (24) pass gpt-oss's window (8) and
Llama 4's attention chunk (16); DeepSeek V3's cache holds the MLA latent, not K/V.
Also: gpt-oss experts stored as MXFP4 (*_blocks/*_scales) load to what transformers' own
dequantizer gives, and bad MoE checkpoints fail with one line.
"""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fixtures.families import FAMILIES  # noqa: E402

TOL = 1e-4
STEPS = 32
PROMPT = 24
FAMS = ["qwen3_moe", "deepseek_v3", "gpt_oss", "glm4_moe", "llama4", "minimax_m2", "afmoe"]


def _reference(name, path):
    cls_name = FAMILIES[name].get("model_class")
    cls = getattr(transformers, cls_name) if cls_name else transformers.AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def _parity(path, name, ref_path=None):
    from llmarch.runtime.kv_cache import KVCache
    from llmarch.runtime.load import load_runtime

    rt = load_runtime(str(path), "cpu", "float32")
    ref = _reference(name, ref_path or path)
    spec, model = rt.spec, rt.model
    a = spec.attention
    max_seq = PROMPT + STEPS
    cache = KVCache(spec.schedule, max_seq, a.kv_heads, a.head_dim, a.v_head_dim or a.head_dim, torch.float32, "cpu")
    model.setup(max_seq, "cpu", torch.float32)
    ids = torch.randint(3, spec.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        mine = model(ids, torch.arange(PROMPT), cache, limit=PROMPT, last_only=False)
        out = ref(ids, use_cache=True)
        theirs, past = out.logits, out.past_key_values
        err = (mine - theirs).abs().max().item()
        assert err < TOL, f"prefill logits differ by {err}"
        worst, n = 0.0, PROMPT
        for step in range(STEPS):
            tok = mine[0, -1].argmax().item()
            assert tok == theirs[0, -1].argmax().item(), f"greedy token {step} differs"
            t = torch.tensor([[tok]])
            mine = model(t, torch.tensor([n]), cache, limit=n + 1)
            out = ref(t, past_key_values=past, use_cache=True)
            theirs, past = out.logits[:, -1:], out.past_key_values
            worst = max(worst, (mine - theirs).abs().max().item())
            n += 1
        assert worst < TOL, f"cached decode logits differ by up to {worst}"
    return rt, cache


@pytest.mark.parametrize("name", FAMS)
def test_moe_family_matches_transformers(tiny, name):
    rt, cache = _parity(tiny(name), name)
    spec = rt.spec
    assert any(l.ffn == "moe" for l in spec.schedule)
    if spec.attention.mla:  # the cache holds (kv_lora_rank + rope dims) per token per layer
        a = spec.attention
        per_token = sum(c.k.shape[-1] + c.v.shape[-1] for c in cache.layers.values())
        assert per_token == spec.layers * (a.kv_lora_rank + a.qk_rope_head_dim)


def test_gpt_oss_mxfp4_experts_load_like_transformers(tiny, tmp_path):
    """MXFP4 blocks/scales in our checkpoint; transformers gets the same experts dequantized by
    its own convert_moe_packed_tensors in a bf16/f32 twin checkpoint."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    src = tiny("gpt_oss")
    mx, twin = tmp_path / "mx", tmp_path / "twin"
    for d in (mx, twin):
        shutil.copytree(src, d)
    sd = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    mx_sd, twin_sd = dict(sd), dict(sd)
    for name in [n for n in sd if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        E, K, R = sd[name].shape  # transformers' layout [E, in, out]
        blocks = torch.randint(0, 256, (E, R, K // 32, 16), dtype=torch.uint8, generator=g)
        scales = torch.randint(120, 125, (E, R, K // 32), dtype=torch.uint8, generator=g)
        del mx_sd[name]
        mx_sd[name + "_blocks"], mx_sd[name + "_scales"] = blocks, scales
        twin_sd[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).contiguous()
        assert twin_sd[name].shape == sd[name].shape
    save_file(mx_sd, mx / "model.safetensors", metadata={"format": "pt"})
    save_file(twin_sd, twin / "model.safetensors", metadata={"format": "pt"})
    _parity(mx, "gpt_oss", ref_path=twin)


def _rewrite(src, dst, edit):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(src / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _bad(path, *extra):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "llmarch", "run", str(path), "--prompt-ids", "1,2,3",
                        "--device", "cpu", "-n", "2", *extra], capture_output=True, text=True)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


def test_bad_moe_checkpoints_one_line(tiny, tmp_path):
    src = tiny("qwen3_moe")

    def drop_expert(sd):
        for k in [k for k in sd if ".layers.2.mlp.experts.5." in k]:
            del sd[k]

    def bad_router(sd):
        sd["model.layers.1.mlp.gate.weight"] = torch.zeros(5, 32)

    def int_experts(sd):
        k = "model.layers.3.mlp.experts.0.up_proj.weight"
        sd[k] = sd[k].to(torch.int8)

    msg = _bad(_rewrite(src, tmp_path / "missing", drop_expert))
    assert "layer 2" in msg and "experts missing" in msg and "5" in msg
    msg = _bad(_rewrite(src, tmp_path / "router", bad_router))
    assert "router weight has shape (5, 32)" in msg and "8 experts" in msg
    msg = _bad(_rewrite(src, tmp_path / "int", int_experts))
    assert "expert storage type I8" in msg and "can read" in msg
    msg = _bad(src, "--expert-bits", "3")
    assert "--expert-bits must be 16, 8 or 4" in msg
    msg = _bad(src, "--device", "cpu", "--experts", "disk", "--expert-dir", "/proc/llmarch-cannot-write-here")
    assert "/proc/llmarch-cannot-write-here: --expert-dir: cannot create a folder" in msg


def test_not_enough_memory_says_what_fits(deepseek_v3_skeleton):
    """DeepSeek V3 (671B, header-only): experts at 16 bits cannot sit in this machine's RAM."""
    msg = _bad(deepseek_v3_skeleton, "--experts", "gpu", "--expert-bits", "16")
    assert msg.count("not enough memory for --experts gpu --expert-bits 16") == 1
    assert "GiB" in msg and "free" in msg

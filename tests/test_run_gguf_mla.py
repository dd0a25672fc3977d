"""llmarch run on MLA GGUFs (llama.cpp's deepseek2 layout: kv_b stored split as attn_k_b + attn_v_b),
written from the tiny DeepSeek V3 checkpoint by `llmarch convert --to gguf` and checked against
transformers on the source checkpoint: f32 logits within 1e-4 at prefill and 32 cached steps with
its greedy tokens; q8_0 top-1 agreement and logit NMSE on a teacher-forced sequence; expert offload
(--experts cpu) from the GGUF gives the resident model's tokens; a GGUF missing k_b or v_b is one
line, exit 2. Kimi K2's model_type runs as deepseek_v3 (test_run_moe), and its GGUF arch is the same
deepseek2, so this covers its GGUF too."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fixtures.parity import check_experts_on_cpu_same_tokens  # noqa: E402
from fixtures.reference import reference_model  # noqa: E402
from tests.test_run_moe import PROMPT, STEPS, _bad, _parity  # noqa: E402

# widths of 64 multiples, as the expert stores of --experts cpu need; q8_0 blocks (32) fit them
SHAPE = dict(hidden_size=128, intermediate_size=128, moe_intermediate_size=64)


@pytest.fixture(scope="module")
def ggufs(tiny, tmp_path_factory):
    src = tiny("deepseek_v3", **SHAPE)
    d = tmp_path_factory.mktemp("mla_gguf")
    from llmarch.convert.to_gguf import convert_to_gguf

    files = {q: d / f"deepseek_v3-{q}.gguf" for q in ("f32", "q8_0")}
    for q, out in files.items():  # what `llmarch convert --to gguf --dtype q` runs, in process (cheaper)
        convert_to_gguf(str(src), out, q)
    return src, files


def test_f32_mla_gguf_matches_transformers(ggufs):
    """kv_b rebuilt from k_b / v_b: the absorbed decode over 32 cached steps matches transformers."""
    import gguf

    src, files = ggufs
    names = {t.name for t in gguf.GGUFReader(files["f32"]).tensors}
    assert "blk.0.attn_k_b.weight" in names and "blk.0.attn_kv_b.weight" not in names  # the split layout
    rt, cache = _parity(files["f32"], "deepseek_v3", ref_path=src)
    assert rt.spec.format == "gguf" and rt.spec.attention.mla


def test_q8_0_mla_gguf_top1_and_nmse(ggufs):
    """q8_0 against transformers (float32 source) teacher-forced over prompt + 32 tokens: every
    position's top-1 and the logits' NMSE (measured: top-1 55/56 = 0.982, NMSE 1.0e-4)."""
    from llmarch.runtime.kv_cache import KVCache
    from llmarch.runtime.load import load_runtime

    src, files = ggufs
    rt = load_runtime(str(files["q8_0"]), "cpu", "float32")
    ref = reference_model("deepseek_v3", src)
    n = PROMPT + STEPS
    seq = torch.randint(3, rt.spec.vocab_size, (1, n), generator=torch.Generator().manual_seed(2))
    a = rt.spec.attention
    cache = KVCache(rt.spec.schedule, n, a.kv_heads, a.head_dim, a.v_head_dim or a.head_dim, torch.float32, "cpu")
    rt.model.setup(n, "cpu", torch.float32)
    with torch.inference_mode():
        theirs = ref(seq).logits[0]
        mine = [rt.model(seq[:, :PROMPT], torch.arange(PROMPT), cache, limit=PROMPT, last_only=False)[0]]
        for i in range(PROMPT, n):  # the cached (absorbed) decode path, fed the sequence's own tokens
            mine.append(rt.model(seq[:, i : i + 1], torch.tensor([i]), cache, limit=i + 1)[0])
    mine_ = torch.cat(mine)
    top1 = (mine_.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    nmse = (((mine_ - theirs) ** 2).sum() / (theirs**2).sum()).item()
    print(f"q8_0 MLA GGUF vs transformers: top-1 {top1:.3f}, NMSE {nmse:.2e}")
    assert top1 >= 0.9, top1
    assert nmse < 1e-2, nmse


def test_mla_gguf_experts_on_cpu_same_tokens(ggufs):
    """--experts cpu from the GGUF gives the greedy tokens of the whole model on one device."""
    check_experts_on_cpu_same_tokens(ggufs[1]["f32"], PROMPT, STEPS)


@pytest.mark.parametrize("drop", ["attn_k_b", "attn_v_b"])
def test_mla_gguf_missing_k_b_or_v_b_one_line(ggufs, tmp_path, drop):
    """A deepseek2 GGUF without one half of kv_b: one line naming the file and the tensor, exit 2."""
    from fixtures.gguf_edit import rewrite_gguf

    dropped = f"blk.1.{drop}.weight"
    out = rewrite_gguf(ggufs[1]["f32"], tmp_path / f"no-{drop}.gguf", drop={dropped})
    if drop == "attn_k_b":  # the command line: one line, exit 2 (a subprocess, so once)
        line = _bad(out)
        assert str(out) in line and dropped in line and "missing" in line, line
    else:
        from llmarch.errors import LlmarchError
        from llmarch.runtime.load import load_runtime

        with pytest.raises(LlmarchError, match=f"{dropped} missing") as e:
            load_runtime(str(out), "cpu", "float32")
        assert str(e.value.path) == str(out)

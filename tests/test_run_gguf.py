"""GGUF loading vs transformers loading the same GGUF: tiny llama (Q8_0, llama.cpp's Q/K row
permutation to undo) and tiny gemma3 (Q8_0, norms stored as 1 + w); plus the GGUF tokenizer."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gguf_logits_match_transformers(tiny_gguf, arch):
    from llmarch.runtime.kv_cache import KVCache
    from llmarch.runtime.load import load_runtime

    # head_dim 256 as in every Gemma 3 but 27B: transformers' GGUF loader assumes query_pre_attn_scalar=256
    path = tiny_gguf(arch, head_dim=256) if arch == "gemma3" else tiny_gguf(arch)
    rt = load_runtime(str(path), "cpu", "float32")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    spec, a = rt.spec, rt.spec.attention
    T, steps = 20, 12  # gemma3's tiny window is 16: the decode runs past it
    cache = KVCache(spec.schedule, T + steps, a.kv_heads, a.head_dim, a.head_dim, torch.float32, "cpu")
    rt.model.setup(T + steps, "cpu", torch.float32)
    ids = torch.randint(4, spec.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        mine = rt.model(ids, torch.arange(T), cache, limit=T, last_only=False)
        theirs = ref(ids).logits
        assert (mine - theirs).abs().max().item() < 1e-4
        seq = ids
        for _ in range(steps):
            nxt = mine[:, -1:].argmax(-1)
            assert nxt.item() == theirs[0, -1].argmax().item()
            seq = torch.cat([seq, nxt], 1)
            mine = rt.model(nxt, torch.tensor([seq.shape[1] - 1]), cache, limit=seq.shape[1])
            theirs = ref(seq).logits[:, -1:]
            assert (mine - theirs).abs().max().item() < 1e-4


def test_gguf_sentencepiece_tokenizer_matches_transformers(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMARCH_CACHE", str(tmp_path))
    from llmarch.checkpoint import open_checkpoint
    from llmarch.runtime.tokenizer import load_tokenizer

    path = tiny_gguf("llama")
    ours = load_tokenizer(open_checkpoint(str(path)))
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # the tiny vocab is pieces "\u2581tokN" + bytes 0x00-0x3F: most text is unknown pieces (dropped, as there)
    for text in ["tok70 tok71", " tok99", "unknown words é 7", "<bos>tok80", "", "tok70\ntok71  ", "12 3;4"]:
        assert ours.encode(text) == ref(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == ref.decode(ref(text)["input_ids"], skip_special_tokens=True), text


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen3", "smollm3", "olmo2", "olmo3", "gemma3_text"])
def test_gguf_of_each_family_runs_like_its_safetensors(tiny, tmp_path, family):
    """The tiny checkpoint written to an f32 GGUF by `llmarch convert` (llama.cpp's names, layouts
    and metadata: fused GPT-2 qkv, permuted llama Q/K, Gemma 1 + w norms, per-layer SWA patterns)
    runs to the same logits as the safetensors original, which test_run_parity ties to transformers."""
    from llmarch.convert.to_gguf import convert_to_gguf
    from llmarch.runtime.kv_cache import KVCache
    from llmarch.runtime.load import load_runtime

    out = tmp_path / f"{family}.gguf"
    convert_to_gguf(str(tiny(family)), out, dtype="f32", force=True)
    runs = [load_runtime(str(p), "cpu", "float32") for p in (tiny(family), out)]
    assert runs[1].spec.format == "gguf"
    T, steps = 20, 8
    ids = torch.randint(3, runs[0].spec.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    logits = []
    for rt in runs:
        s, a = rt.spec, rt.spec.attention
        cache = KVCache(s.schedule, T + steps, a.kv_heads, a.head_dim, a.head_dim, torch.float32, "cpu")
        rt.model.setup(T + steps, "cpu", torch.float32)
        with torch.inference_mode():
            out_ = [rt.model(ids, torch.arange(T), cache, limit=T, last_only=False)]
            for i in range(steps):
                nxt = out_[-1][:, -1:].argmax(-1)
                out_.append(rt.model(nxt, torch.tensor([T + i]), cache, limit=T + i + 1))
        logits.append(out_)
    for a_, b_ in zip(*logits):
        assert (a_ - b_).abs().max().item() < 1e-5


def test_llama3_scaling_read_from_rope_freqs_alone(tiny, tmp_path):
    """A GGUF written by llama.cpp keeps Llama 3 RoPE scaling only as the rope_freqs divisors. With
    llmarch's own copy of the parameters removed, the parameters come back from the divisors (their
    divisors equal the file's), the run equals the safetensors source's, and the same file without
    rope_freqs runs differently (so the scaling is seen). Divisors of no Llama 3 form are one line."""
    from fixtures.gguf_edit import rewrite_gguf
    from llmarch.api import load_spec
    from llmarch.arch.rope_factors import llama3_divisors
    from llmarch.convert.from_gguf import convert_from_gguf
    from llmarch.convert.to_gguf import convert_to_gguf
    from llmarch.errors import LlmarchError
    from llmarch.runtime.load import load_runtime

    src = tiny("llama", hidden_size=64, rope_parameters=dict(LLAMA3_ROPE))
    ours = tmp_path / "ours.gguf"
    convert_to_gguf(str(src), ours, dtype="f32", force=True)
    bare = rewrite_gguf(ours, tmp_path / "bare.gguf", drop_keys=("llmarch.rope_scaling",))
    plain = rewrite_gguf(
        ours, tmp_path / "plain.gguf", drop_keys=("llmarch.rope_scaling",), drop=("rope_freqs.weight",)
    )
    scaling = load_spec(str(bare)).rope.scaling
    assert scaling["rope_type"] == "llama3"
    theta, dim = LLAMA3_ROPE["rope_theta"], 64 // 4
    assert llama3_divisors(dim, theta, scaling).tolist() == llama3_divisors(dim, theta, LLAMA3_ROPE).tolist()
    ids = torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, path in (("source", src), ("bare", bare), ("plain", plain)):
        with torch.inference_mode():
            logits[name] = _prefill(load_runtime(str(path), "cpu", "float32"), ids)
    assert (logits["bare"] - logits["source"]).abs().max().item() < 1e-4
    assert (logits["plain"] - logits["source"]).abs().max().item() > 5e-4  # 5x the tolerance
    odd = rewrite_gguf(
        ours,
        tmp_path / "odd.gguf",
        drop_keys=("llmarch.rope_scaling",),
        drop=("rope_freqs.weight",),
        add={"rope_freqs.weight": torch.tensor([1.0, 3.0, 2.0, 5.0, 1.5, 4.0, 2.5, 6.0]).numpy()},
    )
    with pytest.raises(LlmarchError, match="rope_freqs"):
        load_runtime(str(odd), "cpu", "float32")
    # back to safetensors: config.json gets parameters with the file's divisors; odd ones are refused
    convert_from_gguf(str(bare), tmp_path / "back", force=True)
    back = json.loads((tmp_path / "back" / "config.json").read_text())["rope_scaling"]
    assert llama3_divisors(dim, theta, back).tolist() == llama3_divisors(dim, theta, LLAMA3_ROPE).tolist()
    with pytest.raises(LlmarchError, match="rope_freqs"):
        convert_from_gguf(str(odd), tmp_path / "odd-back", force=True)
    assert not (tmp_path / "odd-back").exists()


# a 16-wide head's wavelengths 2*pi*10000^(i/8): 199 and 628 in the smoothly scaled band (80 to 640),
# the three longer ones scaled fully
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=8.0,
    original_max_position_embeddings=640,
)


def _prefill(rt, ids):
    from llmarch.runtime.kv_cache import KVCache

    s, a, T = rt.spec, rt.spec.attention, ids.shape[1]
    cache = KVCache(s.schedule, T, a.kv_heads, a.head_dim, a.head_dim, torch.float32, "cpu")
    rt.model.setup(T, "cpu", torch.float32)
    return rt.model(ids, torch.arange(T), cache, limit=T, last_only=False)

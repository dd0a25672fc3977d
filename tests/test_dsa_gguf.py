"""DeepSeek Sparse Attention models (DeepSeek V3.2 -> llama.cpp's deepseek32, GLM-5 -> glm-dsa) in
GGUF, written by `llmarch convert --to gguf` from tiny random float32 checkpoints:

- `llmarch run` from the f32 GGUF (the indexer's wq_b / wk / k_norm / weights_proj read back from
  blk.N.indexer.*, kv_b rebuilt from attn_k_b / attn_v_b) against transformers on the source
  checkpoint: prefill and 32 cached decode steps within 1e-4, identical greedy tokens, with
  index_topk 8 under a 40-token prompt so the selection matters; GLM-5 also with a layer that
  reuses the previous layer's selection (written as llama.cpp's attention.indexer.types flags);
  from the q8_0 GGUF, top-1 agreement and logit NMSE against transformers over a 72-token prompt;
  with --experts cpu, the resident model's greedy tokens;
- GGUF -> safetensors gives back the source's tensors (bit-exact at f32) and a config.json whose
  indexer sizes are the source's: transformers' logits from it equal the source's;
- (llamacpp marker) llama.cpp 0.3.36 loads the files, runs its own indexer (a real top-k over an
  indexer key cache, not dense attention: a prompt past index_topk still matches) and gives
  transformers' greedy tokens; logits NMSE reported.

The fixtures use 8 indexer heads (with 2, many keys tie at 0 after the ReLU: see test_run_dsa) and
index_head_dim 64: llama.cpp rotates indexer queries and keys by a Hadamard matrix of at least
64 x 64 (llama_kv_cache::build_input_k_rot), so a narrower key does not build a graph there.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fixtures.parity import check_experts_on_cpu_same_tokens, check_parity, own_cache  # noqa: E402
from fixtures.reference import reference_model  # noqa: E402

PROMPT, STEPS = 40, 32
DSA = {"deepseek_v32": "deepseek32", "glm_moe_dsa": "glm-dsa"}
SHAPE = dict(index_n_heads=8, index_head_dim=64, index_topk=8)
SHARED = ["full", "shared", "full"]  # GLM-5's layers reusing the previous full layer's selection


def _case(shared: bool) -> dict:
    return dict(SHAPE, indexer_types=SHARED) if shared else dict(SHAPE)


CASES = [("deepseek_v32", False), ("glm_moe_dsa", False), ("glm_moe_dsa", True)]
IDS = ["deepseek_v32", "glm_moe_dsa", "glm_moe_dsa-shared"]


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    """(source folder, GGUF) per case and dtype, converted once in process (what `llmarch convert` runs)."""
    from llmarch.convert.to_gguf import convert_to_gguf

    made = {}

    def build(name, shared, dtype="f32"):
        if (name, shared, dtype) not in made:
            src = tiny(name, **_case(shared))
            out = tmp_path_factory.mktemp("dsa_gguf") / f"{name}-{dtype}.gguf"
            convert_to_gguf(str(src), out, dtype)
            made[name, shared, dtype] = (src, out)
        return made[name, shared, dtype]

    return build


@pytest.mark.parametrize("name,shared", CASES, ids=IDS)
def test_run_from_gguf_matches_transformers(converted, name, shared):
    import gguf

    src, path = converted(name, shared)
    r = gguf.GGUFReader(path)
    arch = r.get_field("general.architecture").contents()
    assert arch == DSA[name]
    names = {t.name for t in r.tensors}
    assert {"blk.0.indexer.attn_q_b.weight", "blk.0.indexer.k_norm.bias", "blk.0.attn_k_b.weight"} <= names
    assert r.get_field(f"{arch}.attention.indexer.top_k").contents() == SHAPE["index_topk"]
    p = check_parity(path, own_cache(reference_model(name, src)), "cpu", PROMPT, STEPS)
    spec = p.rt.spec
    assert spec.format == "gguf" and spec.attention.indexer
    a = spec.attention
    assert (a.index_heads, a.index_head_dim, a.index_topk) == (8, 64, 8)
    assert a.index_rope_interleave == (name == "glm_moe_dsa")  # the recipe's, whatever the format
    want = [None, 0, None] if shared else [None] * spec.layers
    assert [l.index_from for l in spec.schedule] == want
    flags = r.get_field(f"{arch}.attention.indexer.types").contents()
    assert flags == [l.index_from is None for l in spec.schedule]


def test_diff_tensors_pairs_the_indexer(converted):
    """`llmarch diff --tensors` names the source's tensors as llama.cpp's deepseek32 file does
    (gguf-py has no deepseek32 tables: glm-dsa's stand in), so only what the conversion changes is
    reported: kv_b split, the MTP layer dropped, gguf-py's spelling of the router bias."""
    from llmarch.api import diff_sources

    src, path = converted("deepseek_v32", False)
    t = diff_sources(str(src), str(path), tensors=True)[0]["tensors"]
    mtp = str(json.loads((src / "config.json").read_text())["num_hidden_layers"])  # the MTP layer's index
    kinds = ("only_in_a", "only_in_b", "shape_changes")
    changed = {e["tensor"] for kind in kinds for e in t[kind] if e["layers"] != mtp}
    assert not [n for n in changed if "indexer" in n or "attn_q" in n], changed
    assert {"blk.*.attn_kv_b.weight", "blk.*.attn_k_b.weight", "blk.*.attn_v_b.weight"} <= changed


def test_gguf_with_llamacpp_mtp_block(converted, tmp_path):
    """llama.cpp's converter keeps GLM-5's MTP layer as one more block (nextn_predict_layers, the
    layer's tensors plus blk.L.nextn.*), which llama.cpp loads and skips. llmarch runs such a file
    as the one without (the MTP block skipped: the same greedy tokens) and converts it back to the
    same safetensors (the block not carried back)."""
    import gguf

    from fixtures.gguf_edit import rewrite_gguf
    from llmarch.convert.from_gguf import convert_from_gguf
    from llmarch.runtime.generate import Generator, Sampling
    from llmarch.runtime.load import load_runtime
    from tests.test_convert import load_st

    _, path = converted("glm_moe_dsa", False)
    r = gguf.GGUFReader(path)
    n, hid = (r.get_field(f"glm-dsa.{k}").contents() for k in ("block_count", "embedding_length"))
    last = [t for t in r.tensors if t.name.startswith(f"blk.{n - 1}.")]
    add = {t.name.replace(f"blk.{n - 1}.", f"blk.{n}."): np.array(t.data) for t in last}
    rng = np.random.default_rng(0)
    for name, shape in (
        ("eh_proj", (hid, 2 * hid)),
        ("enorm", (hid,)),
        ("hnorm", (hid,)),
        ("shared_head_norm", (hid,)),
    ):
        add[f"blk.{n}.nextn.{name}.weight"] = rng.standard_normal(shape).astype(np.float32)
    flags = r.get_field("glm-dsa.attention.indexer.types").contents()
    fields = {"glm-dsa.block_count": n + 1, "glm-dsa.attention.indexer.types": flags + [True]}
    mtp = rewrite_gguf(path, tmp_path / "mtp.gguf", dict(fields, **{"glm-dsa.nextn_predict_layers": 1}), add=add)

    ids = torch.randint(3, 128, (PROMPT,), generator=torch.Generator().manual_seed(4)).tolist()
    tokens = [
        Generator(load_runtime(str(p), "cpu", "float32"), PROMPT + 9, cuda_graph=False)
        .generate(ids, 8, Sampling())
        .tokens
        for p in (path, mtp)
    ]
    assert tokens[0] == tokens[1]
    for p, out in ((path, tmp_path / "plain"), (mtp, tmp_path / "with_mtp")):
        convert_from_gguf(str(p), out, "f32")
    mine, want = load_st(tmp_path / "with_mtp"), load_st(tmp_path / "plain")
    assert set(mine) == set(want) and all(np.array_equal(mine[k], want[k]) for k in want)


@pytest.mark.parametrize("name", DSA)
def test_experts_on_cpu_from_gguf_same_tokens(tiny, tmp_path, name):
    """--experts cpu from the DSA GGUF (indexer and attention resident, experts in the CPU kernel's
    store) gives the greedy tokens of the whole model on one device. Widths of 64 multiples, as the
    expert stores need."""
    from llmarch.convert.to_gguf import convert_to_gguf

    src = tiny(name, **SHAPE, hidden_size=128, intermediate_size=128, moe_intermediate_size=64)
    path = str(tmp_path / f"{name}.gguf")
    convert_to_gguf(str(src), path, "f32")
    check_experts_on_cpu_same_tokens(path, PROMPT, STEPS)


@pytest.mark.parametrize("name", DSA)
def test_run_from_q8_0_gguf_top1_and_nmse(converted, name):
    """llmarch run of the q8_0 GGUF (indexer weights quantized too) against transformers on the
    float32 source, every position of a 72-token prompt (prefill): top-1 agreement and logit NMSE
    (measured: deepseek_v32 0.986 / 1.2e-3, glm_moe_dsa 0.972 / 2.9e-3)."""
    from llmarch.convert.verify import _runtime_logits, nmse

    src, path = converted(name, False, "q8_0")
    ids = torch.randint(3, 128, (72,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        ref = reference_model(name, src)(torch.tensor([ids])).logits[0].numpy()
    got = _runtime_logits(str(path), ids)
    top1, err = (ref.argmax(-1) == got.argmax(-1)).mean(), nmse(ref, got)
    print(f"{name} q8_0 GGUF vs transformers: top-1 {top1:.3f}, NMSE {err:.2e}")
    assert top1 >= 0.9 and err < 1e-2, (top1, err)


@pytest.mark.parametrize("name,shared", CASES, ids=IDS)
def test_gguf_back_to_safetensors(converted, tmp_path, name, shared):
    """GGUF -> HF: every source tensor back bit-exact (MTP layers, which llama.cpp's file lacks,
    aside) and the indexer's config keys as the source's."""
    from llmarch.convert.from_gguf import convert_from_gguf
    from tests.test_convert import load_st

    src, path = converted(name, shared)
    back = tmp_path / "back"
    convert_from_gguf(str(path), back, "f32")
    mine, theirs = load_st(back), load_st(src)
    cfg, want = (json.loads((d / "config.json").read_text()) for d in (back, src))
    n = want["num_hidden_layers"]
    theirs = {k: v for k, v in theirs.items() if not k.startswith(tuple(f"model.layers.{i}." for i in range(n, n + 2)))}
    assert set(mine) == set(theirs)
    for k, v in theirs.items():
        assert np.array_equal(mine[k], v), k
    assert cfg["model_type"] == want["model_type"] and cfg["num_nextn_predict_layers"] == 0
    for key in ("index_n_heads", "index_head_dim", "index_topk"):
        assert cfg[key] == want[key], key
    if shared:
        assert cfg["indexer_types"] == SHARED
    ids = torch.randint(3, want["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # transformers reads the folder back as the source (config included)
        same = reference_model(name, back)(ids).logits, reference_model(name, src)(ids).logits
    assert torch.equal(*same)


@pytest.mark.parametrize(
    "key,value,expect",
    [
        ("attention.indexer.key_length", 32, "indexer tensor blk.0.indexer.attn_"),
        ("attention.indexer.top_k", 0, "index_topk is 0"),
    ],
)
def test_bad_indexer_gguf_one_line(tiny, tmp_path, monkeypatch, key, value, expect):
    """A GGUF whose indexer keys disagree with its tensors, or keep no key: one line naming the file,
    exit 2, from inspect (and run, once: both stop in the same fingerprint check)."""
    from llmarch.convert import to_gguf
    from tests.test_run_dsa import _bad

    real = to_gguf.model_kv
    lie = lambda *a, **k: [(n, value if n.endswith(key) else v, t) for n, v, t in real(*a, **k)]  # noqa: E731
    monkeypatch.setattr(to_gguf, "model_kv", lie)
    out = tmp_path / "bad.gguf"
    to_gguf.convert_to_gguf(str(tiny("glm_moe_dsa", **SHAPE)), out, "f32")
    for command in ("inspect", "run") if value else ("inspect",):
        line = _bad(command, out)
        assert str(out) in line and expect in line, line


# llama.cpp's glm-dsa takes a context of 1M or more for GLM-5.2 and then, unless the file lists
# the indexer types, shares the selection on its layers 3-5, 7-9, ...: written for every DSA file
LLAMACPP_CASES = [
    pytest.param("deepseek_v32", SHAPE, id="deepseek_v32"),
    pytest.param("glm_moe_dsa", SHAPE, id="glm_moe_dsa"),
    pytest.param("glm_moe_dsa", _case(True), id="glm_moe_dsa-shared"),
    pytest.param("glm_moe_dsa", dict(SHAPE, num_hidden_layers=4, max_position_embeddings=1 << 20), id="glm-1M-ctx"),
]


@pytest.mark.llamacpp
@pytest.mark.parametrize("name,over", LLAMACPP_CASES)
def test_llamacpp_runs_our_gguf_as_transformers(tiny, tmp_path, name, over):
    """llama.cpp on our f32 GGUF (f32 KV cache) over a 40-token prompt, 5 x index_topk: every
    position's argmax and 8 greedy tokens as transformers', logits NMSE < 1e-5, while transformers
    attending densely (index_topk past the prompt) is far off: llama.cpp selects; q8_0 within
    llama.cpp's pass bar (1e-2). Measured on the 2-core dev box: deepseek32 NMSE 2.4e-14, q8_0
    5.4e-4 (transformers on the q8_0-rounded weights is itself 5.4e-4 from f32); glm-dsa 2.3e-8,
    q8_0 2.5e-3 (rounded weights 2.2e-3); with a shared layer 4.9e-8, q8_0 7.8e-4. GLM's f32 floor is
    its q_a / kv_a norms: transformers gives them eps 1e-6, llama.cpp the file's one RMS eps (1e-5).
    The 1M-context GLM without attention.indexer.types in the file was NMSE 2.6e-2 (llama.cpp
    shared layer 3's selection)."""
    import shutil

    llama_cpp = pytest.importorskip("llama_cpp")
    from llmarch.convert.to_gguf import convert_to_gguf
    from llmarch.convert.verify import nmse
    from tests.test_convert import add_tokenizer
    from tests.test_convert_llamacpp import VOCAB, llama_greedy, llama_logits, load_llama

    src = tmp_path / name
    shutil.copytree(tiny(name, vocab_size=VOCAB, **over), src)
    add_tokenizer(src, VOCAB)
    out = tmp_path / f"{name}.gguf"
    convert_to_gguf(str(src), out, "f32")
    assert llama_cpp  # imported for the skip
    llm = load_llama(out, n_ctx=128, f32_kv=True)
    ids = torch.randint(3, VOCAB, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()
    model = reference_model(name, src, eager=False)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        greedy = model.generate(
            torch.tensor([ids]), max_new_tokens=8, do_sample=False, min_new_tokens=8, eos_token_id=None, pad_token_id=0
        )[0, PROMPT:].tolist()
    got = llama_logits(llm, ids)
    err = nmse(ref, got)
    print(f"{name} {over}: llama.cpp vs transformers logits NMSE {err:.2e}")
    assert err < 1e-5
    assert (ref.argmax(-1) == got.argmax(-1)).all()
    assert llama_greedy(llm, ids, 8) == greedy
    q = tmp_path / f"{name}-q8.gguf"  # q8_0: within llama.cpp's pass bar
    convert_to_gguf(str(src), q, "q8_0")
    q_err = nmse(ref, llama_logits(load_llama(q, n_ctx=128, f32_kv=True), ids))
    print(f"  q8_0 NMSE {q_err:.2e}")
    assert q_err < 1e-2
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(cfg, index_topk=4 * PROMPT)))
    with torch.no_grad():
        dense = reference_model(name, src, eager=False)(input_ids=torch.tensor([ids])).logits[0].numpy()
    print(f"  transformers dense vs sparse NMSE {nmse(ref, dense):.2e}")
    assert nmse(dense, got) > 100 * max(err, 1e-9)

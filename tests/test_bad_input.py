"""Bad input: every broken checkpoint gives exit status 2 and one line on stderr naming the file
and the problem; no traceback unless LLMARCH_DEBUG=1; nothing allocated from an untrusted length;
nothing written.

Every file here is crafted byte by byte (or cut from a valid one), so the expected problem is
known from the bytes, not from llmarch's output. The CLI runs as a subprocess, as a user runs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MEMORY_LIMIT = 1 << 30  # address space for the CLI process: a header-sized allocation would hit it


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_cli(*args, debug=False, cwd=None, env_extra=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LLMARCH_DEBUG"}
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if debug:
        env["LLMARCH_DEBUG"] = "1"
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "llmarch", "inspect", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or ROOT,
        timeout=120,
        preexec_fn=_limit_memory,
    )


def assert_one_line_error(source, names, problem: str | tuple[str, ...], check_debug=True) -> str:
    """Exit 2, one stderr line naming `names` (a path or its name) and the problem; returns it."""
    r = run_cli(source)
    lines = r.stderr.splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert r.stdout == ""
    for name in [names] if isinstance(names, (str, Path)) else names:
        assert str(name) in line, (name, line)
    # the problem must be in the message itself, not in the path (tmp paths carry test names)
    message = line.split(": ", 2)[-1]
    problems = (problem,) if isinstance(problem, str) else problem
    assert any(p.lower() in message.lower() for p in problems), (problems, line)
    assert "internal error" not in line
    if check_debug:
        d = run_cli(source, debug=True)
        assert d.returncode != 0
        assert "Traceback" in d.stderr, d.stderr
    return line


# ----------------------------------------------------------------------------- safetensors


def st_bytes(header: dict, data: bytes, pad: bool = True) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


# a: F32[2,3] = 24 bytes at [0,24); b: BF16[4] = 8 bytes at [24,32)
GOOD_HEADER = {
    "__metadata__": {"format": "pt"},
    "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
}
GOOD_DATA = bytes(range(32))


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def with_entry(name, **changes) -> dict:
    h = json.loads(json.dumps(GOOD_HEADER))
    h[name].update(changes)
    return h


def test_valid_crafted_safetensors_is_accepted(tmp_path):
    """The base the corrupt cases are cut from is itself fine (exit 0, tensor count right)."""
    f = write(tmp_path / "good.safetensors", st_bytes(GOOD_HEADER, GOOD_DATA))
    r = run_cli(f, "--json")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    json.loads(r.stdout)


@pytest.mark.parametrize(
    "cut, problem",
    [
        (4, "truncated"),  # inside the 8-byte header length
        (8 + 10, ("truncated", "past the end")),  # inside the JSON header
        (-5, ("truncated", "past the end")),  # inside tensor b's data
        (-1, ("truncated", "past the end")),  # last byte missing
    ],
    ids=["in-length", "mid-header", "mid-data", "last-byte"],
)
def test_truncated_safetensors(tmp_path, cut, problem):
    full = st_bytes(GOOD_HEADER, GOOD_DATA)
    f = write(tmp_path / "cut.safetensors", full[:cut])
    assert_one_line_error(f, f, problem)


def test_empty_safetensors(tmp_path):
    f = write(tmp_path / "empty.safetensors", b"")
    assert_one_line_error(f, f, ("empty", "truncated"))


@pytest.mark.parametrize("n", [10_000, 1 << 40, (1 << 64) - 1])
def test_header_length_past_end(tmp_path, n):
    f = write(tmp_path / "long.safetensors", struct.pack("<Q", n) + b"{}" + b" " * 30)
    assert_one_line_error(f, f, "past the end")


def test_header_not_json(tmp_path):
    raw = b"{this is not json" + b" " * 7
    f = write(tmp_path / "notjson.safetensors", struct.pack("<Q", len(raw)) + raw + GOOD_DATA)
    assert_one_line_error(f, f, "not JSON")


def test_header_json_not_object(tmp_path):
    raw = b"[1, 2, 3]       "
    f = write(tmp_path / "list.safetensors", struct.pack("<Q", len(raw)) + raw)
    assert_one_line_error(f, f, "not a JSON object")


def test_header_not_utf8(tmp_path):
    raw = b'{"\xff\xfe": 1}  '
    f = write(tmp_path / "bin.safetensors", struct.pack("<Q", len(raw)) + raw)
    assert_one_line_error(f, f, ("not JSON", "utf-8"))


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"data_offsets": [24, 1000]}, "past the end"),
        ({"data_offsets": [-8, 0]}, "out of range"),
        ({"data_offsets": [32, 24]}, "out of range"),
        ({"data_offsets": [24]}, "data_offsets"),
        ({"data_offsets": "24-32"}, "data_offsets"),
    ],
    ids=["end-past-data", "negative", "start-after-end", "one-offset", "string"],
)
def test_offsets_out_of_range(tmp_path, changes, problem):
    f = write(tmp_path / "range.safetensors", st_bytes(with_entry("b", **changes), GOOD_DATA))
    line = assert_one_line_error(f, f, problem)
    assert "'b'" in line


def test_overlapping_offsets(tmp_path):
    # b (8 bytes) placed at [16,24): inside a's [0,24); sizes still match the shapes
    f = write(tmp_path / "overlap.safetensors", st_bytes(with_entry("b", data_offsets=[16, 24]), GOOD_DATA))
    line = assert_one_line_error(f, f, "overlap")
    assert "'a'" in line and "'b'" in line


def test_unknown_dtype(tmp_path):
    f = write(tmp_path / "dtype.safetensors", st_bytes(with_entry("a", dtype="Q7"), GOOD_DATA))
    line = assert_one_line_error(f, f, "unknown dtype")
    assert "Q7" in line


@pytest.mark.parametrize(
    "changes",
    [{"shape": [2, 2]}, {"shape": [3, 3]}, {"dtype": "F16"}, {"shape": [2, -3]}, {"shape": "2x3"}],
    ids=["fewer-elements", "more-elements", "dtype-size", "negative-dim", "string-shape"],
)
def test_shape_offset_size_mismatch(tmp_path, changes):
    f = write(tmp_path / "size.safetensors", st_bytes(with_entry("a", **changes), GOOD_DATA))
    line = assert_one_line_error(f, f, ("needs", "bad shape"))
    assert "'a'" in line


def test_duplicate_tensor_name(tmp_path):
    """json.loads would keep only the second 'a': the reader must not lose a tensor silently."""
    entry_a = json.dumps(GOOD_HEADER["a"], separators=(",", ":"))
    entry_b = json.dumps(GOOD_HEADER["b"], separators=(",", ":"))
    raw = ('{"a":' + entry_a + ',"b":' + entry_b + ',"a":' + entry_a + "}").encode()
    raw += b" " * (-len(raw) % 8)
    f = write(tmp_path / "dup.safetensors", struct.pack("<Q", len(raw)) + raw + GOOD_DATA)
    assert_one_line_error(f, f, "appears twice", check_debug=False)


def test_data_offsets_as_metadata_text_is_not_a_duplicate(tmp_path):
    h = dict(GOOD_HEADER, __metadata__={"data_offsets": "data_offsets", "note": '"data_offsets": x'})
    f = write(tmp_path / "meta.safetensors", st_bytes(h, GOOD_DATA))
    r = run_cli(f, "--json")
    assert r.returncode == 0, r.stderr


def test_entry_not_object_and_bad_metadata(tmp_path):
    h = dict(GOOD_HEADER, b=[1, 2])
    f = write(tmp_path / "entry.safetensors", st_bytes(h, GOOD_DATA))
    assert_one_line_error(f, f, "not an object", check_debug=False)
    h = dict(GOOD_HEADER, __metadata__=["x"])
    f = write(tmp_path / "meta.safetensors", st_bytes(h, GOOD_DATA))
    assert_one_line_error(f, f, "__metadata__", check_debug=False)


# ----------------------------------------------------------------------------- GGUF by hand

GGUF_STRING, GGUF_ARRAY, GGUF_U32, GGUF_U8 = 8, 9, 4, 0


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv_str(key: str, value: str) -> bytes:
    return gstr(key) + struct.pack("<I", GGUF_STRING) + gstr(value)


def kv_u32(key: str, value: int) -> bytes:
    return gstr(key) + struct.pack("<II", GGUF_U32, value)


def tensor_info(name: str, ne: list[int], ggml_type: int, offset: int) -> bytes:
    return (
        gstr(name)
        + struct.pack("<I", len(ne))
        + b"".join(struct.pack("<Q", d) for d in ne)
        + struct.pack("<IQ", ggml_type, offset)
    )


def gguf_bytes(kvs: list[bytes], tensors: list[bytes], data: bytes, n_kv=None, n_tensors=None, magic=b"GGUF") -> bytes:
    head = magic + struct.pack(
        "<IQQ", 3, len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    )
    head += b"".join(kvs) + b"".join(tensors)
    head += b"\0" * (-len(head) % 32)
    return head + data


GOOD_KVS = [kv_str("general.architecture", "llama"), kv_u32("llama.block_count", 1)]
# t: F32 (type 0) ne=[8]: 32 bytes at offset 0; u: F16 (type 1) ne=[16]: 32 bytes at offset 32
GOOD_TENSORS = [tensor_info("t", [8], 0, 0), tensor_info("u", [16], 1, 32)]
GOOD_GGUF_DATA = bytes(64)


def good_gguf() -> bytes:
    return gguf_bytes(GOOD_KVS, GOOD_TENSORS, GOOD_GGUF_DATA)


def test_crafted_gguf_is_valid(tmp_path):
    """The hand-made base is a real GGUF: gguf-py's own reader agrees on its tensors."""
    from gguf import GGUFReader

    f = write(tmp_path / "good.gguf", good_gguf())
    reader = GGUFReader(str(f))
    assert [t.name for t in reader.tensors] == ["t", "u"]
    from llmarch.checkpoint.gguf import read_gguf_part

    meta, _skipped, tensors = read_gguf_part(f)
    assert meta["general.architecture"] == "llama"
    assert {n: (t.dtype, t.shape, t.nbytes) for n, t in tensors.items()} == {
        "t": ("F32", (8,), 32),
        "u": ("F16", (16,), 32),
    }


def _cut_points() -> dict[str, int]:
    full = good_gguf()
    kv_end = 24 + sum(len(k) for k in GOOD_KVS)
    return {
        "in-magic": 2,
        "in-version": 6,
        "in-counts": 20,
        "in-first-key-length": 27,
        "in-first-key": 24 + 8 + 5,
        "in-kv-value": kv_end - 2,
        "in-tensor-name": kv_end + 9,
        "in-tensor-dims": kv_end + 8 + 1 + 4 + 3,
        "in-tensor-offset": kv_end + len(GOOD_TENSORS[0]) - 3,
        "in-data": len(full) - 20,
        "last-byte": len(full) - 1,
    }


@pytest.mark.parametrize("where", list(_cut_points()))
def test_truncated_gguf(tmp_path, where):
    cut = _cut_points()[where]
    f = write(tmp_path / "cut.gguf", good_gguf()[:cut])
    # the debug run on a few points only: it is the same code path
    assert_one_line_error(f, f, ("truncated", "past the end"), check_debug=where in ("in-magic", "in-data"))


def test_empty_gguf(tmp_path):
    f = write(tmp_path / "empty.gguf", b"")
    assert_one_line_error(f, f, ("empty", "truncated"))


def test_bad_magic(tmp_path):
    f = write(tmp_path / "magic.gguf", gguf_bytes(GOOD_KVS, GOOD_TENSORS, GOOD_GGUF_DATA, magic=b"GGML"))
    assert_one_line_error(f, f, "bad magic")


def test_big_endian_gguf(tmp_path):
    data = bytearray(good_gguf())
    data[4:8] = struct.pack(">I", 3)
    f = write(tmp_path / "be.gguf", bytes(data))
    assert_one_line_error(f, f, "big-endian", check_debug=False)


def test_unsupported_version(tmp_path):
    data = bytearray(good_gguf())
    data[4:8] = struct.pack("<I", 99)
    f = write(tmp_path / "version.gguf", bytes(data))
    assert_one_line_error(f, f, "version 99", check_debug=False)


@pytest.mark.parametrize(
    "etype, count",
    [
        (GGUF_U8, 1 << 31),
        (GGUF_U8, 1 << 40),
        (GGUF_U32, 1 << 61),
        (GGUF_STRING, 1 << 27),
        (GGUF_STRING, 1 << 50),
        (GGUF_STRING, (1 << 64) - 1),
    ],
)
def test_absurd_array_length(tmp_path, etype, count):
    """A header that claims a huge array: refused from the count alone, under a 1 GiB address-space
    limit (building the list, or even an index per element, would fail with MemoryError)."""
    kv = gstr("tokenizer.ggml.tokens") + struct.pack("<IIQ", GGUF_ARRAY, etype, count) + b"\0" * 64
    f = write(tmp_path / "array.gguf", gguf_bytes(GOOD_KVS + [kv], GOOD_TENSORS, GOOD_GGUF_DATA))
    line = assert_one_line_error(f, f, "absurd array length")
    assert str(count) in line and "tokenizer.ggml.tokens" in line


@pytest.mark.parametrize("where", ["key", "value", "tensor-name", "array-element"])
def test_absurd_string_length(tmp_path, where):
    huge = struct.pack("<Q", 1 << 60)
    if where == "key":
        kvs = GOOD_KVS + [huge + b"general.name"]
        tensors = GOOD_TENSORS
    elif where == "value":
        kvs = GOOD_KVS + [gstr("general.name") + struct.pack("<I", GGUF_STRING) + huge + b"x" * 16]
        tensors = GOOD_TENSORS
    elif where == "tensor-name":
        kvs, tensors = GOOD_KVS, [huge + b"t" * 16]
    else:  # a short (inline) string array whose second element claims 2^60 bytes
        kvs = GOOD_KVS + [
            gstr("general.tags") + struct.pack("<IIQ", GGUF_ARRAY, GGUF_STRING, 2) + gstr("ok") + huge + b"x" * 16
        ]
        tensors = GOOD_TENSORS
    f = write(tmp_path / "string.gguf", gguf_bytes(kvs, tensors, GOOD_GGUF_DATA, n_tensors=2))
    assert_one_line_error(f, f, ("absurd string length", "truncated"), check_debug=where == "key")


def test_absurd_counts(tmp_path):
    f = write(tmp_path / "counts.gguf", gguf_bytes(GOOD_KVS, GOOD_TENSORS, GOOD_GGUF_DATA, n_kv=1 << 62))
    line = assert_one_line_error(f, f, "more than the")
    assert str(1 << 62) in line
    f = write(tmp_path / "counts2.gguf", gguf_bytes(GOOD_KVS, GOOD_TENSORS, GOOD_GGUF_DATA, n_tensors=1 << 62))
    line = assert_one_line_error(f, f, "more than the", check_debug=False)
    assert str(1 << 62) in line


def test_unknown_value_type(tmp_path):
    kv = gstr("general.name") + struct.pack("<I", 77) + b"\0" * 16
    f = write(tmp_path / "vtype.gguf", gguf_bytes(GOOD_KVS + [kv], GOOD_TENSORS, GOOD_GGUF_DATA))
    line = assert_one_line_error(f, f, "unknown GGUF value type")
    assert "77" in line


def test_unknown_ggml_type(tmp_path):
    tensors = [tensor_info("t", [8], 9999, 0), GOOD_TENSORS[1]]
    f = write(tmp_path / "ggml.gguf", gguf_bytes(GOOD_KVS, tensors, GOOD_GGUF_DATA))
    line = assert_one_line_error(f, f, "unknown GGML type")
    assert "9999" in line and "'t'" in line


def test_too_many_dims(tmp_path):
    tensors = [tensor_info("t", [1] * 7 + [8], 0, 0), GOOD_TENSORS[1]]
    f = write(tmp_path / "dims.gguf", gguf_bytes(GOOD_KVS, tensors, GOOD_GGUF_DATA))
    assert_one_line_error(f, f, "dimensions", check_debug=False)


@pytest.mark.parametrize("offset", [64, 40, 1 << 62])
def test_gguf_tensor_data_past_eof(tmp_path, offset):
    tensors = [GOOD_TENSORS[0], tensor_info("u", [16], 1, offset)]
    f = write(tmp_path / "past.gguf", gguf_bytes(GOOD_KVS, tensors, GOOD_GGUF_DATA))
    line = assert_one_line_error(f, f, "past the end", check_debug=offset == 64)
    assert "'u'" in line


def test_gguf_overlapping_tensors(tmp_path):
    tensors = [GOOD_TENSORS[0], tensor_info("u", [16], 1, 16)]
    f = write(tmp_path / "overlap.gguf", gguf_bytes(GOOD_KVS, tensors, GOOD_GGUF_DATA))
    assert_one_line_error(f, f, "overlap", check_debug=False)


@pytest.mark.parametrize(
    "kv, key",
    [
        (kv_str("llama.block_count", "many"), "llama.block_count"),
        (kv_str("llama.rope.freq_base", "fast"), "llama.rope.freq_base"),
        (kv_u32("llama.rope.scaling.type", 3), "llama.rope.scaling.type"),
    ],
)
def test_gguf_metadata_of_the_wrong_type(tmp_path, kv, key):
    f = write(
        tmp_path / "types.gguf", gguf_bytes([kv_str("general.architecture", "llama"), kv], GOOD_TENSORS, GOOD_GGUF_DATA)
    )
    line = assert_one_line_error(f, f, "must be a", check_debug=key == "llama.block_count")
    assert key in line


def test_gguf_architecture_not_a_string(tmp_path):
    f = write(tmp_path / "arch.gguf", gguf_bytes([kv_u32("general.architecture", 5)], GOOD_TENSORS, GOOD_GGUF_DATA))
    line = assert_one_line_error(f, f, "must be a non-empty string")
    assert "general.architecture" in line


def test_gguf_without_architecture(tmp_path):
    f = write(tmp_path / "noarch.gguf", gguf_bytes([kv_u32("llama.block_count", 1)], GOOD_TENSORS, GOOD_GGUF_DATA))
    assert_one_line_error(f, f, "general.architecture", check_debug=False)


# ----------------------------------------------------------------------------- folders, indexes


def st_folder(folder: Path, config: dict | str | None = None) -> Path:
    write(folder / "model.safetensors", st_bytes(GOOD_HEADER, GOOD_DATA))
    if config is not None:
        (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder


def index_folder(folder: Path, weight_map: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write(folder / "model-00001-of-00002.safetensors", st_bytes(GOOD_HEADER, GOOD_DATA))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_index_names_file_outside_folder(tmp_path):
    # the outside file exists and is a fine safetensors: refusal must be about where it is
    write(tmp_path / "x.safetensors", st_bytes({"c": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)))
    folder = index_folder(tmp_path / "model", {"a": "model-00001-of-00002.safetensors", "c": "../x.safetensors"})
    line = assert_one_line_error(folder, "model.safetensors.index.json", "outside the folder")
    assert "../x.safetensors" in line


def test_index_names_absolute_path(tmp_path):
    write(tmp_path / "x.safetensors", st_bytes({"c": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)))
    folder = index_folder(
        tmp_path / "model", {"a": "model-00001-of-00002.safetensors", "c": str(tmp_path / "x.safetensors")}
    )
    assert_one_line_error(folder, "model.safetensors.index.json", "outside the folder", check_debug=False)


def test_index_names_missing_shard(tmp_path):
    folder = index_folder(
        tmp_path / "model", {"a": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}
    )
    line = assert_one_line_error(folder, "model.safetensors.index.json", "missing")
    assert "model-00002-of-00002.safetensors" in line


@pytest.mark.parametrize("index", ["{not json", json.dumps({"weight_map": ["a"]}), json.dumps([1])])
def test_index_corrupt(tmp_path, index):
    folder = index_folder(tmp_path / "model", {})
    (folder / "model.safetensors.index.json").write_text(index)
    assert_one_line_error(folder, "model.safetensors.index.json", ("not valid JSON", "weight_map"), check_debug=False)


def test_index_weight_map_disagrees_with_shard(tmp_path):
    """The index says tensor 'zzz' is in the shard, but the shard's header has no such tensor."""
    folder = index_folder(
        tmp_path / "model",
        {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00001-of-00002.safetensors",
            "zzz": "model-00001-of-00002.safetensors",
        },
    )
    line = assert_one_line_error(folder, "model.safetensors.index.json", "zzz", check_debug=False)
    assert "model-00001-of-00002.safetensors" in line


def test_config_not_json(tmp_path):
    folder = st_folder(tmp_path / "m", config='{"model_type": "llama",')
    assert_one_line_error(folder, "config.json", "not valid JSON")


def test_config_not_object(tmp_path):
    folder = st_folder(tmp_path / "m", config="[1, 2]")
    assert_one_line_error(folder, "config.json", "not a JSON object", check_debug=False)


LLAMA_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 16,
    "vocab_size": 4,
    "max_position_embeddings": 64,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
}


@pytest.mark.parametrize(
    "key, value",
    [
        ("num_hidden_layers", "many"),
        ("rope_scaling", 3),
        ("hidden_size", [8]),
        ("num_attention_heads", None),
        ("rope_theta", "fast"),
        ("num_hidden_layers", True),
        ("num_hidden_layers", -1),
        ("layer_types", "sliding_attention"),
        ("tie_word_embeddings", "yes"),
    ],
)
def test_config_wrong_types(tmp_path, key, value):
    config = dict(LLAMA_CONFIG, **{key: value})
    folder = st_folder(tmp_path / "m", config=config)
    line = assert_one_line_error(folder, "config.json", key, check_debug=key in ("num_hidden_layers", "rope_scaling"))
    assert repr(value) in line or json.dumps(value) in line, line


def test_config_wrong_type_in_text_config(tmp_path):
    config = {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": dict(LLAMA_CONFIG, model_type="gemma3_text", num_hidden_layers="many"),
    }
    folder = st_folder(tmp_path / "m", config=config)
    line = assert_one_line_error(folder, "config.json", "num_hidden_layers", check_debug=False)
    assert "text_config" in line


# ----------------------------------------------------------------------------- pickles


class _Marker:
    """Unpickling this creates the marker file (builtins.open(path, 'w')): proof of unpickling."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "consolidated.pth", "weights.ckpt"])
def test_pickle_file_is_never_unpickled(tmp_path, name):
    marker = tmp_path / "UNPICKLED"
    f = write(tmp_path / name, pickle.dumps({"w": _Marker(marker)}))
    # self-check: unpickling this file really would create the marker
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Marker(probe))).close()
    assert probe.exists()
    line = assert_one_line_error(f, name, "pickle", check_debug=name == "pytorch_model.bin")
    assert "arbitrary code" in line  # says why
    assert not marker.exists()


def test_folder_with_only_pickle(tmp_path):
    marker = tmp_path / "UNPICKLED"
    folder = tmp_path / "m"
    write(folder / "pytorch_model.bin", pickle.dumps(_Marker(marker)))
    (folder / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    assert_one_line_error(folder, folder, "pickle")
    assert not marker.exists()


# ----------------------------------------------------------------------------- no model


def test_empty_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    assert_one_line_error(folder, folder, "no model")


def test_folder_with_only_config(tmp_path):
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    assert_one_line_error(folder, folder, "no model", check_debug=False)


@pytest.mark.parametrize("rel", ["does/not/exist.safetensors", "nope.gguf", "missing_dir"])
def test_nonexistent_path(tmp_path, rel):
    p = tmp_path / rel
    assert_one_line_error(p, p, "no such file", check_debug=rel == "nope.gguf")


def test_not_a_checkpoint_file(tmp_path):
    f = write(tmp_path / "notes.txt", b"hello")
    assert_one_line_error(f, f, "not a checkpoint", check_debug=False)


def test_split_gguf_missing_part(tmp_path):
    for i in (1, 3):
        write(tmp_path / f"m-{i:05d}-of-00003.gguf", good_gguf())
    f = tmp_path / "m-00001-of-00003.gguf"
    line = assert_one_line_error(f, "m-00001-of-00003.gguf", "missing")
    assert "m-00002-of-00003.gguf" in line


def test_folder_with_split_gguf_missing_first_part(tmp_path):
    for i in (2, 3):
        write(tmp_path / f"m-{i:05d}-of-00003.gguf", good_gguf())
    line = assert_one_line_error(tmp_path, "m-00001-of-00003.gguf", "missing", check_debug=False)
    assert "m-00002-of-00003.gguf" in line or str(tmp_path) in line


def test_folder_with_several_gguf_models(tmp_path):
    write(tmp_path / "a-q4.gguf", good_gguf())
    write(tmp_path / "a-q8.gguf", good_gguf())
    line = assert_one_line_error(tmp_path, tmp_path, "2 GGUF models")
    assert "a-q4.gguf" in line and "a-q8.gguf" in line


def test_folder_with_model_and_mmproj_is_one_model(tmp_path):
    """llama.cpp ships a vision model as NAME.gguf + mmproj-NAME.gguf: the projector is not a
    second model. Two models and a projector are still ambiguous."""
    from llmarch.checkpoint.open import open_checkpoint

    write(tmp_path / "gemma-3-4b-it-Q4_K_M.gguf", good_gguf())
    write(
        tmp_path / "mmproj-gemma-3-4b-it-f16.gguf",
        gguf_bytes([kv_str("general.architecture", "clip")], [tensor_info("v.patch", [8], 0, 0)], bytes(32)),
    )
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.files == [tmp_path / "gemma-3-4b-it-Q4_K_M.gguf"]
    write(tmp_path / "gemma-3-4b-it-Q8_0.gguf", good_gguf())
    assert_one_line_error(tmp_path, tmp_path, "3 GGUF models", check_debug=False)


def test_folder_with_one_split_gguf_is_fine(tmp_path):
    """Counter-case: the parts of one split model are one model, not several."""
    from llmarch.checkpoint.open import open_checkpoint

    write(tmp_path / "a-00001-of-00002.gguf", gguf_bytes(GOOD_KVS, GOOD_TENSORS[:1], bytes(32)))
    write(
        tmp_path / "a-00002-of-00002.gguf",
        gguf_bytes([kv_str("general.architecture", "llama")], [tensor_info("u", [16], 1, 0)], bytes(32)),
    )
    ckpt = open_checkpoint(tmp_path)
    assert sorted(ckpt.tensors) == ["t", "u"]


# ----------------------------------------------------------------------------- never writes


def _snapshot(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


def test_inspect_never_writes(tmp_path):
    """Good and bad inputs alike: the inputs are byte-for-byte unchanged (mtimes too) and no file
    appears beside them or in the working directory."""
    src = tmp_path / "src"
    st_folder(src / "good", config=LLAMA_CONFIG)
    write(src / "cut.safetensors", st_bytes(GOOD_HEADER, GOOD_DATA)[:-5])
    write(src / "good.gguf", good_gguf())
    write(src / "cut.gguf", good_gguf()[:-20])
    index_folder(src / "idx", {"a": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"})
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = _snapshot(src)
    codes = [
        run_cli(src / name, cwd=cwd).returncode for name in ("good", "cut.safetensors", "good.gguf", "cut.gguf", "idx")
    ]
    assert codes == [0, 2, 0, 2, 2]
    assert _snapshot(src) == before
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("args", [("--context", "abc"), ("--context", "-5"), ("--kv-dtype", "q3"), ("--bogus",)])
def test_bad_options_are_usage_errors_not_crashes(tmp_path, args):
    f = write(tmp_path / "good.safetensors", st_bytes(GOOD_HEADER, GOOD_DATA))
    r = run_cli(f, *args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert args[0] in r.stderr


def test_the_memory_limit_is_real():
    """Self-check of the harness: under the limit the CLI runs with, a 2 GiB allocation fails, so
    the absurd-length tests above would catch a reader that allocates from the claimed count."""
    r = subprocess.run(
        [sys.executable, "-c", "bytearray(1 << 31)"],
        capture_output=True,
        text=True,
        preexec_fn=_limit_memory,
        timeout=60,
    )
    assert r.returncode != 0 and "MemoryError" in r.stderr

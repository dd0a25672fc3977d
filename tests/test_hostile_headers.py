"""Hostile headers: each value a header or config gives is checked where it is read (type,
finiteness, range), work is bounded by the file's real size and tensors, and nothing a stricter
reader would refuse is silently accepted. Each case is one line naming the file (and the key),
never another exception, a hang or an allocation sized by a number in the file.

The files are crafted byte by byte, so what is wrong with each is known from its bytes; where
the safetensors library (the format's reference reader) is the oracle, the test asks it too.
Most cases run in process (llmarch.api.inspect_source, as `inspect` does); the ones that must
prove the CLI does not block or crash run it as a subprocess.
"""

from __future__ import annotations

import ast
import json
import os
import socket
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
from test_bad_input import (
    GOOD_DATA,
    GOOD_HEADER,
    GOOD_KVS,
    GOOD_TENSORS,
    LLAMA_CONFIG,
    gguf_bytes,
    gstr,
    kv_str,
    kv_u32,
    run_cli,
    st_bytes,
    st_folder,
    tensor_info,
    write,
)

from llmarch.api import inspect_source
from llmarch.errors import CheckpointError, LlmarchError

ROOT = Path(__file__).resolve().parents[1]
GGUF_F32, GGUF_BOOL, GGUF_ARRAY, GGUF_F64 = 6, 7, 9, 12
# CPU seconds (not wall time: CI machines are shared) for what used to take minutes; the
# recipes and the fingerprint are loaded before the clock starts (warm fixture)
CPU_BOUND_S = 1.0


@pytest.fixture(autouse=True, scope="module")
def warm():
    from llmarch.arch import recipe_book
    from llmarch.arch.fingerprint import fingerprint  # noqa: F401
    from llmarch.report.document import to_document  # noqa: F401

    recipe_book.all_recipes()


def refused(source: Path, *words: str, exc=CheckpointError) -> str:
    """inspect_source(source) raises one line naming the file and each of `words`."""
    with pytest.raises(exc) as info:
        inspect_source(str(source))
    line = str(info.value)
    assert "\n" not in line, line
    assert source.name in line, line
    message = line.split(": ", 1)[-1]
    for w in words:
        assert w in message, (w, line)
    return message


def kv_f32(key: str, value: float) -> bytes:
    return gstr(key) + struct.pack("<If", GGUF_F32, value)


def kv_f64(key: str, value: float) -> bytes:
    return gstr(key) + struct.pack("<Id", GGUF_F64, value)


def kv_bool(key: str, value: bool) -> bytes:
    return gstr(key) + struct.pack("<I?", GGUF_BOOL, value)


def kv_u32_array(key: str, values: list[int], count: int | None = None) -> bytes:
    n = len(values) if count is None else count
    return gstr(key) + struct.pack("<IIQ", GGUF_ARRAY, 4, n) + b"".join(struct.pack("<I", v) for v in values)


def gguf_file(tmp_path: Path, kvs: list[bytes], tensors=None, name="model.gguf", data=bytes(64)) -> Path:
    return write(tmp_path / name, gguf_bytes(kvs, GOOD_TENSORS if tensors is None else tensors, data))


LLAMA_KVS = [kv_str("general.architecture", "llama"), kv_u32("llama.block_count", 1)]


# ----------------------------------------------------------------------------- GGUF values


@pytest.mark.parametrize(
    "kv, key",
    [
        (kv_f32("llama.context_length", float("inf")), "llama.context_length"),
        (kv_f32("llama.context_length", float("-inf")), "llama.context_length"),
        (kv_f64("llama.embedding_length", float("nan")), "llama.embedding_length"),
        (kv_f32("llama.rope.freq_base", float("nan")), "llama.rope.freq_base"),
        (kv_f64("llama.rope.freq_base", 1e308), "llama.rope.freq_base"),
        (kv_f32("llama.attention.head_count", 1.5), "llama.attention.head_count"),
        (kv_u32_array("llama.context_length", [1, 2]), "llama.context_length"),
        (kv_u32_array("llama.block_count", [1, 2]), "llama.block_count"),
        (kv_bool("llama.embedding_length", True), "llama.embedding_length"),
        (kv_str("llama.expert_count", "8"), "llama.expert_count"),
    ],
)
def test_gguf_size_keys_of_the_wrong_kind(tmp_path, kv, key):
    f = gguf_file(tmp_path, [kv_str("general.architecture", "llama"), kv])
    refused(f, key, "must be")


def test_gguf_block_count_beyond_the_tensors(tmp_path):
    """10^9 layers in a 256-byte file: refused before any per-layer object is built."""
    f = gguf_file(tmp_path, [kv_str("general.architecture", "llama"), kv_u32("llama.block_count", 10**9)])
    tracemalloc.start()
    t = time.process_time()
    try:
        refused(f, "llama.block_count", "1000000000 layers", "2 tensors")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.process_time() - t < CPU_BOUND_S
    assert peak < 16 << 20


@pytest.mark.parametrize(
    "text, problem",
    [
        ("[" * 100000 + "]" * 100000, "nested too deeply"),
        ('{"rope_type": 5}', "rope_type must be a string"),
        ('{"rope_type": "llama3", "factor": "x"}', "factor must be a finite number"),
        ('{"rope_type": "llama3", "factor": ' + "9" * 5000 + "}", "not valid JSON"),
        ('{"rope_type": "llama3", "factor": 8, "factor": 2}', "appears twice"),
        ('{"rope_type": "llama3", "factor": NaN}', "finite"),
        ("[1, 2]", "must be an object"),
    ],
)
def test_llmarch_rope_scaling_json(tmp_path, text, problem):
    f = gguf_file(tmp_path, [*LLAMA_KVS, kv_str("llmarch.rope_scaling", text)])
    refused(f, "llmarch.rope_scaling", problem)


def test_llmarch_rope_scaling_not_a_string(tmp_path):
    f = gguf_file(tmp_path, [*LLAMA_KVS, kv_u32("llmarch.rope_scaling", 3)])
    refused(f, "llmarch.rope_scaling", "JSON string")


@pytest.mark.parametrize(
    "kvs",
    [
        [kv_u32("deepseek2.attention.kv_lora_rank", 16)],
        [kv_u32("deepseek2.attention.head_count", 4), kv_u32("deepseek2.embedding_length", 8)],
        [kv_u32("deepseek2.attention.kv_lora_rank", 16), kv_u32("deepseek2.attention.key_length_mla", 0)],
        [kv_u32("deepseek2.attention.key_length", 192), kv_u32("deepseek2.rope.dimension_count", 64)],
    ],
)
def test_mla_arch_with_missing_metadata(tmp_path, kvs):
    """An MLA arch (deepseek2) with some of its keys: a report or one line, nothing else."""
    f = gguf_file(tmp_path, [kv_str("general.architecture", "deepseek2"), kv_u32("deepseek2.block_count", 1), *kvs])
    try:
        doc = inspect_source(str(f))
    except LlmarchError as e:
        assert f.name in str(e)
    else:
        assert doc["layers"] == 1


def test_zero_dimensional_gguf_tensors(tmp_path):
    tensors = [tensor_info("token_embd.weight", [], 0, 0), tensor_info("blk.0.attn_k.weight", [8], 0, 32)]
    f = gguf_file(tmp_path, LLAMA_KVS, tensors)
    refused(f, "token_embd.weight", "matrix")
    tensors = [tensor_info("blk.0.attn_k.weight", [], 0, 0), tensor_info("u", [8], 0, 32)]
    f = gguf_file(tmp_path, LLAMA_KVS, tensors, name="k.gguf")
    refused(f, "blk.0.attn_k.weight", "no dimensions")


@pytest.mark.parametrize("what", ["key_length", "string", "array"])
def test_small_gguf_with_huge_lengths_allocates_little(tmp_path, what):
    """A 250-byte GGUF whose lengths say 2^26: nothing is sized by them."""
    if what == "key_length":  # a head width of 2^26 is a number, not an allocation
        kvs = [*LLAMA_KVS, kv_u32("llama.attention.key_length", 1 << 26), kv_u32("llama.attention.head_count", 1)]
    elif what == "string":  # a key whose length field says 2^26
        kvs = [*LLAMA_KVS, struct.pack("<Q", 1 << 26) + b"llama.x"]
    else:
        kvs = [*LLAMA_KVS, kv_u32_array("llama.attention.head_count_kv", [1], count=1 << 26)]
    f = gguf_file(tmp_path, kvs)
    assert f.stat().st_size < 400
    tracemalloc.start()
    try:
        try:
            inspect_source(str(f))
        except LlmarchError as e:
            assert f.name in str(e)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


def test_lying_tensor_count_stops_early(tmp_path):
    """A tensor count far above the real one, in a big file: the first implausible tensor info
    (here: read out of the data section) stops the parse, not the file size."""
    data = bytes(64) + b"\xff" * (8 << 20)
    f = write(tmp_path / "m.gguf", gguf_bytes(GOOD_KVS, GOOD_TENSORS, data, n_tensors=300000))
    t = time.process_time()
    with pytest.raises(CheckpointError):
        inspect_source(str(f))
    assert time.process_time() - t < CPU_BOUND_S


@pytest.mark.parametrize("second_key", ["general.architecture", ""])
def test_gguf_repeated_or_empty_key(tmp_path, second_key):
    """gguf-py's reader refuses a repeated key; an empty one is refused before any more keys are
    read, so a lying key count over a zero-filled region ends at once instead of after millions
    of 13-byte "keys"."""
    from gguf import GGUFReader

    f = gguf_file(tmp_path, LLAMA_KVS + [kv_str(second_key, "llama")])
    if second_key:
        with pytest.raises(KeyError):
            GGUFReader(f)
        refused(f, '"general.architecture"', "appears twice")
    else:
        refused(f, "empty metadata key")
    zeros = write(tmp_path / "z.gguf", gguf_bytes(LLAMA_KVS, [], bytes(64 << 20), n_kv=5_000_000))
    t = time.process_time()
    refused(zeros, "empty metadata key")
    assert time.process_time() - t < CPU_BOUND_S


def test_megabyte_key_in_a_message_is_cut(tmp_path):
    """A key of 8 MiB of control bytes quoted in the message: one short line, at once."""
    key = "\x04" * (8 << 20)
    f = gguf_file(tmp_path, LLAMA_KVS + [gstr(key) + struct.pack("<I", 0xDEAD)])
    t = time.process_time()
    message = refused(f, "unknown GGUF value type", "characters left out")
    assert time.process_time() - t < CPU_BOUND_S
    assert len(message) < 8000


# ----------------------------------------------------------------------------- safetensors headers


def test_dtype_given_as_a_list(tmp_path):
    h = json.loads(json.dumps(GOOD_HEADER))
    h["a"]["dtype"] = ["F32"]
    f = write(tmp_path / "m.safetensors", st_bytes(h, GOOD_DATA))
    refused(f, "'a'", "unknown dtype", '["F32"]')


A = '{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}'
B = '{"dtype":"BF16","shape":[4],"data_offsets":[24,32]}'
A2 = '{"dtype":"F32","shape":[2,3],"data_offsets":[32,56]}'  # a second "a" after b: last-wins drops bytes 0-24


def _raw_st(tmp_path: Path, text: str, encoding="utf-8", data: bytes = GOOD_DATA) -> Path:
    raw = text.encode(encoding)
    raw += b" " * (-len(raw) % 8)
    return write(tmp_path / "m.safetensors", struct.pack("<Q", len(raw)) + raw + data)


def _safetensors_refuses(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            f.keys()
    except Exception:
        return True
    return False


@pytest.mark.parametrize(
    "text",
    [
        '{"a":' + A + ',"b":' + B + ',"a":' + A2 + "}",
        '{"a":' + A + ',"b":' + B + ',"\\u0061":' + A2 + "}",  # the second "a" spelled with an escape
        '{"a":' + A + ',"b":' + B + ',"a"  :' + A2 + "}",  # spaces before the colon
        '{"a":' + A + ',"b":' + B + ',"a"\n:' + A2 + "}",
        '{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24],"data\\u005foffsets":[0,24]},"b":' + B + "}",
        '{"a":{"dtype":"F32","dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":' + B + "}",
    ],
)
def test_duplicate_keys_in_any_spelling(tmp_path, text):
    f = _raw_st(tmp_path, text, data=bytes(56) if "[32,56]" in text else GOOD_DATA)
    assert _safetensors_refuses(f)  # the reference reader refuses it: so must we
    refused(f, "appears twice")


@pytest.mark.parametrize(
    "text",
    [
        '{"__metadata__":{"format":"pt"},"a":' + A + ',"b":' + B + ',"__metadata__":{"format":"x"}}',
        '{"__metadata__":{"k":"1","k":"2"},"a":' + A + ',"b":' + B + "}",
        '{"a":' + A + ',"b":' + B + ',"a":' + A + "}",  # the same entry twice: nothing lost, still corrupt
    ],
)
def test_duplicates_the_reference_reader_lets_through(tmp_path, text):
    """json (and serde's map) keep the last copy here; a header saying two things is still refused."""
    refused(_raw_st(tmp_path, text), "appears twice")


def test_utf16_header_is_refused(tmp_path):
    """json.loads(bytes) would detect UTF-16 and accept it; the format says UTF-8."""
    f = _raw_st(tmp_path, '{"a":' + A + ',"b":' + B + "}", encoding="utf-16")
    assert _safetensors_refuses(f)
    refused(f, "not UTF-8")


def test_escaped_names_that_are_not_duplicates_are_fine(tmp_path):
    """The slow (checked) parse accepts what is right: escapes and spaced colons alone are valid."""
    f = _raw_st(tmp_path, '{"\\u0061":' + A + ',"b"  :' + B + ',"__metadata__":{"n":"\\"x\\":"}}')
    doc = inspect_source(str(f))
    assert doc["params"]["total"] == 10


@pytest.mark.parametrize("depth", [100000, 500])
def test_deeply_nested_header(tmp_path, depth):
    f = _raw_st(tmp_path, '{"a":' + A + ',"b":' + B + ',"__metadata__":{"x":' + "[" * depth + "]" * depth + "}}")
    refused(f, "__metadata__" if depth < 1000 else "nested too deeply")


def test_huge_integer_in_header(tmp_path):
    f = _raw_st(tmp_path, '{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,' + "9" * 5000 + ']},"b":' + B + "}")
    refused(f, "not JSON")


def test_zero_dimensional_projection(tmp_path):
    h = {
        "model.layers.0.self_attn.k_proj.weight": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
        "model.embed_tokens.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [4, 28]},
    }
    f = write(tmp_path / "m.safetensors", st_bytes(h, bytes(28)))
    refused(f, "k_proj.weight", "no dimensions")


# ----------------------------------------------------------------------------- tensor names and layer counts


def _one_tensor(tmp_path: Path, name: str) -> Path:
    h = {name: {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    return write(tmp_path / "m.safetensors", st_bytes(h, bytes(16)))


def test_tensor_at_layer_a_trillion(tmp_path):
    f = _one_tensor(tmp_path, "model.layers.1000000000000.x")
    t = time.process_time()
    refused(f, "1000000000001 layers", "1 tensors")
    assert time.process_time() - t < CPU_BOUND_S


def test_single_expert_tensor_at_layer_99999(tmp_path):
    """Used to make the schedule and its pattern search run for minutes: now bounded at once."""
    f = _one_tensor(tmp_path, "model.layers.99999.mlp.experts.0.up_proj.weight")
    t = time.process_time()
    refused(f, "100000 layers")
    assert time.process_time() - t < CPU_BOUND_S


# ----------------------------------------------------------------------------- config.json and the index


@pytest.mark.parametrize(
    "key, value, shown",
    [
        ("n_experts", "Infinity", "Infinity"),
        ("num_experts", "NaN", "NaN"),
        ("max_position_embeddings", "1e308", "1e+308"),
        ("num_hidden_layers", "1e20", "1e+20"),
        ("rope_theta", "9" * 300, "300 digits"),
        ("hidden_size", '"64"', '"64"'),
        ("rope_theta", '["fast"]', '["fast"]'),
        ("num_key_value_heads", '["a", "b"]', '["a", "b"]'),
        ("sliding_window", "true", "true"),
        ("attention_window_size", "-5", "-5"),
        ("swiglu_limit", '"7"', '"7"'),
        ("no_rope_layers", '["x"]', '["x"]'),
        ("rope_parameters", '{"rope_theta": {"factor": 2}}', '{"factor": 2}'),
        ("rope_parameters", '{"full_attention": 5, "rope_theta": 10000}', "full_attention"),
        ("rope_parameters", '{"full_attention": null, "rope_theta": 10000}', "full_attention"),
        ("intermediate_size", "[]", "[]"),
    ],
)
def test_config_values_checked_where_read(tmp_path, key, value, shown):
    text = json.dumps(LLAMA_CONFIG)[:-1] + f', "{key}": {value}' + "}"
    text = text.replace(f'"{key}": {json.dumps(LLAMA_CONFIG.get(key))}, ', "") if key in LLAMA_CONFIG else text
    folder = st_folder(tmp_path / "m", config=text)
    with pytest.raises(CheckpointError) as info:
        inspect_source(str(folder))
    line = str(info.value)
    assert "config.json" in line and key in line and shown in line, line
    assert "\n" not in line


@pytest.mark.parametrize(
    "text, problem",
    [
        ('{"model_type": "llama", "x": ' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
        ('{"model_type": "llama", "x": ' + "[" * 100 + "]" * 100 + "}", "nested more than"),
        ('{"model_type": "llama", "vocab_size": ' + "7" * 5000 + "}", "not valid JSON"),
        ('{"model_type": "llama", "num_hidden_layers": 1, "num_hidden_layers": 2}', "appears twice"),
        ('{"model_type": "llama", "x": {"y": -Infinity}}', "x.y must be a finite number"),
    ],
)
def test_config_json_text(tmp_path, text, problem):
    folder = st_folder(tmp_path / "m", config=text)
    with pytest.raises(CheckpointError) as info:
        inspect_source(str(folder))
    assert "config.json" in str(info.value) and problem in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "index, problem",
    [
        ({"metadata": {}, "weight_map": {}}, "empty weight_map"),
        ('{"weight_map": ' + "{" * 0 + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
        (
            '{"weight_map": {"a": "model.safetensors"}, "metadata": {"total_size": ' + "1" * 5000 + "}}",
            "not valid JSON",
        ),
        ('{"weight_map": {"a": "model.safetensors", "a": "model.safetensors"}}', "appears twice"),
        # a shard name longer than any file system allows: stat fails with ENAMETOOLONG, not ENOENT
        ({"weight_map": {"a": "x" * 300 + ".safetensors"}}, "cannot be looked up"),
    ],
)
def test_index_refusals(tmp_path, index, problem):
    folder = st_folder(tmp_path / "m")
    text = index if isinstance(index, str) else json.dumps(index)
    (folder / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError) as info:
        inspect_source(str(folder))
    assert "model.safetensors.index.json" in str(info.value) and problem in str(info.value), str(info.value)


def test_every_config_key_the_fingerprint_reads_is_declared():
    """Each key the fingerprint reads through Facts.get has a declared kind in config_check, so
    it is checked (type, range, finiteness) where the file is read. Found from the source."""
    from llmarch.arch.fingerprint import facts
    from llmarch.checkpoint.config_check import DECLARED

    keys = set(facts.EXPERTS_KEYS + facts.TOPK_KEYS + facts.SHARED_KEYS)
    for path in (ROOT / "llmarch" / "arch" / "fingerprint").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "f"
            ):
                keys |= {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    assert len(keys) > 80
    assert sorted(keys - DECLARED) == []


# ----------------------------------------------------------------------------- special files


def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("name", ["model.safetensors", "model.gguf"])
def test_fifo_is_refused_not_waited_on(tmp_path, name):
    """Nobody writes to the FIFO: a reader that opened it would block forever."""
    folder = tmp_path / "m"
    _fifo(folder / name)
    for source in (folder, folder / name):
        r = run_cli(source)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
        assert name in r.stderr or "not a" in r.stderr or "no such" in r.stderr, r.stderr


def test_fifo_config_and_device_are_refused(tmp_path):
    folder = st_folder(tmp_path / "m")
    _fifo(folder / "config.json")
    line = run_cli(folder).stderr
    assert "config.json" in line and "not a regular file" in line, line
    dev = tmp_path / "d"
    dev.mkdir()
    (dev / "model.gguf").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="not a regular file"):
        inspect_source(str(dev))


def test_socket_named_safetensors(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(folder / "model.safetensors"))
    except OSError as e:  # path too long for AF_UNIX on some systems
        pytest.skip(str(e))
    try:
        with pytest.raises(CheckpointError):
            inspect_source(str(folder))
    finally:
        s.close()


def test_schedule_period_search_is_linear_in_the_layers():
    """The repeating-unit search of the schedule line agrees with its definition (the smallest
    period p <= n/2, after up to 7 leading layers) and stays linear: 100,000 distinct layers (what a
    header may claim) take well under a second of CPU, where the quadratic search took hours."""
    import random
    import time

    from llmarch.report.text import repeat_unit

    def by_definition(labels):
        for start in range(min(len(labels), 8)):
            body = labels[start:]
            for p in range(1, len(body) // 2 + 1):
                if all(body[i] == body[i - p] for i in range(p, len(body))):
                    return start, p
        return None

    rng = random.Random(0)
    for _ in range(3000):
        unit = [rng.choice("ab") for _ in range(rng.randint(1, 4))]
        labels = [rng.choice("xy") for _ in range(rng.randint(0, 3))] + (unit * 12)[: rng.randint(0, 40)]
        if rng.random() < 0.3:
            labels = [rng.choice("abc") for _ in range(rng.randint(0, 20))]
        assert repeat_unit(labels) == by_definition(labels), labels
    t = time.process_time()
    assert repeat_unit([f"l{i}" for i in range(100_000)]) is None
    assert time.process_time() - t < 5

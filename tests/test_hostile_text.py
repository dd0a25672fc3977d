"""Text from files (file names, tensor names, model_type, metadata keys, template messages) is shown
literally: rich markup in it is not interpreted (`[/]` used to raise MarkupError, `[bold red]x.gguf`
was rendered as markup) and its control characters are escaped, so a name holding a newline and
ANSI escapes cannot forge a second `llmarch: ...` line or colour the terminal.

The hostile files are written here byte by byte; the expected text is the hostile string with
each control character spelled as its Python-style escape (`\\n`, `\\x1b`, `\\u202e`), as the
escaping rule says, not copied from llmarch's output."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import xml.dom.minidom
from pathlib import Path

import pytest

from fixtures.make import write_safetensors_header
from llmarch.errors import LlmarchError, printable
from tests.test_bad_input import GOOD_GGUF_DATA, gguf_bytes, gstr, kv_str, kv_u32, tensor_info

ROOT = Path(__file__).resolve().parents[1]
# markup (both a style and a bare closing tag), a newline that would start a forged line, ANSI
# colour, a C1 control and a right-to-left override
EVIL = "[bold red]x[/] [/]\n\x1b[31mllmarch: forged\x85\u202e"
SHOWN = r"[bold red]x[/] [/]\n\x1b[31mllmarch: forged\x85\u202e"
# file names cannot hold "/"
EVIL_NAME = "[bold red]m\n\x1b[31mllmarch: forged\u202e"
SHOWN_NAME = r"[bold red]m\n\x1b[31mllmarch: forged\u202e"


def run(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LLMARCH_DEBUG"}
    env.update(HF_HUB_OFFLINE="1", COLUMNS="400", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "llmarch", *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )


def shows(text: str, out: str) -> bool:
    """TEXT appears in OUT, allowing rich to have wrapped it (a title is as wide as its table)."""
    return "".join(text.split()) in "".join(out.split())


def assert_harmless(out: str) -> None:
    """No raw control character (beyond line ends) and no line that starts as a forged message."""
    assert not any(c in out for c in "\x1b\x85\u202e\r"), out
    assert not any(line.startswith("llmarch: forged") for line in out.splitlines()), out


def llama_folder(folder: Path, model_type: str = "llama", hostile: bool = True) -> Path:
    """A header-only Llama-shaped safetensors folder; hostile: model_type, a tensor name, a
    metadata key and value and a config key hold EVIL."""
    folder.mkdir(parents=True, exist_ok=True)
    h, v, f = 64, 128, 128
    t = {"model.embed_tokens.weight": ((v, h), "BF16"), "model.norm.weight": ((h,), "BF16")}
    t["lm_head.weight"] = ((v, h), "BF16")
    for i in range(2):
        p = f"model.layers.{i}."
        for name, shape in (
            ("self_attn.q_proj", (h, h)),
            ("self_attn.k_proj", (32, h)),
            ("self_attn.v_proj", (32, h)),
            ("self_attn.o_proj", (h, h)),
            ("mlp.gate_proj", (f, h)),
            ("mlp.up_proj", (f, h)),
            ("mlp.down_proj", (h, f)),
            ("input_layernorm", (h,)),
            ("post_attention_layernorm", (h,)),
        ):
            t[p + name + ".weight"] = (shape, "BF16")
    if hostile:
        t["model.layers.0." + EVIL + ".weight"] = ((4,), "BF16")
    write_safetensors_header(folder / "model.safetensors", t, {"format": "pt", **({EVIL: EVIL} if hostile else {})})
    cfg = {
        "model_type": model_type,
        "hidden_size": h,
        "intermediate_size": f,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": v,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    }
    if hostile:
        cfg.update({"architectures": [EVIL], EVIL: 1})
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    return llama_folder(tmp_path_factory.mktemp("hostile") / EVIL_NAME, model_type=EVIL)


def test_printable_escapes_every_control_character_and_nothing_else():
    assert printable("a\nb\r\t\x00\x1b[31m\x7f\x85\x9f") == r"a\nb\r\t\x00\x1b[31m\x7f\x85\x9f"
    bidi = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c\u2028\u2029"
    assert printable(bidi) == "".join(f"\\u{ord(c):04x}" for c in bidi)
    assert printable("bad\udcff.gguf") == r"bad\udcff.gguf"  # a file name that is not UTF-8
    ordinary = "Gemma 3 · 4 q / 1 kv × 256 — 日本語 é [bold] C:\\models\\x"
    assert printable(ordinary) == ordinary
    assert printable(printable(EVIL)) == printable(EVIL) == SHOWN


def test_an_error_is_one_line_whatever_its_path_and_message_hold():
    e = LlmarchError(f"bad key {EVIL}", f"/tmp/{EVIL_NAME}.gguf")
    assert str(e) == f"/tmp/{SHOWN_NAME}.gguf: bad key {SHOWN}"
    assert "\n" not in str(e) and "\x1b" not in str(e)


def test_inspect_shows_hostile_names_literally(hostile):
    r = run("inspect", hostile)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert shows(SHOWN_NAME, r.stdout)  # the title: the folder's name
    assert SHOWN in r.stdout  # model_type (the family of an unknown model) and the architecture
    assert_harmless(r.stdout)
    doc = json.loads(run("inspect", hostile, "--json").stdout)
    assert doc["model_type"] == EVIL  # --json keeps the exact text (JSON escapes it)


def test_diff_shows_hostile_names_literally(hostile, tmp_path):
    twin = shutil.copytree(hostile, tmp_path / (EVIL_NAME + "2"))
    r = run("diff", hostile, twin, "--tensors", "--all")
    assert r.returncode == 0, r.stderr  # the same architecture
    assert SHOWN in r.stdout and SHOWN_NAME in r.stdout and r.stderr == ""
    assert_harmless(r.stdout)
    plain = llama_folder(tmp_path / "plain", hostile=False)
    r = run("diff", hostile, plain, "--tensors")
    assert r.returncode == 1, r.stderr  # differs: the family and the extra tensor
    assert f"model.layers.*.{SHOWN}.weight only in A" in r.stdout
    assert_harmless(r.stdout)
    md = run("diff", hostile, plain, "--tensors", "--markdown")
    assert md.returncode == 1 and f"**{SHOWN}**" in md.stdout
    assert_harmless(md.stdout)


def test_svg_diagram_is_well_formed_xml_with_the_names_escaped(hostile, tmp_path):
    svg = tmp_path / "d.svg"
    r = run("inspect", hostile, "--diagram", svg)
    assert r.returncode == 0, r.stderr
    text = svg.read_text()
    xml.dom.minidom.parseString(text)  # raw control characters are not allowed in XML 1.0
    assert SHOWN_NAME in text and "\x1b" not in text


def hostile_gguf(path: Path, arch: str = "llama", extra_kvs=()) -> Path:
    kvs = [kv_str("general.architecture", arch), kv_u32(f"{arch}.block_count", 1), kv_str("general.name", EVIL)]
    kvs += [kv_u32(EVIL, 7), *extra_kvs]
    tensors = [tensor_info(EVIL, [8], 0, 0), tensor_info("blk.0." + EVIL, [16], 1, 32)]
    path.write_bytes(gguf_bytes(kvs, tensors, GOOD_GGUF_DATA))
    return path


def test_gguf_with_hostile_name_keys_tensors_and_architecture(tmp_path):
    f = hostile_gguf(tmp_path / f"{EVIL_NAME}.gguf")
    r = run("inspect", f)
    assert r.returncode == 0, r.stderr
    assert shows(f"{SHOWN_NAME}.gguf", r.stdout)
    assert_harmless(r.stdout)
    g = hostile_gguf(tmp_path / "arch.gguf", arch=EVIL)
    r = run("inspect", g)
    assert r.returncode == 0, r.stderr
    assert SHOWN in r.stdout  # the unknown architecture is the family shown
    assert_harmless(r.stdout)


def test_an_error_naming_a_hostile_key_is_one_line(tmp_path):
    # value type 77 does not exist (a key of its own: the same key twice is refused before its value is read)
    bad_value = gstr("x." + EVIL) + struct.pack("<I", 77) + b"\0" * 16
    f = hostile_gguf(tmp_path / f"{EVIL_NAME}.gguf", extra_kvs=[bad_value])
    r = run("inspect", f)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0] == f"llmarch: {tmp_path}/{SHOWN_NAME}.gguf: unknown GGUF value type 77 for x.{SHOWN}"
    assert_harmless(r.stderr)
    twice = hostile_gguf(tmp_path / "twice.gguf", extra_kvs=[kv_u32(EVIL, 8)])
    r = run("inspect", twice)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "appears twice" in r.stderr, r.stderr
    assert_harmless(r.stderr)


def test_a_template_message_is_one_line():
    from llmarch.runtime.chat import render_chat

    with pytest.raises(LlmarchError) as info:
        render_chat("{{ raise_exception('" + EVIL.replace("\n", "\\n") + "') }}", "hi", source=EVIL_NAME)
    assert str(info.value) == f"{SHOWN_NAME}: --chat: the chat template failed: {SHOWN}"


def test_fit_shows_hostile_names_literally(hostile):
    r = run("fit", hostile)
    assert r.returncode == 0, r.stderr
    assert shows(SHOWN_NAME, r.stdout) and r.stderr == ""
    assert_harmless(r.stdout)

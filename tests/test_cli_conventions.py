"""Command-line conventions: --version, -h, help text without type tags and with a description for
every option, shell completion, exclusive options, one stable convert summary line, progress bars
only on a terminal, what --diagram and --context beyond the model say, an all-MoE fact sheet."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def llmarch(*args, env_extra=None, stderr_tty: bool = False) -> subprocess.CompletedProcess:
    """`python -m llmarch ARGS`; stderr_tty: stderr is a pseudo-terminal (as in an interactive shell)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LLMARCH_DEBUG", "LLMARCH_NO_PROGRESS")}
    env.update({"HF_HUB_OFFLINE": "1", "COLUMNS": "60", "PYTHONPATH": str(ROOT)})
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "llmarch", *map(str, args)]
    if not stderr_tty:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    master, slave = pty.openpty()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    err = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        err += chunk
    os.close(master)
    out = p.communicate(timeout=300)[0]
    return subprocess.CompletedProcess(cmd, p.returncode, out.decode(), err.decode(errors="replace"))


def click_command():
    import typer

    from llmarch.cli import app

    return typer.main.get_command(app)


def test_version_matches_pyproject():
    want = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    r = llmarch("--version")
    assert r.returncode == 0 and r.stdout == f"llmarch {want}\n", (r.stdout, r.stderr)


def test_short_help_and_no_type_tags():
    """-h works everywhere; no typer `<bool>`/`<str>` tags; arguments are SOURCE / [SOURCE] in
    usage lines (not `{source}`)."""
    from typer.testing import CliRunner

    from llmarch.cli import app

    runner = CliRunner()
    commands = list(click_command().commands)
    assert {"inspect", "diff", "convert", "run", "families"} <= set(commands)
    for args in [["-h"]] + [[c, "-h"] for c in commands]:
        r = runner.invoke(app, args, prog_name="llmarch", env={"COLUMNS": "200"})
        assert r.exit_code == 0 and "Usage:" in r.output, (args, r.output)
        for tag in ("<bool>", "<str>", "<int>", "<float>"):
            assert tag not in r.output, (args, tag)
        usage = next(line for line in r.output.splitlines() if "Usage:" in line)
        assert "{" not in usage, usage
    usage = {c: runner.invoke(app, [c, "-h"], prog_name="llmarch").output for c in ("run", "convert", "diff")}
    assert "llmarch run [OPTIONS] [SOURCE]" in usage["run"]
    assert "llmarch convert [OPTIONS] SOURCE" in usage["convert"]
    assert "llmarch diff [OPTIONS] A B" in usage["diff"]
    r = runner.invoke(app, ["run", "-h"], prog_name="llmarch", env={"COLUMNS": "200"})
    assert "--prompt      " in r.output and "TEXT" in r.output  # options show a value name, flags none


def test_every_option_has_a_description():
    import click

    missing = [
        f"{name} {p.opts[0] if p.opts else p.name}"
        for name, cmd in click_command().commands.items()
        for p in cmd.params
        if not (getattr(p, "help", None) or "").strip() and not (isinstance(p, click.Option) and p.hidden)
    ]
    assert not missing, missing


def test_shell_completion():
    """typer's --show-completion script, and the completion protocol it calls answering."""
    from typer.testing import CliRunner

    from llmarch.cli import app

    r = CliRunner().invoke(app, ["--show-completion", "bash"], prog_name="llmarch")
    assert r.exit_code == 0 and "_LLMARCH_COMPLETE=complete_bash" in r.output
    exe = Path(sys.executable).with_name("llmarch")
    if not exe.is_file():
        pytest.skip("llmarch is not installed as a console script in this environment")
    env = dict(os.environ, _LLMARCH_COMPLETE="complete_bash", COMP_WORDS="llmarch run --top", COMP_CWORD="2")
    out = subprocess.run([exe], capture_output=True, text=True, env=env, timeout=60).stdout.split()
    assert out == ["--top-k", "--top-p"]


def test_json_and_markdown_exclusive(tmp_path):
    """Refused before either model is opened (neither exists)."""
    r = llmarch("diff", tmp_path / "a", tmp_path / "b", "--json", "--markdown")
    assert r.returncode == 2 and r.stderr == "llmarch: --json and --markdown are exclusive; choose one\n"


def test_context_beyond_the_model_warns(tiny):
    """Decision: answered with a warning (a longer context's KV figure is what a RoPE-scaled
    extension would need), not refused. The maximum is the config's max_position_embeddings."""
    path = tiny("llama")
    trained = json.loads((path / "config.json").read_text())["max_position_embeddings"]
    r = llmarch("inspect", path, "--context", trained * 4, "--json")
    assert r.returncode == 0
    assert json.loads(r.stdout)["kv_cache"]["context"] == trained * 4
    assert f"--context {trained * 4} is beyond the model's maximum of {trained}" in r.stderr
    r = llmarch("inspect", path, "--context", trained, "--json")
    assert r.returncode == 0 and "warning" not in r.stderr


def test_diagram_says_where_and_context_in_binary_units(tiny, tmp_path):
    path = tiny("llama", max_position_embeddings=32768)
    out = tmp_path / "g.svg"
    r = llmarch("inspect", path, "--diagram", out, "--json")
    assert r.returncode == 0, r.stderr
    assert f"wrote the diagram to {out}" in r.stderr
    assert "context 32K<" in out.read_text()


def test_token_counts_as_contexts_are_written():
    from llmarch.report.text import tokens

    assert [tokens(n) for n in (32768, 40960, 131072, 163840, 2**20, 1000, 4097, None)] == [
        "32K",
        "40K",
        "128K",
        "160K",
        "1M",
        "1000",
        "4097",
        "-",
    ]


def test_all_moe_fact_sheet_shows_no_dense_width(tiny):
    """Qwen3-MoE with mlp_only_layers = [] (as the real 30B-A3B): every layer is MoE (transformers'
    rule: MoE iff not in mlp_only_layers and (i+1) % decoder_sparse_step == 0), so the config's
    intermediate_size is a width no layer has."""
    from llmarch.api import inspect_source
    from llmarch.report.table import fact_rows

    all_moe = tiny("qwen3_moe", mlp_only_layers=[])
    width = json.loads((all_moe / "config.json").read_text())["intermediate_size"]
    rows = {fact: value for _, fact, value in fact_rows(inspect_source(str(all_moe)))}
    assert "dense FFN" not in rows["expert width"] and rows["intermediate / hidden"].startswith("none")
    assert str(width) not in rows["intermediate / hidden"]
    rows = {fact: value for _, fact, value in fact_rows(inspect_source(str(tiny("qwen3_moe"))))}  # layer 0 dense
    assert f"dense FFN {width}" in rows["expert width"] and rows["intermediate / hidden"].startswith(str(width))


def test_convert_summary_one_line_and_progress_only_on_a_terminal(tiny, tmp_path):
    """The summary is one line at any terminal width; tokenizer reads the same both ways (the GGUF's
    tokenizer.ggml.model, read back with gguf-py); --dtype in any case; a bar only on a terminal
    and never with --json."""
    import gguf

    src = tiny("llama")
    out = tmp_path / "t.gguf"
    r = llmarch("convert", src, "-o", out, "--dtype", "Q8_0", stderr_tty=True)
    assert r.returncode == 0, r.stderr
    assert "converting" in r.stderr and r.stderr.rstrip().endswith("\x1b[2K")  # drawn, then erased
    assert len(r.stdout.splitlines()) == 1 and r.stdout.startswith(f"wrote {out}, ")
    reader = gguf.GGUFReader(out)
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2} == {"Q8_0"}

    back = tmp_path / "back"
    r = llmarch("convert", out, "-o", back, "--to", "safetensors")  # stderr a pipe: no bar
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert len(r.stdout.splitlines()) == 1 and "tokenizer=none" in r.stdout  # the source folder has none

    tok_gguf = tmp_path / "tok.gguf"
    from fixtures.make import make_gguf

    make_gguf(tok_gguf, arch="llama")
    field = gguf.GGUFReader(tok_gguf).fields["tokenizer.ggml.model"]
    model = bytes(field.parts[field.data[0]]).decode()
    r = llmarch("convert", tok_gguf, "-o", tmp_path / "tok", "--json", stderr_tty=True)
    assert r.returncode == 0 and "converting" not in r.stderr, r.stderr
    assert json.loads(r.stdout)["tokenizer"] == model
    r = llmarch("convert", tmp_path / "tok", "-o", tmp_path / "tok2.gguf")
    assert r.returncode == 0 and f"tokenizer={model}," in r.stdout, r.stdout


def test_load_progress_only_on_a_terminal(tiny):
    args = (tiny("llama"), "--prompt-ids", "1,2", "-n", "2", "--device", "cpu")
    r = llmarch("run", *args, stderr_tty=True)
    assert r.returncode == 0 and "loading weights" in r.stderr, r.stderr
    r = llmarch("run", *args, "--json", stderr_tty=True)  # a pipe gets none either: see the convert test
    assert r.returncode == 0 and "loading weights" not in r.stderr, r.stderr


def test_verify_progress_nests_the_loads(tiny, tmp_path):
    """--verify runs both models through the runtime, each load a step inside the verify step: one
    display (rich allows one live display at a time), then the two closing lines."""
    out = tmp_path / "v.gguf"
    r = llmarch("convert", tiny("llama"), "-o", out, "--dtype", "f32", "--verify", stderr_tty=True)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "verifying" in r.stderr and "loading weights" in r.stderr
    assert [line.split(" ")[0] for line in r.stdout.splitlines()] == ["wrote", "verify"]

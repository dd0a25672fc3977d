"""llmarch convert never loses data: outputs that overlap inputs are refused, --force replaces only
what llmarch convert wrote, a SIGKILL at any moment leaves the old output or the new one complete
under the final name, partials of dead runs are removed by the next run, and write failures (read-only
folder, full disk) and an inconsistent GGUF vocabulary end in one line with nothing left behind.

Expected states come from the filesystem (the bytes that were there before, and those of an
uninterrupted conversion of the same source), never from what the code under test reports.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmarch.errors import LlmarchError

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "LLMARCH_DEBUG"} | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def cli(*args, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmarch", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=120,
        preexec_fn=preexec_fn,
    )


def one_line(r: subprocess.CompletedProcess, names: Path) -> str:
    """Exit 2, one `llmarch: ...` line on stderr naming `names`, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmarch: "), r.stderr
    assert str(names) in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under folder -> its bytes (None for a folder): what must not change."""
    return {
        str(p.relative_to(folder)): (None if p.is_dir() and not p.is_symlink() else p.read_bytes())
        for p in sorted(folder.rglob("*"))
    }


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------- inputs vs output


def test_output_folder_holding_the_source_gguf_is_refused(tiny_gguf, tmp_path):
    """convert X.gguf --to safetensors -o DIR --force, DIR holding X.gguf and notes: nothing deleted."""
    d = tmp_path / "models"
    d.mkdir()
    src = d / "x.gguf"
    shutil.copy(tiny_gguf("llama"), src)
    (d / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    line = one_line(cli("convert", src, "--to", "safetensors", "-o", d, "--force"), d)
    assert f"holds {src}" in line
    (tmp_path / "link").symlink_to(d)  # the same folder through a symbolic link
    line = one_line(cli("convert", src, "--to", "safetensors", "-o", tmp_path / "link", "--force"), tmp_path / "link")
    assert f"holds {src}" in line
    (tmp_path / "link").unlink()
    assert snapshot(tmp_path) == before


def test_output_that_is_or_lies_inside_a_source_is_refused(tiny, tmp_path):
    """convert DIR --to gguf -o DIR/model.safetensors --force: the shard stays; so for a symlink to it,
    a path inside DIR, and a shard that is a symlink into a blob folder (the Hugging Face cache)."""
    from llmarch.convert.to_gguf import convert_to_gguf

    src = tmp_path / "src"
    shutil.copytree(tiny("llama"), src)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (src / "model.safetensors").rename(blobs / "abc123")
    (src / "model.safetensors").symlink_to(blobs / "abc123")
    (tmp_path / "link.gguf").symlink_to(blobs / "abc123")
    before = snapshot(tmp_path)
    shard = src / "model.safetensors"
    one_line(cli("convert", src, "--to", "gguf", "-o", shard, "--force"), shard)
    cases = {
        src / "model.safetensors": "is",
        tmp_path / "link.gguf": "is",
        blobs / "abc123": "is",
        src / "new.gguf": "lies inside",
        src / "config.json": "is",
    }
    for out, why in cases.items():
        with pytest.raises(LlmarchError) as e:
            convert_to_gguf(str(src), out, "f32", force=True)
        assert e.value.path == str(out) and f"output {why} " in e.value.message, (out, e.value)
    with pytest.raises(LlmarchError) as e:  # a single .safetensors source: the config.json beside it is read too
        convert_to_gguf(str(src / "model.safetensors"), src / "config.json", "f32", force=True)
    assert "output is" in e.value.message
    assert snapshot(tmp_path) == before


def test_bind_mounted_or_hard_linked_paths_are_compared_by_inode(tiny_gguf, tmp_path):
    """Same folder under another name without a symlink (a bind mount; here a hard-linked GGUF,
    the one such case a test can make without privileges) is still caught when it is the source."""
    from llmarch.convert.output import refuse_overlap

    src = tmp_path / "a.gguf"
    shutil.copy(tiny_gguf("llama"), src)
    os.link(src, tmp_path / "b.gguf")
    with pytest.raises(LlmarchError, match="output is"):
        refuse_overlap(tmp_path / "b.gguf", [src])
    refuse_overlap(tmp_path / "c.gguf", [src])  # a new name: fine


# ----------------------------------------------------------------------------- --force


def test_force_replaces_only_folders_llmarch_wrote(tiny_gguf, tmp_path):
    from llmarch.convert.from_gguf import convert_from_gguf
    from llmarch.convert.output import MARKER

    src = tiny_gguf("llama")
    out = tmp_path / "hf"
    convert_from_gguf(str(src), out, "f16")
    assert (out / MARKER).is_file()
    ours = snapshot(out)

    # a folder of the user's: no marker (same file names as ours), or ours plus a file of theirs
    theirs = tmp_path / "theirs"
    shutil.copytree(out, theirs)
    (theirs / MARKER).unlink()
    (out / "notes.txt").write_text("mine")
    for folder, why in ((theirs, f"lacks {MARKER}"), (out, "holds notes.txt")):
        before = snapshot(folder)
        line = one_line(cli("convert", src, "--to", "safetensors", "-o", folder, "--force"), folder)
        assert why in line
        assert snapshot(folder) == before
    (out / "notes.txt").unlink()
    assert snapshot(out) == ours

    # a file where a folder goes, and a folder where a GGUF file goes
    (tmp_path / "file").write_text("mine")
    with pytest.raises(LlmarchError, match="not a folder"):
        convert_from_gguf(str(src), tmp_path / "file", "f32", force=True)
    assert (tmp_path / "file").read_text() == "mine"
    from llmarch.convert.to_gguf import convert_to_gguf

    with pytest.raises(LlmarchError, match="is a folder"):
        convert_to_gguf(str(out), theirs, "f32", force=True)

    # ours is replaced, and so is an empty folder (nothing to lose); nothing else appears beside them
    convert_from_gguf(str(src), out, "f32", force=True)
    assert snapshot(out) != ours and (out / MARKER).is_file()
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlmarchError, match="--force"):
        convert_from_gguf(str(src), tmp_path / "empty", "f32")
    convert_from_gguf(str(src), tmp_path / "empty", "f32", force=True)
    assert snapshot(tmp_path / "empty") == snapshot(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "hf", "theirs"]


def test_partials_of_dead_runs_removed_live_ones_kept(tiny_gguf, tmp_path):
    """Only names of our pattern, only of processes that are gone, only the files we write."""
    from llmarch.convert.from_gguf import convert_from_gguf

    src = tiny_gguf("llama")
    dead = dead_pid()
    live = subprocess.Popen(["sleep", "60"])
    try:
        out = tmp_path / "hf"
        stale = tmp_path / f".hf.partial-{dead}"
        stale.mkdir()
        (stale / "model.safetensors").write_bytes(b"x" * 1000)
        keep = {
            f".hf.partial-{live.pid}": "a live run's",
            f".hf.partial-{dead}x": "not our pattern",
            f".hf2.partial-{dead}": "another output's",
            f"hf.partial-{dead}": "not our pattern",
        }
        for name in keep:
            (tmp_path / name).write_text("keep")
        convert_from_gguf(str(src), out, "f32")
        assert not stale.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, "hf"])

        # a dead partial holding a file we never write: our files go, theirs stays
        stale.mkdir()
        (stale / "model.safetensors").write_bytes(b"x")
        (stale / "notes.txt").write_text("mine")
        convert_from_gguf(str(src), out, "f32", force=True)
        assert sorted(p.name for p in stale.iterdir()) == ["notes.txt"]

        # our own process id on a partial: a dead process's (containers reuse small ids)
        mine = tmp_path / f".hf.partial-{os.getpid()}"
        mine.mkdir()
        (mine / "config.json").write_text("{}")
        convert_from_gguf(str(src), out, "f32", force=True)
        assert not mine.exists()
    finally:
        live.kill()
        live.wait()


# ----------------------------------------------------------------------------- SIGKILL


def _bigger_hf(tiny):
    # big enough that writing takes tens of milliseconds, so kills land while the output is written
    return tiny("llama", hidden_size=256, intermediate_size=512, vocab_size=4096)


def _bigger_gguf(tiny_gguf):
    return tiny_gguf("llama", hidden=256, ffn=512, n_vocab=2048)


def _state(path: Path) -> dict[str, bytes] | bytes | None:
    if not os.path.lexists(path):
        return None
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    return path.read_bytes()


def _put(state, path: Path) -> None:
    """Put an output state back under `path` (the test's own copy, not llmarch's)."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    if isinstance(state, dict):
        path.mkdir()
        for name, data in state.items():
            (path / name).write_bytes(data)
    else:
        path.write_bytes(state)


def _leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != name)


def _has_partial(folder: Path, name: str) -> bool:
    return any(n.startswith(f".{name}.partial-") for n in os.listdir(folder))


def _start(args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llmarch", *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for(p: subprocess.Popen, ready) -> float:
    """Poll every millisecond until ready() or the process ends; the seconds waited."""
    t0 = time.perf_counter()
    while p.poll() is None and not ready():
        time.sleep(0.001)
    return time.perf_counter() - t0


def _timeline(args, folder: Path, name: str) -> tuple[float, float]:
    """(seconds until a partial of `name` appears, seconds it then lives) in one uninterrupted run."""
    p = _start(args)
    start = _wait_for(p, lambda: _has_partial(folder, name))
    writing = _wait_for(p, lambda: not _has_partial(folder, name))
    assert p.wait() == 0
    return start, writing


def _directions(tiny, tiny_gguf, tmp_path):
    """(CLI args without -o, output name, old state, new state, the same run in this process) for
    both directions: old = f16, new = q8_0 / f32."""
    from llmarch.convert.from_gguf import convert_from_gguf
    from llmarch.convert.to_gguf import convert_to_gguf

    hf, gg = _bigger_hf(tiny), _bigger_gguf(tiny_gguf)
    refs = tmp_path / "refs"
    refs.mkdir()
    convert_to_gguf(str(hf), refs / "old.gguf", "f16")
    convert_to_gguf(str(hf), refs / "new.gguf", "q8_0")
    convert_from_gguf(str(gg), refs / "old", "f16")
    convert_from_gguf(str(gg), refs / "new", "f32")
    return [
        (
            [hf, "--to", "gguf", "--dtype", "q8_0"],
            "m.gguf",
            _state(refs / "old.gguf"),
            _state(refs / "new.gguf"),
            lambda out, force: convert_to_gguf(str(hf), out, "q8_0", force),
        ),
        (
            [gg, "--to", "safetensors", "--dtype", "f32"],
            "hf",
            _state(refs / "old"),
            _state(refs / "new"),
            lambda out, force: convert_from_gguf(str(gg), out, "f32", force),
        ),
    ]


def test_sigkill_at_random_moments_leaves_old_or_new_output(tiny, tiny_gguf, tmp_path):
    """Kill convert --force (both directions) at seeded random delays: the final name always holds
    the old output intact or the new one complete (byte for byte an uninterrupted run's), never
    anything else; leftovers are only partials of killed runs, and the next run removes them."""
    from llmarch.api import load_checkpoint_spec

    rng = random.Random(20261201)
    for args, name, old, new, rerun in _directions(tiny, tiny_gguf, tmp_path):
        assert old != new
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        out = folder / name
        _put(old, out)
        start, writing = _timeline(["convert", *args, "-o", out, "--force"], folder, name)
        assert _state(out) == new and _leftovers(folder, name) == []
        killed, outcomes = [], []
        for i in range(5):
            _put(old, out)
            p = _start(["convert", *args, "-o", out, "--force"])
            if i == 0:  # anywhere before the writing starts
                time.sleep(rng.uniform(0, start))
            else:  # while it writes and publishes: timed from when this run's partial appears
                _wait_for(p, lambda f=folder, n=name: _has_partial(f, n))
                time.sleep(rng.uniform(0, 1.5 * writing))
            p.send_signal(signal.SIGKILL)
            p.wait()
            killed.append(p.pid)
            state = _state(out)
            outcomes.append(("new" if state == new else "old", len(_leftovers(folder, name))))
            assert state in (old, new), (name, outcomes)
            load_checkpoint_spec(str(out))  # what inspect reads: a whole checkpoint
            pattern = re.compile(rf"\.{re.escape(name)}\.partial-(\d+)")
            for left in _leftovers(folder, name):
                m = pattern.fullmatch(left)
                assert m and int(m.group(1)) in killed, left
        print(name, f"partial after {start:.3f} s, for {writing:.3f} s; kills: (state, leftovers)", outcomes)
        rerun(out, True)  # the next run cleans up after the killed ones
        assert _state(out) == new and _leftovers(folder, name) == [], _leftovers(folder, name)


KILL_AT = r"""
import os, signal, sys
import llmarch.convert.output as o

point, args = sys.argv[1], sys.argv[2:]
swapped = []


def die(*_):
    os.kill(os.getpid(), signal.SIGKILL)


def after(fn, when=lambda: True):
    def wrapped(*a, **k):
        r = fn(*a, **k)
        if when():
            die()
        return r
    return wrapped


if point == "before_publish":
    o._publish = die
elif point == "after_swap":
    o._swap = after(o._swap)
elif point == "after_first_old_file":
    real_swap, real_remove = o._swap, o._remove_ours
    o._swap = lambda a, b: swapped.append(1) or real_swap(a, b)

    def remove(path):
        if not swapped:
            return real_remove(path)
        (path / "config.json").unlink()
        die()

    o._remove_ours = remove
elif point == "after_replace":
    o.os.replace = after(o.os.replace)
elif point == "between_renames":  # a file system without RENAME_EXCHANGE
    o._swap = lambda a, b: False
    o.os.rename = after(o.os.rename)
from llmarch.cli import main

sys.argv = ["llmarch", *args]
main()
"""


def test_sigkill_at_each_publishing_step(tiny, tiny_gguf, tmp_path):
    """A SIGKILL exactly at each step of publishing: before it, after the swap, while the old folder
    is removed, after a file's rename; and between the two renames of the fallback without an atomic
    swap, where the next run puts the old folder back before anything else."""
    to_gguf, from_gguf = _directions(tiny, tiny_gguf, tmp_path)
    cases = [
        (to_gguf, "before_publish", "old"),
        (to_gguf, "after_replace", "new"),
        (from_gguf, "before_publish", "old"),
        (from_gguf, "after_swap", "new"),
        (from_gguf, "after_first_old_file", "new"),
        (from_gguf, "between_renames", None),
    ]
    for (args, name, old, new, rerun), point, expect in cases:
        folder = tmp_path / f"{point}-{name}"
        folder.mkdir()
        out = folder / name
        _put(old, out)
        r = subprocess.run(
            [sys.executable, "-c", KILL_AT, point, "convert", *map(str, args), "-o", str(out), "--force"],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            timeout=120,
        )
        assert r.returncode == -signal.SIGKILL, (point, r.stderr)
        if expect is None:  # the one window the fallback has: old folder aside, new one not yet in place
            assert _state(out) is None and _pid_of(folder, name) > 0
            with pytest.raises(LlmarchError, match="output exists"):  # the next run restores, then refuses
                rerun(out, False)
            assert _state(out) == old and _leftovers(folder, name) == []
            continue
        assert _state(out) == (old if expect == "old" else new), point
        rerun(out, True)
        assert _state(out) == new and _leftovers(folder, name) == [], (point, _leftovers(folder, name))


def _pid_of(folder: Path, name: str) -> int:
    [pid] = [int(m.group(1)) for p in folder.iterdir() if (m := re.fullmatch(rf"\.{name}\.old-(\d+)", p.name))]
    return pid


# ----------------------------------------------------------------------------- write failures


def _make_read_only(folder: Path):
    """chmod 0555, or for root (who writes anyway) the immutable flag; None when neither holds here."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    else:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode:
            return None
        undo = ["chattr", "-i", str(folder)]
    try:
        (folder / "probe").touch()
    except OSError:
        return undo
    subprocess.run(undo)
    (folder / "probe").unlink()
    return None


def test_read_only_output_folder_both_directions(tiny, tiny_gguf, tmp_path):
    from llmarch.convert.from_gguf import convert_from_gguf

    ro = tmp_path / "ro"
    ro.mkdir()
    convert_from_gguf(str(tiny_gguf("llama")), ro / "old", "f32")  # an output of ours, to be replaced
    before = snapshot(ro)
    undo = _make_read_only(ro)
    if undo is None:
        pytest.skip("cannot make a folder read-only here")
    try:
        one_line(cli("convert", tiny("llama"), "--to", "gguf", "-o", ro / "m.gguf"), ro / "m.gguf")
        one_line(cli("convert", tiny_gguf("llama"), "--to", "safetensors", "-o", ro / "hf"), ro / "hf")
        line = one_line(
            cli("convert", tiny_gguf("llama"), "--to", "safetensors", "-o", ro / "old", "--force"), ro / "old"
        )
        assert "cannot write" in line
    finally:
        subprocess.run(undo)
    assert snapshot(ro) == before


def test_full_disk_while_writing_safetensors(tiny_gguf, tmp_path):
    """A file-size limit below model.safetensors (EFBIG, as a full disk gives ENOSPC): one line,
    nothing left; the old output stays when it was being replaced."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the error instead of the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    out = tmp_path / "hf"
    line = one_line(cli("convert", tiny_gguf("llama"), "--to", "safetensors", "-o", out, preexec_fn=limit), out)
    assert "cannot reserve" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("direction", ["to_gguf", "from_gguf"])
def test_disk_full_in_the_middle_of_writing(tiny, tiny_gguf, tmp_path, monkeypatch, direction):
    """ENOSPC from a write after the reservation (a file system that does not reserve): one error
    naming the output, the partial removed, the old output untouched, and the tensors not yet
    started are not converted any more (one thread: at most the one already running)."""
    import llmarch.convert.from_gguf as from_gguf
    import llmarch.convert.writer as writer
    from llmarch.convert.from_gguf import convert_from_gguf
    from llmarch.convert.to_gguf import convert_to_gguf

    if direction == "to_gguf":  # f32 -> f16: every tensor is encoded and pwritten (~22 writes)
        out, module = tmp_path / "m.gguf", writer
        convert_to_gguf(str(tiny("llama")), out, "f32")
        run = lambda: convert_to_gguf(str(tiny("llama")), out, "f16", True, 1)  # noqa: E731
    else:  # q8_0 -> f32: the header, then every tensor pwritten (~22 writes)
        out, module = tmp_path / "hf", from_gguf
        convert_from_gguf(str(tiny_gguf("llama")), out, "f16")
        run = lambda: convert_from_gguf(str(tiny_gguf("llama")), out, "f32", True, 1)  # noqa: E731
    before = snapshot(tmp_path)
    calls, real = [], module.pwrite_all

    def pwrite_all(*a):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        time.sleep(0.05)  # tensors of a real size: the failure is seen before the others are written
        return real(*a)

    monkeypatch.setattr(module, "pwrite_all", pwrite_all)
    with pytest.raises(LlmarchError) as e:
        run()
    assert e.value.path == str(out) and os.strerror(errno.ENOSPC) in e.value.message
    assert snapshot(tmp_path) == before
    assert len(calls) <= 4, len(calls)
    monkeypatch.setattr(module, "pwrite_all", lambda *a: calls.append(1) or real(*a))
    calls.clear()
    run()
    assert len(calls) > 10  # what an uncancelled run would have gone on writing


# ----------------------------------------------------------------------------- inconsistent vocabulary


def rewrite_gguf(src: Path, dst: Path, **keys) -> Path:
    """A copy of a GGUF with metadata keys replaced: key=(value, type[, element type]) or None to drop."""
    import gguf

    r = gguf.GGUFReader(src)
    keys = {k.replace("__", "."): v for k, v in keys.items()}
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in keys:
            continue
        array = f.types[0] == gguf.GGUFValueType.ARRAY
        w.add_key_value(name, f.contents(), f.types[0], sub_type=f.types[-1] if array else None)
    for name, spec in keys.items():
        if spec is not None:
            w.add_key_value(name, *spec)
    for t in r.tensors:
        w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in r.tensors:
        w.write_tensor_data(t.data)
    w.close()
    return dst


def test_inconsistent_bpe_vocabulary_one_line(tiny_gguf, tmp_path):
    """A byte-level (gpt2) vocab whose merge makes a token the vocab lacks made the tokenizers library
    panic (a Rust backtrace on stderr); now one line naming the file and the merge, nothing written."""
    import gguf

    A, S, I = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING, gguf.GGUFValueType.INT32
    src = tiny_gguf("llama")
    tokens = gguf.GGUFReader(src).fields["tokenizer.ggml.tokens"].contents()
    a, b = tokens[70], tokens[71]
    assert a + b not in tokens
    bad = rewrite_gguf(
        src,
        tmp_path / "bad.gguf",
        tokenizer__ggml__model=("gpt2", S),
        tokenizer__ggml__pre=("gpt-2", S),
        tokenizer__ggml__merges=([f"{a} {b}"], A, S),
        tokenizer__ggml__scores=None,
    )
    out = tmp_path / "hf"
    line = one_line(cli("convert", bad, "--to", "safetensors", "-o", out), bad)
    assert "merges[0]" in line and repr(a + b) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]

    from llmarch.convert.from_gguf import convert_from_gguf

    n = len(tokens)
    variants = {
        "not two tokens": dict(tokenizer__ggml__merges=([a + b], A, S)),
        "token_type has 3 entries": dict(tokenizer__ggml__token_type=([1, 1, 1], A, I)),
        "scores has 2 entries": dict(
            tokenizer__ggml__model=("llama", S), tokenizer__ggml__scores=([0.0, 0.0], A, gguf.GGUFValueType.FLOAT32)
        ),
        "tokens is not a list of the right type": dict(tokenizer__ggml__tokens=(list(range(n)), A, I)),
    }
    for why, keys in variants.items():
        base = dict(
            tokenizer__ggml__model=("gpt2", S),
            tokenizer__ggml__pre=("gpt-2", S),
            tokenizer__ggml__merges=None,
            tokenizer__ggml__scores=None,
        )
        path = rewrite_gguf(src, tmp_path / f"v{len(why)}.gguf", **(base | keys))
        with pytest.raises(LlmarchError) as e:
            convert_from_gguf(str(path), out, "f32")
        assert e.value.path == str(path) and why in e.value.message, (why, e.value)
        path.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]

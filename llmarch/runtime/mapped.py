"""A checkpoint file's bytes as one numpy array, mapped once per process and read in place. No torch:
the torch loader (weights.py) and the torch-free runner (native_run.py) share the same map, so a
pointer into one is a pointer into the other."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from llmarch.checkpoint.parts import joined


@lru_cache(maxsize=64)
def file_bytes(path: Path) -> np.ndarray:
    # mode "c": copy-on-write map, so torch gets writable tensors without copying the file; a file
    # read in place from its parts (the embedded model) is already such a map
    parted = joined(path)
    return np.frombuffer(parted, dtype=np.uint8) if parted is not None else np.memmap(path, dtype=np.uint8, mode="c")

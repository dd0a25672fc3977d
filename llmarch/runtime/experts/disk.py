"""--experts disk: a layer's stored experts in one file, memory-mapped, so that RSS holds only the
pages touched, and a budget past which those pages are dropped."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import torch


def map_to_disk(path: Path, tensors: tuple) -> tuple[np.memmap, list]:
    """Write the tensors (None skipped) one after another to `path` and map the file back: returns
    the mapping and, in the tensors' places, views of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for t in tensors:
            if t is not None:
                f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
    mm = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable views, nothing copied
    off, out = 0, []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        n = t.numel() * t.element_size()
        out.append(torch.frombuffer(mm, dtype=torch.uint8, count=n, offset=off).view(t.dtype).view(t.shape))
        off += n
    return mm, out


class DiskCache:
    """Expert pages read through the file mappings count in RSS until dropped. Once the bytes touched
    since the last drop pass the budget, every mapping is told MADV_DONTNEED: the pages leave the
    process (the kernel's page cache may keep them; a later touch maps them back)."""

    def __init__(self, budget: int):
        self.budget, self.touched, self.maps, self.drops = budget, 0, [], 0

    def add(self, mm) -> None:
        self.maps.append(mm)

    def touch(self, nbytes: int) -> None:
        self.touched += nbytes
        if self.touched > self.budget:
            for mm in self.maps:
                mm._mmap.madvise(mmap.MADV_DONTNEED)
            self.touched, self.drops = 0, self.drops + 1

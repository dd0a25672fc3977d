"""--experts disk: the quantized experts of a layer in one file, memory-mapped."""

from __future__ import annotations

import mmap


class DiskCache:
    """--experts disk: expert pages read through the file mappings count in RSS until dropped. Once
    the bytes touched since the last drop pass the budget, every mapping is told MADV_DONTNEED: the
    pages leave the process (the kernel's page cache may keep them; a later touch maps them back)."""

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

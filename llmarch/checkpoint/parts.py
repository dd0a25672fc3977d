"""One file stored as consecutive part files, read in place without joining them on disk.

The embedded demo model's package ships its .gguf as four chunk files; joining them into one file
(what its assemble() does) keeps the model on disk twice. Instead the parts are mapped side by
side into one reserved address range (mmap MAP_FIXED over a PROT_NONE reservation): readers get
one contiguous, copy-on-write byte buffer (a memoryview, so header-only commands need no numpy),
as np.memmap(mode="c") gives for a real file, and no byte is copied. That needs a POSIX mmap and every part but the last a whole number of pages;
where either is missing, map_parts() returns None and the caller falls back to a joined file.

Readers that open a path (the GGUF header parser, the tensor reader) ask joined(path) first: a path
registered here stands for the whole joined buffer, not for the part file of that name.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

_JOINED: dict[Path, memoryview] = {}

_MAP_FIXED = 0x10  # the same value on Linux and the BSDs / macOS; the mmap module does not export it


def joined(path: Path) -> memoryview | None:
    """The buffer registered for `path`, or None for an ordinary file."""
    return _JOINED.get(path) if _JOINED else None


def register(path: Path, buf: memoryview) -> None:
    _JOINED[path] = buf


def map_parts(parts: list[Path]) -> memoryview | None:
    """The parts' bytes as one buffer, mapped in place (kept mapped for the life of the process),
    or None where this platform or the part sizes do not allow it."""
    anonymous = getattr(mmap, "MAP_ANONYMOUS", None) or getattr(mmap, "MAP_ANON", None)
    if os.name != "posix" or anonymous is None or not parts:
        return None
    sizes = [os.stat(p).st_size for p in parts]
    if not all(sizes) or any(s % mmap.PAGESIZE for s in sizes[:-1]):
        return None
    total = sum(sizes)
    import ctypes  # here, not at the top: only the embedded model's parts need it (~7 ms of inspect's start)

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_ssize_t]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    failed = ctypes.c_void_p(-1).value
    base = libc.mmap(None, total, 0, mmap.MAP_PRIVATE | anonymous, -1, 0)  # reserve the range, no access
    if base is None or base == failed:
        return None
    offset = 0
    for part, size in zip(parts, sizes):
        fd = os.open(part, os.O_RDONLY)
        try:
            # private and writable: copy-on-write views, as np.memmap(mode="c"); the file is never written
            at = libc.mmap(base + offset, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_FIXED, fd, 0)
        finally:
            os.close(fd)
        if at != base + offset:
            libc.munmap(base, total)
            return None
        offset += size
    return memoryview((ctypes.c_uint8 * total).from_address(base)).cast("B")

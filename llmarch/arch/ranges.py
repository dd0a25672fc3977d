"""Layer index lists as short text: [0, 1, 2, 5] -> "0-2,5" (evidence, warnings and reports)."""

from __future__ import annotations


def index_ranges(idx: list[int]) -> str:
    if not idx:
        return "none"
    out, start, prev = [], idx[0], idx[0]
    for i in idx[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(out)


def layers_named(idx: list[int]) -> str:
    """[0] -> "layer 0", [0, 1, 2] -> "layers 0-2": an index list that cannot be read as a count."""
    return ("layer " if len(idx) == 1 else "layers ") + index_ranges(idx)

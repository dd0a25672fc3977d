"""Human-readable pieces shared by the fact sheet, the diff table and the diagrams."""

from __future__ import annotations

from llmarch.arch.spec import ArchSpec, LayerSpec
from llmarch.errors import printable


def plain(value, style: str = ""):
    """VALUE, which may hold text from a file (names, keys, model_type), as a rich Text: shown
    literally (`[bold red]x.gguf` is not markup) with its control characters escaped."""
    from rich.text import Text

    return Text(printable(str(value)), style=style)


def literal(value) -> str:
    """VALUE, which may hold text from a file, for a rich markup string: its brackets escaped
    (shown, not read as markup) and its control characters escaped."""
    from rich.markup import escape

    return escape(printable(str(value)))


def count(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def tokens(n: int | None) -> str:
    """A token count as people write contexts: 32768 -> 32K, 1048576 -> 1M (binary multiples, which
    is what model cards mean), anything else exact (count() would round 32768 to 32.8K)."""
    if n is None:
        return "-"
    if n >= 2**20 and n % 2**20 == 0:
        return f"{n // 2**20}M"
    if n >= 2**10 and n % 2**10 == 0:
        return f"{n // 2**10}K"
    return str(int(n))


def nbytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            v = n / size
            return f"{v:.0f} {unit}" if abs(v) >= 100 else f"{v:.3g} {unit}"  # 1020 MiB, not 1.02e+03
    return f"{int(n)} B"


def layer_label(layer: LayerSpec, learned_positions: bool = False) -> str:
    mixer = layer.linear_kind or layer.mixer if layer.mixer in ("linear", "mamba") else layer.mixer
    parts = [f"{mixer}({layer.window})" if layer.window else mixer]
    if layer.compress_ratio:  # compressed entries beside the window, indexed (sparse) or all read
        parts[0] += f"+compressed(1/{layer.compress_ratio}{', indexed' if layer.compressed_index else ''})"
    if not layer.rope and layer.mixer not in ("linear", "mamba", "none") and not learned_positions:
        parts.append("NoPE")
    if layer.kv_shared_from is not None:
        parts.append(f"kv<-{layer.kv_shared_from}")
    parts.append(layer.ffn)
    return " ".join(parts)


def schedule_runs(spec: ArchSpec) -> list[tuple[int, int, str]]:
    """Consecutive layers with the same label, as (first, last, label)."""
    runs: list[tuple[int, int, str]] = []
    for layer in spec.schedule:
        label = layer_label(layer, spec.rope.learned_positions)
        if runs and runs[-1][2] == label:
            runs[-1] = (runs[-1][0], layer.index, label)
        else:
            runs.append((layer.index, layer.index, label))
    return runs


def schedule_pattern(spec: ArchSpec) -> str:
    """The shortest repeating unit of the schedule, e.g. '5 x sliding(512) dense + full dense, x3'."""
    labels = [layer_label(l, spec.rope.learned_positions) for l in spec.schedule]
    if not labels:
        return "-"
    found = repeat_unit(labels)
    if found:
        start, p = found
        body = labels[start:]
        head = _group(labels[:start])
        unit = _group(body[:p])
        reps = len(body) / p
        rep = f" ×{reps:g}" if reps != 1 else ""
        return (head + "; then " if head else "") + f"[{unit}]{rep}"
    return "; ".join(f"{a}-{b}: {lab}" if a != b else f"{a}: {lab}" for a, b, lab in schedule_runs(spec))


def repeat_unit(labels: list) -> tuple[int, int] | None:
    """(start, period): labels[start:] repeats with that period (the last repeat may be cut
    short); a few leading layers (dense-first) may precede it. None when nothing repeats.
    Shared by schedule_pattern and the diagrams."""
    n = len(labels)
    for start in range(0, min(n, 8)):
        p = _smallest_period(labels[start:])
        if p is not None:
            return start, p
    return None


def _smallest_period(body: list) -> int | None:
    """The smallest p <= len/2 with body[i] == body[i - p] for every i >= p, or None: the length
    minus the longest proper prefix that is also a suffix (KMP's failure function), linear in the
    number of layers however many a header claims."""
    m = len(body)
    if m < 2:
        return None
    border = [0] * m
    k = 0
    for i in range(1, m):
        while k and body[i] != body[k]:
            k = border[k - 1]
        if body[i] == body[k]:
            k += 1
        border[i] = k
    p = m - border[-1]
    return p if p <= m // 2 else None


def _group(labels: list[str]) -> str:
    out: list[list] = []
    for lab in labels:
        if out and out[-1][0] == lab:
            out[-1][1] += 1
        else:
            out.append([lab, 1])
    return " + ".join(f"{k}×{lab}" if k > 1 else lab for lab, k in out)

"""Progress for the long steps (loading weights, converting, verifying): a transient rich bar on an
interactive stderr, nothing at all on a pipe, in a file, or when the command prints --json.

The bar is transient so what stays on screen is the command's own closing line; nothing is
written to stdout, which holds the command's real output.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_silenced = False
_shown = None  # the bar on screen: a step inside another step (verify loading a model) adds a line to it


def silence() -> None:
    """No bars for the rest of this process (the command prints a JSON document)."""
    global _silenced
    _silenced = True


def enabled() -> bool:
    return not _silenced and not os.environ.get("LLMARCH_NO_PROGRESS") and sys.stderr.isatty()


@contextmanager
def progress(description: str, total: float | None = None) -> Iterator[Callable[..., None]]:
    """Yields advance(n=1); total None: an indeterminate bar with the elapsed time."""
    global _shown
    if not enabled():
        yield _nothing
        return
    if _shown is not None:  # rich allows one live display at a time: nest as another line of it
        bar = _shown
        task = bar.add_task(description, total=total)
        try:
            yield lambda n=1: bar.advance(task, n)
        finally:
            bar.remove_task(task)
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        _shown = bar
        try:
            yield lambda n=1: bar.advance(task, n)  # thread-safe: rich's Progress takes its own lock
        finally:
            _shown = None


def _nothing(n: float = 1) -> None:
    return None

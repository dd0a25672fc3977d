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


def silence() -> None:
    """No bars for the rest of this process (the command prints a JSON document)."""
    global _silenced
    _silenced = True


def enabled() -> bool:
    return not _silenced and not os.environ.get("LLMARCH_NO_PROGRESS") and sys.stderr.isatty()


@contextmanager
def progress(description: str, total: float | None = None, unit_bytes: bool = False) -> Iterator[Callable[..., None]]:
    """Yields advance(n=1). total None: an indeterminate bar with the elapsed time.
    unit_bytes: show the completed / total amount as bytes (MB/GB) instead of a count."""
    if not enabled():
        yield _nothing
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    amount = DownloadColumn() if unit_bytes else MofNCompleteColumn()
    columns = [TextColumn("{task.description}"), BarColumn(), amount, TimeElapsedColumn()]
    if total is not None:
        columns.append(TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: float = 1) -> None:
            bar.advance(task, n)  # thread-safe: rich's Progress takes its own lock

        yield advance


def _nothing(n: float = 1) -> None:
    return None

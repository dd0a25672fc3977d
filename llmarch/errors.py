"""The one error type the CLI turns into a single line on stderr and exit status 2."""

from __future__ import annotations

from pathlib import Path


class LlmarchError(Exception):
    """A problem with the user's input: reported as `path: message`, never as a traceback."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = str(path) if path is not None else None
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class CheckpointError(LlmarchError):
    """A checkpoint file is unreadable, corrupt, or of a kind we refuse to read."""

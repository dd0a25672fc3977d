"""The one error type the CLI turns into a single line on stderr and exit status 2, and
`printable`, which keeps text read from a file to one harmless line on a terminal."""

from __future__ import annotations

import re
from pathlib import Path

# C0 controls, DEL and C1 controls (ESC starts terminal sequences, CR/LF forge lines), the Unicode
# line and paragraph separators, the bidirectional controls that reorder what follows them, and
# lone surrogates (the bytes of a file name that is not UTF-8, which no terminal can show)
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def printable(text: str) -> str:
    """TEXT with every control character written as an escape (`\\n`, `\\x1b`, `\\u202e`): a file
    name, key or message from a file cannot move the cursor, colour the terminal, reorder the
    line or forge a second `llmarch: ...` line. Backslashes are kept, so applying it twice is
    the same as once."""
    return _UNPRINTABLE.sub(_escape, text)


MAX_MESSAGE = 1000


def shortened(text: str, limit: int = MAX_MESSAGE) -> str:
    """TEXT cut in the middle to about `limit` characters: a key or name read from a file can be
    megabytes long, and a one-line message quoting it whole is neither readable nor cheap."""
    if len(text) <= limit:
        return text
    head, tail = limit * 3 // 4, limit // 4
    return f"{text[:head]} ... ({len(text) - head - tail} characters left out) ... {text[-tail:]}"


class LlmarchError(Exception):
    """A problem with the user's input: reported as `path: message`, never as a traceback.
    Its text is printable(): one line whatever the path and message hold."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = str(path) if path is not None else None
        self.message = message
        text = shortened(message)
        super().__init__(printable(f"{self.path}: {text}" if self.path else text))


class CheckpointError(LlmarchError):
    """A checkpoint file is unreadable, corrupt, or of a kind we refuse to read."""

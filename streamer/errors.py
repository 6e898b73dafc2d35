"""User-facing errors.

Every failure a user can cause (a bad path, a corrupt file, a hostile checkpoint, an
unreachable hub) is raised as a :class:`StreamerError` whose message is one line that
says what is wrong and, where there is one, the fix. The CLI prints that line and exits
non-zero; it never shows a traceback for these.
"""

from __future__ import annotations


class StreamerError(Exception):
    """An error whose message is fit to show a user as it is, on one line."""

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class AudioError(StreamerError):
    """An audio file or stream that cannot be read or decoded."""


class CheckpointError(StreamerError):
    """A model checkpoint that is missing, malformed, not an AST or unsafe."""

"""User-facing errors.

Every failure a user can cause (a bad path, a corrupt file, a hostile checkpoint, an
unreachable hub) is raised as a :class:`StreamerError` whose message is one line that
says what is wrong and, where there is one, the fix. The CLI prints that line and exits
non-zero; it never shows a traceback for these.
"""

from __future__ import annotations


def text_number_hint(value: object) -> str:
    """For a config value that is text but reads as a number: why, and how to write it.

    YAML 1.1 (PyYAML) takes ``1e-3`` as the text "1e-3" — an exponent needs a dot and a sign
    (``1.0e-3``) to be a number — so a user who wrote a number is told so, not only "got '1e-3'"."""
    if not isinstance(value, str):
        return ""
    from decimal import Decimal, InvalidOperation

    try:
        number = Decimal(value.strip())
    except InvalidOperation:
        return ""
    if not number.is_finite():
        return ""
    if "e" not in value.lower():
        return " (a number in quotes is text: drop the quotes)"
    plain = f"{number:f}"
    plain = plain.rstrip("0").rstrip(".") if "." in plain else plain
    return f" (YAML reads {value} as text: write it as a decimal, e.g. {plain})"


class StreamerError(Exception):
    """An error whose message is fit to show a user as it is, on one line."""

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class AudioError(StreamerError):
    """An audio file or stream that cannot be read or decoded."""


class CheckpointError(StreamerError):
    """A model checkpoint that is missing, malformed, not an AST or unsafe."""

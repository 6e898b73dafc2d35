"""Credentials in URLs, masked before anything is logged or shown.

A camera URL usually carries its password (``rtsp://admin:secret@cam/stream``), and the
URL turns up in many places: a source's description, its retry messages, ffmpeg's own
error lines. :func:`mask_url` takes any text and masks the password of every URL in it,
so that every path to a log line or a status can go through the one function.
"""

from __future__ import annotations

import re

MASK = "***"

LIVE_URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")

# scheme://user:password@host — the authority ends at '/', '?', '#' or whitespace; the
# password runs to the *last* '@' of the authority (a raw '@' in a password is common
# enough in hand-written camera URLs), and the user ends at the first ':'.
_USERINFO = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/?#@:]*):(?P<password>[^\s/?#]*)@"
)
# query parameters that carry secrets: ?password=…, &token=…
_SECRET_PARAM = re.compile(
    r"(?P<head>[?&;](?:pass|passwd|password|pwd|token|access_token|api_key|apikey|key|secret|auth|sig|signature)=)"
    r"(?P<value>[^&#\s]+)",
    re.IGNORECASE,
)


def mask_url(text: str) -> str:
    """``text`` with the password of every URL in it (and secret query values) replaced by ``***``.

    ``rtsp://user:pass@cam/stream`` → ``rtsp://user:***@cam/stream``; a URL inside a longer
    message (an ffmpeg error line, a retry reason) is masked in place; text without a URL
    comes back unchanged.
    """
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)
    return _SECRET_PARAM.sub(lambda m: f"{m['head']}{MASK}", text)

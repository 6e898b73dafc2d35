"""Names → identifiers for topics, Home Assistant ids and file names, without collisions.

Stream and target names are free text ("Smoke detector, smoke alarm", "a/b", "🔥", "厨房"),
but an MQTT topic level, a Home Assistant object id (``[a-zA-Z0-9_-]``) and a file name
each allow less. A plain slug loses information, so different names could share an id:
``a/b`` and ``a b`` would publish to the same topic, and clips would overwrite each other.

:func:`ident` is injective by construction:

- a name that already is a plain id (lower-case letters and digits, runs joined by single
  ``_`` or ``-``, at most :data:`MAX_SLUG_CHARS` long, and not ending like a hash suffix)
  is its own id — ``kitchen``, ``front-door``, ``smoke_alarm``;
- any other name becomes a readable slug plus ``_`` and :data:`HASH_HEX_CHARS` hex digits
  of a hash of the whole original name — ``Smoke alarm`` → ``smoke_alarm_5c1b2e0a``.

The two kinds never meet (a plain id never ends in ``_`` + 8 hex digits; a hashed one
always does), and within the hashed kind two names share an id only if their 32-bit
hashes collide as well as their slugs. No id ever contains ``__``, which makes ``__`` a
safe joiner for compound ids (see :func:`join`).
"""

from __future__ import annotations

import hashlib
import re
import socket

MAX_SLUG_CHARS = 40  # readable part of an id; longer names are cut and hashed
HASH_HEX_CHARS = 8  # 32 bits of blake2b over the original name
JOINER = "__"  # never inside an id: joins ids into a compound id without ambiguity

_PLAIN = re.compile(r"[a-z0-9]+(?:[_-][a-z0-9]+)*")
_HASHED_TAIL = re.compile(r"_[0-9a-f]{%d}$" % HASH_HEX_CHARS)
_UNSAFE = re.compile(r"[^a-z0-9-]+")


def _digest(name: str) -> str:
    data = name.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=HASH_HEX_CHARS // 2).hexdigest()


def is_plain(name: str) -> bool:
    """True when ``name`` is used as its own id."""
    return (len(name) <= MAX_SLUG_CHARS and _PLAIN.fullmatch(name) is not None
            and _HASHED_TAIL.search(name) is None)


def ident(name: str) -> str:
    """A topic-, Home Assistant- and file-name-safe id of ``name``; distinct names → distinct ids."""
    if is_plain(name):
        return name
    slug = _UNSAFE.sub("_", name.casefold())
    slug = re.sub(r"[_-]{2,}", "_", slug).strip("_-")[:MAX_SLUG_CHARS].strip("_-") or "x"
    return f"{slug}_{_digest(name)}"


def join(*ids: str) -> str:
    """Ids joined into one, unambiguously (no id contains the joiner)."""
    return JOINER.join(ids)


def host_instance() -> str:
    """The default instance id: this host's name as an id (stable across restarts)."""
    return ident(socket.gethostname() or "localhost")


def machine_id() -> str:
    """A stable id of this machine (``/etc/machine-id``), to tell two hosts of one name apart."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path, encoding="ascii") as f:
                value = f.read().strip()
            if value:
                return value
        except OSError:
            continue
    import uuid

    return f"{uuid.getnode():012x}"

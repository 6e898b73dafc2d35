"""The durable event journal: every ON/OFF is written to SQLite before it counts as raised.

Why: an event waiting for the broker used to live only in memory, so a SIGKILL, a crash or
a power cut during an outage lost it silently. Now :class:`JournalSink` appends each event
to an SQLite database (WAL mode, ``synchronous=FULL``: a committed row survives a power
cut) and the MQTT sender delivers from it in order, marking a row delivered only once the
broker has acknowledged it. The next start delivers whatever was still pending.

What the journal keeps is bounded, by count (``max_events``) and by age (``max_age_s``);
what a bound sheds is counted and logged, never silently lost. Four counters live in the
same database, updated in the same transactions as the rows, so that across restarts::

    raised == delivered + shed + pending

Every event keeps the id the smoother gave it (ON and OFF share the detection's id), and
the message identity is ``(id, state)``: a consumer drops a duplicate that was redelivered
because the process died between the broker's acknowledgement and our mark.

A database that cannot be read (corrupt, not SQLite) is moved aside with one log line and
a fresh one started; the move is counted (``corrupt_files``) in the fresh one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from streamer.errors import StreamerError
from streamer.events import Event

log = logging.getLogger(__name__)

JOURNAL_FILE = "journal.db"
DEFAULT_MAX_EVENTS = 100_000
DEFAULT_MAX_AGE_S = 7 * 86_400.0
SHED_LOG_INTERVAL_S = 10.0
WAL_CHECKPOINT_PAGES = 64  # ~256 KB of write-ahead log between checkpoints (an event is ~0.5 KB)
WAL_PAGE_BYTES = 4096  # SQLite's default page size
UNWRITTEN_BACKLOG_EVENTS = 10_000  # events kept in memory while the journal cannot be written (~5 MB)
BUSY_TIMEOUT_S = 5.0  # a second process on the same file (check tools) waits this long for the lock
MEMORY = ":memory:"
COUNTERS = ("raised", "delivered", "shed", "corrupt_files", "runs")

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, so order survives deletions and restarts
    id TEXT NOT NULL,
    state TEXT NOT NULL,
    stream TEXT NOT NULL,
    target TEXT NOT NULL,
    payload TEXT NOT NULL,                  -- the event's JSON, exactly as it is published
    created REAL NOT NULL                   -- wall clock (s since the epoch) when appended
);
CREATE INDEX IF NOT EXISTS events_created ON events (created);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class JournalSettings:
    """The ``journal`` section: where the file lives and how much it may hold."""

    path: Path = Path("state") / JOURNAL_FILE
    max_events: int = DEFAULT_MAX_EVENTS
    max_age_s: float = DEFAULT_MAX_AGE_S


@dataclass(frozen=True)
class JournalRow:
    """One pending event: its journal sequence number and what is published."""

    seq: int
    id: str
    state: str
    stream: str
    target: str
    payload: str
    created: float


@dataclass(frozen=True)
class JournalCounts:
    """Totals across restarts: ``raised == delivered + shed + pending``."""

    raised: int
    delivered: int
    shed: int
    pending: int
    corrupt_files: int = 0


class JournalError(StreamerError):
    """The journal file cannot be opened at all (not even a fresh one): a one-line error at start."""


def _rollback(db: sqlite3.Connection) -> None:
    """Undo the open transaction, if there is one: a failed COMMIT (a full disk) may have ended it,
    and a ROLLBACK's own error must not hide the one that matters."""
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


class EventJournal:
    """Append-only event log with delivery marks, bounded by count and age.

    Thread-safe: one connection, one lock. Appends come from the journal sink's thread,
    reads and marks from the MQTT sender's.
    """

    def __init__(self, path: Path | str, max_events: int = DEFAULT_MAX_EVENTS,
                 max_age_s: float = DEFAULT_MAX_AGE_S, clock: Callable[[], float] = time.time) -> None:
        self.path = path if path == MEMORY else Path(path)
        self.max_events = max_events
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_shed_log = -1e9
        self._shed_since_log = 0
        self._db = self._open()
        self._db.execute("UPDATE counters SET value = value + 1 WHERE name = 'runs'")
        # this process's run number (1, 2, …) in this journal: event ids restart with the
        # audio timeline, so a run number in them keeps them unique across restarts
        self.run = int(self._db.execute("SELECT value FROM counters WHERE name = 'runs'").fetchone()[0])

    # -- opening -------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None)
        try:
            if self.path != MEMORY:
                mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    log.warning("journal %s: WAL mode unavailable (%s); using it anyway", self.path, mode)
            db.execute("PRAGMA synchronous=FULL")  # an appended event survives a power cut
            # the write-ahead log folded back every WAL_CHECKPOINT_PAGES and kept at most that size: at
            # SQLite's 1000 pages it held ~4 MB, which on a small disk was the space every later write needed
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
            db.execute(f"PRAGMA journal_size_limit={WAL_CHECKPOINT_PAGES * WAL_PAGE_BYTES}")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check}")
            db.executescript(SCHEMA)
            db.executemany("INSERT OR IGNORE INTO counters (name, value) VALUES (?, 0)", [(n,) for n in COUNTERS])
        except BaseException:
            db.close()
            raise
        return db

    def _open(self) -> sqlite3.Connection:
        if self.path != MEMORY:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise JournalError(f"cannot create the journal directory {self.path.parent} ({exc.strerror})") from None
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            if self.path == MEMORY or isinstance(exc, sqlite3.OperationalError):  # locked, unreadable: not corrupt
                raise JournalError(f"cannot open the journal {self.path} ({exc})") from None
            moved = self._move_aside(exc)
        try:
            db = self._connect()
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"cannot open a fresh journal {self.path} ({exc})") from None
        db.execute("UPDATE counters SET value = value + 1 WHERE name = 'corrupt_files'")
        log.error("journal %s could not be read; moved aside to %s and started afresh (its pending events are in that file)",
                  self.path, moved)
        return db

    def _move_aside(self, exc: Exception) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self._clock()))
        moved = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{os.getpid()}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(str(self.path) + suffix)
            if source.exists():
                try:
                    os.replace(source, Path(str(moved) + suffix))
                except OSError as move_exc:
                    raise JournalError(f"journal {self.path} is unreadable ({exc}) and cannot be moved aside "
                                       f"({move_exc.strerror})") from None
        return moved

    # -- writing -------------------------------------------------------------------------
    def append(self, event: Event) -> int:
        """Write ``event`` durably; return its sequence number. Sheds the oldest rows past the bounds."""
        payload = json.dumps(event.as_dict())
        with self._lock:
            now = self._clock()
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                seq = db.execute(
                    "INSERT INTO events (id, state, stream, target, payload, created) VALUES (?, ?, ?, ?, ?, ?)",
                    (event.id, event.state, event.stream, event.target, payload, now)).lastrowid
                db.execute("UPDATE counters SET value = value + 1 WHERE name = 'raised'")
                shed = self._enforce_bounds(now)
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
        if shed:
            self._log_shed(shed)
        return int(seq)

    def _enforce_bounds(self, now: float) -> int:
        """Delete rows past ``max_age_s`` and past ``max_events`` (oldest first); inside a transaction."""
        db = self._db
        shed = db.execute("DELETE FROM events WHERE created < ?", (now - self.max_age_s,)).rowcount
        over = db.execute("SELECT COUNT(*) FROM events").fetchone()[0] - self.max_events
        if over > 0:
            shed += db.execute("DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT ?)", (over,)).rowcount
        if shed:
            db.execute("UPDATE counters SET value = value + ? WHERE name = 'shed'", (shed,))
        return shed

    def expire(self) -> int:
        """Apply the age bound now (the sender calls it while idle); returns the rows shed."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                shed = self._enforce_bounds(self._clock())
                self._db.execute("COMMIT")
            except BaseException:
                _rollback(self._db)
                raise
        if shed:
            self._log_shed(shed)
        return shed

    def _log_shed(self, count: int) -> None:
        self._shed_since_log += count
        now = time.monotonic()
        if now - self._last_shed_log >= SHED_LOG_INTERVAL_S:
            log.warning("journal: %d undelivered event(s) shed (bounds: %d events, %.0f s); %d shed in all",
                        self._shed_since_log, self.max_events, self.max_age_s, self.counts().shed)
            self._last_shed_log, self._shed_since_log = now, 0

    def mark_delivered(self, seqs: int | Iterable[int]) -> int:
        """The broker acknowledged these rows: remove them, count them; returns how many were pending."""
        seqs = [seqs] if isinstance(seqs, int) else list(seqs)
        if not seqs:
            return 0
        return self._remove(seqs, "delivered")

    def mark_shed(self, seqs: int | Iterable[int], reason: str) -> int:
        """Give up on these rows (e.g. a topic the broker can never accept): counted as shed."""
        seqs = [seqs] if isinstance(seqs, int) else list(seqs)
        removed = self._remove(seqs, "shed") if seqs else 0
        if removed:
            log.warning("journal: %d event(s) shed: %s", removed, reason)
        return removed

    def _remove(self, seqs: list[int], counter: str) -> int:
        with self._lock:
            db = self._db
            # A delivery mark is not fsynced: lost to a power cut, it only means a duplicate
            # (recognisable by id) on the next start; the next append's fsync makes it durable.
            db.execute(f"PRAGMA synchronous={'NORMAL' if counter == 'delivered' else 'FULL'}")
            db.execute("BEGIN IMMEDIATE")
            try:
                removed = 0
                for start in range(0, len(seqs), 500):  # SQLite's bound-parameter limit
                    chunk = seqs[start:start + 500]
                    removed += db.execute(f"DELETE FROM events WHERE seq IN ({','.join('?' * len(chunk))})", chunk).rowcount
                db.execute("UPDATE counters SET value = value + ? WHERE name = ?", (removed, counter))
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
            finally:
                db.execute("PRAGMA synchronous=FULL")
        return removed

    # -- reading -------------------------------------------------------------------------
    def pending(self, after: int = 0, limit: int = 1000) -> list[JournalRow]:
        """Pending rows with ``seq > after``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, id, state, stream, target, payload, created FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit)).fetchall()
        return [JournalRow(*row) for row in rows]

    def pending_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def counts(self) -> JournalCounts:
        with self._lock:
            values = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
            pending = self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        return JournalCounts(raised=values["raised"], delivered=values["delivered"], shed=values["shed"],
                             pending=int(pending), corrupt_files=values["corrupt_files"])

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error as exc:
                log.warning("journal %s: closing failed: %s", self.path, exc)


class JournalSink:
    """The journal as a :class:`~streamer.sinks.base.Sink`: append each event, then tell the
    listeners (the MQTT sender) that there is something to deliver.

    The event is durable before any listener hears of it, so "raised" means "journaled".
    """

    name = "journal"
    accepts: tuple[type, ...] = (Event,)

    def __init__(self, journal: EventJournal, listeners: Iterable[Callable[[Event, int], None]] = (),
                 backlog_events: int = UNWRITTEN_BACKLOG_EVENTS) -> None:
        self.journal = journal
        self.listeners = list(listeners)
        self.appended = 0
        self.failed = 0  # events lost: the journal could not be written and the backlog below was full
        self.write_errors = 0  # writes that failed (disk full, I/O error); their events wait in the backlog
        self._backlog: deque[Event] = deque()  # not yet written, in order: written (and sent) once the journal can be
        self._backlog_events = backlog_events
        self._failing = False

    def handle(self, item: Event) -> None:
        self._backlog.append(item)
        self._flush()
        while len(self._backlog) > self._backlog_events:  # still failing: the oldest make room, counted as lost
            self._backlog.popleft()
            self.failed += 1

    def _flush(self) -> None:
        """Write what waits, oldest first; stop at the first failure (the order is kept)."""
        while self._backlog:
            event = self._backlog[0]
            try:
                seq = self.journal.append(event)
            except sqlite3.Error as exc:
                self.write_errors += 1
                if not self._failing:
                    self._failing = True
                    log.error("journal %s: cannot write events (%s); up to %d wait in memory and are written when it "
                              "can be (lost if the daemon stops first)", self.journal.path, exc, self._backlog_events)
                return
            self._backlog.popleft()
            if self._failing:
                self._failing = False
                log.warning("journal %s: writing again%s", self.journal.path,
                            f"; {self.failed} event(s) lost in all while it could not (the backlog was full)" if self.failed else "")
            self.appended += 1
            for listener in self.listeners:
                listener(event, seq)

    @property
    def unwritten(self) -> int:
        """Events waiting in memory for the journal to be writable."""
        return len(self._backlog)

    def close(self) -> None:
        """The journal outlives the sink: the MQTT sender still drains it; whoever built it closes it.
        What still waits in memory gets one last try."""
        self._flush()
        if self._backlog:
            log.error("journal %s: %d event(s) could not be written before the stop and are lost", self.journal.path,
                      len(self._backlog))
            self.failed += len(self._backlog)
            self._backlog.clear()

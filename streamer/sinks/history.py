"""The event history behind the web page: one SQLite row per detection, kept across restarts.

An ON inserts a row (stream, target, start, peak so far); its OFF completes the same row
(end, peak, mean, clip). Rows are filtered by stream, target and time for the page's
history table, and the table is bounded twice — by age (``web.history_days``) and by a
row count — so a box that hears a lot for years keeps a flat file.

Detection ids (``stream:target:start_sample``) repeat when a file source is replayed after
a restart, so the row key is SQLite's own rowid: an OFF completes the newest open row of
its id. A row left open by a daemon that died (SIGKILL, power cut) is marked
``interrupted`` when the store is opened again, so the page never shows an event as
"still going" from a previous run.

Writes happen on the history sink's own thread (the hub's), reads on the web server's;
one connection in WAL mode behind a lock serves both — every statement is a few rows.
A failing disk is counted and logged at most once per interval, never raised into the
pipeline.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamer.events import Event

log = logging.getLogger(__name__)

DEFAULT_MAX_ROWS = 100_000  # events kept, newest first; older ones are pruned
DEFAULT_MAX_AGE_S = 30 * 86400.0
PRUNE_EVERY_INSERTS = 200  # prune cost amortised over this many new rows
QUERY_LIMIT_MAX = 1000  # rows one history query may return
ERROR_LOG_INTERVAL_S = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    rowid INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    stream TEXT NOT NULL,
    target TEXT NOT NULL,
    labels TEXT NOT NULL,
    start_sample INTEGER NOT NULL,
    end_sample INTEGER,
    start_time REAL,
    end_time REAL,
    t REAL NOT NULL,            -- wall time of the start (the stream's clock, else when recorded)
    peak REAL NOT NULL,
    mean REAL,
    closed_by TEXT,
    clip TEXT                   -- file name inside the clips folder, or NULL
);
CREATE INDEX IF NOT EXISTS events_t ON events (t);
CREATE INDEX IF NOT EXISTS events_id ON events (id, end_sample);
CREATE INDEX IF NOT EXISTS events_stream_target ON events (stream, target, t);
"""

COLUMNS = ("rowid", "id", "stream", "target", "labels", "start_sample", "end_sample", "start_time", "end_time",
           "t", "peak", "mean", "closed_by", "clip")


@dataclass
class HistoryStats:
    inserted: int = 0
    completed: int = 0
    pruned: int = 0
    errors: int = 0


class HistoryStore:
    """The SQLite file: ``record`` events, ``query`` them, bounded by ``max_rows`` and ``max_age_s``."""

    def __init__(self, path: Path | str, max_rows: int = DEFAULT_MAX_ROWS, max_age_s: float = DEFAULT_MAX_AGE_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self.stats = HistoryStats()
        self._clock = clock
        self._lock = threading.Lock()
        self._since_prune = 0
        self._last_error_log = -1e9
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            interrupted = self._db.execute(
                "UPDATE events SET closed_by = 'interrupted' WHERE end_sample IS NULL").rowcount
        except sqlite3.Error as exc:
            from streamer.errors import StreamerError

            raise StreamerError(f"web: cannot open the event history {self.path} ({exc}); change web.history") from None
        if interrupted:
            log.info("history: %d event(s) left open by the previous run marked interrupted", interrupted)
        self.prune()

    # -- writing (the history sink's thread) -------------------------------------------------
    def record(self, event: Event) -> bool:
        """ON: a new row; OFF: complete the newest open row of its id (or a whole row if none)."""
        clip = Path(event.clip).name if event.clip else None
        try:
            with self._lock:
                if event.state == "ON":
                    self._insert(event, None)
                    self.stats.inserted += 1
                else:
                    row = self._db.execute(
                        "SELECT rowid FROM events WHERE id = ? AND end_sample IS NULL ORDER BY rowid DESC LIMIT 1",
                        (event.id,)).fetchone()
                    if row is None:  # its ON came before this store existed (or was lost): keep the OFF whole
                        self._insert(event, clip)
                        self.stats.inserted += 1
                    else:
                        self._db.execute(
                            "UPDATE events SET end_sample = ?, end_time = ?, peak = max(peak, ?), mean = ?, "
                            "closed_by = ?, clip = ? WHERE rowid = ?",
                            (event.end_sample, event.end_time, event.peak, event.mean, event.closed_by, clip, row[0]))
                    self.stats.completed += 1
                self._since_prune += 1
            if self._since_prune >= PRUNE_EVERY_INSERTS:
                self.prune()
            return True
        except sqlite3.Error as exc:
            self._error(f"cannot write {event.id} ({exc})")
            return False

    def _insert(self, event: Event, clip: str | None) -> None:
        t = event.start_time if event.start_time is not None else self._clock()
        self._db.execute(
            "INSERT INTO events (id, stream, target, labels, start_sample, end_sample, start_time, end_time, t, "
            "peak, mean, closed_by, clip) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (event.id, event.stream, event.target, json.dumps(list(event.labels)), event.start_sample,
             event.end_sample, event.start_time, event.end_time, t, event.peak,
             event.mean if event.state == "OFF" else None, event.closed_by, clip))

    def prune(self) -> int:
        """Drop rows older than ``max_age_s`` and all but the newest ``max_rows``; how many went."""
        try:
            with self._lock:
                self._since_prune = 0
                gone = self._db.execute("DELETE FROM events WHERE t < ?", (self._clock() - self.max_age_s,)).rowcount
                gone += self._db.execute(
                    "DELETE FROM events WHERE rowid <= (SELECT rowid FROM events ORDER BY rowid DESC LIMIT 1 OFFSET ?)",
                    (self.max_rows,)).rowcount
        except sqlite3.Error as exc:
            self._error(f"cannot prune ({exc})")
            return 0
        self.stats.pruned += gone
        return gone

    # -- reading (the web server's thread) -----------------------------------------------------
    def query(self, stream: str | None = None, target: str | None = None, since: float | None = None,
              until: float | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """Events newest first, filtered; at most ``limit`` (capped at QUERY_LIMIT_MAX)."""
        where, args = [], []
        for column, value in (("stream", stream), ("target", target)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("t >= ?")
            args.append(since)
        if until is not None:
            where.append("t <= ?")
            args.append(until)
        sql = f"SELECT {', '.join(COLUMNS)} FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY t DESC, rowid DESC LIMIT ?"
        args.append(max(1, min(int(limit), QUERY_LIMIT_MAX)))
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        out = []
        for row in rows:
            item = dict(zip(COLUMNS, row))
            item["labels"] = json.loads(item["labels"])
            out.append(item)
        return out

    def facets(self) -> dict[str, list[str]]:
        """The streams and targets that have events: the page's filter choices."""
        with self._lock:
            streams = [r[0] for r in self._db.execute("SELECT DISTINCT stream FROM events ORDER BY stream")]
            targets = [r[0] for r in self._db.execute("SELECT DISTINCT target FROM events ORDER BY target")]
        return {"streams": streams, "targets": targets}

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM events").fetchone()[0]

    def _error(self, message: str) -> None:
        self.stats.errors += 1
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL_S:
            self._last_error_log = now
            log.error("history: %s (%d error(s) so far)", message, self.stats.errors)

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error:
                pass


class HistorySink:
    """The store as a hub sink: events in, and ``on_change`` called after each write (the page refreshes)."""

    name = "history"
    accepts = (Event,)

    def __init__(self, store: HistoryStore, on_change: Callable[[], None] | None = None) -> None:
        self.store = store
        self.on_change = on_change

    def handle(self, item: Event) -> None:
        if self.store.record(item) and self.on_change is not None:
            self.on_change()

    def close(self) -> None:
        self.store.close()

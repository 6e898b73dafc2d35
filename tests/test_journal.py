"""The durable event journal (SQLite): order, marks, bounds, accounting across restarts, corruption."""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys

import pytest

from conftest import REPO
from streamer.events import Event
from streamer.sinks.base import Sink
from streamer.sinks.journal import EventJournal, JournalError, JournalSink


def event(n: int, state: str = "ON") -> Event:
    return Event(id=f"kitchen:dog:{n}", stream="Kitchen", target="Dog", state=state, labels=("Dog",), start_sample=n * 16000,
                 end_sample=None if state == "ON" else n * 16000 + 8000, start_time=None, end_time=None, peak=0.9, mean=0.8)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def balanced(j: EventJournal) -> bool:
    c = j.counts()
    return c.raised == c.delivered + c.shed + c.pending


def test_append_pending_in_order_and_mark(tmp_path):
    j = EventJournal(tmp_path / "j.db")
    seqs = [j.append(event(n, s)) for n in range(5) for s in ("ON", "OFF")]
    assert seqs == sorted(seqs) and len(set(seqs)) == 10
    rows = j.pending()
    assert [r.seq for r in rows] == seqs
    assert [(r.id, r.state) for r in rows] == [(f"kitchen:dog:{n}", s) for n in range(5) for s in ("ON", "OFF")]
    assert json.loads(rows[1].payload)["state"] == "OFF" and json.loads(rows[1].payload)["id"] == "kitchen:dog:0"
    assert (rows[0].stream, rows[0].target) == ("Kitchen", "Dog")
    assert [r.seq for r in j.pending(after=seqs[3], limit=2)] == seqs[4:6]
    assert j.mark_delivered([seqs[0], seqs[2]]) == 2
    assert j.mark_delivered(seqs[0]) == 0  # a second ack of the same row counts nothing
    assert [r.seq for r in j.pending()] == [s for s in seqs if s not in (seqs[0], seqs[2])]
    c = j.counts()
    assert (c.raised, c.delivered, c.shed, c.pending) == (10, 2, 0, 8) and balanced(j)
    j.close()


def test_wal_mode_on_disk(tmp_path):
    j = EventJournal(tmp_path / "j.db")
    j.append(event(1))
    assert (tmp_path / "j.db-wal").exists()
    j.close()
    with sqlite3.connect(tmp_path / "j.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_count_bound_sheds_oldest_counted_and_logged(tmp_path, caplog):
    j = EventJournal(tmp_path / "j.db", max_events=5)
    with caplog.at_level(logging.WARNING, logger="streamer.sinks.journal"):
        for n in range(12):
            j.append(event(n))
    assert [r.id for r in j.pending()] == [f"kitchen:dog:{n}" for n in range(7, 12)]  # the newest kept
    c = j.counts()
    assert (c.raised, c.shed, c.pending) == (12, 7, 5) and balanced(j)
    assert "shed" in caplog.text


def test_age_bound_sheds_old_rows(tmp_path):
    clock = Clock()
    j = EventJournal(tmp_path / "j.db", max_age_s=60, clock=clock)
    for n in range(3):
        j.append(event(n))
    clock.now += 30
    j.append(event(3))
    clock.now += 40  # the first three are 70 s old now, the fourth 40 s
    assert j.expire() == 3
    assert [r.id for r in j.pending()] == ["kitchen:dog:3"]
    assert j.counts().shed == 3 and balanced(j)


def test_counters_survive_restart(tmp_path):
    path = tmp_path / "state" / "journal.db"  # the directory is made
    j = EventJournal(path, max_events=4)
    seqs = [j.append(event(n)) for n in range(6)]  # 2 shed
    j.mark_delivered(seqs[2])
    j.close()
    again = EventJournal(path, max_events=4)
    assert (j.run, again.run) == (1, 2)  # a run number for ids that stay unique across restarts
    c = again.counts()
    assert (c.raised, c.delivered, c.shed, c.pending) == (6, 1, 2, 3) and balanced(again)
    new = again.append(event(6))
    assert new > seqs[-1]  # sequence numbers never go back, so order holds across restarts
    assert [r.seq for r in again.pending()] == [seqs[3], seqs[4], seqs[5], new]


def test_appended_row_survives_sigkill(tmp_path):
    """Append returns only once the row is committed: a SIGKILL right after loses nothing."""
    path = tmp_path / "j.db"
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
from streamer.sinks.journal import EventJournal
from streamer.events import Event
j = EventJournal({str(path)!r})
for n in range(50):
    j.append(Event(id=f"a:{{n}}", stream="a", target="t", state="ON", labels=(), start_sample=n, end_sample=None,
                   start_time=None, end_time=None, peak=1.0, mean=1.0))
os.kill(os.getpid(), signal.SIGKILL)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == -9, result.stderr
    j = EventJournal(path)
    assert [r.id for r in j.pending(limit=100)] == [f"a:{n}" for n in range(50)]
    assert j.counts().raised == 50


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file_is_moved_aside_with_one_line_and_counted(tmp_path, caplog, damage):
    path = tmp_path / "j.db"
    if damage == "garbage":
        path.write_bytes(b"this is not an SQLite database\n" * 200)
    else:
        j = EventJournal(path)
        for n in range(200):
            j.append(event(n))
        j.close()
        data = path.read_bytes()
        path.write_bytes(data[:100] + b"\xff" * 4000 + data[4100:])  # the header's tail and the first pages
    with caplog.at_level(logging.ERROR, logger="streamer.sinks.journal"):
        j = EventJournal(path)
    lines = [r for r in caplog.records if r.name == "streamer.sinks.journal" and r.levelno >= logging.ERROR]
    assert len(lines) == 1 and "moved aside" in lines[0].getMessage() and "\n" not in lines[0].getMessage()
    assert list(tmp_path.glob("j.db.corrupt-*"))  # kept for a human, not deleted
    c = j.counts()
    assert c.corrupt_files == 1 and (c.raised, c.pending) == (0, 0)
    j.append(event(1))
    assert j.counts().pending == 1


def test_unopenable_path_is_a_journal_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(JournalError, match="cannot create the journal directory"):
        EventJournal(blocker / "sub" / "j.db")


def test_journal_sink_is_a_sink_that_appends_before_telling_listeners(tmp_path):
    j = EventJournal(tmp_path / "j.db")
    heard = []
    sink = JournalSink(j, [lambda e, seq: heard.append((e.id, seq, j.counts().pending))])
    assert isinstance(sink, Sink) and Event in sink.accepts
    sink.handle(event(1))
    sink.handle(event(1, "OFF"))
    assert [h[0] for h in heard] == ["kitchen:dog:1", "kitchen:dog:1"]
    assert [h[2] for h in heard] == [1, 2]  # each was in the journal before the listener heard of it
    assert [r.seq for r in j.pending()] == [h[1] for h in heard]


def test_memory_journal_for_tests_and_standalone_use():
    j = EventJournal(":memory:", max_events=3)
    for n in range(5):
        j.append(event(n))
    assert j.counts().pending == 3 and j.counts().shed == 2 and balanced(j)

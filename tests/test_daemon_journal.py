"""The daemon and its event journal: SIGKILL mid-outage loses nothing (issue 14).

The daemon raises events while the broker is down; it is SIGKILLed with them pending;
a new daemon starts, the broker comes back, and every one of them arrives: in order,
each once by (id, state) — a repeat could only be one of the in-flight window.
"""

from __future__ import annotations

import pytest

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from conftest import REPO, write_wav
from mqtt_helpers import Broker, Subscriber, daemon_topics, wait_for
from streamer.sinks.journal import EventJournal
from streamer.sinks.mqtt import INFLIGHT_WINDOW

LABELS = 527  # every label a target: the first window raises 527 ONs


def pending_rows(path: Path) -> list[tuple[str, str]]:
    """(id, state) of the pending rows, read-only (the daemon may be writing)."""
    if not path.exists():
        return []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
        try:
            return db.execute("SELECT id, state FROM events ORDER BY seq").fetchall()
        except sqlite3.OperationalError:  # not created yet
            return []


def config(tmp_path: Path, model: Path, audio: Path, port: int, on_threshold: float) -> Path:
    raw = {
        "model": {"path": str(model), "max_batch": 4},
        "hop": 0.5,
        "sources": [{"name": "yard", "type": "file", "path": str(audio), "realtime": True, "loop": True}],
        "detect": {"include": ["*"], "defaults": {"on_threshold": on_threshold, "off_threshold": 0.0, "hold": 0, "smoothing": "none"}},
        "mqtt": {"host": "127.0.0.1", "port": port, "homeassistant": False},
        "console": {"mode": "off"},
        "state_dir": str(tmp_path / "state"),
    }
    path = tmp_path / f"c{time.monotonic_ns()}.yaml"
    path.write_text(json.dumps(raw))
    return path


def daemon(path: Path) -> subprocess.Popen:
    err = open(path.with_suffix(".err"), "w")
    return subprocess.Popen([sys.executable, "-m", "streamer", "run", "--config", str(path)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=err, env={**os.environ})


@pytest.mark.slow  # over 8 s on 2 cores: CI runs it, the fast lane does not
def test_sigkill_mid_outage_then_restart_delivers_all_pending_in_order_each_once(tmp_path, tiny_checkpoint):
    model, _ = tiny_checkpoint(max_length=128, num_labels=LABELS, seed=4)
    audio = write_wav(tmp_path / "noise.wav", np.random.default_rng(0).uniform(-0.3, 0.3, 16000 * 3).astype(np.float32))
    journal_path = tmp_path / "state" / "journal.db"
    # the recorder's session may queue more than mosquitto's default 1000 while it reconnects
    broker = Broker(tmp_path, persistence=True, extra=["max_queued_messages 0"])
    recorder = Subscriber(broker.port, [f"{daemon_topics().base}/+/events"], client_id="recorder", persistent=True)
    broker.stop()  # the outage

    first = daemon(config(tmp_path, model, audio, broker.port, on_threshold=0.0))
    try:
        # 527 ONs at the first window; a reload closes them (527 OFFs) and they fire again (527 ONs)
        assert wait_for(lambda: len(pending_rows(journal_path)) >= LABELS, 120), first.args
        path = Path(first.args[-1])  # a detect section that changed (a weight smoothing "none" never reads): a reload
        raw = json.loads(path.read_text())
        raw["detect"]["defaults"]["ema_alpha"] = 0.4
        path.write_text(json.dumps(raw))
        first.send_signal(signal.SIGHUP)
        assert wait_for(lambda: len(pending_rows(journal_path)) >= 3 * LABELS, 60)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.kill()
    owed = pending_rows(journal_path)
    assert len(owed) >= 1000 and len(set(owed)) == len(owed)
    assert [s for _, s in owed[:LABELS]] == ["ON"] * LABELS and "OFF" in {s for _, s in owed}

    recorder.connected.clear()
    broker.start()
    assert recorder.connected.wait(15)  # back on its session before the backlog comes
    second = daemon(config(tmp_path, model, audio, broker.port, on_threshold=1.0))  # raises nothing new
    try:
        assert wait_for(lambda: not pending_rows(journal_path), 120), len(pending_rows(journal_path))
        assert wait_for(lambda: len(recorder.on_prefix(f"{daemon_topics().base}/")) >= len(owed), 30)
        second.send_signal(signal.SIGTERM)
        second.wait(30)
    finally:
        second.kill()
        recorder.close()
        broker.stop()
    got = [json.loads(m.payload) for m in recorder.on_prefix(f"{daemon_topics().base}/")]
    firsts, seen = [], set()
    for g in got:
        key = (g["id"], g["state"])
        if key not in seen:
            seen.add(key)
            firsts.append(key)
    assert firsts == owed  # every one, in the order raised
    # delivered by the second daemon, they still carry the run that raised them (the first)
    assert {g["run"] for g in got} == {1}
    assert len(got) - len(firsts) <= INFLIGHT_WINDOW  # repeats only from the unacknowledged window
    c = EventJournal(journal_path).counts()
    assert c.pending == 0 and c.raised == c.delivered + c.shed and c.delivered >= len(owed)
    err = Path(str(second.args[-1])).with_suffix(".err").read_text()
    assert "Traceback" not in err
    assert "pending from earlier runs" in err and "journal: raised" in err


@pytest.mark.slow
def test_reload_from_a_fifo_or_dev_zero_never_blocks_the_main_loop(tmp_path, tiny_checkpoint):
    """SIGHUP after the config was replaced by a FIFO, then by a symlink to /dev/zero: each
    reload is refused at once with one line, and SIGTERM is still obeyed promptly."""
    model, _ = tiny_checkpoint(max_length=128, num_labels=LABELS, seed=4)
    audio = write_wav(tmp_path / "noise.wav", np.random.default_rng(0).uniform(-0.3, 0.3, 16000 * 3).astype(np.float32))
    path = config(tmp_path, model, audio, port=1, on_threshold=1.0)
    raw = json.loads(path.read_text())
    del raw["mqtt"]
    path.write_text(json.dumps(raw))
    err_path = path.with_suffix(".err")
    proc = subprocess.Popen([sys.executable, "-m", "streamer", "-v", "run", "--config", str(path)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=open(err_path, "w"))
    try:
        assert wait_for(lambda: "streamer ready" in err_path.read_text(), 120)
        path.unlink()
        os.mkfifo(path)
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "FIFO" in err_path.read_text(), 10)
        path.unlink()
        path.symlink_to("/dev/zero")
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "character device" in err_path.read_text(), 10)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        assert time.monotonic() - t0 < 15 and proc.returncode == 0
    finally:
        proc.kill()
    err = err_path.read_text()
    refusals = [line for line in err.splitlines() if "reload refused" in line]
    assert len(refusals) == 2 and "Traceback" not in err

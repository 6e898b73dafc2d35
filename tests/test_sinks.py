"""Sinks cannot stall detection: a stdout that nobody reads, or one that is closed, costs only
the console's own queue — scoring, MQTT and shutdown go on (the real daemon, real mosquitto)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from conftest import REPO, write_wav
from mqtt_helpers import Broker, Subscriber, daemon_topics, free_port, wait_for

LABELS = 527


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path)
    yield b
    b.stop()


def windows_scored(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return -1.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("streamer_windows_total{"))


def start(tmp_path, model, broker_port: int, metrics_port: int, stdout) -> subprocess.Popen:
    noise = (np.random.default_rng(0).standard_normal(16000 * 4) * 0.1).astype(np.float32)
    audio = write_wav(tmp_path / "noise.wav", noise)
    config = {
        "model": {"path": str(model), "max_batch": 4, "precision": "fp32"}, "hop": 0.25,
        "sources": [{"name": "room", "type": "file", "path": str(audio), "realtime": True, "loop": True}],
        # every label fires at once, and again after each reload-free cooldown: far more lines than a pipe holds
        "detect": {"defaults": {"on_threshold": 0.0, "off_threshold": 0.0, "hold": 0, "smoothing": "none"}},
        "console": {"mode": "json"}, "logging": {"level": "info"},
        "metrics": {"enabled": True, "port": metrics_port},
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "homeassistant": False},
        "state_dir": str(tmp_path / "state"),
    }
    path = tmp_path / "streamer.yaml"
    path.write_text(json.dumps(config))
    return subprocess.Popen([sys.executable, "-m", "streamer", "run", "--config", str(path)], cwd=REPO,
                            stdout=stdout, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("reader", ["never-read", "closed"])
def test_a_stdout_nobody_reads_or_a_closed_one_does_not_stop_detection(tmp_path, tiny_checkpoint, broker, reader):
    model, _ = tiny_checkpoint(max_length=128, num_labels=LABELS, seed=4)
    events_topic = daemon_topics().events("room")
    sub = Subscriber(broker.port, [events_topic])
    port = free_port()
    proc = start(tmp_path, model, broker.port, port, subprocess.PIPE)
    if reader == "closed":
        proc.stdout.close()  # the reader went away: every print now fails with a broken pipe
    try:
        # 527 ON lines of ~300 bytes at the first window: more than a 64 KiB pipe holds
        assert wait_for(lambda: len(sub.on(events_topic)) >= LABELS, 120), proc.stderr.read() if proc.poll() else ""
        first = windows_scored(port)
        assert wait_for(lambda: windows_scored(port) >= first + 8, 30)  # scoring goes on past the full pipe
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)  # the pipe stays unread to the end: the printer is still stuck at shutdown
        err = proc.stderr.read()
        assert time.monotonic() - t0 < 30  # shutdown never waits on the stuck printer beyond its budget
    finally:
        proc.kill()
        sub.close()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    account = [line for line in err.splitlines() if "events: raised" in line][-1]
    raised = int(account.split("raised ")[1].split(";")[0])
    delivered = int(account.split("delivered ")[1].split(",")[0])
    assert raised > LABELS and delivered == raised  # MQTT got every event, OFFs at shutdown included
    if reader == "closed":
        assert sum("no longer printed" in line for line in err.splitlines()) == 1  # said once, not per line
    else:
        assert "console" in err and "shed" in err  # what the stuck printer could not take is counted

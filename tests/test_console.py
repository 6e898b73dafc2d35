"""The console: the live view's content, and plain/JSON lines when not a terminal."""

from __future__ import annotations

import io
import json

import numpy as np
from rich.console import Console

from streamer.events import Event
from streamer.features.fbank import dbfs
from streamer.sinks.console import ConsoleView, LinePrinter

EVENT = Event(id="porch:dog:16000", stream="porch", target="Dog", state="ON", labels=("Dog", "Bark"), start_sample=16000,
              end_sample=None, start_time=None, end_time=None, peak=0.91, mean=0.91)


def test_live_view_shows_levels_labels_events_and_counters():
    console = Console(file=io.StringIO(), width=140, record=True, force_terminal=True)
    view = ConsoleView(["porch", "kitchen"], console=console)
    view.update_stream("porch", state="running", level_dbfs=-20.0, windows=42, skipped=3, overruns=160, active=["Dog"])
    view.update_scores("porch", ("Dog", "Bark", "Speech", "Music"), np.array([0.91, 0.7, 0.1, 0.05]))
    view.mqtt_state, view.mqtt_queue = "connected", 0
    view.event(EVENT)
    console.print(view.render())
    text = console.export_text()
    for expected in ("porch", "kitchen", "running", "-20 dBFS", "0.91 Dog", "0.70 Bark", "42", "160", "MQTT: connected, queue 0",
                     "porch: Dog ON at 1.00s"):
        assert expected in text, expected
    assert "Speech" in text and "Music" not in text  # the top three labels only


def test_line_printer_plain_and_json():
    out = io.StringIO()
    LinePrinter(stream=out).event(EVENT)
    assert out.getvalue().strip() == "porch: Dog ON at 1.00s peak 0.91 [Dog, Bark]"
    out = io.StringIO()
    LinePrinter(as_json=True, stream=out).event(EVENT)
    assert json.loads(out.getvalue())["id"] == "porch:dog:16000"


def test_dbfs():
    assert dbfs(np.zeros(100, dtype=np.float32)) == -90.0
    assert abs(dbfs(np.full(100, 0.5, dtype=np.float32)) - 20 * np.log10(0.5)) < 1e-6

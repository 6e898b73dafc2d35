"""What a person at a terminal sees: a live view, or plain lines when it is not a terminal.

In a terminal ``streamer run`` shows, per stream, a level meter, the top labels with
bars, the active events and the counters (windows, skipped, overruns, MQTT queue),
redrawn a few times a second with ``rich``. Elsewhere (journald, a pipe) each event is one
log line, or one JSON object with ``--json``.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from dataclasses import dataclass, field

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from streamer.events import Event
from streamer.sinks.base import Scores
from streamer.features.fbank import LEVEL_FLOOR_DBFS

log = logging.getLogger(__name__)

TOP_LABELS = 3
BAR_WIDTH = 20
REFRESH_PER_SECOND = 4


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    filled = max(0, min(width, round(fraction * width)))
    return "█" * filled + "·" * (width - filled)


@dataclass
class StreamView:
    """What the console knows of one stream."""

    name: str
    state: str = "starting"
    level_dbfs: float = LEVEL_FLOOR_DBFS
    top: list[tuple[str, float]] = field(default_factory=list)
    active: list[str] = field(default_factory=list)
    windows: int = 0
    skipped: int = 0
    gated: int = 0
    overruns: int = 0


class ConsoleView:
    """The live terminal view; ``update_*`` from any thread, rendered on rich's own timer.

    As a sink it takes events and scores on its own thread (the pipeline never waits for
    the terminal).
    """

    name = "console"
    accepts = (Event, Scores)

    def __init__(self, streams: list[str], console: Console | None = None, labels: tuple[str, ...] = ()) -> None:
        self.labels = labels
        self.console = console or Console()
        self.streams = {name: StreamView(name) for name in streams}
        self.mqtt_queue: int | None = None
        self.mqtt_state = "off"
        self.recent: list[str] = []
        self._lock = threading.Lock()
        self._live: Live | None = None

    def update_stream(self, name: str, **fields) -> None:
        with self._lock:
            view = self.streams[name]
            for key, value in fields.items():
                setattr(view, key, value)

    def update_scores(self, name: str, labels: tuple[str, ...], probs: np.ndarray) -> None:
        top = np.argsort(-probs)[:TOP_LABELS]
        self.update_stream(name, top=[(labels[i], float(probs[i])) for i in top])

    def event(self, event: Event) -> None:
        with self._lock:
            self.recent = (self.recent + [plain_line(event)])[-5:]

    def handle(self, item: Event | Scores) -> None:
        if isinstance(item, Event):
            self.event(item)
        else:
            if self.labels:
                self.update_scores(item.stream, self.labels, item.probabilities)
            self.update_stream(item.stream, active=list(item.active))

    def close(self) -> None:
        self.stop()

    def render(self) -> Group:
        with self._lock:
            table = Table(title="streamer", expand=True)
            for column in ("stream", "level", "heard", "events", "windows", "skipped", "gated", "overruns"):
                table.add_column(column)
            for view in self.streams.values():
                level = (view.level_dbfs - LEVEL_FLOOR_DBFS) / -LEVEL_FLOOR_DBFS
                heard = "\n".join(f"{bar(p, 10)} {p:.2f} {label}" for label, p in view.top) or "…"
                table.add_row(
                    f"{view.name}\n[dim]{view.state}[/dim]", f"{bar(level, 12)}\n{view.level_dbfs:.0f} dBFS", heard,
                    ", ".join(view.active) or "–", str(view.windows), str(view.skipped), str(view.gated), str(view.overruns),
                )
            footer = Text(f"MQTT: {self.mqtt_state}" + (f", queue {self.mqtt_queue}" if self.mqtt_queue is not None else ""))
            recent = Text("\n".join(self.recent), style="dim")
            return Group(table, footer, recent)

    def __rich__(self) -> Group:
        return self.render()

    def start(self) -> "ConsoleView":
        self._live = Live(self, console=self.console, refresh_per_second=REFRESH_PER_SECOND, transient=False)
        self._live.start()
        return self

    def stop(self) -> None:
        if self._live:
            self._live.stop()


def plain_line(event: Event) -> str:
    when = f"{event.start_s:.2f}s" if event.state == "ON" else f"{(event.end_sample or 0) / 16000:.2f}s"
    extra = f" peak {event.peak:.2f}" + (f" ({event.closed_by})" if event.closed_by and event.closed_by != "audio" else "")
    return f"{event.stream}: {event.target} {event.state} at {when}{extra} [{', '.join(event.labels)}]"


class LinePrinter:
    """Not a terminal: one line per event (plain text, or JSON with ``as_json``).

    A sink: it writes on its own thread, so a stdout that nobody reads blocks only this
    printer (its queue fills and sheds, counted by the hub). A closed stdout (the reader
    went away) ends the printing with one log line; every line not printed is counted.
    """

    name = "console"
    accepts = (Event,)

    def __init__(self, as_json: bool = False, stream=None) -> None:
        self.as_json = as_json
        self.out = stream or sys.stdout
        self.closed_reason: str | None = None
        self.unprinted = 0  # lines not printed because the output was closed
        self._lock = threading.Lock()

    def event(self, event: Event) -> None:
        if self.closed_reason is not None:
            self.unprinted += 1
            return
        line = json.dumps(event.as_dict()) if self.as_json else plain_line(event)
        try:
            with self._lock:
                print(line, file=self.out, flush=True)
        except (BrokenPipeError, OSError, ValueError) as exc:  # closed pipe, closed file, full disk
            self.closed_reason = getattr(exc, "strerror", None) or type(exc).__name__
            self.unprinted += 1
            log.warning("event lines are no longer printed: the output is closed (%s); detection and MQTT go on",
                        self.closed_reason)

    handle = event

    def close(self) -> None:
        if self.unprinted:
            log.info("console: %d event line(s) not printed (output closed)", self.unprinted)

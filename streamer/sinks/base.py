"""What sinks receive, the one interface they implement, and the fan-out that feeds them.

The scoring path never waits for a sink. It hands each item to :meth:`SinkHub.publish`,
which puts it on every interested sink's own bounded queue without blocking; each sink
drains its queue on one thread of its own. A stdout nobody reads, a slow disk or a dead
browser therefore costs at most that sink's queue: what a full queue sheds is counted per
sink (``SinkHub.shed``) and logged once per burst, never silently dropped. The number of
threads is the number of sinks — fixed, whatever the number of streams.

Durability is not the hub's job: events that must survive a crash go through the event
journal (a sink like the others, whose queue is large), and the MQTT sender delivers from
the journal, not from its hub queue.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol, Union, runtime_checkable

import numpy as np

from streamer.events import Event

log = logging.getLogger(__name__)

DEFAULT_QUEUE_ITEMS = 1024
SHED_LOG_INTERVAL_S = 10.0
CLOSE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Scores:
    """One scored window of one stream: raw probabilities and the targets' smoothed scores.

    ``probabilities`` is the model's output (L labels); ``target_scores`` the smoother's
    view of it (one per target, in ``targets`` order) with the thresholds each is held to.
    """

    stream: str
    start_sample: int
    end_sample: int
    wall_time: float | None
    probabilities: np.ndarray  # (L,) float32
    targets: tuple[str, ...]
    target_scores: np.ndarray  # (T,) smoothed
    on_thresholds: np.ndarray  # (T,)
    off_thresholds: np.ndarray  # (T,)
    active: tuple[str, ...] = ()
    gated: bool = False  # True: the window was quieter than min_level and not scored (scores are 0)


@dataclass(frozen=True)
class SourceStatus:
    """A source changed state (starting, running, retrying, ended, failed, stopped)."""

    stream: str
    state: str
    error: str | None = None


@dataclass(frozen=True)
class Level:
    """A stream's recent level, in dBFS."""

    stream: str
    dbfs: float
    wall_time: float


@dataclass(frozen=True)
class Spectrogram:
    """New mel frames of one stream, for a live view: (n, mel bins) log-mel, normalised as
    the model sees them (roughly -2 … 2), oldest first; ``end_frame`` is the frame index
    (10 ms each on the stream's timeline) just past the last one. Published only when a
    sink accepts it, and decimated in time for display."""

    stream: str
    frames: np.ndarray  # (n, mel bins) float16
    end_frame: int
    frame_step: int = 1  # frames of the stream per row (decimation)


SinkItem = Union[Event, Scores, SourceStatus, Level, Spectrogram]


@runtime_checkable
class Sink(Protocol):
    """A consumer of pipeline output. ``handle`` runs on the sink's own thread only."""

    name: str
    accepts: tuple[type, ...]  # which SinkItem types it wants; others never reach its queue

    def handle(self, item: SinkItem) -> None: ...

    def close(self) -> None: ...


_STOP = object()


@dataclass
class _Lane:
    sink: Sink
    queue: queue.Queue
    thread: threading.Thread | None = None
    shed: int = 0
    errors: int = 0
    handled: int = 0
    busy_since: float | None = None  # monotonic time the current handle() began; None when idle
    last_shed_log: float = field(default=-1e9)


class SinkHub:
    """Fan-out: one bounded queue and one thread per sink; ``publish`` never blocks."""

    def __init__(self) -> None:
        self._lanes: list[_Lane] = []
        self._started = False

    def add(self, sink: Sink, queue_items: int = DEFAULT_QUEUE_ITEMS) -> Sink:
        if self._started:
            raise RuntimeError("add sinks before start()")
        self._lanes.append(_Lane(sink, queue.Queue(maxsize=queue_items)))  # 0: unbounded (offline collectors only)
        return sink

    def wants(self, kind: type) -> bool:
        """Whether any sink accepts items of ``kind`` (so that nobody builds them for nothing)."""
        return any(issubclass(kind, lane.sink.accepts) for lane in self._lanes)

    @property
    def sinks(self) -> list[Sink]:
        return [lane.sink for lane in self._lanes]

    def start(self) -> "SinkHub":
        for lane in self._lanes:
            lane.thread = threading.Thread(target=self._drain, args=(lane,), name=f"sink-{lane.sink.name}", daemon=True)
            lane.thread.start()
        self._started = True
        return self

    def publish(self, item: SinkItem) -> None:
        """Hand ``item`` to every sink that accepts it; a full queue sheds it (counted)."""
        for lane in self._lanes:
            if not isinstance(item, lane.sink.accepts):
                continue
            try:
                lane.queue.put_nowait(item)
            except queue.Full:
                lane.shed += 1
                now = time.monotonic()
                if now - lane.last_shed_log >= SHED_LOG_INTERVAL_S:
                    lane.last_shed_log = now
                    log.warning("sink %s is not keeping up: its queue is full, %d item(s) shed so far",
                                lane.sink.name, lane.shed)

    def _drain(self, lane: _Lane) -> None:
        while True:
            item = lane.queue.get()
            if item is _STOP:
                return
            lane.busy_since = time.monotonic()
            try:
                lane.sink.handle(item)
                lane.handled += 1
            except Exception as exc:  # a sink's failure is its own: count it, keep going
                lane.errors += 1
                if lane.errors == 1 or lane.errors % 1000 == 0:
                    log.error("sink %s failed (%d so far): %s", lane.sink.name, lane.errors, exc)
            finally:
                lane.busy_since = None

    def stats(self) -> dict[str, dict[str, float]]:
        """Per sink: queued, shed, errors, handled, and how long the current item has taken (s)."""
        now = time.monotonic()
        return {lane.sink.name: {"queued": lane.queue.qsize(), "shed": lane.shed, "errors": lane.errors,
                                 "handled": lane.handled,
                                 "busy_s": 0.0 if lane.busy_since is None else now - lane.busy_since}
                for lane in self._lanes}

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Let every sink finish its queue within ``timeout`` (shared), then close it.

        A sink whose queue is full is looked at last, so that one stuck sink (a blocked
        pipe) cannot use up the others' budget; one still stuck after the budget is
        abandoned — its thread is a daemon thread — and what it had not handled is counted
        as shed.
        """
        deadline = time.monotonic() + timeout
        later, sent = [], set()
        for lane in self._lanes:
            try:
                lane.queue.put_nowait(_STOP)
                sent.add(id(lane))
            except queue.Full:
                later.append(lane)
        for lane in [lane for lane in self._lanes if lane not in later] + later:
            if lane in later:
                try:
                    lane.queue.put(_STOP, timeout=max(0.0, deadline - time.monotonic()))
                    sent.add(id(lane))
                except queue.Full:
                    pass
            if lane.thread is not None:
                lane.thread.join(max(0.0, deadline - time.monotonic()))
                if lane.thread.is_alive():
                    left = max(0, lane.queue.qsize() - (id(lane) in sent))  # the stop marker is no item
                    lane.shed += left
                    log.warning("sink %s did not finish within %.0f s; %d item(s) not handled", lane.sink.name, timeout, left)
                    continue
            try:
                lane.sink.close()
            except Exception as exc:
                log.error("closing sink %s failed: %s", lane.sink.name, exc)

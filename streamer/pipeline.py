"""The one composition root: sources → frames → worker → smoothers → sinks.

``streamer run`` (the daemon) and ``streamer detect`` (files, offline) both build a
:class:`Pipeline`; offline is the same pipeline over lossless file sources, so a file
gives the windows, scores and events the same audio gives live.

Threads, whatever the number of streams: one ingest loop (capture), the worker's
scoring and results threads, one per sink (:class:`~streamer.sinks.base.SinkHub`), and
the caller's. Work is woken by data: each source's ``on_data`` hook marks its stream and
wakes the worker; the feed looks only at marked streams and reads a stream's ring only
when its next window is due (or, for a lossless stream, when it has room for windows),
so a stream costs a few microseconds per block and one read per hop.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from streamer.capture.ingest import Ingest
from streamer.capture.sources import FileSource, Source
from streamer.constants import SAMPLE_RATE_HZ
from streamer.events import Event, SmootherBank, Target, rounds
from streamer.features.fbank import LEVEL_FLOOR_DBFS, window_samples
from streamer.features.frames import FrameBank, WindowRef
from streamer.features.gate import WindowGate
from streamer.inference.engine import InferenceEngine
from streamer.inference.worker import IDLE_TICK_S, Worker
from streamer.sinks.base import Scores, SinkHub, Spectrogram

log = logging.getLogger(__name__)

# The scoring thread releases the GIL at every torch call and must win it back from the
# ingest thread; at CPython's default 5 ms a feed of ~50 calls could wait 250 ms for it
# (the "convoy effect"), starving the GPU while the cores were half idle.
GIL_SWITCH_INTERVAL_S = 0.001
MAX_READ_SECONDS = 4.0  # audio one stream may bring into one feed: bounds the frontend's work per step
SPECTROGRAM_STEP = 10  # live views get rows of 10 frames averaged (100 ms)


def fast_dbfs(samples: np.ndarray) -> float:
    """RMS level in dBFS (floored), as :func:`~streamer.features.fbank.dbfs`, with one BLAS dot."""
    if len(samples) == 0:
        return LEVEL_FLOOR_DBFS
    mean_square = float(np.dot(samples, samples)) / len(samples)
    return max(LEVEL_FLOOR_DBFS, 10.0 * math.log10(mean_square)) if mean_square > 0 else LEVEL_FLOOR_DBFS


class _GateWindow(NamedTuple):
    """What the gate needs of a window."""

    stream: str
    start_sample: int
    frames: int


@dataclass
class StreamSlot:
    """One stream in the pipeline: its source and what the pipeline knows of it."""

    index: int
    source: Source
    lossless: bool
    level_dbfs: float = LEVEL_FLOOR_DBFS
    windows: int = 0  # windows that became due
    done: bool = False  # finished and its last window handed on

    @property
    def name(self) -> str:
        return self.source.name


class Pipeline:
    """Sources → :class:`FrameBank` → :class:`Worker` → smoothers → :class:`SinkHub`.

    ``targets`` are the detect targets (the same for every stream); ``hub`` holds the
    sinks (events, scores, live state); ``on_event(stream index, event)`` runs on the results
    thread for each event before the fan-out — the place to attach a clip path or count. With
    ``stop_when_done`` the worker stops by itself once every source has ended (offline
    detection); a live daemon keeps going until :meth:`stop`.
    """

    def __init__(
        self,
        engine: InferenceEngine,
        sources: Sequence[Source],
        hop_frames: int,
        targets: list[Target],
        hub: SinkHub,
        max_wait_ms: float = 20.0,
        added_delay_s: float = 0.0,
        on_event: Callable[[int, Event], Event] | None = None,
        on_window: Callable[[WindowRef, np.ndarray, float], None] | None = None,
        on_batch: Callable[[int], None] | None = None,
        stop_when_done: bool = False,
        min_level_dbfs: float | None = None,
    ) -> None:
        self.engine = engine
        self.labels = engine.labels
        self.hub = hub
        self.on_event = on_event
        self.on_window = on_window
        self.on_batch = on_batch
        self._lock = threading.Lock()  # the smoothers: the results thread and a reload
        self.stop_when_done = stop_when_done
        self.streams = [StreamSlot(i, s, isinstance(s, FileSource) and not s.realtime) for i, s in enumerate(sources)]
        self.by_name = {s.name: s for s in self.streams}
        features = engine.loaded.features
        lossless = frozenset(s.index for s in self.streams if s.lossless)
        # lossless streams read up to max_batch windows ahead: their frames must still be in the ring
        slack = engine.max_batch * hop_frames if lossless else None
        live = [s for s in self.streams if not s.lossless]
        phases = [0] * len(self.streams)
        for k, s in enumerate(live):  # spread the live streams' windows over the hop
            phases[s.index] = k * hop_frames // len(live)
        self.frames = FrameBank(features, len(self.streams), hop_frames, engine.device,
                                slack_frames=None if slack is None else slack + 200, phases=phases)
        self.window_span = window_samples(features.max_length)
        self.raised = 0  # events handed to the sinks: counted, not kept, so memory stays flat
        self._dirty: set[int] = set(range(len(self.streams)))
        self._last_full = 0.0
        self._clocks = [s.source.clock for s in self.streams]
        self._want_scores = hub.wants(Scores)
        self._want_spectrogram = hub.wants(Spectrogram)
        self.set_targets(targets)
        # the silence gate: fed the same samples as the frontend, asked about each due window
        self.gate = WindowGate(min_level_dbfs)
        self.worker = Worker(engine, self._feed, self.frames.gather, self._deliver, max_wait_ms,
                             active_streams=self._active_streams, lossless=lossless, added_delay_s=added_delay_s,
                             admit=self._admit)
        for slot in self.streams:
            slot.source.on_data = self._marker(slot.index)
        self.ingest = Ingest()  # one thread drives every file and ffmpeg source (mics: PortAudio's callbacks)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "Pipeline":
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
        self.worker.start()
        for slot in self.streams:
            self.ingest.add(slot.source)
        self.ingest.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Until every source has ended and its windows are delivered (offline); True if done."""
        return self.worker.join(timeout)

    def stop(self, timeout: float) -> None:
        """Stop capture, score the windows already due, close open events (OFFs reach the sinks)."""
        self.ingest.stop()
        self.worker.stop(drain=True, timeout=timeout)
        self.close_events()

    def close_events(self, reason: str | None = None) -> None:
        with self._lock:
            for slot in self.streams:
                why = reason or ("stream-end" if slot.source.state.value in ("ended", "failed") else "shutdown")
                self._emit(slot.index, self.smoother.close_all(slot.index, why))

    def reload(self, targets: list[Target], min_level_dbfs: float | None = None) -> None:
        """New detect settings: open events close (reason ``reload``), the smoothers start afresh."""
        self.gate.min_level_dbfs = min_level_dbfs
        with self._lock:
            for slot in self.streams:
                self._emit(slot.index, self.smoother.close_all(slot.index, "reload"))
            self.set_targets(targets)

    def set_targets(self, targets: list[Target]) -> None:
        """(Re)build the smoothers; called at start and on reload (after :meth:`close_events`)."""
        self.targets = targets
        self.smoother = SmootherBank([s.name for s in self.streams], self.labels, targets, self.window_span)
        self._on = np.array([t.settings.on_threshold for t in targets])
        self._off = np.array([t.settings.off_threshold for t in targets])
        self._target_names = tuple(t.name for t in targets)

    # -- the scoring thread's side ----------------------------------------------------------------
    def _marker(self, index: int) -> Callable[[], None]:
        def mark() -> None:  # on the producer's thread: two cheap, GIL-atomic steps
            self._dirty.add(index)
            self.worker.wake()
        return mark

    def _active_streams(self) -> int:
        return sum(1 for s in self.streams if not s.done)

    def _feed(self, stopping: bool) -> list[WindowRef]:
        """Read what is due from the rings, frame it in one batched call; the windows now due."""
        if stopping:
            return []  # at a stop, only the windows already due are scored
        now = time.monotonic()
        marked, self._dirty = self._dirty, set()
        if now - self._last_full >= IDLE_TICK_S:
            self._last_full = now
            candidates = range(len(self.streams))  # ends of streams, a mark that raced with the swap
        else:
            candidates = marked
        chunks: list[tuple[int, int, np.ndarray]] = []
        ending: list[int] = []
        bank, worker = self.frames, self.worker
        gate_on = self.gate.min_level_dbfs is not None  # off: no level blocks kept (a reload that turns it on
        # finds no history and lets those windows through: the gate only ever errs towards scoring)
        for i in candidates:
            slot = self.streams[i]
            if slot.done:
                continue
            source, ring = slot.source, slot.source.ring
            finished = source.finished  # read before available(): every write happened before the state changed
            available = ring.available()
            if slot.lossless:
                room = worker.room(i)
                if room <= 0:
                    continue
                count = min(available, bank.samples_wanted(i, room))
            elif available >= bank.samples_wanted(i) or finished or available >= ring.capacity // 2:
                count = min(available, int(MAX_READ_SECONDS * SAMPLE_RATE_HZ))
            else:
                continue
            if count > 0:
                position, samples = ring.read(count)
                if len(samples):
                    if gate_on:
                        if position != bank.runs[i].next_sample:  # a gap: the gate restarts with the frames
                            self.gate.reset(slot.name, position)
                        self.gate.push(slot.name, samples)
                    chunks.append((i, position, samples))
                    slot.level_dbfs = fast_dbfs(samples)
            if finished and ring.available() == 0:
                ending.append(i)
            elif count > 0:
                self._dirty.add(i)  # more may be due already (a lossless stream reading ahead, a burst)
        refs, new_frames = bank.push(chunks, self._clocks)
        for i in ending:
            slot = self.streams[i]
            if slot.source.stats.samples:  # a source that failed before any audio has nothing to score
                refs.extend(bank.finish(i))
            slot.done = True
        for ref in refs:
            self.streams[ref.stream].windows += 1
        if self._want_spectrogram and new_frames:
            self._publish_spectrogram(new_frames)
        if self.stop_when_done and all(s.done for s in self.streams):
            worker.feeding_done = True
        return refs

    def _admit(self, ref: WindowRef) -> bool:
        """Whether the gate lets a window be scored (always, with the gate off)."""
        if self.gate.min_level_dbfs is None:
            return True
        return self.gate.admit(_GateWindow(self.streams[ref.stream].name, ref.start_sample, ref.frames))

    def _publish_spectrogram(self, new_frames: list[tuple[int, torch.Tensor]]) -> None:
        """Live views get rows of SPECTROGRAM_STEP frames averaged, aligned to the stream's frame count."""
        for stream, frames in new_frames:
            end = self.frames.runs[stream].frame_count
            first = end - frames.shape[0]
            skip = (-first) % SPECTROGRAM_STEP
            rows = (frames.shape[0] - skip) // SPECTROGRAM_STEP
            if rows <= 0:
                continue
            block = frames[skip:skip + rows * SPECTROGRAM_STEP].reshape(rows, SPECTROGRAM_STEP, -1).mean(dim=1)
            self.hub.publish(Spectrogram(self.streams[stream].name, block.to("cpu", torch.float16).numpy(),
                                         first + skip + rows * SPECTROGRAM_STEP, SPECTROGRAM_STEP))

    # -- the results thread's side ------------------------------------------------------------------
    def _deliver(self, refs: list[WindowRef], probs: np.ndarray, latencies: list[float]) -> None:
        if self.on_batch is not None:
            self.on_batch(len(refs))
        with self._lock:
            self._deliver_locked(refs, probs, latencies)

    def _deliver_locked(self, refs: list[WindowRef], probs: np.ndarray, latencies: list[float]) -> None:
        bank = self.smoother
        for positions in rounds([ref.stream for ref in refs]):  # one numpy pass per round (live: the batch)
            batch = [refs[k] for k in positions]
            rows = np.fromiter((ref.stream for ref in batch), np.int64, len(batch))
            starts = np.fromiter((ref.start_sample for ref in batch), np.int64, len(batch))
            walls = np.fromiter((np.nan if ref.wall_time is None else ref.wall_time for ref in batch),
                                np.float64, len(batch))
            round_probs = probs[positions] if len(positions) < len(refs) else probs
            events = bank.update(rows, starts, round_probs, walls)
            by_window: dict[int, list[Event]] = {}
            for b, event in events:
                by_window.setdefault(b, []).append(event)
            if self.on_window is None and not self._want_scores:
                for b, mine in by_window.items():
                    self._emit(batch[b].stream, mine)
                continue
            for b, ref in enumerate(batch):
                row = round_probs[b]
                if self.on_window is not None:
                    self.on_window(ref, row, latencies[positions[b]])
                if b in by_window:
                    self._emit(ref.stream, by_window[b])
                if self._want_scores:
                    self.hub.publish(Scores(
                        stream=self.streams[ref.stream].name, start_sample=ref.start_sample,
                        end_sample=ref.start_sample + self.window_span, wall_time=ref.wall_time,
                        probabilities=row, targets=self._target_names,
                        target_scores=bank.smoothed[ref.stream].copy(), on_thresholds=self._on,
                        off_thresholds=self._off, active=tuple(bank.active_targets(ref.stream)),
                        gated=not row.any()))

    def _emit(self, stream: int, events: list[Event]) -> None:
        for event in events:
            if self.on_event is not None:
                event = self.on_event(stream, event)
            self.raised += 1
            self.hub.publish(event)

    # -- for the status loop ---------------------------------------------------------------------------
    @property
    def last_progress(self) -> float:
        return self.worker.last_progress

    def finished(self) -> bool:
        return all(s.done for s in self.streams) and self.worker.pending() == 0

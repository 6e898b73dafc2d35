"""One worker for every stream: it pulls due windows, batches them, scores them, hands results on.

Two threads, whatever the number of streams:

- the **scoring thread** wakes on new audio (a source's ``on_data`` hook sets
  :meth:`Worker.wake`), or on a finished batch, or on one clock tick; calls ``feed()``
  (the pipeline's: read the rings that have a window due, run the batched frontend) to
  get the windows that just became due; keeps at most one waiting window per stream — a
  newer one replaces it and the older counts as skipped, so latency stays bounded and
  memory flat however far behind the model is; and submits a batch as soon as it holds
  ``max_batch`` windows or one from every active stream, or ``max_wait`` after its oldest
  window came. Up to ``PIPELINE_DEPTH`` batches are in flight, so the next batch is
  gathered and staged while the last one computes.
- the **results thread** waits for each batch and calls ``deliver(refs, probabilities,
  latencies)`` — smoothing, events and the sinks' fan-out happen there, never on the
  scoring thread.

Lossless streams (files scored as fast as they go) are never skipped: the feed does not
read such a stream while it has a window waiting (:meth:`Worker.waiting`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from streamer.features.frames import WindowRef
from streamer.inference.engine import PIPELINE_DEPTH, InferenceEngine

log = logging.getLogger(__name__)

MIN_TICK_S = 0.02  # new audio is looked at no more often than this: a burst of blocks is one feed
IDLE_TICK_S = 0.25  # with nothing new, the feed still runs this often (ends of streams, lossless pacing)
FEED_ERROR_BACKOFF_S = 1.0  # after a failed feed: no busy loop of errors


@dataclass
class WorkerStats:
    submitted: int = 0  # windows that became due
    skipped: int = 0  # windows replaced by a newer one of the same stream before inference
    processed: int = 0
    failed: int = 0  # windows lost to an inference error (each batch logged)
    batches: int = 0
    feed_errors: int = 0
    gated: int = 0  # windows not scored: quieter than detect.min_level_dbfs


class Worker:
    """Batches due windows from ``feed`` through ``engine``; results go to ``deliver``."""

    def __init__(
        self,
        engine: InferenceEngine,
        feed: Callable[[bool], list[WindowRef]],
        gather: Callable[[list[WindowRef]], torch.Tensor],
        deliver: Callable[[list[WindowRef], np.ndarray, list[float]], None],
        max_wait_ms: float,
        active_streams: Callable[[], int],
        lossless: frozenset[int] = frozenset(),
        added_delay_s: float = 0.0,
        admit: Callable[[WindowRef], bool] | None = None,
    ) -> None:
        self.engine = engine
        self.feed = feed
        self.gather = gather
        self.deliver = deliver
        self.max_wait_s = max_wait_ms / 1000.0
        self.active_streams = active_streams
        self.lossless = lossless  # streams never skipped: they may hold up to max_batch windows each
        # the silence gate: a window it refuses is not scored; it is delivered, in its stream's
        # order, with all-zero probabilities (the smoother takes it as silence)
        self.admit = admit
        # a rehearsal knob: every batch takes this much longer, to see overload handled
        # (skipped windows counted, latency bounded) and a stall caught by the watchdog
        self.added_delay_s = added_delay_s
        self.stats = WorkerStats()
        self.last_progress = time.monotonic()
        self._pending: dict[int, deque[tuple[WindowRef, float, float]]] = {}  # stream → (window, waiting since, due at)
        self._count = 0  # windows waiting, all streams
        self._wake = threading.Event()
        self._kicked = False  # woken by a finished batch or a stop, not only by new audio
        self._stop = threading.Event()
        self._drain = True
        self._in_flight = 0
        self._flight_lock = threading.Lock()
        self._handoff: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self.feeding_done = False  # set (from feed) when no more audio will come: drain, then stop

    # -- control --------------------------------------------------------------------------------
    def wake(self, data: bool = True) -> None:
        """New audio (``data``), a freed slot or a stop: look now. Cheap; safe from any thread."""
        if not data:
            self._kicked = True
        elif self._wake.is_set():  # already pending (the loop clears it before it reads): skip the lock
            return
        self._wake.set()

    def room(self, stream: int) -> int:
        """Windows a stream may still add: lossless streams up to max_batch, others any (latest wins)."""
        if stream not in self.lossless:
            return 1
        held = self._pending.get(stream)
        return self.engine.max_batch - (len(held) if held else 0)

    def pending(self) -> int:
        return self._count

    def start(self) -> "Worker":
        self._threads = [threading.Thread(target=self._score_loop, name="scoring", daemon=True),
                         threading.Thread(target=self._results_loop, name="results", daemon=True)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop; with ``drain`` the windows already due are scored and delivered first."""
        self._drain = drain
        self._stop.set()
        self.wake(data=False)
        self.join(timeout)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for both threads (they end by themselves once feeding is done); True if they did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not self.alive

    @property
    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    # -- the scoring thread -------------------------------------------------------------------------
    def _take(self, refs: list[WindowRef], now: float) -> None:
        for ref in refs:
            self.stats.submitted += 1
            gated = self.admit is not None and not self.admit(ref)
            self.stats.gated += gated
            held = self._pending.get(ref.stream)
            if held is None:
                self._pending[ref.stream] = deque([(ref, now, now, gated)])
                self._count += 1
            elif ref.stream in self.lossless:
                held.append((ref, held[-1][1], now, gated))
                self._count += 1
            else:
                self.stats.skipped += 1
                # the stream keeps its place in the queue; latency counts from this window's own due time
                held[0] = (ref, held[0][1], now, gated)

    def _oldest(self) -> float:
        return min(held[0][1] for held in self._pending.values())

    def _ready(self, now: float, final: bool) -> bool:
        if not self._count or self._in_flight >= PIPELINE_DEPTH:
            return False
        if final or self._count >= self.engine.max_batch or len(self._pending) >= max(1, self.active_streams()):
            return True
        return now - self._oldest() >= self.max_wait_s

    def _submit(self) -> None:
        batch: list[tuple[WindowRef, float, float, bool]] = []
        for stream in sorted(self._pending, key=lambda s: self._pending[s][0][1]):  # the longest waiting first
            held = self._pending[stream]
            while held and len(batch) < self.engine.max_batch:
                batch.append(held.popleft())
            if not held:
                del self._pending[stream]
            if len(batch) == self.engine.max_batch:
                break
        self._count -= len(batch)
        refs = [ref for ref, _, _, _ in batch]
        gated = [g for _, _, _, g in batch]
        scored = [ref for ref, g in zip(refs, gated) if not g]
        pending = None
        if scored:
            try:
                pending = self.engine.submit(self.gather(scored))
                if self.added_delay_s:  # as if the forward pass took that much longer
                    self._stop.wait(self.added_delay_s)
            except Exception as exc:  # keep serving the other streams; the loss is logged and counted
                log.error("inference failed for %d window(s): %s", len(scored), exc)
                self.stats.failed += len(scored)
                return
            self.stats.batches += 1
        with self._flight_lock:
            self._in_flight += 1
        self._handoff.put((refs, [due for _, _, due, _ in batch], pending, gated))

    def _score_loop(self) -> None:
        last_feed = 0.0
        refeed = False
        try:
            while True:
                stopping = self._stop.is_set()
                if stopping and not self._drain:
                    break
                now = time.monotonic()
                self._wake.clear()
                self._kicked = False
                if refeed or stopping or now - last_feed >= MIN_TICK_S:
                    last_feed, refeed = now, False
                    try:
                        self._take(self.feed(stopping), now)
                    except Exception as exc:  # a bug in the feed: logged and counted, never a silent stop
                        self.stats.feed_errors += 1
                        if self.stats.feed_errors == 1 or self.stats.feed_errors % 100 == 0:
                            log.exception("reading the streams failed (%d time(s)): %s", self.stats.feed_errors, exc)
                        self._stop.wait(FEED_ERROR_BACKOFF_S)
                final = stopping or self.feeding_done  # no more audio: every waiting window goes now
                submitted = False
                while self._ready(time.monotonic(), final):
                    self._submit()
                    submitted = True
                if final and not self._count:
                    break
                if submitted and self.lossless:
                    refeed = True  # read ahead for the next batch while this one computes
                    continue
                timeout = IDLE_TICK_S
                if self._count and self._in_flight < PIPELINE_DEPTH:
                    timeout = max(0.0, min(timeout, self._oldest() + self.max_wait_s - time.monotonic()))
                if self._wake.wait(timeout) and not self._kicked:
                    # woken by new audio only: let a burst of blocks gather into one feed
                    rest = last_feed + MIN_TICK_S - time.monotonic()
                    if rest > 0:
                        self._stop.wait(rest)
                if self._kicked:
                    refeed = bool(self.lossless)
        except Exception:
            log.exception("the scoring loop failed")
        finally:
            self._handoff.put(None)

    # -- the results thread -----------------------------------------------------------------------------
    def _results_loop(self) -> None:
        while (item := self._handoff.get()) is not None:
            refs, due, pending, gated = item
            try:
                scored = self.engine.collect(pending) if pending is not None else None
                if not any(gated):
                    probs = scored
                else:  # gated windows: all-zero probabilities, in their places
                    probs = np.zeros((len(refs), len(self.engine.labels)), dtype=np.float32)
                    if scored is not None:
                        probs[~np.asarray(gated)] = scored
            except Exception as exc:
                log.error("inference failed for %d window(s): %s", len(refs), exc)
                self.stats.failed += len(refs)
                continue
            finally:
                with self._flight_lock:
                    self._in_flight -= 1
                self.wake(data=False)
            done = time.monotonic()
            self.last_progress = done
            self.stats.processed += len(refs) - sum(gated)
            try:
                self.deliver(refs, probs, [done - t for t in due])
            except Exception:
                log.exception("delivering results failed")

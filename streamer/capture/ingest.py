"""One thread that drives every capture source, however many there are.

Sources used to own a thread each (plus one per ffmpeg stderr and one per microphone
pump): 64 streams meant well over a hundred threads, each waking on its own sleeps. Here
one event loop does all of it:

* ffmpeg's stdout and stderr pipes are non-blocking and multiplexed by the loop's selector;
* real-time file sources are decoded block by block, each block written when its last
  sample is due — one :class:`Pacer` keeps every source's due time in one heap behind a
  single loop timer, and the loop sleeps in ``select`` until the next one;
* lossless (not real-time) file sources write only into the room their ring has behind
  the consumer, and are woken by the consumer's read (``RingBuffer.on_space``) when full;
* microphone callbacks (PortAudio's own threads) only copy their block and wake the loop,
  which resamples it into the 16 kHz ring;
* retries with backoff, ffmpeg's stall and start-up limits, reaping an exited ffmpeg: all
  are timers in the same heap — nothing sleeps in a thread of its own.

The loop is :mod:`asyncio`'s (a selector and a heap of timers, well kept and well known),
driven with plain callbacks: no coroutine, no executor, no child watcher — so it starts no
thread beyond its own.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import threading
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0
PACE_COALESCE_S = 0.01  # paced calls due within this of each other are served by one wake-up


class PacedCall:
    """A call queued on the :class:`Pacer`; ``cancel()`` as an asyncio handle's."""

    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Pacer:
    """Due-time calls of many sources on ONE loop timer (the loop's thread only).

    Real-time file sources write a block every 100 ms each; with one asyncio timer per
    block, 1500 sources meant 15,000 timer handles, heap operations and loop turns a
    second — the ingest thread held the GIL more than the scoring thread. Here the due
    calls sit in one heap; one timer wakes at the earliest (at most every
    ``PACE_COALESCE_S``) and runs every call due by then. A call is never run early.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, PacedCall]] = []
        self._order = itertools.count()
        self._armed_at = math.inf
        self._timer: asyncio.TimerHandle | None = None

    def call_at(self, when: float, callback: Callable[[], None]) -> PacedCall:
        call = PacedCall(callback)
        heapq.heappush(self._heap, (when, next(self._order), call))
        if when < self._armed_at:
            self._arm(when)
        return call

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_at = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer, self._armed_at = None, math.inf
        now = self._loop.time()
        due = []
        while self._heap and self._heap[0][0] <= now:  # calls queued while these run wait for the next wake
            due.append(heapq.heappop(self._heap)[2])
        try:
            for call in due:
                if not call.cancelled:
                    try:
                        call.callback()  # sources guard their own callbacks (Source._guarded)
                    except Exception:  # a bug in one must not stop every paced source
                        log.exception("ingest: a paced call failed")
        finally:
            while self._heap and self._heap[0][2].cancelled:
                heapq.heappop(self._heap)
            if self._heap:
                self._arm(max(self._heap[0][0], now + PACE_COALESCE_S))


class Driven(Protocol):
    """What the loop needs of a source (see :class:`streamer.capture.sources.Source`)."""

    name: str

    def _attach(self, ingest: "Ingest") -> None: ...
    def _begin(self) -> None: ...
    def _halt(self) -> None: ...


class Ingest:
    """The ingest loop: ``add`` sources, ``start`` it, ``stop`` it (which stops them all).

    Sources added after ``start`` begin at once. Every source callback runs on the loop's
    one thread, so sources need no locks; the only cross-thread entries are
    :meth:`call_soon_threadsafe` (microphone callbacks, readers making room, ``stop``).
    """

    def __init__(self, name: str = "ingest") -> None:
        self.name = name
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._on_loop_error)
        self._pacer = Pacer(self._loop)
        self._thread: threading.Thread | None = None
        self._sources: list[Driven] = []
        self._lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._loop.is_closed()

    def add(self, source: Driven) -> Driven:
        """Drive ``source`` from this loop (it begins now if the loop runs, else at ``start``)."""
        with self._lock:
            source._attach(self)
            self._sources.append(source)
            if self.running:
                self._loop.call_soon_threadsafe(source._begin)
        return source

    def start(self) -> "Ingest":
        with self._lock:
            if self._thread is not None:
                return self
            for source in self._sources:
                self._loop.call_soon(source._begin)
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop every source (ffmpeg killed, streams closed), then the loop; wait ``timeout``."""
        if not self.running:
            if self._thread is None:  # never started: nothing runs, just mark the sources
                for source in self._sources:
                    source._halt()
            return
        done = threading.Event()

        def halt_all() -> None:
            for source in list(self._sources):
                try:
                    source._halt()
                except Exception:  # one source's cleanup must not keep the others running
                    log.exception("ingest: stopping source %s failed", source.name)
            self._loop.stop()
            done.set()

        self._loop.call_soon_threadsafe(halt_all)
        done.wait(timeout)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            asyncio.set_event_loop(None)

    @staticmethod
    def _on_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # sources guard their own callbacks; reaching here is a bug, logged but not fatal
        log.error("ingest loop: %s", context.get("message"), exc_info=context.get("exception"))

    # -- for sources ----------------------------------------------------------------------
    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def time(self) -> float:
        """The loop's clock (``time.monotonic``), for due times."""
        return self._loop.time()

    def call_at(self, when: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        return self._loop.call_at(when, callback)

    def pace_at(self, when: float, callback: Callable[[], None]) -> PacedCall:
        """Like :meth:`call_at`, for the many small due-time calls of paced sources (see :class:`Pacer`)."""
        return self._pacer.call_at(when, callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        return self._loop.call_later(delay, callback)

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` on the loop soon; from any thread. False once the loop is closed."""
        try:
            self._loop.call_soon_threadsafe(callback)
            return True
        except RuntimeError:  # closed: the sources are stopped anyway
            return False

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._loop.add_reader(fd, callback)

    def remove_reader(self, fd: int) -> None:
        self._loop.remove_reader(fd)


_shared: Ingest | None = None
_shared_lock = threading.Lock()


def shared_ingest() -> Ingest:
    """The process's shared loop, started on first use, for sources started on their own
    (``Source.start()``: tests, ``streamer record``). Still one thread for all of them."""
    global _shared
    with _shared_lock:
        if _shared is None or not _shared.running:
            _shared = Ingest("ingest-shared").start()
        return _shared

"""A reference reader for tests: one thread per stream, polling (the daemon uses the pipeline).

Each :class:`StreamReader` takes what its source has written, places it on the stream's
timeline (a gap from an overrun or a restart is noticed and counted), runs the
incremental frontend and the scheduler, and hands each window on — to the inference
worker in the daemon, to a list in tests.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from streamer.capture.sources import Source
from streamer.constants import SAMPLE_RATE_HZ
from streamer.features.fbank import LEVEL_FLOOR_DBFS, dbfs
from streamer.model.config import FeatureConfig
from streamer.features.windows import StreamWindows, Window

log = logging.getLogger(__name__)

READ_POLL_S = 0.01
MAX_READ_SECONDS = 1.0  # audio taken per read: bounds the frontend's work per step


class StreamReader:
    """Reads one source's ring, makes windows, calls ``on_window`` for each (in order)."""

    def __init__(self, source: Source, features: FeatureConfig, hop_frames: int, on_window: Callable[[Window], None]) -> None:
        self.source = source
        self.windows = StreamWindows(source.name, features, hop_frames)
        self.on_window = on_window
        self.emitted = 0
        self.level_dbfs = LEVEL_FLOOR_DBFS
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.done = threading.Event()

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def gaps(self) -> int:
        return self.windows.gaps

    def start(self) -> "StreamReader":
        self._thread = threading.Thread(target=self._run, name=f"stream-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)

    def step(self) -> bool:
        """Process what the ring holds now; False once the source is finished and drained."""
        ring = self.source.ring
        position, samples = ring.read(int(MAX_READ_SECONDS * SAMPLE_RATE_HZ))
        if len(samples):
            self.level_dbfs = dbfs(samples)
            for window in self.windows.push(samples, position, self.source.clock):
                self._emit(window)
            return True
        if self.source.finished and ring.available() == 0:
            if self.source.stats.samples:  # a source that failed before any audio has nothing to score
                for window in self.windows.finish():
                    self._emit(window)
            return False
        return True

    def _emit(self, window: Window) -> None:
        self.emitted += 1
        self.on_window(window)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                before = self.source.ring.read_pos
                if not self.step():
                    break
                if self.source.ring.read_pos == before:
                    self._stop.wait(READ_POLL_S)
        except Exception:
            log.exception("stream %s: processing failed", self.name)
        finally:
            self.done.set()

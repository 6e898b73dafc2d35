"""Saved clips: for every event, its audio from ``pre`` seconds before to ``post`` after, as FLAC.

The source's ring still holds the audio when an event closes (the OFF comes a window
length and the hold after the sound), so a clip is a copy out of the ring, written by a
background thread. Retention keeps the directory under a size and an age. Errors (disk
full, no permission) are counted and logged at most once per interval, never per event,
and never stop the event from being published.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

from streamer.capture.ring import RingBuffer
from streamer.constants import SAMPLE_RATE_HZ
from streamer.events import Event, slug

log = logging.getLogger(__name__)

ERROR_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True)
class ClipSettings:
    directory: Path
    pre: float = 2.0  # seconds before the event's start
    post: float = 2.0  # seconds after its end
    max_bytes: int = 1 << 30
    max_age_s: float = 30 * 86400.0


class ClipWriter:
    def __init__(self, settings: ClipSettings) -> None:
        self.settings = settings
        self.written = 0
        self.errors = 0
        self._last_error_log = 0.0
        self._errors_since_log = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="clips", daemon=True)
        self._thread.start()

    def path_for(self, event: Event) -> Path:
        return self.settings.directory / f"{slug(event.stream)}-{slug(event.target)}-{event.start_sample}.flac"

    def save(self, event: Event, ring: RingBuffer) -> Path | None:
        """Copy the event's audio out of the ring now; write it in the background. Its path, or None."""
        start = max(0, event.start_sample - int(self.settings.pre * SAMPLE_RATE_HZ))
        end = (event.end_sample or event.start_sample) + int(self.settings.post * SAMPLE_RATE_HZ)
        audio = ring.copy(start, end)
        if audio is None:
            self._error(f"clip for {event.id}: its audio has already left the ring (raise ring_seconds)")
            return None
        path = self.path_for(event)
        self._queue.put((path, audio))
        return path

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            path, audio = item
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(str(path), audio, SAMPLE_RATE_HZ, format="FLAC", subtype="PCM_16")
                self.written += 1
                self._retain()
            except (OSError, sf.LibsndfileError, RuntimeError) as exc:
                try:  # no half-written clip left behind (a full disk)
                    path.unlink(missing_ok=True)
                except OSError:
                    pass
                self._error(f"cannot write clips to {self.settings.directory} ({self._reason(exc, audio.nbytes)})")

    def _reason(self, exc: Exception, needed: int) -> str:
        """libsndfile says only "System error." when the disk is full: say what it is."""
        try:
            if shutil.disk_usage(self.settings.directory).free < needed:
                return "No space left on the device"
        except OSError:
            pass
        return " ".join(str(exc).split()) or type(exc).__name__

    def _error(self, message: str) -> None:
        self.errors += 1
        self._errors_since_log += 1
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL_S:
            log.error("clips: %s (%d such errors since the last report)", message, self._errors_since_log)
            self._last_error_log, self._errors_since_log = now, 0

    def _retain(self) -> None:
        files = sorted(self.settings.directory.glob("*.flac"), key=lambda p: p.stat().st_mtime)
        now = time.time()
        total = sum(p.stat().st_size for p in files)
        for p in files:
            if total <= self.settings.max_bytes and now - p.stat().st_mtime <= self.settings.max_age_s:
                break
            total -= p.stat().st_size
            p.unlink(missing_ok=True)

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

"""Saved clips: for every event, its audio from ``pre`` seconds before to ``post`` after, as FLAC.

The source's ring still holds the audio when an event closes (the OFF comes a window
length and the hold after the sound), so a clip is a copy out of the ring, written by a
background thread. Errors (disk full, no permission) are counted and logged at most once
per interval, never per event, and never stop the event from being published.

Clip files are named ``streamer-<stream id>-<target id>-<UTC start>-<start sample>.flac``
(:func:`clip_name`; ids from :func:`streamer.names.ident`, so distinct names never share a
file). Retention keeps our clips under a size and an age, and touches only files with that
name pattern (:func:`is_clip_name`): whatever else the directory holds — a user's own
recordings — is never deleted. It logs what it deleted.
"""

from __future__ import annotations

import logging
import queue
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

from streamer.capture.ring import RingBuffer
from streamer.constants import SAMPLE_RATE_HZ
from streamer.events import Event
from streamer.names import ident

log = logging.getLogger(__name__)

ERROR_LOG_INTERVAL_S = 60.0
CLIP_MIN_FREE_BYTES = 64 * 1024  # under this the disk is full for a clip (a second of noise is ~32 KB of FLAC)
CLIP_PREFIX = "streamer-"
CLIP_SUFFIX = ".flac"
CLIP_NAME = re.compile(r"streamer-[a-z0-9_-]+-[a-z0-9_-]+-\d{8}T\d{6}Z-\d+\.flac")


def clip_name(stream: str, target: str, start_sample: int, wall_time: float) -> str:
    """The file name of one event's clip: recognisable (retention deletes nothing else),
    injective in (stream, target) and distinct across restarts (the UTC start time)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(wall_time))
    return f"{CLIP_PREFIX}{ident(stream)}-{ident(target)}-{stamp}-{start_sample}{CLIP_SUFFIX}"


def is_clip_name(name: str) -> bool:
    """Whether a file name is one :func:`clip_name` makes."""
    return CLIP_NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class ClipSettings:
    directory: Path = Path("clips")
    pre: float = 2.0  # seconds before the event's start
    post: float = 2.0  # seconds after its end
    max_bytes: int = 1 << 30
    max_age_s: float = 30 * 86400.0


class ClipWriter:
    def __init__(self, settings: ClipSettings) -> None:
        self.settings = settings
        self.written = 0
        self.errors = 0
        self.deleted = 0  # clips removed by retention
        self._last_error_log = 0.0
        self._errors_since_log = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="clips", daemon=True)
        self._thread.start()

    def path_for(self, event: Event) -> Path:
        wall = event.start_time if event.start_time is not None else time.time()
        return self.settings.directory / clip_name(event.stream, event.target, event.start_sample, wall)

    def save(self, event: Event, ring: RingBuffer) -> Path | None:
        """Copy the event's audio out of the ring now; write it in the background. Its path, or None."""
        start = max(0, event.start_sample - int(self.settings.pre * SAMPLE_RATE_HZ))
        end = (event.end_sample or event.start_sample) + int(self.settings.post * SAMPLE_RATE_HZ)
        audio = ring.copy(start, end)
        if audio is None:
            self._error(f"clip for {event.id}: its audio has already left the ring (raise ring_seconds)")
            return None
        try:  # the event carries the path at once and the file comes later: a full disk must not give a path to nothing
            free = shutil.disk_usage(self.settings.directory if self.settings.directory.exists() else
                                     next(p for p in self.settings.directory.parents if p.exists())).free
        except (OSError, StopIteration):
            free = None
        if free is not None and free < CLIP_MIN_FREE_BYTES:  # a full disk (FLAC's size is unknown before: silence packs small)
            self._error(f"cannot write clips to {self.settings.directory} (No space left on the device)")
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

    def _retain(self) -> int:
        """Delete our oldest clips while they are over ``max_bytes`` or older than
        ``max_age_s``; only files named like our clips. The number deleted."""
        clips: list[tuple[float, int, Path]] = []
        for path in self.settings.directory.iterdir():
            if not is_clip_name(path.name):
                continue
            try:
                st = path.lstat()
            except OSError:  # gone meanwhile
                continue
            if path.is_symlink() or not path.is_file():
                continue
            clips.append((st.st_mtime, st.st_size, path))
        clips.sort()
        now = time.time()
        total = sum(size for _, size, _ in clips)
        deleted = freed = 0
        for mtime, size, path in clips:
            if total <= self.settings.max_bytes and now - mtime <= self.settings.max_age_s:
                break
            total -= size
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                self._error(f"retention cannot delete {path} ({exc.strerror})")
                continue
            deleted += 1
            freed += size
        if deleted:
            self.deleted += deleted
            log.info("clips: retention deleted %d clip(s) (%.1f MiB) from %s (limits: %g days, %.0f MiB)",
                     deleted, freed / 2**20, self.settings.directory, self.settings.max_age_s / 86400,
                     self.settings.max_bytes / 2**20)
        return deleted

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

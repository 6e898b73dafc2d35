"""Live audio sources: microphones (PortAudio), audio files, and anything ffmpeg reads.

Each source owns a :class:`RingBuffer` of 16 kHz mono float32 that the pipeline reads at
its own pace. No source has a thread: all of them are driven by one
:class:`~streamer.capture.ingest.Ingest` loop (``Source.start()`` alone uses the process's
shared loop). A source that fails is retried with exponential backoff and jitter while the
others keep running; its ``state`` and ``error`` say what it is doing, for the console,
metrics and MQTT. Anything a source logs or shows has the credentials of URLs masked.

For the consumer:

* ``source.on_data`` (optional, set before the loop starts the source) is called on the
  ingest thread after every write into the ring and when the source becomes ``finished``;
  it must be cheap and must not block (set an Event, notify a Condition).
* ``source.ring.read(max_frames)`` takes audio; for a lossless source that read is also
  the acknowledgement: it makes room, and the source is woken to write more.
* End of stream is ``source.drained``: the source is finished *and* its ring holds nothing
  unread. ``state == ENDED`` means the input is exhausted and every sample it produced is
  in the ring (nothing held back, nothing dropped); a lossless source goes further and
  says ``ENDED`` only once the consumer has read all of it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
import logging
import os
import random
import shutil
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from streamer.capture.files import BLOCK_SECONDS, iter_audio, sanitise, to_mono
from streamer.capture.resample import StreamingResampler
from streamer.capture.ring import RingBuffer
from streamer.capture.urls import LIVE_URL_SCHEMES, mask_url
from streamer.constants import SAMPLE_RATE_HZ
from streamer.errors import StreamerError

if TYPE_CHECKING:
    from streamer.capture.ingest import Ingest
    from streamer.settings import SourceConfig

log = logging.getLogger(__name__)

DEFAULT_RING_SECONDS = 30.0
FILE_BLOCK_SECONDS = 0.1  # real-time file pacing granularity
FILE_DECODE_SECONDS = 4.0  # a real-time file is decoded this much at a time (a read costs ~100 µs of Python whatever its size; 256 KiB a source)
MIC_BLOCK_SECONDS = 0.02  # PortAudio callback size
MIC_CHECK_S = 0.5  # how often a mic's stream is checked for a device that went away
RAW_RING_MAX_SECONDS = 10.0
DEFAULT_MAX_CHANNELS = 2  # channels opened when the config names none (then mixed to mono)
FFMPEG_READ_BYTES = 65536  # at most ~1 s of f32le mono at 16 kHz per read
FFMPEG_STDERR_READ_BYTES = 4096
FFMPEG_STALL_SECONDS = 10.0
FFMPEG_STARTUP_SECONDS = 20.0  # a connection may take this long before its first audio
FFMPEG_STALL_CHECK_S = 0.5  # how often a running ffmpeg is checked for silence
FFMPEG_REAP_POLL_S = 0.02  # after its stdout closed, how often ffmpeg's exit is checked
FFMPEG_REAP_GRACE_S = 2.0  # then it is killed
FFMPEG_PROBE_BYTES = 65536
FFMPEG_ANALYZE_US = 500_000
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
BACKOFF_JITTER = 0.25  # ± fraction of each delay, so that many sources don't retry in step
STDERR_LINES_KEPT = 20
STDERR_LINE_MAX = 300


class SourceState(str, enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    RETRYING = "retrying"
    ENDED = "ended"
    FAILED = "failed"
    STOPPED = "stopped"


FINISHED_STATES = (SourceState.ENDED, SourceState.FAILED, SourceState.STOPPED)


@dataclass
class SourceStats:
    restarts: int = 0
    overflows: int = 0  # PortAudio input overflows (audio the device dropped)
    nonfinite: int = 0
    samples: int = 0


class Backoff:
    """Exponential backoff with jitter; ``reset`` after a spell of success."""

    def __init__(self, first: float = BACKOFF_FIRST_S, maximum: float = BACKOFF_MAX_S, jitter: float = BACKOFF_JITTER) -> None:
        self.first, self.maximum, self.jitter = first, maximum, jitter
        self.attempt = 0

    def next_delay(self) -> float:
        delay = min(self.maximum, self.first * 2**self.attempt)
        self.attempt += 1
        return delay * random.uniform(1 - self.jitter, 1 + self.jitter)

    def reset(self) -> None:
        self.attempt = 0


class Source:
    """Base class: a named producer of 16 kHz mono audio into ``ring``, driven by an ingest loop.

    Subclasses implement ``_begin`` (first action, on the loop) and ``_close`` (release
    what is open); every later action is a timer (``_schedule``) or a reader callback,
    wrapped by ``_guarded`` so that an error fails this source alone.
    """

    kind = "source"

    def __init__(self, name: str, ring_seconds: float = DEFAULT_RING_SECONDS, gain: float = 1.0,
                 on_data: Callable[[], None] | None = None) -> None:
        self.name = name
        self.gain = gain
        self.ring = RingBuffer(int(ring_seconds * SAMPLE_RATE_HZ))
        self.stats = SourceStats()
        self.state = SourceState.STARTING
        self.error: str | None = None
        self.on_data = on_data
        self._ingest: Ingest | None = None
        self._timer = None  # the one pending timer of this source (asyncio.TimerHandle)
        self._halted = False
        self._stopped = threading.Event()

    # -- public API -------------------------------------------------------------------------
    def start(self) -> "Source":
        """Begin on the process's shared ingest loop (the pipeline uses ``Ingest.add``)."""
        from streamer.capture.ingest import shared_ingest

        if self._ingest is None:
            shared_ingest().add(self)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop producing (ffmpeg killed, stream closed); wait up to ``timeout`` for it."""
        ingest = self._ingest
        if ingest is None or not ingest.running or ingest.on_loop_thread():
            self._halt()
        elif ingest.call_soon_threadsafe(self._halt):
            self._stopped.wait(timeout)
        if self.state not in (SourceState.ENDED, SourceState.FAILED):
            self._set(SourceState.STOPPED)

    @property
    def lost(self) -> int:
        """Samples lost to overruns of this source's rings."""
        return self.ring.lost

    @property
    def finished(self) -> bool:
        """No more audio will come (ended, failed for good, or stopped)."""
        return self.state in FINISHED_STATES

    @property
    def drained(self) -> bool:
        """End of stream for the consumer: finished, and nothing unread left in the ring.

        Checked in this order, so that audio written just before the source finished is
        never missed.
        """
        return self.finished and self.ring.available() == 0

    def clock(self, position: int) -> float | None:
        return self.ring.wall_time(position, SAMPLE_RATE_HZ)

    def describe(self) -> str:
        return self.name

    # -- for the ingest loop ----------------------------------------------------------------
    def _attach(self, ingest: "Ingest") -> None:
        if self._ingest is not None and self._ingest is not ingest:
            raise StreamerError(f"source {self.name} is already driven by another ingest loop")
        self._ingest = ingest
        self._begin = self._guarded(self._begin)

    def _begin(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _close(self) -> None:
        """Release what is open (process, stream, file); called on the loop, idempotent."""

    def _halt(self) -> None:
        """Stop now, on the loop (or when no loop runs)."""
        self._halted = True
        self._cancel_timer()
        try:
            self._close()
        finally:
            self._stopped.set()

    def _guarded(self, fn: Callable[..., None]) -> Callable[..., None]:
        """``fn`` as a loop callback: nothing after a stop; an error fails this source only."""

        def call(*args) -> None:
            if self._halted:
                return
            try:
                fn(*args)
            except StreamerError as exc:
                self._fail(str(exc))
            except Exception as exc:  # a bug must not take the other sources down
                log.exception("source %s crashed", self.name)
                self._fail(f"{type(exc).__name__}: {exc}")

        return call

    def _fail(self, message: str) -> None:
        self._cancel_timer()
        try:
            self._close()
        except Exception:
            log.exception("source %s: cleanup after a failure failed", self.name)
        self._set(SourceState.FAILED, message)

    def _schedule(self, delay: float, fn: Callable[[], None], at: float | None = None) -> None:
        """Make ``fn`` this source's one pending timer (replacing any other)."""
        self._cancel_timer()
        if at is not None:
            self._timer = self._ingest.call_at(at, self._guarded(fn))
        else:
            self._timer = self._ingest.call_later(delay, self._guarded(fn))

    def _pace(self, at: float, guarded: Callable[[], None]) -> None:
        """Like :meth:`_schedule` at a due time, through the ingest's shared :class:`Pacer`
        (``guarded``: a callback already wrapped by :meth:`_guarded`, made once)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._ingest.pace_at(at, guarded)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _set(self, state: SourceState, error: str | None = None) -> None:
        error = mask_url(error) if error else error
        if state != self.state or error != self.error:
            if error:
                log.warning("source %s: %s: %s", self.name, state.value, error)
            else:
                log.info("source %s: %s", self.name, state.value)
        was_finished = self.finished
        self.state, self.error = state, error
        if self.finished and not was_finished:
            self._notify()  # a sleeping consumer must see the end

    def _notify(self) -> None:
        hook = self.on_data
        if hook is not None:
            try:
                hook()
            except Exception:
                log.exception("source %s: on_data hook failed", self.name)

    def _prepare(self, samples: np.ndarray, sanitised: bool = False) -> np.ndarray:
        """Samples made safe (NaN/inf/absurd values fixed and counted), gain applied, counted.

        ``sanitised``: decoding already fixed and counted them (files: before resampling).
        """
        if not sanitised:
            samples, bad = sanitise(samples)
            self.stats.nonfinite += bad
        if self.gain != 1.0:
            samples = samples * np.float32(self.gain)
        self.stats.samples += len(samples)
        return samples

    def _emit(self, samples: np.ndarray, wall_end: float | None, sanitised: bool = False) -> None:
        """Write into the ring (overwriting unread audio if the reader is behind: counted)."""
        samples = self._prepare(samples, sanitised)
        if len(samples):
            self.ring.write(samples, wall_end)
            self._notify()

    def _count_damaged(self, count: int) -> None:
        self.stats.nonfinite += count


class FileSource(Source):
    """An audio file, paced at real time (like a live stream) or lossless, as fast as the reader goes.

    Real time: decoded in ``FILE_BLOCK_SECONDS`` blocks, each written when its last sample
    is due. Lossless (``realtime=False``): decoded in the same blocks as offline decoding
    (hence the very same samples) and written only into the room the ring has behind the
    reader; when the ring is full the source waits, without holding the loop, for the
    reader's next read. It says ``ENDED`` once the reader has read every sample.
    """

    kind = "file"

    def __init__(self, name: str, path: str | Path, realtime: bool = True, loop: bool = False, **kwargs) -> None:
        super().__init__(name, **kwargs)
        self.path = Path(path)
        self.realtime = realtime
        self.loop = loop
        self._blocks: Iterator[np.ndarray] | None = None
        self._pending: np.ndarray | None = None  # decoded, not yet (fully) in the ring
        self._offset = 0  # of _pending, already written
        self._t0 = 0.0
        self._sent = 0
        self._decoded = np.zeros(0, np.float32)  # real time: decoded, not yet due
        self._woken = False  # a wake-up from the reader is queued on the loop
        self._paced_tick: Callable[[], None] | None = None  # _tick, guarded once (it runs 10 times a second)

    def _open(self) -> None:
        block = FILE_DECODE_SECONDS if self.realtime else BLOCK_SECONDS
        self._blocks = iter_audio(self.path, block_seconds=block, on_damaged=self._count_damaged)

    def _next_block(self) -> np.ndarray | None:
        """The next decoded block; at the end of the file, loop or return None."""
        for attempt in range(2):
            chunk = next(self._blocks, None)
            if chunk is not None:
                return chunk
            if not self.loop or attempt:  # the end (or an empty file asked to loop)
                return None
            self.stats.restarts += 1
            self._open()
        return None

    def _begin(self) -> None:
        self._set(SourceState.RUNNING)
        self._open()
        if self.realtime:
            self._t0 = self._ingest.time()
            self._sent = 0
            self._tick()
        else:
            self._pump()

    def _close(self) -> None:
        self.ring.on_space = None
        if self._blocks is not None:
            self._blocks.close()  # closes the sound file
            self._blocks = None

    # -- real time: one block per due time ----------------------------------------------------
    def _tick(self) -> None:
        if self._pending is not None:
            self._emit(self._pending, time.time(), sanitised=True)
            self._pending = None
        piece = int(FILE_BLOCK_SECONDS * SAMPLE_RATE_HZ)
        if len(self._decoded) < piece and self._blocks is not None:
            more = self._next_block()
            if more is not None:
                self._decoded = np.concatenate([self._decoded, more]) if len(self._decoded) else more
        chunk, self._decoded = (self._decoded[:piece], self._decoded[piece:]) if len(self._decoded) else (None, self._decoded)
        if chunk is None:
            self._close()
            self._set(SourceState.ENDED)
            return
        self._sent += len(chunk)
        self._pending = chunk
        if self._paced_tick is None:
            self._paced_tick = self._guarded(self._tick)
        self._pace(self._t0 + self._sent / SAMPLE_RATE_HZ, self._paced_tick)

    # -- lossless: write into the room behind the reader --------------------------------------
    def _pump(self) -> None:
        self.ring.on_space = None
        self._woken = False
        while True:
            if self._pending is None:
                if self._blocks is None:  # everything is in the ring
                    return self._end_when_read()
                chunk = self._next_block()
                if chunk is None:
                    self._close()
                    return self._end_when_read()
                self._pending, self._offset = self._prepare(chunk, sanitised=True), 0
                if not len(self._pending):
                    self._pending = None
                    continue
            room = self.ring.room()
            if room == 0:
                if self._wait_for_room():
                    return
                continue
            n = min(room, len(self._pending) - self._offset)
            self.ring.write(self._pending[self._offset:self._offset + n])
            self._offset += n
            self._notify()
            if self._offset == len(self._pending):
                self._pending = None
                # one decoded block per turn: the other sources get the loop in between
                self._schedule(0, self._pump)
                return

    def _wait_for_room(self) -> bool:
        """Arm the reader's wake-up; False if room appeared meanwhile (go on writing)."""
        self.ring.on_space = self._space_made
        if self.ring.room() == 0:
            return True
        self.ring.on_space = None
        return False

    def _space_made(self) -> None:
        """On the reader's thread: wake the loop once (not once per read)."""
        if not self._woken:
            self._woken = True
            self._ingest.call_soon_threadsafe(self._guarded(self._pump))

    def _end_when_read(self) -> None:
        """``ENDED`` once the reader has taken every sample (or what it lost was counted)."""
        if self.ring.available() == 0:
            self.ring.on_space = None
            self._set(SourceState.ENDED)
            return
        self.ring.on_space = self._space_made
        if self.ring.available() == 0:  # the reader took the rest meanwhile
            self._pump()

    def describe(self) -> str:
        return f"{self.name} (file {self.path})"


class FfmpegSource(Source):
    """Any URL or file ffmpeg reads (rtsp://, http://, a camera), as 16 kHz mono PCM.

    ffmpeg runs as a child process whose pipes the ingest loop reads without blocking;
    when it exits or goes silent for ``stall_seconds`` it is restarted with exponential
    backoff and jitter (``restart=False``: the source ends). Its stderr lines are kept
    (masked) for the error message.
    """

    kind = "ffmpeg"

    def __init__(
        self, name: str, url: str, realtime: bool = False, restart: bool = True,
        stall_seconds: float = FFMPEG_STALL_SECONDS, ffmpeg: str = "ffmpeg",
        backoff: Backoff | None = None, **kwargs,
    ) -> None:
        super().__init__(name, **kwargs)
        self.url = url
        self.realtime = realtime and not url.startswith(LIVE_URL_SCHEMES)  # a live stream paces itself
        self.restart = restart
        self.stall_seconds = stall_seconds
        self.ffmpeg = ffmpeg
        self.backoff = backoff or Backoff()
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_LINES_KEPT)
        self._proc: subprocess.Popen | None = None
        self._readers: list[int] = []
        self._leftover = b""
        self._stderr_partial = b""
        self._got_data = False
        self._last_data = 0.0
        self._outcome = "ended"
        self._reap_deadline = 0.0

    def command(self) -> list[str]:
        cmd = [self.ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error",
               # start from the first packets instead of analysing seconds of a live stream
               # (not "-fflags nobuffer": it throws the probed packets away, i.e. the first audio)
               "-probesize", str(FFMPEG_PROBE_BYTES), "-analyzeduration", str(FFMPEG_ANALYZE_US)]
        if self.realtime:
            cmd.append("-re")
        return cmd + ["-i", self.url, "-vn", "-ac", "1", "-ar", str(SAMPLE_RATE_HZ),
                      "-f", "f32le", "-flush_packets", "1", "pipe:1"]

    def _begin(self) -> None:
        if shutil.which(self.ffmpeg) is None:
            raise StreamerError(f"source {self.name}: ffmpeg not found; install it (apt-get install ffmpeg)")
        self._launch()

    def _launch(self) -> None:
        self.stderr_tail.clear()
        self._leftover = self._stderr_partial = b""
        self._got_data = False
        self._outcome = "ended"
        try:
            proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        except OSError as exc:
            return self._after(f"cannot start ffmpeg ({exc})")
        self._proc = proc
        for pipe, callback in ((proc.stdout, self._on_stdout), (proc.stderr, self._on_stderr)):
            os.set_blocking(pipe.fileno(), False)
            self._ingest.add_reader(pipe.fileno(), self._guarded(callback))
            self._readers.append(pipe.fileno())
        self._last_data = time.monotonic()
        self._schedule(FFMPEG_STALL_CHECK_S, self._check_stall)

    def _unwatch(self, fd: int) -> None:
        if fd in self._readers:
            self._readers.remove(fd)
            self._ingest.remove_reader(fd)

    def _on_stdout(self) -> None:
        proc = self._proc
        fd = proc.stdout.fileno()
        try:
            data = os.read(fd, FFMPEG_READ_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self._outcome = f"reading ffmpeg's output failed ({exc})"
            data = b""
        if not data:  # ffmpeg closed its output: it is exiting
            self._unwatch(fd)
            return self._reap()
        data = self._leftover + data if self._leftover else data
        usable = len(data) - len(data) % 4
        self._leftover = data[usable:]
        if usable:
            self._last_data = time.monotonic()
            if not self._got_data:
                self._got_data = True
                self.backoff.reset()
                self._set(SourceState.RUNNING)
            self._emit(np.frombuffer(data[:usable], dtype="<f4"), time.time())

    def _on_stderr(self) -> None:
        proc = self._proc
        if proc is None:
            return
        fd = proc.stderr.fileno()
        while True:
            try:
                data = os.read(fd, FFMPEG_STDERR_READ_BYTES)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._unwatch(fd)
                self._stderr_lines(b"\n")
                return
            self._stderr_lines(data)

    def _stderr_lines(self, data: bytes) -> None:
        *lines, self._stderr_partial = (self._stderr_partial + data).replace(b"\r", b"\n").split(b"\n")
        if len(self._stderr_partial) > 4 * STDERR_LINE_MAX:  # a line without end: keep its start
            lines.append(self._stderr_partial)
            self._stderr_partial = b""
        for raw in lines:
            line = mask_url(raw.decode("utf-8", "replace").strip())
            if line:
                self.stderr_tail.append(line[:STDERR_LINE_MAX])

    def _check_stall(self) -> None:
        limit = self.stall_seconds if self._got_data else max(self.stall_seconds, FFMPEG_STARTUP_SECONDS)
        if time.monotonic() - self._last_data > limit:
            self._outcome = f"no audio for {limit:.0f} s (stalled)"
            self._proc.kill()
            self._unwatch(self._proc.stdout.fileno())
            return self._reap()
        self._schedule(FFMPEG_STALL_CHECK_S, self._check_stall)

    def _reap(self) -> None:
        """Wait for ffmpeg's exit on the loop's clock (never blocking the loop), then decide."""
        proc = self._proc
        self._cancel_timer()  # the stall check is over
        if self._reap_deadline == 0.0:
            self._reap_deadline = time.monotonic() + FFMPEG_REAP_GRACE_S
        if proc.poll() is None:
            if time.monotonic() > self._reap_deadline:
                proc.kill()
            return self._schedule(FFMPEG_REAP_POLL_S, self._reap)
        self._reap_deadline = 0.0
        self._on_stderr()  # its last words
        self._close()
        outcome = self._outcome
        if outcome == "ended" and proc.returncode != 0:
            last = self.stderr_tail[-1] if self.stderr_tail else ""
            outcome = f"ffmpeg exited with code {proc.returncode}" + (f": {last}" if last else "")
        elif outcome == "ended" and not self._got_data:
            outcome = "stream gave no audio"
        self._after(outcome)

    def _after(self, outcome: str) -> None:
        """ffmpeg is gone: end, fail, or retry after a backoff delay."""
        if not self.restart:
            if outcome == "ended":
                self._set(SourceState.ENDED)
            else:
                self._set(SourceState.FAILED, outcome)
            return
        delay = self.backoff.next_delay()
        self.stats.restarts += 1
        self._set(SourceState.RETRYING, f"{outcome}; retrying in {delay:.1f} s")
        self._schedule(delay, self._launch)

    def _close(self) -> None:
        for fd in list(self._readers):
            self._unwatch(fd)
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()  # after SIGKILL: immediate
        proc.stdout.close()
        proc.stderr.close()
        self._proc = proc  # kept for its return code (closed pipes are harmless)

    def _halt(self) -> None:
        super()._halt()
        self._proc = None

    def describe(self) -> str:
        return f"{self.name} (ffmpeg {mask_url(self.url)})"


def import_sounddevice():
    """``sounddevice``, imported only when a microphone is asked for."""
    try:
        import sounddevice
    except OSError as exc:  # the module imports but cannot find the PortAudio library
        raise StreamerError(
            f"PortAudio is not available ({exc}); install it (apt-get install libportaudio2) "
            "or use a file or ffmpeg source"
        ) from None
    except ImportError:
        raise StreamerError("the sounddevice package is missing; pip install sounddevice, or use a file or ffmpeg source") from None
    return sounddevice


@dataclass(frozen=True)
class InputDevice:
    index: int
    name: str
    channels: int
    default_rate: float
    host_api: str


def input_devices() -> list[InputDevice]:
    sd = import_sounddevice()
    apis = sd.query_hostapis()
    return [
        InputDevice(i, d["name"], d["max_input_channels"], d["default_samplerate"], apis[d["hostapi"]]["name"])
        for i, d in enumerate(sd.query_devices())
        if d["max_input_channels"] > 0
    ]


def find_device(spec: str | int | None) -> InputDevice:
    """An input device by index, or by a case-insensitive substring of its name (None: the default)."""
    devices = input_devices()
    if not devices:
        raise StreamerError("no microphone (input device) found; use a file or ffmpeg source, or plug one in")
    if spec is None or spec == "default":
        sd = import_sounddevice()
        default = sd.default.device[0]
        return next((d for d in devices if d.index == default), devices[0])
    if isinstance(spec, int) or str(spec).isdigit():
        match = [d for d in devices if d.index == int(spec)]
    else:
        match = [d for d in devices if str(spec).casefold() in d.name.casefold()]
    if not match:
        raise StreamerError(f"no input device matches {spec!r}; `streamer devices` lists them")
    return match[0]


class MicSource(Source):
    """A PortAudio input device at its native rate and channel count, resampled to 16 kHz.

    The PortAudio callback (PortAudio's own thread) only counts overflows, copies the block
    into a raw ring (device rate, all channels) and wakes the ingest loop, which selects or
    mixes channels, resamples and writes the 16 kHz ring. If the device goes away the
    stream is reopened with backoff — a timer of the loop, like every retry.
    """

    kind = "mic"

    def __init__(self, name: str, device: str | int | None = None, channels: int | None = None,
                 channel: int | None = None, backoff: Backoff | None = None, **kwargs) -> None:
        super().__init__(name, **kwargs)
        self.device_spec = device
        self.channels = channels
        self.channel = channel
        self.backoff = backoff or Backoff()
        self.device: InputDevice | None = None
        self._raw: RingBuffer | None = None
        # the raw ring only bridges the loop's short delays, but a stall of the loop (a busy
        # CPU) must not lose audio that the 16 kHz ring could still hold
        self._raw_seconds = min(self.ring.capacity / SAMPLE_RATE_HZ, RAW_RING_MAX_SECONDS)
        self._clock_offset = 0.0
        self._stream = None
        self._resampler: StreamingResampler | None = None
        self._pump_queued = False
        self._pump_call: Callable[[], None] | None = None

    def open_check(self) -> InputDevice:
        """Resolve the device now, so that a missing one is an error at start-up."""
        device = find_device(self.device_spec)
        if self.channels is not None and not 1 <= self.channels <= device.channels:
            raise StreamerError(f"source {self.name}: {device.name} has {device.channels} input channels, not {self.channels}")
        if self.channel is not None and not 0 <= self.channel < self.open_channels(device):
            raise StreamerError(f"source {self.name}: channel {self.channel} does not exist on {device.name} ({self.open_channels(device)} channels)")
        self.device = device
        return device

    def open_channels(self, device: InputDevice) -> int:
        """Channels to open: as configured, else the device's own count up to a stereo pair."""
        return self.channels or min(device.channels, DEFAULT_MAX_CHANNELS)

    def _callback(self, indata, frames, time_info, status) -> None:
        """PortAudio's thread: check the status, copy, hand over (wake the loop once)."""
        if status.input_overflow:
            self.stats.overflows += 1
        self._raw.write(indata, time_info.inputBufferAdcTime + self._clock_offset + frames / self._rate)
        if not self._pump_queued:
            self._pump_queued = True
            self._ingest.call_soon_threadsafe(self._pump_call)

    def _begin(self) -> None:
        self._pump_call = self._guarded(self._pump)
        self._open_stream()

    def _open_stream(self) -> None:
        sd = import_sounddevice()
        try:
            device = self.device or self.open_check()
            self._rate = int(device.default_rate)
            channels = self.open_channels(device)
            self._raw = RingBuffer(int(self._rate * self._raw_seconds), channels)
            self._resampler = StreamingResampler(self._rate, SAMPLE_RATE_HZ)
            stream = sd.InputStream(
                device=device.index, samplerate=self._rate, channels=channels, dtype="float32",
                blocksize=int(self._rate * MIC_BLOCK_SECONDS), callback=self._callback,
            )
            stream.start()
            self._clock_offset = time.time() - stream.time
        except (sd.PortAudioError, StreamerError, ValueError) as exc:
            delay = self.backoff.next_delay()
            self.device = None
            self.stats.restarts += 1
            self._set(SourceState.RETRYING, f"cannot open input device ({' '.join(str(exc).split())}); retrying in {delay:.1f} s")
            return self._schedule(delay, self._open_stream)
        self._stream = stream
        self._set(SourceState.RUNNING)
        self.backoff.reset()
        self._schedule(MIC_CHECK_S, self._check_active)

    def _check_active(self) -> None:
        if self._stream is not None and self._stream.active:
            return self._schedule(MIC_CHECK_S, self._check_active)
        self._close()
        self.device = None
        self._set(SourceState.RETRYING, "input stream stopped (device gone?)")
        self._schedule(0, self._open_stream)

    def _close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()
            except Exception as exc:  # a device that vanished may refuse even this
                log.debug("source %s: closing the input stream: %s", self.name, exc)
            if self._resampler is not None:
                self._pump()  # what the callbacks left in the raw ring

    def _pump(self) -> None:
        self._pump_queued = False
        if self._raw is None or self._resampler is None:
            return
        start, raw = self._raw.read()
        if not len(raw):
            return
        if raw.ndim == 1:  # a one-channel device
            mono = raw
        else:
            mono = raw[:, self.channel].copy() if self.channel is not None else to_mono(raw)
        out = self._resampler.process(mono)
        if len(out):
            end = start + len(raw)
            self._emit(out, self._raw.wall_time(end - 1, self._rate))

    @property
    def lost(self) -> int:
        return (self._raw.lost if self._raw else 0) + self.ring.lost

    def describe(self) -> str:
        name = self.device.name if self.device else self.device_spec
        return f"{self.name} (mic {name})"


# ---------------------------------------------------------------- the one factory


def source_from_spec(spec: str, name: str | None = None, realtime: bool = True) -> "SourceConfig":
    """The configuration of a source given in a short command-line form.

    ``mic`` or ``mic:DEVICE`` (index or part of its name), ``file:PATH`` or an existing
    path, ``ffmpeg:URL`` or a URL (rtsp://, http://, …). :func:`make_source` makes it.
    """
    from streamer.settings import SourceConfig

    kind, _, rest = spec.partition(":")
    if spec == "mic" or kind == "mic":
        device: str | int | None = rest or None
        return SourceConfig(name=name or "mic", type="mic", device=device, realtime=realtime)
    if kind == "ffmpeg" or spec.startswith(LIVE_URL_SCHEMES):
        url = rest if kind == "ffmpeg" else spec
        return SourceConfig(name=name or "stream", type="ffmpeg", url=url, realtime=realtime)
    path = Path(rest if kind == "file" else spec)
    if kind == "file" or path.exists():
        return SourceConfig(name=name or path.stem, type="file", path=str(path), realtime=realtime)
    raise StreamerError(f"source {mask_url(spec)!r}: not a file, URL or mic (use mic[:DEVICE], file:PATH or a URL)")


def make_source(config: "SourceConfig", ring_seconds: float = DEFAULT_RING_SECONDS,
                on_data: Callable[[], None] | None = None) -> Source:
    """The one place a :class:`Source` is made from its configuration (daemon, record, detect)."""
    common = {"gain": config.gain, "ring_seconds": ring_seconds, "on_data": on_data}
    if config.type == "mic":
        return MicSource(config.name, device=config.device, channels=config.channels, channel=config.channel, **common)
    if config.type == "ffmpeg":
        return FfmpegSource(config.name, config.url, realtime=config.realtime, **common)
    if config.type == "file":
        return FileSource(config.name, config.path, realtime=config.realtime, loop=config.loop, **common)
    raise StreamerError(f"source {config.name}: unknown type {config.type!r} (mic, file or ffmpeg)")

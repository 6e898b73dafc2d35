"""Live audio sources: microphones (PortAudio), audio files, and anything ffmpeg reads.

Each source owns a :class:`RingBuffer` of 16 kHz mono float32 and a thread that fills it;
the pipeline reads the ring at its own pace. A source that fails is retried with
exponential backoff and jitter while the others keep running; its ``state`` and ``error``
say what it is doing, for the console, metrics and MQTT.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
import logging
import os
import random
import select
import shutil
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamer.capture.files import BLOCK_SECONDS, iter_audio, sanitise, to_mono
from streamer.capture.resample import StreamingResampler
from streamer.capture.ring import RingBuffer
from streamer.constants import SAMPLE_RATE_HZ
from streamer.errors import StreamerError

log = logging.getLogger(__name__)

DEFAULT_RING_SECONDS = 30.0
FILE_BLOCK_SECONDS = 0.1  # real-time file pacing granularity
MIC_BLOCK_SECONDS = 0.02  # PortAudio callback size
PUMP_INTERVAL_S = 0.02
RAW_RING_MAX_SECONDS = 10.0
DEFAULT_MAX_CHANNELS = 2  # channels opened when the config names none (then mixed to mono)  # how often a mic's raw audio is resampled into its ring
FFMPEG_READ_BYTES = 6400  # 0.1 s of f32le mono at 16 kHz
FFMPEG_STALL_SECONDS = 10.0
FFMPEG_STARTUP_SECONDS = 20.0  # a connection may take this long before its first audio
FFMPEG_PROBE_BYTES = 65536
FFMPEG_ANALYZE_US = 500_000
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
BACKOFF_JITTER = 0.25  # ± fraction of each delay, so that many sources don't retry in step
STDERR_LINES_KEPT = 20
LIVE_URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")


class SourceState(str, enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    RETRYING = "retrying"
    ENDED = "ended"
    FAILED = "failed"
    STOPPED = "stopped"


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
    """Base class: a named producer of 16 kHz mono audio into ``ring``."""

    kind = "source"

    def __init__(self, name: str, ring_seconds: float = DEFAULT_RING_SECONDS, gain: float = 1.0) -> None:
        self.name = name
        self.gain = gain
        self.ring = RingBuffer(int(ring_seconds * SAMPLE_RATE_HZ))
        self.stats = SourceStats()
        self.state = SourceState.STARTING
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_data: Callable[[], None] | None = None  # called after each write to the ring (the consumer's wake-up)

    def start(self) -> "Source":
        self._thread = threading.Thread(target=self._run_guarded, name=f"source-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)
        if self.state not in (SourceState.ENDED, SourceState.FAILED):
            self.state = SourceState.STOPPED

    @property
    def lost(self) -> int:
        """Samples lost to overruns of this source's rings."""
        return self.ring.lost

    @property
    def finished(self) -> bool:
        """No more audio will come (ended, failed for good, or stopped)."""
        return self.state in (SourceState.ENDED, SourceState.FAILED, SourceState.STOPPED)

    def clock(self, position: int) -> float | None:
        return self.ring.wall_time(position, SAMPLE_RATE_HZ)

    def _set(self, state: SourceState, error: str | None = None) -> None:
        if state != self.state or error != self.error:
            if error:
                log.warning("source %s: %s: %s", self.name, state.value, error)
            else:
                log.info("source %s: %s", self.name, state.value)
        self.state, self.error = state, error

    def _emit(self, samples: np.ndarray, wall_end: float | None, block: bool = False) -> None:
        samples, bad = sanitise(samples)  # NaN/inf/absurd values (a broken stream or file): fixed and counted
        self.stats.nonfinite += bad
        if self.gain != 1.0:
            samples = samples * np.float32(self.gain)
        self.stats.samples += len(samples)
        while not self._stop.is_set():
            if self.ring.write(samples, wall_end, block=block, timeout=0.2 if block else None) or len(samples) == 0:
                if self.on_data is not None:
                    self.on_data()
                return

    def _count_damaged(self, count: int) -> None:
        self.stats.nonfinite += count

    def _run_guarded(self) -> None:
        try:
            self._run()
        except StreamerError as exc:
            self._set(SourceState.FAILED, str(exc))
        except Exception as exc:  # a bug must not take the other sources down
            log.exception("source %s crashed", self.name)
            self._set(SourceState.FAILED, f"{type(exc).__name__}: {exc}")

    def _run(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class FileSource(Source):
    """An audio file, paced at real time (like a live stream) or as fast as the pipeline reads."""

    kind = "file"

    def __init__(self, name: str, path: str | Path, realtime: bool = True, loop: bool = False, **kwargs) -> None:
        super().__init__(name, **kwargs)
        self.path = Path(path)
        self.realtime = realtime
        self.loop = loop

    def _run(self) -> None:
        # as fast as possible: the same blocks as offline decoding, hence the very same samples
        block = FILE_BLOCK_SECONDS if self.realtime else BLOCK_SECONDS
        start = time.monotonic()
        sent = 0
        while not self._stop.is_set():
            self._set(SourceState.RUNNING)
            for chunk in iter_audio(self.path, block_seconds=block, on_damaged=self._count_damaged):
                if self._stop.is_set():
                    return
                if self.realtime:
                    sent += len(chunk)
                    delay = start + sent / SAMPLE_RATE_HZ - time.monotonic()
                    if delay > 0:
                        self._stop.wait(delay)
                    self._emit(chunk, time.time())
                else:
                    self._emit(chunk, None, block=True)
            if not self.loop:
                self._set(SourceState.ENDED)
                return
            self.stats.restarts += 1

    def describe(self) -> str:
        return f"{self.name} (file {self.path})"


class FfmpegSource(Source):
    """Any URL or file ffmpeg reads (rtsp://, http://, a camera), as 16 kHz mono PCM.

    ffmpeg runs as a child process; when it exits or goes silent for ``stall_seconds`` it
    is restarted with exponential backoff and jitter (``restart=False``: the source ends).
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

    def command(self) -> list[str]:
        cmd = [self.ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error",
               # start from the first packets instead of analysing seconds of a live stream
               # (not "-fflags nobuffer": it throws the probed packets away, i.e. the first audio)
               "-probesize", str(FFMPEG_PROBE_BYTES), "-analyzeduration", str(FFMPEG_ANALYZE_US)]
        if self.realtime:
            cmd.append("-re")
        return cmd + ["-i", self.url, "-vn", "-ac", "1", "-ar", str(SAMPLE_RATE_HZ),
                      "-f", "f32le", "-flush_packets", "1", "pipe:1"]

    def _run(self) -> None:
        if shutil.which(self.ffmpeg) is None:
            raise StreamerError(f"source {self.name}: ffmpeg not found; install it (apt-get install ffmpeg)")
        while not self._stop.is_set():
            outcome = self._run_once()
            if self._stop.is_set():
                return
            if not self.restart:
                self._set(SourceState.ENDED if outcome == "ended" else SourceState.FAILED, None if outcome == "ended" else outcome)
                return
            delay = self.backoff.next_delay()
            self._set(SourceState.RETRYING, f"{outcome}; retrying in {delay:.1f} s")
            self.stats.restarts += 1
            self._stop.wait(delay)

    def _run_once(self) -> str:
        """Run ffmpeg until it exits, stalls or we stop; say what happened."""
        self.stderr_tail.clear()
        try:
            proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        except OSError as exc:
            return f"cannot start ffmpeg ({exc})"
        self._proc = proc
        drain = threading.Thread(target=self._drain_stderr, args=(proc,), daemon=True)
        drain.start()
        fd = proc.stdout.fileno()
        leftover = b""
        got_data = False
        last_data = time.monotonic()
        outcome = "ended"
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([fd], [], [], 0.2)
                if not ready:
                    limit = self.stall_seconds if got_data else max(self.stall_seconds, FFMPEG_STARTUP_SECONDS)
                    if time.monotonic() - last_data > limit:
                        outcome = f"no audio for {limit:.0f} s (stalled)"
                        break
                    continue
                data = os.read(fd, FFMPEG_READ_BYTES)
                if not data:
                    break
                data = leftover + data
                usable = len(data) - len(data) % 4
                leftover = data[usable:]
                if usable:
                    samples = np.frombuffer(data[:usable], dtype="<f4")
                    last_data = time.monotonic()
                    if not got_data:
                        got_data = True
                        self.backoff.reset()
                        self._set(SourceState.RUNNING)
                    self._emit(samples, time.time())
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            drain.join(1.0)
            proc.stdout.close()
        if outcome == "ended" and proc.returncode not in (0, None) and not self._stop.is_set():
            last = self.stderr_tail[-1] if self.stderr_tail else ""
            outcome = f"ffmpeg exited with code {proc.returncode}" + (f": {last}" if last else "")
        elif outcome == "ended" and not got_data:
            outcome = "stream gave no audio"
        return outcome

    def _drain_stderr(self, proc: subprocess.Popen) -> None:
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").strip()
            if line:
                self.stderr_tail.append(line[:300])
        proc.stderr.close()

    def describe(self) -> str:
        return f"{self.name} (ffmpeg {self.url})"


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

    The PortAudio callback only copies the block into a raw ring (device rate, all
    channels) and counts overflows; a pump thread selects or mixes channels, resamples and
    writes the 16 kHz ring. If the device goes away the stream is reopened with backoff.
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
        # the raw ring only bridges the pump's short intervals, but a stall of the pump
        # (a busy CPU) must not lose audio that the 16 kHz ring could still hold
        self._raw_seconds = min(self.ring.capacity / SAMPLE_RATE_HZ, RAW_RING_MAX_SECONDS)
        self._clock_offset = 0.0

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
        if status.input_overflow:
            self.stats.overflows += 1
        self._raw.write(indata, time_info.inputBufferAdcTime + self._clock_offset + frames / self._rate)

    def _run(self) -> None:
        sd = import_sounddevice()
        while not self._stop.is_set():
            try:
                device = self.device or self.open_check()
                self._rate = int(device.default_rate)
                channels = self.open_channels(device)
                self._raw = RingBuffer(int(self._rate * self._raw_seconds), channels)
                resampler = StreamingResampler(self._rate, SAMPLE_RATE_HZ)
                stream = sd.InputStream(
                    device=device.index, samplerate=self._rate, channels=channels, dtype="float32",
                    blocksize=int(self._rate * MIC_BLOCK_SECONDS), callback=self._callback,
                )
            except (sd.PortAudioError, StreamerError, ValueError) as exc:
                delay = self.backoff.next_delay()
                self.device = None
                self._set(SourceState.RETRYING, f"cannot open input device ({' '.join(str(exc).split())}); retrying in {delay:.1f} s")
                self.stats.restarts += 1
                self._stop.wait(delay)
                continue
            with stream:
                self._clock_offset = time.time() - stream.time
                self._set(SourceState.RUNNING)
                self.backoff.reset()
                while not self._stop.is_set() and stream.active:
                    self._stop.wait(PUMP_INTERVAL_S)
                    self._pump(resampler)
                self._pump(resampler)
            if not self._stop.is_set():
                self.device = None
                self._set(SourceState.RETRYING, "input stream stopped (device gone?)")

    def _pump(self, resampler: StreamingResampler) -> None:
        start, raw = self._raw.read()
        if not len(raw):
            return
        if raw.ndim == 1:  # a one-channel device
            mono = raw
        else:
            mono = raw[:, self.channel].copy() if self.channel is not None else to_mono(raw)
        out = resampler.process(mono)
        if len(out):
            end = start + len(raw)
            self._emit(out, self._raw.wall_time(end - 1, self._rate))

    @property
    def lost(self) -> int:
        return (self._raw.lost if self._raw else 0) + self.ring.lost

    def describe(self) -> str:
        name = self.device.name if self.device else self.device_spec
        return f"{self.name} (mic {name})"

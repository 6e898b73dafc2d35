"""The sliding window: every ``hop`` frames, the last ``max_length`` frames of a stream.

Frames go into a preallocated ring stored twice over (the classic mirrored ring), so
every window is one contiguous slice, copied once when it is emitted. Start-up policy:
**wait** — the first window is emitted when ``max_length`` frames (10.24 s for AudioSet
models) exist; a stream that ends before that yields one window at sample 0, right-padded
with padding frames exactly as the reference pads a short clip. Offline detection and the
live daemon share this class, so both see the same windows at the same sample positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from streamer.features.fbank import FRAME_SHIFT, Frontend, pad_value, window_samples
from streamer.model.config import FeatureConfig


Clock = Callable[[int], "float | None"]  # stream sample → wall-clock time


@dataclass(frozen=True)
class Window:
    """One model input and where it sits on its stream's timeline."""

    stream: str
    start_sample: int  # index of the window's first sample in the 16 kHz stream
    features: torch.Tensor  # (max_length, num_mel_bins), normalised
    frames: int  # real (unpadded) frames in it
    wall_time: float | None = None  # wall-clock time of its last sample, when known


class WindowScheduler:
    """Turn a stream's frames into windows every ``hop_frames`` frames."""

    def __init__(self, stream: str, max_length: int, num_mel_bins: int, hop_frames: int, pad_value: float) -> None:
        if hop_frames < 1:
            raise ValueError(f"hop must be at least one frame, got {hop_frames}")
        self.stream = stream
        self.max_length = max_length
        self.hop_frames = hop_frames
        self.pad_value = pad_value
        self._ring = torch.empty(2 * max_length, num_mel_bins)
        self.reset()

    def reset(self, first_sample: int = 0) -> None:
        """Start afresh; the next frame begins at stream sample ``first_sample``."""
        self.first_sample = first_sample
        self.frames_total = 0
        self.windows_emitted = 0

    def _next_due(self) -> int:
        """Frame count at which the next window is complete."""
        return self.max_length + self.windows_emitted * self.hop_frames

    def push(self, frames: torch.Tensor, clock: Clock | None = None) -> list[Window]:
        """Store new frames; return the windows they complete, oldest first.

        ``clock(sample)`` gives the wall-clock time of a stream sample, when known.
        """
        windows: list[Window] = []
        done = 0
        n = frames.shape[0]
        while done < n:
            take = min(n - done, self._next_due() - self.frames_total, self.max_length)
            self._store(frames[done:done + take])
            done += take
            if self.frames_total == self._next_due():
                windows.append(self._emit(clock))
        return windows

    def _store(self, frames: torch.Tensor) -> None:
        k = frames.shape[0]
        pos = self.frames_total % self.max_length
        first = min(k, self.max_length - pos)
        for offset in (0, self.max_length):
            self._ring[offset + pos:offset + pos + first] = frames[:first]
            if k > first:
                self._ring[offset:offset + k - first] = frames[first:]
        self.frames_total += k

    def _emit(self, clock: Clock | None) -> Window:
        start = self.first_sample + (self.frames_total - self.max_length) * FRAME_SHIFT
        pos = self.frames_total % self.max_length
        self.windows_emitted += 1
        return Window(
            stream=self.stream,
            start_sample=start,
            features=self._ring[pos:pos + self.max_length].clone(),
            frames=self.max_length,
            wall_time=clock(start + window_samples(self.max_length) - 1) if clock else None,
        )

    def finish(self) -> list[Window]:
        """End of stream: a stream too short for one window yields one padded window at 0."""
        if self.windows_emitted or self.frames_total >= self.max_length:
            return []
        features = torch.full_like(self._ring[: self.max_length], self.pad_value)
        features[: self.frames_total] = self._ring[: self.frames_total]
        self.windows_emitted += 1
        return [Window(self.stream, self.first_sample, features, self.frames_total)]


class StreamWindows:
    """One stream's whole path from samples to windows: incremental frontend + scheduler.

    Samples are placed on the stream's timeline: ``push`` takes the position of its first
    sample, and a gap (audio lost to an overrun, a source restart) restarts the frontend
    and the window at the new position, so every window's ``start_sample`` stays exact.
    """

    def __init__(self, stream: str, features: FeatureConfig, hop_frames: int) -> None:
        self.frontend = Frontend(features)
        self.scheduler = WindowScheduler(
            stream, features.max_length, features.num_mel_bins, hop_frames, pad_value(features)
        )
        self.gaps = 0
        self._next = 0

    def push(self, samples: np.ndarray, position: int | None = None, clock: Clock | None = None) -> list[Window]:
        windows: list[Window] = []
        if position is not None and position != self._next:
            windows = self.scheduler.finish()  # a stream cut short still gets its padded window
            self.gaps += 1
            self.reset(position)
        self._next += len(samples)
        return windows + self.scheduler.push(self.frontend.push(samples), clock)

    def finish(self) -> list[Window]:
        return self.scheduler.finish()

    def reset(self, position: int = 0) -> None:
        self.frontend.reset()
        self.scheduler.reset(position)
        self._next = position

"""The sliding window: every ``hop`` frames, the last ``max_length`` frames of a stream.

Frames go into a preallocated ring stored twice over (the classic mirrored ring), so
every window is one contiguous slice, copied once when it is emitted. Start-up policy:
**wait** — the first window is emitted when ``max_length`` frames (10.24 s for AudioSet
models) exist; a stream that ends before that yields one window at sample 0, right-padded
with padding frames exactly as the reference pads a short clip. Offline detection and the
live daemon share this class, so both see the same windows at the same sample positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from streamer.frontend import FRAME_SHIFT, Frontend, pad_value
from streamer.model.config import FeatureConfig


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

    def reset(self) -> None:
        self.frames_total = 0
        self.windows_emitted = 0

    def _next_due(self) -> int:
        """Frame count at which the next window is complete."""
        return self.max_length + self.windows_emitted * self.hop_frames

    def push(self, frames: torch.Tensor, wall_time: float | None = None) -> list[Window]:
        """Store new frames; return the windows they complete, oldest first."""
        windows: list[Window] = []
        done = 0
        n = frames.shape[0]
        while done < n:
            take = min(n - done, self._next_due() - self.frames_total, self.max_length)
            self._store(frames[done:done + take])
            done += take
            if self.frames_total == self._next_due():
                windows.append(self._emit(wall_time))
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

    def _emit(self, wall_time: float | None) -> Window:
        start_frame = self.frames_total - self.max_length
        pos = self.frames_total % self.max_length
        self.windows_emitted += 1
        return Window(
            stream=self.stream,
            start_sample=start_frame * FRAME_SHIFT,
            features=self._ring[pos:pos + self.max_length].clone(),
            frames=self.max_length,
            wall_time=wall_time,
        )

    def finish(self) -> list[Window]:
        """End of stream: a stream too short for one window yields one padded window at 0."""
        if self.windows_emitted or self.frames_total >= self.max_length:
            return []
        features = torch.full_like(self._ring[: self.max_length], self.pad_value)
        features[: self.frames_total] = self._ring[: self.frames_total]
        self.windows_emitted += 1
        return [Window(self.stream, 0, features, self.frames_total)]


class StreamWindows:
    """One stream's whole path from samples to windows: incremental frontend + scheduler."""

    def __init__(self, stream: str, features: FeatureConfig, hop_frames: int) -> None:
        self.frontend = Frontend(features)
        self.scheduler = WindowScheduler(
            stream, features.max_length, features.num_mel_bins, hop_frames, pad_value(features)
        )

    def push(self, samples: np.ndarray, wall_time: float | None = None) -> list[Window]:
        return self.scheduler.push(self.frontend.push(samples), wall_time)

    def finish(self) -> list[Window]:
        return self.scheduler.finish()

    def reset(self) -> None:
        self.frontend.reset()
        self.scheduler.reset()

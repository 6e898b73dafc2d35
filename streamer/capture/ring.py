"""A preallocated single-producer / single-consumer ring of float32 audio.

Every sample has a position on its stream's timeline (a monotonic counter from the first
sample), so windows, scores and events can be placed exactly. The writer never blocks
(a producer that must lose nothing, such as a file read as fast as the pipeline goes,
writes only what ``room()`` allows and sets ``on_space`` to be woken by the reader; a
blocking ``write`` remains for simple callers) and never allocates: it copies into the preallocated array and then publishes the
new write position. When the reader falls behind by more than the capacity, the oldest
audio is overwritten and the loss is counted by the reader, never silent.

The positions are plain Python ints whose assignment is atomic under the GIL: the writer
only ever moves ``written`` forward and the reader only ``read``, which is all an SPSC ring
needs. A reader whose copy raced with an overwrite detects it afterwards and drops (and
counts) the samples that may have been torn.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np


class RingBuffer:
    """``capacity`` frames of ``channels`` float32 samples, with positions and a wall clock."""

    def __init__(self, capacity: int, channels: int = 1) -> None:
        if capacity < 1 or channels < 1:
            raise ValueError(f"ring capacity and channels must be positive, got {capacity}, {channels}")
        self.capacity = capacity
        self.channels = channels
        self._data = np.zeros((capacity, channels), dtype=np.float32)
        self.written = 0  # frames ever written (the next frame's position)
        self.read_pos = 0  # frames ever consumed or lost
        self.lost = 0  # frames overwritten before the reader got them
        # (position just past the last written frame, wall-clock time of that frame's end);
        # replaced as a whole, so a reader always sees a consistent pair
        self._anchor: tuple[int, float] | None = None
        self._space = threading.Event()
        self._writing_to = 0  # end position of the write in progress (== written when idle)
        # called (on the reader's thread, after ``read_pos`` moved) by every read while set:
        # a producer that waits for room (a lossless source in the ingest loop) sets it to
        # be woken instead of polling, and clears it itself; it must be cheap
        self.on_space: Callable[[], None] | None = None

    def write(self, frames: np.ndarray, wall_end: float | None = None, block: bool = False, timeout: float | None = None) -> int:
        """Append ``frames`` (``(n,)`` or ``(n, channels)``); return how many were written.

        With ``block`` the writer waits until the reader has made room (for sources that
        may wait); otherwise the oldest unread audio is overwritten.
        """
        data = frames.reshape(-1, self.channels) if frames.ndim == 1 else frames
        n = data.shape[0]
        if block and n > self.capacity:  # a waiting writer loses nothing: hand it over in pieces
            done = 0
            while done < n:
                step = self.write(data[done:done + self.capacity], wall_end if done + self.capacity >= n else None, True, timeout)
                if step == 0:
                    return done
                done += step
            return done
        if block:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self.written + min(n, self.capacity) - self.read_pos > self.capacity:
                self._space.clear()
                if self.written + min(n, self.capacity) - self.read_pos <= self.capacity:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return 0
                self._space.wait(remaining if remaining is not None else 0.1)
        if n > self.capacity:  # only the newest capacity frames can be kept
            self.written += n - self.capacity
            self._writing_to = self.written
            data = data[n - self.capacity:]
            n = self.capacity
        self._writing_to = self.written + n  # published before the copy, for the reader's torn check
        start = self.written % self.capacity
        first = min(n, self.capacity - start)
        self._data[start:start + first] = data[:first]
        if n > first:
            self._data[: n - first] = data[first:]
        self.written += n
        if wall_end is not None:
            self._anchor = (self.written, wall_end)
        return n

    def room(self) -> int:
        """Frames that can be written now without overwriting unread audio."""
        return max(0, self.capacity - (self.written - self.read_pos))

    def available(self) -> int:
        return min(self.written - self.read_pos, self.capacity)

    def read(self, max_frames: int | None = None) -> tuple[int, np.ndarray]:
        """Take the unread frames (at most ``max_frames``): ``(position of the first, frames)``.

        Frames lost to overruns are skipped and added to ``lost``.
        """
        written = self.written
        if written - self.read_pos > self.capacity:
            self.lost += written - self.capacity - self.read_pos
            self.read_pos = written - self.capacity
        count = written - self.read_pos
        if max_frames is not None:
            count = min(count, max_frames)
        start_pos = self.read_pos
        out = self._copy_out(start_pos, count)
        # the writer may have lapped us during the copy, or be writing over our start right
        # now (its ``written`` not yet moved): drop what could be torn
        torn = self._writing_to - self.capacity - start_pos
        if torn > 0:
            torn = min(torn, count)
            self.lost += torn
            out = out[torn:]
            start_pos += torn
        self.read_pos = start_pos + out.shape[0]
        self._space.set()
        hook = self.on_space
        if hook is not None and count:
            hook()
        return start_pos, (out[:, 0] if self.channels == 1 else out)

    def _copy_out(self, position: int, count: int) -> np.ndarray:
        """``count`` frames from ``position`` on, unwrapped into a new ``(count, channels)`` array."""
        start = position % self.capacity
        first = min(count, self.capacity - start)
        out = np.empty((count, self.channels), dtype=np.float32)
        out[:first] = self._data[start:start + first]
        if count > first:
            out[first:] = self._data[: count - first]
        return out

    def wall_time(self, position: int, rate: float) -> float | None:
        """Wall-clock time of the sample at ``position``, from the newest anchor."""
        anchor = self._anchor
        if anchor is None:
            return None
        end, wall = anchor
        return wall - (end - 1 - position) / rate

    def copy(self, start: int, end: int) -> np.ndarray | None:
        """Frames ``[start, end)`` still in the ring (without consuming them), or None if gone.

        ``end`` is clipped to what has been written.
        """
        end = min(end, self.written)
        if start >= end:
            return np.zeros((0,) if self.channels == 1 else (0, self.channels), dtype=np.float32)
        if start < self._writing_to - self.capacity:
            return None
        out = self._copy_out(start, end - start)
        if start < self._writing_to - self.capacity:  # overwritten while we copied
            return None
        return out[:, 0] if self.channels == 1 else out

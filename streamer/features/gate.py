"""The silence gate: do not score a window in which nothing reaches ``detect.min_level_dbfs``.

A quiet room is most of a home microphone's day, and a window of near-silence costs as
much to score as one with a sound in it. The gate keeps, per stream, the peak level of
every 100 ms block of samples (:class:`BlockLevels`, computed as samples arrive, in
bounded memory); when a window is due, its loudest block decides: below the level, the
window is not scored and the smoother takes it as silence (every score 0).

Nothing audible may be skipped, so the gate errs towards scoring: a window's level is the
peak of every block that *overlaps* its span (a block straddling the window's edge counts
in full), it is the sample peak (not an average), and a span whose blocks are no longer
(or not yet) known counts as full scale. Hence ``loudest(span) >= 20·log10(max |sample|)``
over the span, always.
"""

from __future__ import annotations

import math

import numpy as np

SAMPLE_RATE = 16000
BLOCK_SECONDS = 0.1
BLOCK_SAMPLES = int(SAMPLE_RATE * BLOCK_SECONDS)  # 1600
KEEP_SECONDS = 30.0  # blocks remembered: a 10.24 s window plus generous lag of the scorer
SILENCE_DBFS = -150.0  # the level of digital silence (keeps numbers finite)
FULL_SCALE_DBFS = 0.0


def dbfs(peak: float) -> float:
    """A linear sample peak (1.0 = full scale) in dBFS, floored at :data:`SILENCE_DBFS`."""
    if not peak > 0:  # 0 (and never NaN here: NaN blocks are stored as full scale)
        return SILENCE_DBFS
    return max(SILENCE_DBFS, 20.0 * math.log10(peak))


def gated(level_dbfs: float, min_level_dbfs: float | None) -> bool:
    """True when a window at ``level_dbfs`` is not to be scored (``None`` = gate off)."""
    return min_level_dbfs is not None and level_dbfs < min_level_dbfs


class BlockLevels:
    """Peak level of each 100 ms block of one stream, pushed incrementally, last ``keep_seconds`` kept.

    Sample ``i`` of the stream (counting from ``first_sample``) falls in block
    ``i // block_samples``; blocks are aligned to sample 0 of the stream.
    """

    def __init__(self, first_sample: int = 0, block_samples: int = BLOCK_SAMPLES,
                 keep_seconds: float = KEEP_SECONDS, sample_rate: int = SAMPLE_RATE) -> None:
        if block_samples < 1:
            raise ValueError(f"block_samples must be >= 1, got {block_samples}")
        self.block_samples = block_samples
        self.capacity = max(2, math.ceil(keep_seconds * sample_rate / block_samples))
        self._peaks = np.zeros(self.capacity, dtype=np.float32)
        self.reset(first_sample)

    def reset(self, first_sample: int = 0) -> None:
        """Forget everything; the next pushed sample is stream sample ``first_sample``."""
        self.next_sample = first_sample
        self._partial_peak = 0.0  # peak of the samples already seen in the block being filled
        self._first_block = first_sample // self.block_samples  # oldest block still known
        self._peaks[:] = 0.0

    def push(self, samples: np.ndarray) -> None:
        """Add the stream's next samples (float, 1.0 = full scale; NaN counts as full scale)."""
        x = np.abs(np.asarray(samples, dtype=np.float32).reshape(-1))
        if not x.size:
            return
        b = self.block_samples
        pos = 0
        offset = self.next_sample % b
        if offset:  # finish the block being filled
            take = min(b - offset, x.size)
            self._partial_peak = max(self._partial_peak, _peak(x[:take]))
            pos = take
            if offset + take == b:
                self._store(self.next_sample // b, self._partial_peak)
                self._partial_peak = 0.0
        full = (x.size - pos) // b
        if full:
            peaks = x[pos:pos + full * b].reshape(full, b).max(axis=1)
            peaks[np.isnan(peaks)] = 1.0
            first = (self.next_sample + pos) // b
            for k in range(max(0, full - self.capacity), full):  # only the last `capacity` are kept anyway
                self._store(first + k, float(peaks[k]))
            pos += full * b
        if pos < x.size:  # the start of a new block
            self._partial_peak = _peak(x[pos:])
        self.next_sample += x.size

    def _store(self, block: int, peak: float) -> None:
        self._peaks[block % self.capacity] = peak
        self._first_block = max(self._first_block, block - self.capacity + 1)

    def loudest(self, start_sample: int, end_sample: int) -> float:
        """Peak level in dBFS of the blocks overlapping samples ``[start_sample, end_sample)``.

        Blocks not known (forgotten, or not pushed yet) count as full scale, so a window
        is never gated on what the gate has not seen.
        """
        if end_sample <= start_sample:
            raise ValueError(f"empty span [{start_sample}, {end_sample})")
        b = self.block_samples
        first, last = start_sample // b, (end_sample - 1) // b
        done = self.next_sample // b  # blocks before this one are complete
        if first < self._first_block or last > done or (last == done and end_sample > self.next_sample):
            return FULL_SCALE_DBFS
        peak = self._partial_peak if last == done else 0.0
        complete_last = min(last, done - 1)
        if complete_last >= first:
            idx = np.arange(first, complete_last + 1) % self.capacity
            peak = max(peak, float(self._peaks[idx].max()))
        return dbfs(peak)


def _peak(x: np.ndarray) -> float:
    peak = float(x.max())
    return 1.0 if math.isnan(peak) else peak


class WindowGate:
    """The gate for every stream of a pipeline: feed it samples, ask it about windows.

    One :class:`BlockLevels` per stream; :meth:`admit` says whether a window is to be
    scored and counts the ones that are not (``gated[stream]``), so that the pipeline
    only has to skip them, publish the count (``streamer_windows_gated``) and hand the
    smoother all-zero scores. ``min_level_dbfs`` may change at any time (a reload);
    ``None`` turns the gate off (every window admitted, nothing counted). Called from one
    thread (the ingest/frontend thread that also makes the windows): no locking.
    """

    def __init__(self, min_level_dbfs: float | None = None, keep_seconds: float = KEEP_SECONDS) -> None:
        self.min_level_dbfs = min_level_dbfs
        self.keep_seconds = keep_seconds
        self._levels: dict[str, BlockLevels] = {}
        self.gated: dict[str, int] = {}
        self.admitted: dict[str, int] = {}

    def _stream(self, stream: str) -> BlockLevels:
        levels = self._levels.get(stream)
        if levels is None:
            levels = self._levels[stream] = BlockLevels(keep_seconds=self.keep_seconds)
            self.gated.setdefault(stream, 0)
            self.admitted.setdefault(stream, 0)
        return levels

    def push(self, stream: str, samples: np.ndarray) -> None:
        """The stream's next 16 kHz mono samples: the same ones its frontend gets."""
        self._stream(stream).push(samples)

    def reset(self, stream: str, first_sample: int = 0) -> None:
        """The stream restarts (as its window scheduler does) at ``first_sample``."""
        self._stream(stream).reset(first_sample)

    def remove(self, stream: str) -> None:
        self._levels.pop(stream, None)

    def level(self, stream: str, start_sample: int, samples: int) -> float:
        """Loudest 100 ms block (dBFS) over ``samples`` samples from ``start_sample``."""
        return self._stream(stream).loudest(start_sample, start_sample + max(1, samples))

    def admit(self, window) -> bool:
        """Whether to score ``window`` (a :class:`streamer.features.windows.Window`); counts it.

        Its span is its real frames' samples (a short, padded last window is judged on
        the audio it holds).
        """
        from streamer.features.fbank import window_samples

        if self.min_level_dbfs is None:
            return True
        level = self.level(window.stream, window.start_sample, window_samples(max(1, window.frames)))
        if gated(level, self.min_level_dbfs):
            self.gated[window.stream] = self.gated.get(window.stream, 0) + 1
            return False
        self.admitted[window.stream] = self.admitted.get(window.stream, 0) + 1
        return True

"""A streaming polyphase resampler whose chunked output equals whole-signal resampling.

It uses the windowed-sinc kernel of ``torchaudio.functional.resample`` (Hann-squared
window, ``lowpass_filter_width`` 6, rolloff 0.99), so a file resampled offline and the
same audio resampled live, block by block, give the same samples: the state carried
between calls is only the input that the next outputs still need.
"""

from __future__ import annotations

import math

import numpy as np

LOWPASS_FILTER_WIDTH = 6
ROLLOFF = 0.99


def _kernel(orig: int, new: int) -> tuple[np.ndarray, int]:
    """Polyphase filter bank (``new`` phases × taps) and the half-width in input samples."""
    base = min(orig, new) * ROLLOFF
    width = math.ceil(LOWPASS_FILTER_WIDTH * orig / base)
    idx = np.arange(-width, width + orig, dtype=np.float64) / orig
    t = (-np.arange(new, dtype=np.float64)[:, None] / new + idx[None, :]) * base
    t = np.clip(t, -LOWPASS_FILTER_WIDTH, LOWPASS_FILTER_WIDTH)
    window = np.cos(t * math.pi / LOWPASS_FILTER_WIDTH / 2) ** 2
    t *= math.pi
    sinc = np.where(t == 0, 1.0, np.sin(t) / np.where(t == 0, 1.0, t))
    return (sinc * window * base / orig).astype(np.float32), width


class StreamingResampler:
    """Resample mono float32 audio from ``orig_rate`` to ``new_rate`` in any chunk sizes.

    ``process`` returns every output sample whose inputs have all arrived; ``flush`` pads
    the end with zeros and returns the rest, so that the concatenation of all outputs is
    exactly ``resample(whole_signal)`` (``ceil(n * new / orig)`` samples).
    """

    def __init__(self, orig_rate: int, new_rate: int) -> None:
        if orig_rate <= 0 or new_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {orig_rate} → {new_rate}")
        g = math.gcd(orig_rate, new_rate)
        self.orig, self.new = orig_rate // g, new_rate // g
        self.passthrough = self.orig == self.new
        if not self.passthrough:
            kernel, self.width = _kernel(self.orig, self.new)
            self._kernel_t = np.ascontiguousarray(kernel.T)  # (taps, phases)
            self._taps = kernel.shape[1]
        self.reset()

    def reset(self) -> None:
        """Forget all input, as if newly made."""
        self._pending = np.zeros(0 if self.passthrough else self.width, dtype=np.float32)
        self._received = 0
        self._emitted = 0

    def _run(self, buffer: np.ndarray, blocks: int) -> np.ndarray:
        frames = np.lib.stride_tricks.as_strided(
            buffer, shape=(blocks, self._taps), strides=(buffer.strides[0] * self.orig, buffer.strides[0])
        )
        return (frames @ self._kernel_t).reshape(-1)

    def process(self, chunk: np.ndarray) -> np.ndarray:
        chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
        if self.passthrough:
            self._received += chunk.size
            self._emitted += chunk.size
            return chunk
        buffer = np.concatenate((self._pending, chunk))
        self._received += chunk.size
        blocks = max(0, (buffer.size - self._taps) // self.orig + 1)
        out = self._run(buffer, blocks) if blocks else np.zeros(0, dtype=np.float32)
        self._pending = buffer[blocks * self.orig:]
        self._emitted += out.size
        return out

    def flush(self) -> np.ndarray:
        """Zero-pad the end of the signal and return the remaining output samples."""
        if self.passthrough:
            return np.zeros(0, dtype=np.float32)
        total = -(-self._received * self.new // self.orig)
        remaining = total - self._emitted
        if remaining <= 0:
            return np.zeros(0, dtype=np.float32)
        blocks = -(-remaining // self.new)
        buffer = np.concatenate((self._pending, np.zeros(blocks * self.orig + self._taps, dtype=np.float32)))
        out = self._run(buffer, blocks)[:remaining]
        self._pending = np.zeros(self.width, dtype=np.float32)
        self._received = self._emitted = 0
        return out


def resample(signal: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Resample a whole mono signal; the same numbers as streaming it through in pieces."""
    resampler = StreamingResampler(orig_rate, new_rate)
    return np.concatenate((resampler.process(signal), resampler.flush()))

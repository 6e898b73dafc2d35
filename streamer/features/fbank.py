"""The AST frontend: Kaldi log-mel filterbanks exactly as ``ASTFeatureExtractor`` makes them.

``torchaudio.compliance.kaldi.fbank`` with a Hanning window, 25 ms frames every 10 ms,
no dither and ``snip_edges`` — so each frame depends on its own 400 samples only. That is
what lets :class:`Frontend` work incrementally: it computes just the frames that newly
arrived audio completes, and a stream's frames equal the offline features of the same
samples. Frames are normalised with the checkpoint's mean/std as ``(x - mean) / (2 std)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torchaudio.compliance.kaldi as kaldi

from streamer.constants import SAMPLE_RATE_HZ
from streamer.model.config import FeatureConfig

FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
FRAME_LENGTH = int(SAMPLE_RATE_HZ * FRAME_LENGTH_MS / 1000)  # 400 samples
FRAME_SHIFT = int(SAMPLE_RATE_HZ * FRAME_SHIFT_MS / 1000)  # 160 samples
WINDOW_TYPE = "hanning"


def window_samples(frames: int) -> int:
    """Samples that ``frames`` consecutive frames cover (1024 frames → 164 080)."""
    return (frames - 1) * FRAME_SHIFT + FRAME_LENGTH


PREEMPHASIS = 0.97
FFT_SIZE = 512  # the frame rounded up to a power of two, as Kaldi does
FFT_MIN_ROWS = 64  # the smallest batch of frames the GPU frontend transforms (see fft_rows)
# Kaldi's constants for these settings, computed once instead of on every call
_WINDOW = torch.hann_window(FRAME_LENGTH, periodic=False)
_MEL_BANKS: dict[int, torch.Tensor] = {}
_LOG_FLOOR = float(kaldi.EPSILON)  # Kaldi's floor before the log, as a number: the same on any device


def _mel_matrix(num_mel_bins: int) -> torch.Tensor:
    """Kaldi's triangular mel filters as a ``(FFT_SIZE // 2 + 1, bins)`` matrix (cached)."""
    if num_mel_bins not in _MEL_BANKS:
        banks, _ = kaldi.get_mel_banks(num_mel_bins, FFT_SIZE, float(SAMPLE_RATE_HZ), 20.0, 0.0, 100.0, -500.0, 1.0)
        _MEL_BANKS[num_mel_bins] = torch.nn.functional.pad(banks, (0, 1)).T.contiguous()
    return _MEL_BANKS[num_mel_bins]


def log_mel(samples: np.ndarray | torch.Tensor, num_mel_bins: int) -> torch.Tensor:
    """Raw Kaldi log-mel frames ``(n_frames, num_mel_bins)`` of 16 kHz mono samples.

    The arithmetic of ``torchaudio.compliance.kaldi.fbank`` with this module's settings
    (hanning window, 25/10 ms, no dither, DC removal, pre-emphasis 0.97, power spectrum,
    log with Kaldi's floor), equal to it within float rounding (the tests check 1e-5), but
    with the window and the mel matrix built once, the power taken as re² + im² instead of
    |z|², and without fbank's unused energy term: a live stream pays for each of these on
    every hop. Fewer than 400 samples make no frame.
    """
    waveform = torch.as_tensor(samples, dtype=torch.float32).reshape(-1)
    if waveform.shape[0] < FRAME_LENGTH:
        return torch.zeros(0, num_mel_bins)
    count = (waveform.shape[0] - FRAME_LENGTH) // FRAME_SHIFT + 1
    frames = waveform.as_strided((count, FRAME_LENGTH), (FRAME_SHIFT, 1))
    return log_mel_frames(frames, _WINDOW, _mel_matrix(num_mel_bins))


def fft_rows(count: int) -> int:
    """``count`` rounded up to one of four sizes per octave (1, 1.25, 1.5, 1.75 × 2^k; at least 64).

    cuFFT makes a plan for every batch size it sees, synchronously, in milliseconds; the
    pipeline's frame count changed at every feed, so most of the scoring thread's time went
    into plans (28 % at 1500 streams). Padded to these sizes, a few dozen plans serve every
    count, at most 25 % of padding rows."""
    if count <= FFT_MIN_ROWS:
        return FFT_MIN_ROWS
    octave = 1 << (count.bit_length() - 1)
    step = max(1, octave // 4)
    return -(-count // step) * step


def log_mel_frames(frames: torch.Tensor, window: torch.Tensor, mel: torch.Tensor) -> torch.Tensor:
    """Kaldi log-mel of framed audio ``(n, 400)`` → ``(n, bins)``, on whatever device they are.

    The one place the filterbank arithmetic lives: :func:`log_mel` (one stream, on the
    CPU) and the pipeline's batched frontend (every stream's new frames in one call, on the
    model's device) both use it, so live frames equal offline ones.
    """
    if frames.is_cuda and frames.dtype == torch.float32:  # cuFFT's float32 rounding differs from the CPU's: compute in float64 there, so
        # the GPU frames equal the CPU reference to float32 rounding (a few GFLOP/s even for 1000s of streams)
        count = frames.shape[0]
        rows = fft_rows(count)  # a cuFFT plan per distinct row count: a few sizes, so plans are reused
        padded = torch.zeros((rows, frames.shape[1]), dtype=torch.float64, device=frames.device)
        padded[:count] = frames
        return log_mel_frames(padded, window.double(), mel.double())[:count].float()
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat((frames[:, :1], frames[:, :-1]), dim=1)  # Kaldi replicates the first sample
    frames = (frames - PREEMPHASIS * previous).mul_(window)
    spectrum = torch.fft.rfft(frames, n=FFT_SIZE)
    power = spectrum.real.square() + spectrum.imag.square()  # |z|² without fbank's sqrt-then-square
    return torch.mm(power, mel).clamp_min_(_LOG_FLOOR).log_()


def filterbank_constants(num_mel_bins: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The analysis window and the mel matrix, on ``device`` (for :func:`log_mel_frames`)."""
    return _WINDOW.to(device), _mel_matrix(num_mel_bins).to(device)


def normalise(frames: torch.Tensor, features: FeatureConfig) -> torch.Tensor:
    """``(x - mean) / (2 std)``, as ASTFeatureExtractor normalises; in place."""
    if not features.do_normalize:
        return frames
    return frames.sub_(features.mean).div_(features.std * 2)


def pad_value(features: FeatureConfig) -> float:
    """What a zero (padding) frame becomes after normalisation, as in the reference."""
    return float(normalise(torch.zeros(1), features))  # a fresh tensor: in place is fine


def clip_features(samples: np.ndarray, features: FeatureConfig) -> torch.Tensor:
    """One model input from one clip: frames right-padded with zero frames or cut to ``max_length``.

    The single-clip equivalent of ``ASTFeatureExtractor(samples)``, for short clips.
    """
    frames = log_mel(np.asarray(samples[: window_samples(features.max_length)]), features.num_mel_bins)
    out = torch.full((features.max_length, features.num_mel_bins), pad_value(features))
    out[: frames.shape[0]] = normalise(frames, features)
    return out


class Frontend:
    """Incremental frontend for one stream: push samples in any chunk sizes, get new frames.

    Keeps only the < 400 samples that the next frame still needs, so state is bounded.
    ``frames_done`` counts frames emitted; frame ``i`` starts at sample ``i * 160`` of the
    stream.
    """

    def __init__(self, features: FeatureConfig) -> None:
        self.features = features
        self.reset()

    def reset(self) -> None:
        self._tail = np.zeros(0, dtype=np.float32)
        self.frames_done = 0
        self.samples_seen = 0
        self.nonfinite_samples = 0

    def push(self, samples: np.ndarray) -> torch.Tensor:
        """Normalised frames completed by ``samples`` (possibly none): ``(k, num_mel_bins)``."""
        chunk = np.asarray(samples, dtype=np.float32).reshape(-1)
        self.samples_seen += chunk.size
        if not np.isfinite(chunk).all():  # NaN/inf would poison every frame they touch
            bad = ~np.isfinite(chunk)
            self.nonfinite_samples += int(bad.sum())
            chunk = np.where(bad, np.float32(0.0), chunk)
        buffer = np.concatenate((self._tail, chunk)) if self._tail.size else chunk
        if buffer.size < FRAME_LENGTH:
            self._tail = buffer.copy()
            return torch.zeros(0, self.features.num_mel_bins)
        count = (buffer.size - FRAME_LENGTH) // FRAME_SHIFT + 1
        used = (count - 1) * FRAME_SHIFT + FRAME_LENGTH
        frames = log_mel(buffer[:used], self.features.num_mel_bins)
        self._tail = buffer[count * FRAME_SHIFT:].copy()
        self.frames_done += count
        return normalise(frames, self.features)


LEVEL_FLOOR_DBFS = -90.0


def dbfs(samples: np.ndarray) -> float:
    """RMS level in dB relative to full scale (floored for silence)."""
    if len(samples) == 0:
        return LEVEL_FLOOR_DBFS
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    return max(LEVEL_FLOOR_DBFS, 20 * np.log10(rms)) if rms > 0 else LEVEL_FLOOR_DBFS

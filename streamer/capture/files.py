"""Decoding audio files (wav, flac, ogg, … whatever libsndfile reads) to 16 kHz mono.

Files are read in blocks, downmixed to mono and resampled by the streaming resampler, so
a long recording never has to fit in memory and the samples equal those of a live stream
of the same audio.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import soundfile as sf

from streamer.capture.resample import StreamingResampler
from streamer.errors import AudioError
from streamer.constants import SAMPLE_RATE_HZ

log = logging.getLogger(__name__)

BLOCK_SECONDS = 10.0
MIN_RATE_HZ, MAX_RATE_HZ = 1000, 768_000  # sample rates real recordings have
# the exact polyphase resampler needs 16000 / gcd(rate, 16000) phases: 160 for 44.1 kHz, 640
# for 11.025 kHz, 2000 for an odd 44.056 kHz; a rate field damaged into 15947 Hz would need 16000
MAX_RESAMPLE_PHASES = 2000
# libsndfile's header dump of a WAV whose data chunk promises more than the file holds
_CUT_SHORT = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_UNKNOWN_LENGTH = (0, 0xFFFFFFFF)  # what a writer that streams (ffmpeg to a pipe) puts there: not a promise
_cut_short_said: set[tuple[str, int]] = set()  # (path, size): said once a process, though a command opens a file twice and a source loops
MAX_CHANNELS = 64
MAX_ABS_SAMPLE = 100.0  # full scale is 1.0; beyond this a float sample is damage, not audio


def sanitise(samples: np.ndarray) -> tuple[np.ndarray, int]:
    """Samples made safe for the frontend, and how many had to change.

    NaN/inf become 0 and absurd magnitudes (a damaged float file: 1e30 would overflow the
    power spectrum to inf) are clipped to ``MAX_ABS_SAMPLE``; ordinary audio, clipped at
    full scale or not, passes unchanged and uncopied.
    """
    bad = ~np.isfinite(samples) | (np.abs(samples) > MAX_ABS_SAMPLE)
    if not bad.any():
        return samples, 0
    fixed = np.clip(np.where(np.isfinite(samples), samples, np.float32(0)), -MAX_ABS_SAMPLE, MAX_ABS_SAMPLE).astype(np.float32)
    return fixed, int(bad.sum())


def _open(path: Path) -> sf.SoundFile:
    try:
        path.stat()
    except (OSError, ValueError) as exc:  # libsndfile would say only "System error." for a loop or a permission
        why = "no such file" if isinstance(exc, FileNotFoundError) else getattr(exc, "strerror", None) or str(exc)
        raise AudioError(f"{path}: {why}") from None
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, not an audio file")
    if not path.is_file():  # a FIFO is opened twice (info, then decoding) and would block for ever; a device never ends
        raise AudioError(f"{path}: not a regular file (a pipe or a device); save the audio to a file, or stream it "
                         f"with an ffmpeg source (type: ffmpeg)")
    try:
        with open(path, "rb"):  # a permission problem named as one
            pass
    except OSError as exc:
        raise AudioError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        f = sf.SoundFile(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError, TypeError, ValueError) as exc:
        raise AudioError(f"{path}: cannot decode audio ({' '.join(str(exc).split())[:160]})") from None
    try:
        _check_header(path, f)
    except BaseException:
        f.close()
        raise
    return f


def _check_header(path: Path, f: sf.SoundFile) -> None:
    """Refuse a header no recording has; one that promises more audio than the file holds
    (a copy or a recording cut off) is read for what it holds, and said once."""
    if not MIN_RATE_HZ <= f.samplerate <= MAX_RATE_HZ or not 1 <= f.channels <= MAX_CHANNELS:
        # a damaged header: 7 Hz would mean resampling each sample into thousands
        raise AudioError(f"{path}: invalid header ({f.samplerate} Hz, {f.channels} channels; expected "
                         f"{MIN_RATE_HZ}–{MAX_RATE_HZ} Hz, 1–{MAX_CHANNELS} channels)")
    if SAMPLE_RATE_HZ // math.gcd(f.samplerate, SAMPLE_RATE_HZ) > MAX_RESAMPLE_PHASES:
        # a damaged rate field (15947 Hz) would take minutes to convert
        raise AudioError(f"{path}: an unusual sample rate ({f.samplerate} Hz) that is very costly to convert "
                         f"exactly; convert the file first (ffmpeg -i IN -ar 16000 OUT.wav)")
    cut = _CUT_SHORT.search(f.extra_info or "")
    if cut and int(cut.group(1)) not in _UNKNOWN_LENGTH and int(cut.group(2)) < int(cut.group(1)):
        promised, held = int(cut.group(1)), int(cut.group(2))
        bytes_per_s = max(1, f.samplerate * f.channels * _bytes_per_sample(f))
        key = (str(path), held)
        if key in _cut_short_said:
            return
        _cut_short_said.add(key)
        log.warning("%s: cut short: its header promises %.2f s, the file holds %.2f s; reading what it holds",
                    path, promised / bytes_per_s, held / bytes_per_s)


def _bytes_per_sample(f: sf.SoundFile) -> int:
    """Bytes per sample of an uncompressed subtype (PCM_16 → 2); 1 where it is not known."""
    digits = re.search(r"(\d+)$", f.subtype or "")
    return int(digits.group(1)) // 8 if digits and int(digits.group(1)) >= 8 else {"FLOAT": 4, "DOUBLE": 8}.get(f.subtype, 1)


def audio_info(path: Path) -> tuple[int, int, int]:
    """(sample rate, channels, frames) of an audio file."""
    with _open(Path(path)) as f:
        return f.samplerate, f.channels, f.frames


def to_mono(block: np.ndarray) -> np.ndarray:
    """Average the channels of a ``(frames, channels)`` block."""
    return block[:, 0].copy() if block.shape[1] == 1 else block.mean(axis=1, dtype=np.float32)


def iter_audio(path: str | Path, block_seconds: float = BLOCK_SECONDS,
               on_damaged: Callable[[int], None] | None = None) -> Iterator[np.ndarray]:
    """Yield the file's audio as 16 kHz mono float32 blocks, in order.

    Damaged samples (see :func:`sanitise`) are fixed before resampling, so that they do not
    spread; ``on_damaged`` receives their count per block, else one warning is logged.
    """
    path = Path(path)
    with _open(path) as f:
        resampler = StreamingResampler(f.samplerate, SAMPLE_RATE_HZ)
        block_frames = max(1, int(block_seconds * f.samplerate))
        damaged = 0
        try:
            while True:
                block = f.read(block_frames, dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    break
                mono, bad = sanitise(to_mono(block))
                damaged += bad
                if bad and on_damaged:
                    on_damaged(bad)
                out = resampler.process(mono)
                if out.size:
                    yield out
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise AudioError(f"{path}: decoding failed part way ({' '.join(str(exc).split())[:160]})") from None
        tail = resampler.flush()
        if tail.size:
            yield tail
        if damaged and not on_damaged:
            log.warning("%s: %d samples were NaN, inf or absurdly large; replaced", path, damaged)


def read_audio(path: str | Path, on_damaged: Callable[[int], None] | None = None) -> np.ndarray:
    """A whole file as 16 kHz mono float32 (``on_damaged``: as :func:`iter_audio`'s)."""
    blocks = list(iter_audio(path, on_damaged=on_damaged))
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)

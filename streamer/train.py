"""``streamer train``: teach the detector your own sounds.

``DATA_DIR`` holds one folder per label of clips in any format soundfile reads, at any
rate; an optional ``background`` folder, and any ``--background DIR`` of long recordings
of the room (``streamer record mic background/room.wav --minutes 60``), supply negatives
and the noise that clips are mixed into. Two ways to train:

- from scratch (no ``--base``): a small AST (a size preset, ``tiny`` by default; its window
  may be shorter than 1024 frames, e.g. 128 = 1.28 s), multi-label, with the feature
  mean/std computed from the training data, its attention initialised as trained attention
  looks (:func:`_mimetic`); the model saved is the running average of its weights (``ema``);
- with ``--base`` (a pretrained AST, such as the AudioSet one): the backbone is frozen and
  new label rows are trained on its pooled embedding, so one checkpoint holds the base
  labels **and** the new ones and nothing downstream changes.

Training runs a fixed number of steps (``--steps``): the model is a function of the data,
the seed and the step budget, not of how busy the machine was (``--minutes`` is only a
cap). Examples are what inference feeds the model: a clip over a random crop of
background at a random SNR, anywhere in the window including across its edges, and a
clip alone, as ``streamer detect`` scores a file (a clip shorter than the window padded as
the frontend pads it); negatives are background crops, also alone and padded, and from
step 500 half of them are the crops the model in training scores highest
(:func:`hardest_negatives`). A split by
file (fixed seed; long background recordings split by file too) is validated through the
same code as ``streamer detect`` (:mod:`streamer.validation`), which also chooses each
label's threshold; the result is a standard Hugging Face AST checkpoint with
``validation.json``, ``thresholds.json`` and ``split.json`` beside it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from streamer.capture.files import MAX_ABS_SAMPLE, read_audio
from streamer.constants import SAMPLE_RATE_HZ
from streamer.errors import StreamerError
from streamer.features.fbank import log_mel, window_samples
from streamer.inference.capacity import gap_warning
from streamer.model.ast import AudioSpectrogramTransformer
from streamer.model.checkpoint import PICKLE_FILE, LoadedModel, load_model, save_checkpoint
from streamer.model.config import ASTConfig, FeatureConfig
from streamer.model.thresholds import HOP_TOLERANCE_S, THRESHOLDS_FILE, VALIDATION_FILE, write_thresholds
from streamer.scenes import ACTIVE_FRAME_SAMPLES, active_frames

log = logging.getLogger(__name__)

# every container soundfile (libsndfile) decodes, by file suffix — mp3 and opus too where the
# library has them; RAW has no header to decode by. Other files in the folders are counted as skipped
AUDIO_SUFFIXES = {f".{name.lower()}" for name in sf.available_formats() if name != "RAW"} | {".aif", ".wave", ".oga", ".opus"}
PRESETS = {
    "tiny": dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=3, intermediate_size=384),
    "small": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=768),
}
DEFAULT_STEPS = 4000  # the default step budget: 9–13 min of the tiny preset on an idle 2-core CPU, by the CPU (bench/README.md)
WARMUP_STEPS = 50
PROGRESS_EVERY_STEPS = 50
NEGATIVE_FRACTION = 0.35  # examples of background alone: the model must learn to say "nothing" (0.25: more false events on ambience)
FILE_FRACTION = 0.3  # of positives and of negatives: alone, as `streamer detect` scores a file (padded when short)
EDGE_FRACTION = 0.3  # of positives in a stream: the clip across the window's start or end
EDGE_MIN_ENERGY = 0.5  # a clip cut by the window's edge keeps its label with this share of its energy inside
EDGE_TRIES = 4
FILE_NEGATIVE_MIN_S = 0.3  # shortest background piece scored as a file
BAND_LIMIT_HZ = (2500.0, 7000.0)  # range of the random low-pass cutoff
BAND_LIMIT_ROLLOFF_HZ = 500.0  # its roll-off width
LONG_BACKGROUND_S = 30.0  # a background file at least this long is a recording of the room: split by file, streamed whole
NORMALISATION_EXAMPLES = 200
SPEC_MASK_MEL_BINS = 16  # SpecAugment: widest masked band of mel bins (of 128)
SPEC_MASK_FRAMES = 16  # SpecAugment: widest masked stretch of 10 ms frames
WEIGHT_DECAY = 0.05  # AdamW's, from scratch (none with --base: it would move the frozen base rows)
# hard negatives: every HARD_EVERY_STEPS steps from HARD_FROM_STEP, HARD_POOL fresh background
# examples are scored by the model being trained and the HARD_KEEP that score highest on any
# label are kept; HARD_NEGATIVE_SHARE of the negatives is then drawn from them. Over 40 splits
# paired on the H100: clip accuracy +0.016, top label +0.007, scenes F1 +0.010; 4.5 % more time
# on 2 CPU cores (bench/README.md, "Training"); 0.75 of the negatives did no better. Not with
# --base: a full-size model scoring the pool would cost minutes each time
HARD_NEGATIVE_SHARE = 0.5
HARD_FROM_STEP = 500  # before this the model's scores say little about what is hard
HARD_EVERY_STEPS = 250
HARD_POOL = 768
HARD_KEEP = 96
HARD_SCORE_BATCH = 64
MIN_CLIPS_PER_LABEL = 2  # one to train on, one held out
STAGE_PREFIX = ".streamer-partial-"  # the hidden folder inside --out a model is written to before it is moved into place
SPLIT_FILE = "split.json"  # the held-out files, beside the model
STALE_FILES = (THRESHOLDS_FILE, VALIDATION_FILE, SPLIT_FILE, PICKLE_FILE)  # replaced or made wrong by a new model
MIN_HELD_OUT_BACKGROUND_S = 60.0  # less held-out background than this says little of a room's false events per hour
SILENT_PEAK = 1e-4  # -80 dBFS: a label's clip whose loudest sample is under this holds no sound to learn
# attention starts as trained attention looks ("mimetic", Trockman & Kolter 2023): each head's
# W_q W_k^T ≈ α Z + β I (a token attends to tokens like it), each layer's W_v W_o ≈ α Z − β I.
# Over 46 new splits paired on H100s against the earlier init: clip accuracy +0.018 ± 0.008,
# top label +0.014 ± 0.008, scenes F1 +0.010 ± 0.010, at no cost a step (bench/README.md,
# "Training"); "default" gives the earlier recipe (bench/sweep_train.py pairs them)
ATTN_INIT = "mimetic"
MIMETIC_QK = (0.7, 0.7)  # (α, β), the paper's
MIMETIC_VO = (0.4, 0.4)


@dataclass
class TrainSettings:
    preset: str = "tiny"  # on the shared clips tiny with 4000 steps beat small with the same time (bench/README.md)
    max_length: int = 128  # frames of the model's window (from scratch)
    stride: int = 10  # patch stride, both axes (from scratch)
    steps: int = DEFAULT_STEPS  # the step budget: the same data, seed and steps give the same weights
    minutes: float | None = None  # an explicit cap on training time (stops early: then not reproducible)
    batch: int = 32
    lr: float = 1e-3
    val_fraction: float = 0.2
    seed: int = 0
    background: str = "background"
    long_background: tuple[Path, ...] = ()  # --background DIR: long recordings of the room
    snr_db: tuple[float, float] = (0.0, 30.0)  # clip level above the background
    gain_db: tuple[float, float] = (-20.0, 6.0)
    negative_gain_db: tuple[float, float] = (-50.0, 6.0)
    band_limit: float = 0.4  # fraction of examples given a random low-pass (see Mixer.band_limit)
    threads: int | None = None  # None: every core
    # bf16 autocast: off, whatever the CPU — on an AMX Xeon it made the tiny recipe slower and
    # worse (4000 steps: 376 s vs 352 s, clip accuracy 0.773 vs 0.841; bench/README.md)
    bf16: bool = False
    max_false_per_hour: float = 1.0  # thresholds keep false events on held-out background under this
    ema: float = 0.998  # decay of the average of the weights that is saved (0: the last weights)
    negatives: float = NEGATIVE_FRACTION  # fraction of examples that are background alone
    device: str = "cpu"  # where the model trains ("cuda" on a GPU box); validation always runs as the CPU daemon does
    hop_s: float = 1.0  # the hop thresholds are chosen for: the daemon's (and detect's) default


@dataclass
class Dataset:
    labels: list[str]
    clips: list[tuple[np.ndarray, int, str]]  # (16 kHz samples, label index, file name)
    background: list[np.ndarray] = field(default_factory=list)


def audio_files(folder: Path) -> list[Path]:
    """Audio files under ``folder``, in its subfolders too, sorted (the order never depends on the
    file system). Hidden ones are not clips: a notebook's ``.ipynb_checkpoints`` copies, macOS's
    ``._clip.wav`` resource forks."""
    return [f for f in _visible_files(folder) if f.suffix.lower() in AUDIO_SUFFIXES]


def other_files(folder: Path) -> list[Path]:
    """The visible files under ``folder`` that are not audio by their suffix (an .m4a, notes):
    not clips, but counted among the skipped so that none vanishes without a word."""
    return [f for f in _visible_files(folder) if f.suffix.lower() not in AUDIO_SUFFIXES]


def _visible_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts))


def scan(data_dir: Path, background: str) -> tuple[dict[str, list[Path]], list[Path]]:
    """``{label: clips}`` and the background clips: each folder of ``data_dir`` is a label, and
    the clips in its subfolders are that label's too (a user's sessions, recorded apart)."""
    if not data_dir.is_dir():
        raise StreamerError(f"{data_dir}: not a directory (one folder per label of audio clips)")
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = {p.name: audio_files(p) for p in folders}
    bg = files.pop(background, [])  # a label folder without audio stays, empty: train names it as left out
    if not any(files.values()):
        raise StreamerError(f"{data_dir}: no label folders with audio clips in them (one folder per label)")
    return files, bg


def readable(paths: list[Path], skipped: list[str]) -> dict[Path, np.ndarray]:
    """Each file's audio; a file that cannot be decoded, holds no audio or holds damaged samples
    (NaN, inf, far beyond full scale: the daemon replaces them to keep running, but a model
    should not learn from the repair) is skipped and named in ``skipped``."""
    out = {}
    for path in paths:
        damaged: list[int] = []
        try:
            audio = read_audio(path, on_damaged=damaged.append)
        except StreamerError as exc:
            skipped.append(str(exc))
            continue
        if sum(damaged):
            skipped.append(f"{path}: {sum(damaged)} samples NaN, inf or beyond ±{MAX_ABS_SAMPLE:g} (a damaged file)")
            continue
        if len(audio) < window_samples(1):
            skipped.append(f"{path}: shorter than one 25 ms frame")
            continue
        out[path] = audio
    return out


def split(files: dict[str, list[Path]], bg: list[Path], fraction: float, seed: int,
          long_bg: list[Path] = ()) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """A split by file, stratified by label (short background clips and long recordings apart), fixed seed."""
    rng = random.Random(seed)
    train, val = {}, {}
    for label, paths in list(files.items()) + [("\0bg", bg), ("\0long", list(long_bg))]:
        shuffled = paths[:]
        rng.shuffle(shuffled)
        n_val = max(1, round(len(shuffled) * fraction)) if len(shuffled) > 1 else 0
        val[label], train[label] = shuffled[:n_val], shuffled[n_val:]
    return train, val


class Mixer:
    """Random training examples, as inference will present them to the model.

    In a stream, a window holds a clip anywhere — whole, or cut by the window's start or
    end — over whatever the room sounds like; ``streamer detect`` on a clip file gives the
    clip alone from sample 0, padded when shorter than the window. Both are drawn here, and
    negatives of both kinds, so that neither the padding nor a clip's own recording
    conditions (a 1 s clip ending in silence) can stand for a label.
    """

    def __init__(self, data: Dataset, span: int, settings: TrainSettings, rng: np.random.Generator) -> None:
        self.data, self.span, self.s, self.rng = data, span, settings, rng

    def noise(self, length: int | None = None) -> np.ndarray:
        """A random crop of the background recordings (pieces end to end where one is too short)."""
        length = self.span if length is None else length
        out = np.zeros(length, dtype=np.float32)
        if not self.data.background:
            return out + self.rng.normal(0, 1e-3, length).astype(np.float32)
        pos = 0
        while pos < length:
            bg = self.data.background[self.rng.integers(len(self.data.background))]
            take = min(len(bg), length - pos)
            start = self.rng.integers(0, len(bg) - take + 1)
            out[pos:pos + take] = bg[start:start + take]
            pos += take
        return out

    def crop(self, clip: np.ndarray) -> np.ndarray:
        """A window-long piece of a longer clip that holds some of the sound itself.

        Long clips have pauses (the crying-baby clips are zeroed between cries): a crop of a
        pause labelled with the clip's label teaches the model that quiet means that label.
        So the crop is placed around a random active frame (within ``ACTIVE_DB`` of the
        clip's loudest frame).
        """
        active = active_frames(clip)
        frame_start = int(active[self.rng.integers(len(active))]) * ACTIVE_FRAME_SAMPLES
        lo = max(0, frame_start + ACTIVE_FRAME_SAMPLES - self.span)
        hi = min(len(clip) - self.span, frame_start)
        start = int(self.rng.integers(lo, hi + 1))
        return clip[start:start + self.span]

    def offset(self, clip: np.ndarray) -> int:
        """Where in the window a clip (no longer than it) starts; across an edge for some examples,
        as long as ``EDGE_MIN_ENERGY`` of its energy stays inside."""
        inside = int(self.rng.integers(0, self.span - len(clip) + 1))
        if self.rng.random() >= EDGE_FRACTION:
            return inside
        energy = np.cumsum(clip.astype(np.float64) ** 2)
        total = energy[-1] + 1e-12
        for _ in range(EDGE_TRIES):
            cut = int(self.rng.integers(1, len(clip)))  # samples of the clip outside the window
            if self.rng.random() < 0.5:  # across the start: its first `cut` samples are before it
                kept = total - energy[cut - 1]
                offset = -cut
            else:  # across the end
                kept = energy[len(clip) - cut - 1]
                offset = self.span - len(clip) + cut
            if kept / total >= EDGE_MIN_ENERGY:
                return offset
        return inside

    def example(self, clip: np.ndarray | None) -> np.ndarray:
        """One example: a clip (or, with None, nothing) in a stream or alone as a file."""
        as_file = self.rng.random() < FILE_FRACTION
        if clip is None:  # background alone, from barely audible to loud: all of it means "nothing"
            gain = np.float32(10 ** (self.rng.uniform(*self.s.negative_gain_db) / 20))
            if as_file:  # a short recording of nothing, padded as detect pads it
                length = int(self.rng.integers(min(int(FILE_NEGATIVE_MIN_S * SAMPLE_RATE_HZ), self.span), self.span + 1))
                return self.band_limit(self.noise(length)) * gain
            return self.band_limit(self.noise()) * gain
        if len(clip) > self.span:
            clip = self.crop(clip)
        gain = np.float32(10 ** (self.rng.uniform(*self.s.gain_db) / 20))
        if as_file:
            return self.band_limit(clip.astype(np.float32)) * gain
        bg = self.noise()
        offset = self.offset(clip) if len(clip) < self.span else 0
        lo, hi = max(0, offset), min(self.span, offset + len(clip))
        part = clip[lo - offset:hi - offset]
        rms_clip = np.sqrt(np.mean(clip**2)) + 1e-8
        rms_bg = np.sqrt(np.mean(bg**2)) + 1e-8
        snr = self.rng.uniform(*self.s.snr_db)
        bg = bg * np.float32(rms_clip / rms_bg / 10 ** (snr / 20))
        bg[lo:hi] += part
        return self.band_limit(bg) * gain

    def band_limit(self, wave: np.ndarray) -> np.ndarray:
        """Sometimes a random low-pass, to examples of every label and to background alone.

        Recordings of one label often share a bandwidth (the crying-baby clips were sampled at
        8 kHz, so nothing lies above 4 kHz): without this the model learns "no high
        frequencies" as that label and fires on any dull background.
        """
        if self.rng.random() >= self.s.band_limit:
            return wave
        cutoff = self.rng.uniform(*BAND_LIMIT_HZ)
        spectrum = np.fft.rfft(wave)
        freqs = np.fft.rfftfreq(len(wave), 1 / SAMPLE_RATE_HZ)
        spectrum *= np.clip((cutoff + BAND_LIMIT_ROLLOFF_HZ - freqs) / BAND_LIMIT_ROLLOFF_HZ, 0.0, 1.0)
        return np.fft.irfft(spectrum, len(wave)).astype(np.float32)


def features(waves: list[np.ndarray], feat: FeatureConfig) -> torch.Tensor:
    """Model inputs; a wave shorter than the window is padded with zero frames, as the frontend
    pads a short file (:func:`streamer.features.fbank.clip_features`)."""
    out = torch.empty(len(waves), feat.max_length, feat.num_mel_bins)
    for i, w in enumerate(waves):
        frames = log_mel(w, feat.num_mel_bins)[: feat.max_length]
        out[i, : frames.shape[0]] = frames
        out[i, frames.shape[0]:] = 0.0
    return (out - feat.mean) / (feat.std * 2)


def spec_augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """One frequency and one time mask per example, up to ``SPEC_MASK_MEL_BINS`` / ``SPEC_MASK_FRAMES``
    (read at call time, so a recipe that sets them, as bench/sweep_train.py does, takes effect)."""
    for i in range(x.shape[0]):
        f = rng.integers(0, SPEC_MASK_MEL_BINS + 1)
        f0 = rng.integers(0, x.shape[2] - f + 1)
        x[i, :, f0:f0 + f] = 0.0
        t = rng.integers(0, SPEC_MASK_FRAMES + 1)
        t0 = rng.integers(0, x.shape[1] - t + 1)
        x[i, t0:t0 + t, :] = 0.0
    return x


def hardest_negatives(model: AudioSpectrogramTransformer, mixer: Mixer, feat: FeatureConfig, offset: int,
                      device: torch.device) -> list[np.ndarray]:
    """The background examples, of ``HARD_POOL`` fresh ones, that the model scores highest on any new label.

    Random crops of the room are mostly easy (a hum, a quiet street); the ones that sound like
    a label (a clatter in the office, a laugh in the café) are rare, so the false alarm that
    sets a label's threshold is seen only now and then. Scoring a pool with the model being
    trained and training on the worst finds them: hard-negative mining, as in detection. Only
    the model's eval-mode forward is used (no dropout, no gradients), and the pool comes from
    the training's own random generator: the weights stay a function of data, seed and steps.
    """
    pool = [mixer.example(None) for _ in range(HARD_POOL)]
    was_training = model.training
    model.eval()
    scores = []
    with torch.no_grad():
        for i in range(0, len(pool), HARD_SCORE_BATCH):
            logits = model(features(pool[i:i + HARD_SCORE_BATCH], feat).to(device))
            scores.append(logits[:, offset:].max(dim=1).values.float().cpu())
    model.train(was_training)
    order = torch.cat(scores).argsort(descending=True)[:HARD_KEEP]
    return [pool[int(i)] for i in order]


def duration(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s" if seconds >= 60 else f"{seconds:.0f} s"


def train(data_dir: Path, out_dir: Path, settings: TrainSettings, base: str | None = None,
          progress: Callable[[str], None] = print) -> dict:
    """Train, write the checkpoint, validate it as ``streamer detect`` would; the report.

    The report's ``verdict`` is None for a usable model, else the one line that says why
    not and the fix (the CLI prints it and exits ``streamer.cli.EXIT_UNUSABLE_MODEL``);
    ``stream_warning`` is the one line for labels a usable model never hears in a stream,
    ``false_alarm_warning`` the one for labels that fire on held-out background at every threshold.
    """
    from streamer.validation import HeldOut, false_alarm_warning, stream_warning, verdict

    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    threads = settings.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)  # set, not left to torch: the same count on every run of a recipe
    bf16 = settings.bf16
    files, bg = scan(data_dir, settings.background)
    long_bg = []
    data_root, own_bg = data_dir.resolve(), (data_dir / settings.background).resolve()
    seen = {p.resolve() for p in bg}  # DATA_DIR/background given again as --background: each file once
    for folder in settings.long_background:
        if not Path(folder).is_dir():
            raise StreamerError(f"--background {folder}: not a directory (give a folder of long recordings of the room)")
        where = Path(folder).resolve()
        if where != own_bg and (where == data_root or data_root in where.parents or where in data_root.parents):
            raise StreamerError(f"--background {folder}: holds labelled clips ({data_dir} is the clips folder): they would be "
                                f"taught as \"nothing\"; give a folder of background recordings only")
        everything = audio_files(Path(folder))
        if not everything:
            raise StreamerError(f"--background {folder}: no audio files in it")
        found = [f for f in everything if f.resolve() not in seen]  # a folder given twice (or inside another): each file once
        seen.update(f.resolve() for f in found)
        long_bg += found
    skipped: list[str] = [f"{f}: not an audio file by its suffix (streamer reads .wav, .flac, .ogg, .mp3, .opus, .aiff "
                          f"and the like: convert it, e.g. ffmpeg -i IN OUT.wav)"
                          for folder in [*(p for p in sorted(data_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")),
                                         *map(Path, settings.long_background)] for f in other_files(folder)]
    skipped += [f"{f}: not in a label folder ({data_dir}/LABEL/{f.name} would be)" for f in sorted(data_dir.iterdir())
                if f.is_file() and not f.name.startswith(".")]
    audio = readable([p for paths in files.values() for p in paths] + bg + long_bg, skipped)
    for path in [p for paths in files.values() for p in paths if p in audio]:
        if float(np.abs(audio[path]).max()) < SILENT_PEAK:  # a label's clip must hold its sound (background may be quiet)
            skipped.append(f"{path}: silent (peak under {20 * math.log10(SILENT_PEAK):.0f} dBFS): a clip of a label must hold the sound")
            del audio[path]
    if skipped:
        progress(f"skipped {len(skipped)} file(s) that cannot be used: {skipped[0]}" + (f" (and {len(skipped) - 1} more: " + ("listed below)" if log.isEnabledFor(logging.INFO) else "`streamer -v train …` lists them)")
                                          if len(skipped) > 1 else ""))
        for why in skipped[1:]:
            log.info("skipped: %s", why)
    files = {k: [p for p in v if p in audio] for k, v in files.items()}
    if (dropped := sorted(k for k, v in files.items() if not v)) and any(files.values()):  # none at all: the error below
        progress(f"warning: left out, no usable clip in its folder: {', '.join(dropped[:5])}"
                 f"{f' and {len(dropped) - 5} more' if len(dropped) > 5 else ''} (the model will not know "
                 f"{'it' if len(dropped) == 1 else 'them'}: add readable clips that hold the sound, or remove the folder)")
    files = {k: v for k, v in files.items() if v}
    if not files:
        raise StreamerError(f"{data_dir}: no readable audio clips in its label folders")
    lonely = sorted(k for k, v in files.items() if len(v) < MIN_CLIPS_PER_LABEL)
    if lonely:  # nothing of it could be held out: its verdict would be a guess
        raise StreamerError(f"{data_dir}: {', '.join(lonely[:3])}{' and more' if len(lonely) > 3 else ''}: only one usable clip; "
                            f"at least {MIN_CLIPS_PER_LABEL} per label (one is held out to validate): add clips, or remove the folder")
    # DATA_DIR/background recordings as long as a room recording are streamed whole in validation too
    long_bg = [p for p in long_bg if p in audio] + [p for p in bg if p in audio and len(audio[p]) >= LONG_BACKGROUND_S * SAMPLE_RATE_HZ]
    bg = [p for p in bg if p in audio and p not in long_bg]
    new_labels = sorted(files)
    train_files, val_files = split(files, bg, settings.val_fraction, settings.seed, long_bg)
    train_data = Dataset(new_labels, [(audio[p], new_labels.index(k), p.name) for k, paths in train_files.items()
                                      if not k.startswith("\0") for p in paths],
                         [audio[p] for p in train_files["\0bg"] + train_files["\0long"]])
    held = HeldOut([(p, k) for k, paths in val_files.items() if not k.startswith("\0") for p in paths],
                   val_files["\0bg"], val_files["\0long"])
    train_bg_s = sum(len(b) for b in train_data.background) / SAMPLE_RATE_HZ
    val_bg_s = sum(len(audio[p]) for p in held.background_clips + held.background_streams) / SAMPLE_RATE_HZ
    progress(f"{len(new_labels)} labels, {len(train_data.clips)} training clips, {len(held.clips)} validation clips; "
             f"background {duration(train_bg_s)} for training, {duration(val_bg_s)} held out")
    if not train_data.clips:  # a val_fraction that holds every clip out (TrainSettings; the CLI keeps 0.2)
        raise StreamerError(f"{data_dir}: too few clips to hold some out for validation (at least 2 per label)")
    first_new = output_folder(out_dir, data_dir, settings.long_background, base)  # before hours of training, not after: a bad --out fails now

    if base:
        loaded = load_model(base)
        if not loaded.config.multi_label:  # softmax: one sum over every label, so new rows would move the old scores
            raise StreamerError(f"--base {base}: a single-label (softmax) model: new labels would change the scores of its own; "
                                f"give a multi-label base (sigmoid, like the AudioSet models), or train from scratch without --base")
        if set(new_labels) & set(loaded.labels):
            raise StreamerError(f"labels already in the base model: {sorted(set(new_labels) & set(loaded.labels))[:5]}")
        feat = loaded.features
        labels = list(loaded.labels) + new_labels
    else:
        feat = FeatureConfig(max_length=settings.max_length)
    span = window_samples(feat.max_length)
    if line := gap_warning(span / SAMPLE_RATE_HZ, settings.hop_s):  # thresholds chosen for a stream that is mostly unheard
        progress(f"warning: {line}")

    if not base:  # normalisation from the training data (features of plain clips over background)
        sample = [Mixer(train_data, span, settings, rng).example(c) for c, _, _ in train_data.clips[:NORMALISATION_EXAMPLES]]
        raw = torch.cat([log_mel(w, feat.num_mel_bins) for w in sample])
        feat = FeatureConfig(max_length=feat.max_length, mean=float(raw.mean()), std=float(raw.std()))
        config = ASTConfig(**PRESETS[settings.preset], max_length=feat.max_length, frequency_stride=settings.stride,
                           time_stride=settings.stride, labels=tuple(new_labels), problem_type="multi_label_classification")
        model = AudioSpectrogramTransformer(config)
        _init(model)
        labels = new_labels
    else:
        model, config = _extend(loaded, new_labels)

    offset = len(labels) - len(new_labels)
    # no weight decay on a base model (below): decay would move the frozen base labels' rows too
    mixer = Mixer(train_data, span, settings, rng)
    device = torch.device(settings.device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0 if base else WEIGHT_DECAY)
    average = [p.detach().clone() for p in params] if settings.ema > 0 else None
    progress(f"training {settings.steps} steps of {settings.batch} examples ({'--base, head only' if base else settings.preset + ' AST'}), "
             f"{threads} threads, {'bf16 autocast' if bf16 else 'fp32'}" + (f", on {device} (not bit-reproducible)" if device.type != "cpu" else ""))
    started, step, loss_avg = time.monotonic(), 0, None
    hard: list[np.ndarray] = []
    deadline = started + settings.minutes * 60 if settings.minutes else None
    while step < settings.steps:
        if deadline is not None and time.monotonic() >= deadline:
            progress(f"stopped by --minutes {settings.minutes:g} after {step} of {settings.steps} steps "
                     "(a time cap: another run may stop elsewhere)")
            break
        if not base and HARD_NEGATIVE_SHARE > 0 and step >= HARD_FROM_STEP and (step - HARD_FROM_STEP) % HARD_EVERY_STEPS == 0:
            hard = hardest_negatives(model, mixer, feat, offset, device)
        model.train()
        picks = rng.integers(0, len(train_data.clips), settings.batch)
        negative = rng.random(settings.batch) < settings.negatives
        waves, target = [], torch.zeros(settings.batch, len(labels))
        for row, pick in enumerate(picks):
            if not negative[row]:
                clip, label, _ = train_data.clips[pick]
                waves.append(mixer.example(clip))
                target[row, offset + label] = 1.0
            elif hard and rng.random() < HARD_NEGATIVE_SHARE:
                waves.append(hard[rng.integers(len(hard))])
            else:
                waves.append(mixer.example(None))
        x = spec_augment(features(waves, feat), rng).to(device)
        lr = settings.lr * min(1.0, (step + 1) / WARMUP_STEPS) * 0.5 * (1 + math.cos(math.pi * step / settings.steps))
        for group in optimiser.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if base:  # frozen backbone: only the new head rows learn, on the pooled embedding
                with torch.no_grad():
                    pooled = model.forward_head(model.forward_features(x, pooled_only=True), pre_logits=True)
                logits = model.head(pooled)
            else:
                logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits[:, offset:].float(), target[:, offset:].to(device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        step += 1
        if average is not None:  # warmed-up decay: early steps are not stuck in the average
            decay = min(settings.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for mean, p in zip(average, params):
                    mean.lerp_(p, 1 - decay)
        loss_avg = loss.item() if loss_avg is None else 0.9 * loss_avg + 0.1 * loss.item()
        if step % PROGRESS_EVERY_STEPS == 0 or step == settings.steps:
            elapsed = time.monotonic() - started
            rate = step / elapsed
            progress(f"step {step}/{settings.steps} [{'#' * (20 * step // settings.steps):<20}] loss {loss_avg:.3f}, "
                     f"{rate:.2f} steps/s, ETA {duration((settings.steps - step) / rate)}")
    train_s = time.monotonic() - started
    if average is not None:  # the saved model is the average: steadier on clips it never saw (bench/README.md)
        with torch.no_grad():
            for p, mean in zip(params, average):
                p.copy_(mean)
    model.to("cpu").eval()
    # everything is written into a hidden folder inside --out and moved into place only once
    # validated: an interrupt or a crash while validating leaves an earlier model whole, and
    # never a model without its thresholds that every command would load without a word
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        for leftover in out_dir.glob(f"{STAGE_PREFIX}*"):  # a crashed run's
            shutil.rmtree(leftover, ignore_errors=True)
        stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=out_dir))
    try:
        report = _write_and_validate(model, config, feat, stage, out_dir, data_dir, val_files, held, new_labels, settings,
                                     loaded if base else None, val_bg_s, progress)
        report.update(steps=step, steps_planned=settings.steps, seconds=round(train_s, 1), steps_per_s=round(step / train_s, 3) if train_s else None,
                      threads=threads, bf16=bf16, seed=settings.seed, labels=new_labels, base=base,
                      preset=None if base else settings.preset, max_length=feat.max_length, skipped=skipped)
        report["verdict"] = verdict(report, step)
        report["stream_warning"] = stream_warning(report)
        report["false_alarm_warning"] = false_alarm_warning(report)
        report["background_warning"] = background_warning(len(train_data.background), len(held.background_clips + held.background_streams),
                                                          val_bg_s)
        with writing(out_dir):
            (stage / VALIDATION_FILE).write_text(json.dumps(report, indent=2) + "\n")
            written = sorted(f.name for f in stage.iterdir())
            for stale in STALE_FILES:  # an earlier model's, in the same folder: its thresholds would be read with this one
                if stale not in written:
                    (out_dir / stale).unlink(missing_ok=True)
            for name in written:  # each move is atomic; thresholds.json and validation.json come last (sorted)
                os.replace(stage / name, out_dir / name)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        _remove_empty(out_dir, first_new)
        raise
    shutil.rmtree(stage, ignore_errors=True)
    make_readable(out_dir, written, created=first_new)
    return report


def _write_and_validate(model: AudioSpectrogramTransformer, config: ASTConfig, feat: FeatureConfig, stage: Path, out_dir: Path,
                        data_dir: Path, val_files: dict, held, new_labels: list[str], settings: TrainSettings,
                        base: LoadedModel | None, val_bg_s: float, progress: Callable[[str], None]) -> dict:
    """The checkpoint and split into ``stage``, validated there (``streamer detect``'s path over
    the files as written), then its thresholds.json; the report."""
    from streamer.validation import BACKGROUND, validate

    with writing(out_dir):
        save_checkpoint(LoadedModel(model, config, feat, str(out_dir)), stage)
        (stage / SPLIT_FILE).write_text(json.dumps({"validation": {  # DATA_DIR/label/<this>: a name, or sub/name
            **{k: [p.relative_to(data_dir / k).as_posix() for p in v] for k, v in val_files.items() if not k.startswith("\0")},
            BACKGROUND: [p.relative_to(data_dir / settings.background).as_posix() for p in val_files["\0bg"]],
            "background_long": [str(p) for p in val_files["\0long"]]}}, indent=2) + "\n")

    progress(f"validating {len(held.clips)} held-out clips and {duration(val_bg_s)} of background through `streamer detect`'s path")
    started_val = time.monotonic()
    report, chosen = validate(stage, held, new_labels, settings.max_false_per_hour, hop_s=settings.hop_s, seed=settings.seed)
    kept = base_thresholds(base, settings.hop_s, progress) if base is not None else {}
    with writing(out_dir):
        write_thresholds(stage, {**kept, **{k: {key: v[key] for key in ("on_threshold", "off_threshold", "ema_alpha", "recall", "false_events_per_hour")}
                                            for k, v in chosen.items()}},
                         chosen_for=f"at most {settings.max_false_per_hour:g} false events per hour on held-out background, "
                                    f"best recall of held-out clips in a stream (hop {report['hop_s']:g} s, the shipped smoothing with the EMA weight chosen too)",
                         background_s=report["stream"]["background_s"], hop_s=report["hop_s"])
    report["thresholds"] = chosen
    report["validation_seconds"] = round(time.monotonic() - started_val, 1)
    return report


def _remove_empty(out_dir: Path, first_new: Path | None) -> None:
    """Folders this run created for --out, if nothing is in them (an interrupted run leaves none)."""
    if first_new is None:
        return
    for folder in [out_dir.absolute(), *out_dir.absolute().parents]:
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == first_new.absolute():
            return


def background_warning(trained_on: int, held_out: int, held_out_s: float = 0.0) -> str | None:
    """One line when no background recording was held out, or too little to say anything: the
    thresholds were then chosen on (nearly) the silence between the held-out clips, and say
    little of the room's false events."""
    if held_out and held_out_s >= MIN_HELD_OUT_BACKGROUND_S:
        return None
    if held_out:
        why = f"only {held_out_s:.0f} s of background held out (from short clips)"
        return (f"warning: {why}: thresholds were chosen on so little of the room that false events in it are a guess; fix: "
                "record the room as it sounds without your sounds (`streamer record mic background/room.wav --minutes 20`, "
                "several recordings) and train with --background background/")
    why = ("no background recordings" if not trained_on else
           f"only {trained_on} background recording(s), none left to hold out (one of every 5 is)")
    return (f"warning: {why}: thresholds were chosen on silence, so expect false events in a real room; fix: record the room "
            "as it sounds without your sounds (`streamer record mic background/room.wav --minutes 60`, several recordings) "
            "and train with --background background/")


def base_thresholds(loaded: LoadedModel, hop_s: float, progress: Callable[[str], None]) -> dict[str, dict]:
    """The ``--base`` model's own calibrated thresholds, for the model that extends it.

    Its backbone and label rows are frozen, so its labels score exactly as before and what
    its own training chose for them still holds — but only at the hop it was chosen at: at
    another, those labels would go back to the config's or the shipped thresholds, and this
    says so (a base with no thresholds, such as AudioSet's, says nothing).
    """
    if not loaded.thresholds:
        return {}
    if loaded.thresholds_hop_s is not None and abs(loaded.thresholds_hop_s - hop_s) >= HOP_TOLERANCE_S:
        progress(f"warning: the base model's thresholds for its {len(loaded.thresholds)} label(s) were chosen at hop {loaded.thresholds_hop_s:g} s, "
                 f"not {hop_s:g} s: not kept (those labels use the config's or the shipped thresholds); "
                 f"fix: train with --hop {loaded.thresholds_hop_s:g}")
        return {}
    return {label: {"on_threshold": c.on_threshold, "off_threshold": c.off_threshold, "ema_alpha": c.ema_alpha, "from_base": True}
            for label, c in loaded.thresholds.items()}


@contextmanager
def writing(out_dir: Path) -> Iterator[None]:
    """Writes into the model folder: a disk that fills up during a long training is one line, not a traceback."""
    try:
        yield
    except OSError as exc:
        raise StreamerError(f"--out {out_dir}: cannot write the model ({exc.strerror or exc}); free space there, or give another --out") from None


def output_folder(out_dir: Path, data_dir: Path | None = None, backgrounds: tuple[Path, ...] = (), base: str | None = None
                  ) -> Path | None:
    """Prove ``out_dir`` can be written; the first folder of its path that does not exist yet.

    Called before training, so that a ``--out`` that is a file, lies where this user cannot
    write, lies among the clips (the model would become a label folder of the next run), or
    is a folder of other things (a home directory: the model's files would land among them),
    or is the ``--base`` model itself (a new model judged not usable would still replace the one
    that works) is a one-line error at once instead of a lost model at the end. Nothing is left behind:
    a folder is made and removed in the nearest one that exists, and ``out_dir`` itself is
    created only when the model is saved (an interrupted training leaves no folder).
    """
    resolved = out_dir.resolve()
    for folder, what in [(data_dir, "the clips folder"), *((b, "the --background folder") for b in backgrounds)]:
        if folder is not None and (resolved == Path(folder).resolve() or Path(folder).resolve() in resolved.parents):
            raise StreamerError(f"--out {out_dir}: inside {what} {folder}: the model would be read as clips next time; "
                                f"give a folder outside it (e.g. models/NAME)")
    if base is not None and Path(base).is_dir() and Path(base).resolve() == resolved:
        raise StreamerError(f"--out {out_dir}: the --base model's own folder: the extended model would replace it even if it "
                            f"is judged not usable; give a new folder (e.g. {out_dir.name}-2), and point the config at it once it is usable")
    if out_dir.is_dir() and not (out_dir / "config.json").is_file() and any(
            not p.name.startswith(STAGE_PREFIX) for p in out_dir.iterdir()):
        raise StreamerError(f"--out {out_dir}: a folder with other things in it, not a model; give a new or empty folder "
                            f"(or a model folder to replace)")
    out_dir = out_dir.absolute()
    first_new = next((p for p in [*reversed(out_dir.parents), out_dir] if not p.exists()), None)
    existing = out_dir if first_new is None else first_new.parent
    if not existing.is_dir():
        raise StreamerError(f"--out {out_dir}: {existing} is a file, not a folder; give a folder for the model")
    try:
        tempfile.TemporaryDirectory(dir=existing, prefix=".streamer-write-test-").cleanup()
    except OSError as exc:
        raise StreamerError(f"--out {out_dir}: cannot write there ({exc.strerror or exc}); give a folder you can write to") from None
    return first_new


def _init(model: AudioSpectrogramTransformer) -> None:
    """Torch's default (fan-in scaled) init for the linear layers, ViT's for the patches and positions,
    and zero class tokens, as transformers initialises them.

    With every weight at std 0.02 (and random class tokens) a window's own content reaches the
    pooled class tokens only faintly at first: the loss sat at the label prior for the first
    ~350 steps on tones a tiny AST tells apart at once (bench/README.md, "Training").
    """
    for name, p in model.named_parameters():
        if "token" in name:
            torch.nn.init.zeros_(p)
        elif "pos_embed" in name or "patch_embed" in name and p.dim() > 1:
            torch.nn.init.trunc_normal_(p, std=0.02)
    if ATTN_INIT == "mimetic":
        with torch.no_grad():
            for block in model.blocks:
                _mimetic(block.attn)


def _low_rank(alpha: float, beta: float, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``L, R`` with ``L @ R ≈ α Z + β I`` (Z random, variance 1/dim), split by SVD."""
    u, s, vt = torch.linalg.svd(alpha * torch.randn(dim, dim) / math.sqrt(dim) + beta * torch.eye(dim))
    root = s.sqrt()
    return u * root, root[:, None] * vt


def _mimetic(attn: torch.nn.Module) -> None:
    """Mimetic attention: per head, queries·keys ≈ (α Z + β I) at rank head_dim; values through the projection ≈ α Z − β I."""
    dim, hd = attn.proj.in_features, attn.head_dim
    weight = attn.qkv.weight  # rows: q heads, k heads, v heads; ``y = x @ W.T``
    for h in range(attn.num_heads):
        left, right = _low_rank(*MIMETIC_QK, dim)
        weight[h * hd:(h + 1) * hd] = left[:, :hd].T
        weight[dim + h * hd:dim + (h + 1) * hd] = right[:hd]
    left, right = _low_rank(MIMETIC_VO[0], -MIMETIC_VO[1], dim)
    weight[2 * dim:] = left.T
    attn.proj.weight.copy_(right.T)


def _extend(loaded: LoadedModel, new_labels: list[str]) -> tuple[AudioSpectrogramTransformer, ASTConfig]:
    """The base model with a head of base + new labels; only the new rows learn."""
    from dataclasses import replace

    base = loaded.model.float().train()
    config = replace(loaded.config, labels=tuple(loaded.labels) + tuple(new_labels), problem_type="multi_label_classification")
    old_fc = base.head.fc
    fc = torch.nn.Linear(config.hidden_size, config.num_labels)
    with torch.no_grad():
        torch.nn.init.trunc_normal_(fc.weight, std=0.02)
        fc.bias.zero_()
        fc.weight[: old_fc.out_features] = old_fc.weight
        fc.bias[: old_fc.out_features] = old_fc.bias
    base.requires_grad_(False)
    base.head.fc = fc
    base.config = config
    fc.weight.requires_grad_(True)
    fc.bias.requires_grad_(True)
    keep = old_fc.out_features
    fc.weight.register_hook(lambda g: torch.cat([torch.zeros_like(g[:keep]), g[keep:]]))
    fc.bias.register_hook(lambda g: torch.cat([torch.zeros_like(g[:keep]), g[keep:]]))
    return base, config


MODEL_FILE_MODE = 0o644
MODEL_DIR_MODE = 0o755


def make_readable(out_dir: Path, written: list[str], created: Path | None = None) -> None:
    """The files training wrote (``written``, names in ``out_dir``) 0644 and ``out_dir`` 0755: a
    model trained as one user (root, a umask of 077) is read by another — the service's dynamic
    user. Nothing else in the folder is touched. ``created``: the first folder that training
    created above ``out_dir``, made traversable too (folders that existed are left alone)."""
    out_dir = out_dir.absolute()
    out_dir.chmod(MODEL_DIR_MODE)
    for name in written:
        path = out_dir / name
        if path.is_file() and not path.is_symlink():
            path.chmod(MODEL_FILE_MODE)
    if created is not None:
        created = created.absolute()
        for parent in out_dir.parents:
            if parent == created or created in parent.parents:
                parent.chmod(MODEL_DIR_MODE)

"""``streamer train``: teach the detector your own sounds.

``DATA_DIR`` holds one folder per label of clips in any format soundfile reads, at any
rate; an optional ``background`` folder supplies negatives and the noise that clips are
mixed into. Two ways to train:

- from scratch (no ``--base``): a small AST (a size preset; its window may be shorter than
  1024 frames, e.g. 128 = 1.28 s), multi-label, with the feature mean/std computed from the
  training data;
- with ``--base`` (a pretrained AST, such as the AudioSet one): the backbone is frozen and
  new label rows are trained on its pooled embedding, so one checkpoint holds the base
  labels **and** the new ones and nothing downstream changes.

Clips are placed at random offsets over background, with random gain and mixing levels,
and SpecAugment masks. A split by file (fixed seed) gives validation figures —
per-label precision/recall and clip accuracy — written next to the model as
``validation.json``. The result is a standard Hugging Face AST checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from streamer.capture.files import read_audio
from streamer.constants import SAMPLE_RATE_HZ
from streamer.errors import StreamerError
from streamer.features.fbank import log_mel, window_samples
from streamer.model.ast import AudioSpectrogramTransformer
from streamer.model.checkpoint import LoadedModel, load_model, save_checkpoint
from streamer.model.config import ASTConfig, FeatureConfig

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".aiff", ".aif", ".au"}
PRESETS = {
    "tiny": dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=3, intermediate_size=384),
    "small": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=768),
}
THRESHOLD = 0.5
NEGATIVE_FRACTION = 0.25  # examples of background alone: the model must learn to say "nothing"
ACTIVE_FRAME_SAMPLES = 800  # 50 ms frames for finding where in a long clip the sound is
ACTIVE_DB = 20.0
BAND_LIMIT_HZ = (2500.0, 7000.0)  # its cutoff
BAND_LIMIT_ROLLOFF_HZ = 500.0  # a frame is part of the sound when within this of the clip's loudest frame


@dataclass
class TrainSettings:
    preset: str = "small"
    max_length: int = 128  # frames of the model's window (from scratch)
    stride: int = 10  # patch stride, both axes (from scratch)
    minutes: float = 8.0  # training time budget
    max_steps: int | None = None  # a step budget instead (reproducible whatever the machine's load)
    batch: int = 32
    lr: float = 1e-3
    val_fraction: float = 0.2
    seed: int = 0
    background: str = "background"
    snr_db: tuple[float, float] = (0.0, 30.0)  # clip level above the background
    gain_db: tuple[float, float] = (-20.0, 6.0)
    negative_gain_db: tuple[float, float] = (-50.0, 6.0)
    band_limit: float = 0.4  # fraction of examples given a random low-pass (see Mixer.band_limit)
    threads: int | None = None


@dataclass
class Dataset:
    labels: list[str]
    clips: list[tuple[np.ndarray, int, str]]  # (16 kHz samples, label index, file name)
    background: list[np.ndarray] = field(default_factory=list)


def scan(data_dir: Path, background: str) -> tuple[dict[str, list[Path]], list[Path]]:
    if not data_dir.is_dir():
        raise StreamerError(f"{data_dir}: not a directory (one folder per label of audio clips)")
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir())
    files = {p.name: sorted(f for f in p.iterdir() if f.suffix.lower() in AUDIO_SUFFIXES) for p in folders}
    bg = files.pop(background, [])
    files = {k: v for k, v in files.items() if v}
    if len(files) < 1:
        raise StreamerError(f"{data_dir}: no label folders with audio clips in them")
    return files, bg


def split(files: dict[str, list[Path]], bg: list[Path], fraction: float, seed: int):
    """A split by file, stratified by label, with a fixed seed."""
    rng = random.Random(seed)
    train, val = {}, {}
    for label, paths in list(files.items()) + [("\0bg", bg)]:
        shuffled = paths[:]
        rng.shuffle(shuffled)
        n_val = max(1, round(len(shuffled) * fraction)) if len(shuffled) > 1 else 0
        val[label], train[label] = shuffled[:n_val], shuffled[n_val:]
    return train, val


def load(files: dict[str, list[Path]], labels: list[str], bg_key: str = "\0bg") -> Dataset:
    clips = [(read_audio(p), labels.index(k), p.name) for k, paths in files.items() if k != bg_key for p in paths]
    background = [read_audio(p) for p in files.get(bg_key, [])]
    return Dataset(labels, clips, background)


class Mixer:
    """Random training examples: a clip at a random place over random background."""

    def __init__(self, data: Dataset, span: int, settings: TrainSettings, rng: np.random.Generator) -> None:
        self.data, self.span, self.s, self.rng = data, span, settings, rng

    def noise(self) -> np.ndarray:
        out = np.zeros(self.span, dtype=np.float32)
        if not self.data.background:
            return out + self.rng.normal(0, 1e-3, self.span).astype(np.float32)
        pos = 0
        while pos < self.span:
            bg = self.data.background[self.rng.integers(len(self.data.background))]
            take = min(len(bg), self.span - pos)
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
        frames = len(clip) // ACTIVE_FRAME_SAMPLES
        energy = (clip[: frames * ACTIVE_FRAME_SAMPLES].reshape(frames, -1).astype(np.float64) ** 2).mean(axis=1)
        level = 10 * np.log10(energy + 1e-12)
        active = np.flatnonzero(level >= level.max() - ACTIVE_DB)
        frame_start = int(active[self.rng.integers(len(active))]) * ACTIVE_FRAME_SAMPLES
        lo = max(0, frame_start + ACTIVE_FRAME_SAMPLES - self.span)
        hi = min(len(clip) - self.span, frame_start)
        start = int(self.rng.integers(lo, hi + 1))
        return clip[start:start + self.span]

    def example(self, clip: np.ndarray | None) -> np.ndarray:
        bg = self.noise()
        if clip is None:  # background alone, from barely audible to loud: all of it means "nothing"
            return self.band_limit(bg) * np.float32(10 ** (self.rng.uniform(*self.s.negative_gain_db) / 20))
        if len(clip) > self.span:
            clip = self.crop(clip)
        offset = self.rng.integers(0, self.span - len(clip) + 1)
        rms_clip = np.sqrt(np.mean(clip**2)) + 1e-8
        rms_bg = np.sqrt(np.mean(bg**2)) + 1e-8
        snr = self.rng.uniform(*self.s.snr_db)
        bg = bg * np.float32(rms_clip / rms_bg / 10 ** (snr / 20))
        bg[offset:offset + len(clip)] += clip
        return self.band_limit(bg) * np.float32(10 ** (self.rng.uniform(*self.s.gain_db) / 20))

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
    out = torch.empty(len(waves), feat.max_length, feat.num_mel_bins)
    for i, w in enumerate(waves):
        frames = log_mel(w, feat.num_mel_bins)[: feat.max_length]
        out[i, : frames.shape[0]] = frames
        out[i, frames.shape[0]:] = 0.0
    return (out - feat.mean) / (feat.std * 2)


def spec_augment(x: torch.Tensor, rng: np.random.Generator, max_freq: int = 16, max_time: int = 16) -> torch.Tensor:
    for i in range(x.shape[0]):
        f = rng.integers(0, max_freq + 1)
        f0 = rng.integers(0, x.shape[2] - f + 1)
        x[i, :, f0:f0 + f] = 0.0
        t = rng.integers(0, max_time + 1)
        t0 = rng.integers(0, x.shape[1] - t + 1)
        x[i, t0:t0 + t, :] = 0.0
    return x


def fixed_examples(data: Dataset, span: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    """Deterministic validation examples: each clip at a fixed offset over background."""
    rng = np.random.default_rng(seed + 1)
    settings = TrainSettings(snr_db=(20.0, 20.0), gain_db=(0.0, 0.0), negative_gain_db=(-20.0, -20.0), band_limit=0.0)
    mixer = Mixer(data, span, settings, rng)
    waves = [mixer.example(clip) for clip, _, _ in data.clips]
    targets = [label for _, label, _ in data.clips]
    waves += [mixer.example(None) for _ in data.background]
    targets += [-1] * len(data.background)
    return waves, targets


def evaluate(model: AudioSpectrogramTransformer, x: torch.Tensor, targets: list[int], labels: list[str], offset: int = 0) -> dict:
    """Clip accuracy (background = no label above threshold) and per-label precision/recall."""
    model.eval()
    with torch.inference_mode():
        probs = torch.cat([model.probabilities(model(x[i:i + 64])) for i in range(0, len(x), 64)]).numpy()[:, offset:]
    best = probs.argmax(axis=1)
    predicted = np.where(probs.max(axis=1) >= THRESHOLD, best, -1)
    truth = np.asarray(targets)
    per_label = {}
    for k, name in enumerate(labels):
        tp = int(np.sum((predicted == k) & (truth == k)))
        fp = int(np.sum((predicted == k) & (truth != k)))
        fn = int(np.sum((predicted != k) & (truth == k)))
        per_label[name] = {"precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
                           "clips": int(np.sum(truth == k))}
    return {"clip_accuracy": float(np.mean(predicted == truth)) if len(truth) else 0.0,
            "clips": int(len(truth)), "per_label": per_label}


def train(data_dir: Path, out_dir: Path, settings: TrainSettings, base: str | None = None, progress=print) -> dict:
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    files, bg = scan(data_dir, settings.background)
    new_labels = sorted(files)
    train_files, val_files = split(files, bg, settings.val_fraction, settings.seed)
    train_data, val_data = load(train_files, new_labels), load(val_files, new_labels)
    progress(f"{len(new_labels)} labels, {len(train_data.clips)} training clips, {len(val_data.clips)} validation clips, "
             f"{len(train_data.background)} + {len(val_data.background)} background clips")

    if base:
        loaded = load_model(base)
        if set(new_labels) & set(loaded.labels):
            raise StreamerError(f"labels already in the base model: {sorted(set(new_labels) & set(loaded.labels))[:5]}")
        feat = loaded.features
        labels = list(loaded.labels) + new_labels
    else:
        feat = FeatureConfig(max_length=settings.max_length)
    span = window_samples(feat.max_length)

    if not base:  # normalisation from the training data (features of plain clips over background)
        sample = [Mixer(train_data, span, settings, rng).example(c) for c, _, _ in train_data.clips[:200]]
        raw = torch.cat([log_mel(w, feat.num_mel_bins) for w in sample])
        feat = FeatureConfig(max_length=feat.max_length, mean=float(raw.mean()), std=float(raw.std()))
        config = ASTConfig(**PRESETS[settings.preset], max_length=feat.max_length, frequency_stride=settings.stride,
                           time_stride=settings.stride, labels=tuple(new_labels), problem_type="multi_label_classification")
        model = AudioSpectrogramTransformer(config)
        _init(model)
        labels = new_labels
    else:
        model, config = _extend(loaded, new_labels)

    val_waves, val_targets = fixed_examples(val_data, span, settings.seed)
    val_x = features(val_waves, feat)
    offset = len(labels) - len(new_labels)
    params = [p for p in model.parameters() if p.requires_grad]
    # no weight decay on a base model: decay would move the frozen base labels' rows too
    optimiser = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0 if base else 0.05)
    mixer = Mixer(train_data, span, settings, rng)
    deadline = time.monotonic() + settings.minutes * 60
    started, step, best = time.monotonic(), 0, None
    warmup = 50
    while (step < settings.max_steps) if settings.max_steps else (time.monotonic() < deadline):
        model.train()
        picks = rng.integers(0, len(train_data.clips), settings.batch)
        negative = rng.random(settings.batch) < NEGATIVE_FRACTION
        waves, target = [], torch.zeros(settings.batch, len(labels))
        for row, pick in enumerate(picks):
            if not negative[row]:
                clip, label, _ = train_data.clips[pick]
                waves.append(mixer.example(clip))
                target[row, offset + label] = 1.0
            else:
                waves.append(mixer.example(None))
        x = spec_augment(features(waves, feat), rng)
        elapsed = step / settings.max_steps if settings.max_steps else (time.monotonic() - started) / (settings.minutes * 60)
        lr = settings.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed)))
        for group in optimiser.param_groups:
            group["lr"] = lr
        if base:  # frozen backbone: only the new head rows learn, on the pooled embedding
            with torch.no_grad():
                pooled = model.forward_head(model.forward_features(x, pooled_only=True), pre_logits=True)
            logits = model.head(pooled)
        else:
            logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits[:, offset:], target[:, offset:])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        step += 1
        if step % 50 == 0:
            report = evaluate(model, val_x, val_targets, new_labels, offset)
            progress(f"step {step}, {time.monotonic() - started:.0f} s, loss {loss.item():.3f}, "
                     f"validation clip accuracy {report['clip_accuracy']:.3f}")
            if best is None or report["clip_accuracy"] >= best[0]:
                best = (report["clip_accuracy"], {k: v.detach().clone() for k, v in model.state_dict().items()})
    if best is not None:
        model.load_state_dict(best[1])
    report = evaluate(model, val_x, val_targets, new_labels, offset)
    report.update(steps=step, seconds=round(time.monotonic() - started, 1), labels=new_labels,
                  base=base, preset=None if base else settings.preset, max_length=feat.max_length)
    model.eval()
    first_new = next((p for p in [*reversed(out_dir.absolute().parents), out_dir.absolute()] if not p.exists()), None)
    save_checkpoint(LoadedModel(model, config, feat, str(out_dir)), out_dir)
    (out_dir / "validation.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "split.json").write_text(json.dumps({"validation": {k if k != "\0bg" else "background": [p.name for p in v] for k, v in val_files.items()}}, indent=2) + "\n")
    make_readable(out_dir, created=first_new)
    return report


def _init(model: AudioSpectrogramTransformer) -> None:
    for name, p in model.named_parameters():
        if p.dim() > 1:
            torch.nn.init.trunc_normal_(p, std=0.02)
        elif "token" in name or "pos_embed" in name:
            torch.nn.init.trunc_normal_(p, std=0.02)


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


def make_readable(out_dir: Path, created: Path | None = None) -> None:
    """Files 0644, folders 0755: a model trained as one user (root, a umask of 077) is read
    by another — the service's dynamic user. ``created``: the first folder that training
    created above ``out_dir``, made traversable too (folders that existed are left alone)."""
    out_dir = out_dir.absolute()
    for path in [out_dir, *out_dir.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod(MODEL_DIR_MODE if path.is_dir() else MODEL_FILE_MODE)
    if created is not None:
        created = created.absolute()
        for parent in out_dir.parents:
            if parent == created or created in parent.parents:
                parent.chmod(MODEL_DIR_MODE)

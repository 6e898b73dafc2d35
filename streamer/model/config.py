"""AST architecture and feature settings, read from a checkpoint's JSON files.

The checkpoint's ``config.json`` decides the architecture (sizes, patch strides,
``max_length``, ``num_mel_bins``, labels) and its ``preprocessor_config.json`` the
feature normalisation. Both are validated here, before a single tensor is allocated,
so a hostile or broken file gives a clear error instead of an out-of-memory kill.
"""

from __future__ import annotations

import json
import math
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamer.constants import SAMPLE_RATE_HZ
from streamer.errors import CheckpointError

AST_MODEL_TYPE = "audio-spectrogram-transformer"

# AudioSet statistics of the Kaldi log-mel features; ASTFeatureExtractor's defaults.
AUDIOSET_MEAN = -4.2677393
AUDIOSET_STD = 4.5689974

# Without an explicit problem_type, a head this wide is taken as multi-label (AudioSet
# has 527 labels, FSD50K 200); narrower heads (Speech Commands 35, ESC-50 50) as
# single-label. A checkpoint can always state problem_type to settle it.
MULTI_LABEL_MIN_LABELS = 100

# Bounds that no real AST comes near; anything past them is refused before allocating.
MAX_HIDDEN_SIZE = 8192
MAX_LAYERS = 96
MAX_HEADS = 256
MAX_INTERMEDIATE_SIZE = 65536
MAX_PATCH_SIZE = 128
MAX_FRAMES = 65536
MAX_MEL_BINS = 1024
MAX_LABELS = 100_000
MAX_PARAMETERS = 4_000_000_000

SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")


@dataclass(frozen=True)
class ASTConfig:
    """The architecture of an Audio Spectrogram Transformer, as ``config.json`` states it."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    patch_size: int = 16
    qkv_bias: bool = True
    frequency_stride: int = 10
    time_stride: int = 10
    max_length: int = 1024
    num_mel_bins: int = 128
    labels: tuple[str, ...] = field(default_factory=tuple)
    problem_type: str | None = None

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def grid(self) -> tuple[int, int]:
        """Number of patches along frequency and along time."""
        f = (self.num_mel_bins - self.patch_size) // self.frequency_stride + 1
        t = (self.max_length - self.patch_size) // self.time_stride + 1
        return f, t

    @property
    def num_patches(self) -> int:
        f, t = self.grid
        return f * t

    @property
    def multi_label(self) -> bool:
        """Whether scores are independent sigmoids (True) or one softmax (False)."""
        if self.problem_type == "multi_label_classification":
            return True
        if self.problem_type == "single_label_classification":
            return False
        return self.num_labels == 1 or self.num_labels >= MULTI_LABEL_MIN_LABELS

    def window_gflop(self) -> float:
        """Multiply-adds × 2 of one window's forward pass, in GFLOP (the full 10-10 AST: ~200).

        Every layer's projections and MLP on every token plus attention's two token×token
        products (the last layer's query-only shortcut ignored: an upper bound).
        """
        h, i, tokens = self.hidden_size, self.intermediate_size, self.num_patches + 2
        per_layer = 2 * tokens * (4 * h * h + 2 * h * i) + 4 * tokens * tokens * h
        embed = 2 * self.num_patches * self.patch_size**2 * h
        return (self.num_hidden_layers * per_layer + embed) / 1e9

    def parameter_count(self) -> int:
        h, i, n = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        per_layer = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h
        embed = h * self.patch_size**2 + h + (self.num_patches + 4) * h
        head = 2 * h + (h + 1) * self.num_labels
        return n * per_layer + embed + 2 * h + head

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ASTConfig":
        """Validate a ``config.json`` mapping; raise :class:`CheckpointError` naming the bad key."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type != AST_MODEL_TYPE:
            raise CheckpointError(
                f"{source}: model_type is {model_type!r}, not {AST_MODEL_TYPE!r}: this is not an "
                "Audio Spectrogram Transformer checkpoint"
            )
        defaults = cls()

        def integer(key: str, low: int, high: int) -> int:
            value = raw.get(key, getattr(defaults, key))
            if isinstance(value, (list, tuple)) and key == "patch_size":
                if len(value) != 2 or value[0] != value[1]:
                    raise CheckpointError(f"{source}: {key} must be square, got {value!r}")
                value = value[0]
            if isinstance(value, bool) or not isinstance(value, int):
                raise CheckpointError(f"{source}: {key} must be an integer, got {value!r}")
            if not low <= value <= high:
                raise CheckpointError(f"{source}: {key}={value} is outside {low}..{high}")
            return value

        hidden = integer("hidden_size", 1, MAX_HIDDEN_SIZE)
        heads = integer("num_attention_heads", 1, MAX_HEADS)
        if hidden % heads:
            raise CheckpointError(
                f"{source}: hidden_size={hidden} is not divisible by num_attention_heads={heads}"
            )
        patch = integer("patch_size", 1, MAX_PATCH_SIZE)
        act = raw.get("hidden_act", defaults.hidden_act)
        if act not in SUPPORTED_ACTIVATIONS:
            raise CheckpointError(
                f"{source}: hidden_act={act!r} is not supported (use one of {', '.join(SUPPORTED_ACTIVATIONS)})"
            )
        eps = raw.get("layer_norm_eps", defaults.layer_norm_eps)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise CheckpointError(f"{source}: layer_norm_eps must be a number in (0, 1), got {eps!r}")
        qkv_bias = raw.get("qkv_bias", True)
        if not isinstance(qkv_bias, bool):
            raise CheckpointError(f"{source}: qkv_bias must be true or false, got {qkv_bias!r}")
        problem_type = raw.get("problem_type")
        if problem_type not in (None, "multi_label_classification", "single_label_classification", "regression"):
            raise CheckpointError(f"{source}: unknown problem_type {problem_type!r}")

        config = cls(
            hidden_size=hidden,
            num_hidden_layers=integer("num_hidden_layers", 1, MAX_LAYERS),
            num_attention_heads=heads,
            intermediate_size=integer("intermediate_size", 1, MAX_INTERMEDIATE_SIZE),
            hidden_act=act,
            layer_norm_eps=float(eps),
            patch_size=patch,
            qkv_bias=qkv_bias,
            frequency_stride=integer("frequency_stride", 1, MAX_PATCH_SIZE),
            time_stride=integer("time_stride", 1, MAX_PATCH_SIZE),
            max_length=integer("max_length", patch, MAX_FRAMES),
            num_mel_bins=integer("num_mel_bins", patch, MAX_MEL_BINS),
            labels=_labels(raw, source),
            problem_type=problem_type,
        )
        params = config.parameter_count()
        if params > MAX_PARAMETERS:
            raise CheckpointError(
                f"{source}: the sizes describe a model of {params:.3g} parameters, over the limit of "
                f"{MAX_PARAMETERS:.3g}; refusing to allocate it"
            )
        return config


def _labels(raw: dict[str, Any], source: str) -> tuple[str, ...]:
    """Labels in class-index order from ``id2label`` (or ``num_labels`` generic names)."""
    id2label = raw.get("id2label")
    if id2label is None:
        count = raw.get("num_labels", 2)
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_LABELS:
            raise CheckpointError(f"{source}: num_labels must be an integer in 0..{MAX_LABELS}")
        return tuple(f"LABEL_{i}" for i in range(count))
    if not isinstance(id2label, dict) or len(id2label) > MAX_LABELS:
        raise CheckpointError(f"{source}: id2label must be an object of at most {MAX_LABELS} entries")
    try:
        indexed = {int(k): v for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: id2label keys must be class indices") from None
    if any(str(int(k)) != k for k in id2label):  # "-0" or " 1" would silently replace another class's name
        raise CheckpointError(f"{source}: id2label keys must be class indices written plainly (0, 1, …), got {next(k for k in id2label if str(int(k)) != k)!r}")
    if sorted(indexed) != list(range(len(indexed))):
        raise CheckpointError(f"{source}: id2label must number its classes 0..{len(indexed) - 1} without gaps")
    if not all(isinstance(v, str) and v.strip() for v in indexed.values()):
        raise CheckpointError(f"{source}: id2label values must be non-empty strings")
    if any(unicodedata.category(c) == "Cc" for v in indexed.values() for c in v):  # a newline forges output lines, ESC paints a terminal
        bad = next(i for i, v in indexed.items() if any(unicodedata.category(c) == "Cc" for c in v))
        raise CheckpointError(f"{source}: label {bad} ({indexed[bad]!r}) holds control characters (a newline, an escape)")
    seen: dict[str, int] = {}
    for i in range(len(indexed)):
        if indexed[i] in seen:  # targets and MQTT topics are named by label: two classes of one name cannot be told apart
            raise CheckpointError(f"{source}: labels {seen[indexed[i]]} and {i} are both {indexed[i]!r}; each label needs its own name")
        seen[indexed[i]] = i
    return tuple(indexed[i] for i in range(len(indexed)))


FEATURE_STD_RANGE = (1e-3, 1e3)  # a log-mel std (AudioSet's is 4.6): outside this the normalised input overflows or is noise
FEATURE_MEAN_MAX = 1e3  # |mean| of log-mel values (AudioSet's is -4.3)


@dataclass(frozen=True)
class FeatureConfig:
    """How audio becomes the model's input: what ``preprocessor_config.json`` says."""

    num_mel_bins: int = 128
    max_length: int = 1024
    mean: float = AUDIOSET_MEAN
    std: float = AUDIOSET_STD
    do_normalize: bool = True
    sample_rate: int = SAMPLE_RATE_HZ

    @classmethod
    def for_model(cls, model: ASTConfig, raw: dict[str, Any] | None, source: str) -> "FeatureConfig":
        """Features for ``model``: the preprocessor's mean/std when given, else AudioSet's."""
        raw = {} if raw is None else raw  # no file; a file of [], null or 0 is not "no file"
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: expected a JSON object")
        rate = raw.get("sampling_rate", SAMPLE_RATE_HZ)
        if rate != SAMPLE_RATE_HZ:
            raise CheckpointError(f"{source}: sampling_rate={rate!r}; only {SAMPLE_RATE_HZ} Hz models are supported")
        mel = raw.get("num_mel_bins", model.num_mel_bins)
        if mel != model.num_mel_bins:
            raise CheckpointError(
                f"{source}: num_mel_bins={mel!r} disagrees with config.json's {model.num_mel_bins}"
            )
        values = {}
        for key, default in (("mean", AUDIOSET_MEAN), ("std", AUDIOSET_STD)):
            value = raw.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise CheckpointError(f"{source}: {key} must be a finite number, got {value!r}")
            values[key] = float(value)
        if values["std"] <= 0:
            raise CheckpointError(f"{source}: std must be positive, got {values['std']}")
        # log-mel features lie within tens of their mean: a std of 1e-320 or a mean of 1e308
        # turns every score into NaN, a model that can never fire and never says so
        if not FEATURE_STD_RANGE[0] <= values["std"] <= FEATURE_STD_RANGE[1] or abs(values["mean"]) > FEATURE_MEAN_MAX:
            raise CheckpointError(f"{source}: mean {values['mean']:g} / std {values['std']:g} are not log-mel statistics "
                                  f"(AudioSet's: {AUDIOSET_MEAN} / {AUDIOSET_STD}); the file is damaged or not an AST preprocessor's")
        do_normalize = raw.get("do_normalize", True)
        if not isinstance(do_normalize, bool):
            raise CheckpointError(f"{source}: do_normalize must be true or false")
        # The model's positional table fixes the window length; the preprocessor's
        # max_length only matters to transformers' padding and must not disagree.
        return cls(
            num_mel_bins=model.num_mel_bins,
            max_length=model.max_length,
            mean=values["mean"],
            std=values["std"],
            do_normalize=do_normalize,
        )


def read_json(path: Path) -> Any:
    """Parse a JSON file, turning every failure into a one-line :class:`CheckpointError`."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from None
    except RecursionError:  # [[[[… a hundred thousand deep: no model's file is
        raise CheckpointError(f"{path}: not readable JSON (nested too deeply)") from None
    except ValueError as exc:  # an integer of thousands of digits (Python's limit on converting them)
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from None

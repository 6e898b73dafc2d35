"""Per-label event thresholds chosen from data, kept next to a checkpoint.

``streamer train`` picks, for each label it trained, the on-threshold that keeps false
events on held-out background under a target rate while keeping recall — and the EMA
weight it was chosen with (a short sound seen by one window is halved by the shipped EMA;
a steady one is best averaged) — and writes them to ``thresholds.json`` beside
``config.json``. Transformers ignores the file, so the checkpoint stays a standard one;
the smoother takes a label's values as its defaults where the config sets none for that
target (see :meth:`streamer.events.DetectSettings.targets`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, NamedTuple

from streamer.errors import CheckpointError
from streamer.model.config import read_json

log = logging.getLogger(__name__)

THRESHOLDS_FILE = "thresholds.json"
VALIDATION_FILE = "validation.json"  # streamer train's report: its presence says the model was trained here
HOP_TOLERANCE_S = 0.005  # hops are whole 10 ms frames: closer than half a frame is the same hop


THRESHOLDS_FIX = ("fix: train the model again (streamer train … --out DIR), or move thresholds.json out of the model "
                  "folder to use the config's thresholds")


class ThresholdsError(CheckpointError):
    """A thresholds.json that is there but cannot be used; the model's labels still can."""


class Calibration(NamedTuple):
    """One label's values chosen from data; ``ema_alpha`` None: the smoothing was not chosen."""

    on_threshold: float
    off_threshold: float
    ema_alpha: float | None = None


def read_thresholds(directory: Path, labels: tuple[str, ...]) -> tuple[dict[str, Calibration], float | None]:
    """``{label: Calibration}`` from ``directory``'s thresholds.json (or {}), and the hop (s)
    they were chosen at (None: no file, or one written before the hop was recorded).

    A file that is there but broken is an error (a model whose calibration silently
    vanished would fire at the wrong rate); labels the model does not have are refused.
    """
    try:
        return _read(directory / THRESHOLDS_FILE, labels)
    except CheckpointError as exc:
        raise ThresholdsError(f"{exc}; {THRESHOLDS_FIX}") from None


def _read(path: Path, labels: tuple[str, ...]) -> tuple[dict[str, Calibration], float | None]:
    if not path.exists():
        if (path.parent / VALIDATION_FILE).is_file():  # trained by `streamer train`, its thresholds since lost
            log.warning("%s: trained by streamer train but its %s is missing: every label uses the config's thresholds; "
                        "fix: train it again, or put thresholds.json back", path.parent, THRESHOLDS_FILE)
        return {}, None
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    raw = read_json(path)
    entries = raw.get("labels") if isinstance(raw, dict) else None
    if not isinstance(entries, dict):
        raise CheckpointError(f"{path}: expected {{\"labels\": {{label: {{\"on_threshold\": …, \"off_threshold\": …}}}}}}")
    hop = raw.get("hop_s")
    if hop is not None and not (isinstance(hop, (int, float)) and not isinstance(hop, bool) and math.isfinite(hop) and hop > 0):
        raise CheckpointError(f"{path}: hop_s must be a positive number of seconds, got {hop!r}")
    out: dict[str, Calibration] = {}
    for label, entry in entries.items():
        if label not in labels:
            raise CheckpointError(f"{path}: label {label!r} is not one of the model's labels")
        on, off = (entry.get(k) if isinstance(entry, dict) else None for k in ("on_threshold", "off_threshold"))
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0.0 <= v <= 1.0
                   for v in (on, off)) or off > on:
            raise CheckpointError(f"{path}: {label}: expected 0 <= off_threshold <= on_threshold <= 1, got {entry!r}")
        alpha = entry.get("ema_alpha")
        if alpha is not None and not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
                                      and math.isfinite(alpha) and 0.0 < alpha <= 1.0):
            raise CheckpointError(f"{path}: {label}: ema_alpha must be in (0, 1], got {alpha!r}")
        out[label] = Calibration(float(on), float(off), None if alpha is None else float(alpha))
    return out, None if hop is None else float(hop)


def hop_mismatch(model: str, chosen_at_s: float | None, hop_s: float) -> str | None:
    """One warning line when thresholds chosen at one hop are used at another; else None.

    At another hop a sound is heard by another number of windows and the background by
    another number an hour, so the smoother's calibrated thresholds no longer give the false
    events and recall that ``streamer train`` measured (short sounds suffer most).
    """
    if chosen_at_s is None or abs(chosen_at_s - hop_s) < HOP_TOLERANCE_S:
        return None
    return (f"{model}: its thresholds were chosen at hop {chosen_at_s:g} s but this runs at hop {hop_s:g} s, so its false events "
            f"per hour and recall will differ from what training measured; fix: train with --hop {hop_s:g}, run at hop "
            f"{chosen_at_s:g}, or set those targets' thresholds under detect.targets")


def write_thresholds(directory: Path, thresholds: dict[str, dict[str, Any]], **about: Any) -> Path:
    """Write ``{label: {"on_threshold", "off_threshold", …}}`` with how they were chosen (``about``)."""
    path = directory / THRESHOLDS_FILE
    path.write_text(json.dumps({**about, "labels": thresholds}, indent=2) + "\n", encoding="utf-8")
    return path

"""Test scenes and event-level scoring, for proving detection end to end on real recordings.

A scene is background noise with silent stretches and clips placed at known times; the
truth is the list of (onset, offset, label). Scoring follows the usual event-based
definition (as in sed_eval's EventBasedMetrics with offsets ignored): an estimated event
is a hit when a true event of the same label has its onset within ``collar`` seconds of
the estimate's onset, each true event matched at most once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamer.constants import SAMPLE_RATE_HZ


ACTIVE_FRAME_SAMPLES = 800  # 50 ms frames for finding where in a clip the sound is
ACTIVE_DB = 20.0  # a frame is part of the sound when within this of the clip's loudest frame


def active_frames(clip: np.ndarray) -> np.ndarray:
    """Indices of the clip's ``ACTIVE_FRAME_SAMPLES`` frames that hold its sound (within
    ``ACTIVE_DB`` of its loudest frame); a clip shorter than one frame is one frame, 0."""
    frames = len(clip) // ACTIVE_FRAME_SAMPLES
    if frames == 0:
        return np.zeros(1, dtype=np.int64)
    energy = (clip[: frames * ACTIVE_FRAME_SAMPLES].reshape(frames, -1).astype(np.float64) ** 2).mean(axis=1)
    level = 10 * np.log10(energy + 1e-12)
    return np.flatnonzero(level >= level.max() - ACTIVE_DB)


def sound_onset_s(clip: np.ndarray) -> float:
    """Where in the clip its sound starts (s): its first active frame. A recording often
    begins before the sound does (one crying-baby clip is quiet for its first 2.65 s), and
    a detector that fires at the first cry is right, not 2.65 s late."""
    return float(active_frames(clip)[0]) * ACTIVE_FRAME_SAMPLES / SAMPLE_RATE_HZ


@dataclass(frozen=True)
class TrueEvent:
    onset: float
    offset: float
    label: str


def build_scene(clips: list[tuple[np.ndarray, str]], background: list[np.ndarray], gap_s: float = 9.0,
                lead_s: float = 4.0, tail_s: float = 10.0, noise_level: float = 0.2, seed: int = 0) -> tuple[np.ndarray, list[TrueEvent]]:
    """Clips ``gap_s`` apart after ``lead_s`` of background, ``tail_s`` of background at the end.

    A true event starts where the clip's sound starts (:func:`sound_onset_s`), not where its
    file does, and ends with the file."""
    rng = np.random.default_rng(seed)
    total = lead_s + sum(len(c) / SAMPLE_RATE_HZ + gap_s for c, _ in clips) + tail_s
    n = int(total * SAMPLE_RATE_HZ)
    bed = np.zeros(n, dtype=np.float32)
    if background:
        pos = 0
        while pos < n:
            bg = background[rng.integers(len(background))]
            take = min(len(bg), n - pos)
            bed[pos:pos + take] = bg[:take]
            pos += take
        bed *= np.float32(noise_level / (np.abs(bed).max() + 1e-8) * 0.25)
    truth = []
    t = lead_s
    for clip, label in clips:
        start = int(t * SAMPLE_RATE_HZ)
        bed[start:start + len(clip)] += clip
        truth.append(TrueEvent(t + sound_onset_s(clip), t + len(clip) / SAMPLE_RATE_HZ, label))
        t += len(clip) / SAMPLE_RATE_HZ + gap_s
    return bed, truth


def event_metrics(estimated: list[tuple[float, str]], truth: list[TrueEvent], collar: float) -> dict:
    """Event-based precision, recall and F1 on onsets (within ``collar`` seconds)."""
    used = set()
    hits = 0
    for onset, label in sorted(estimated):
        match = next((i for i, e in enumerate(truth) if i not in used and e.label == label and abs(e.onset - onset) <= collar), None)
        if match is not None:
            used.add(match)
            hits += 1
    precision = hits / len(estimated) if estimated else 0.0
    recall = hits / len(truth) if truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "hits": hits, "estimated": len(estimated), "true": len(truth)}


def background_false_events(estimated: list[tuple[float, str]], truth: list[TrueEvent], collar: float,
                            duration: float) -> tuple[list[tuple[float, str]], float]:
    """Estimated onsets on background alone — at least ``collar`` away from every clip — and
    how many seconds of the scene are background alone."""
    busy = [(e.onset - collar, e.offset + collar) for e in truth]
    merged: list[list[float]] = []
    for a, b in sorted((max(0.0, a), min(duration, b)) for a, b in busy):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    quiet_s = duration - sum(b - a for a, b in merged)
    false = [(t, label) for t, label in estimated if not any(a <= t <= b for a, b in merged)]
    return false, quiet_s


def missed(estimated: list[tuple[float, str]], truth: list[TrueEvent], collar: float) -> list[TrueEvent]:
    """True events with no estimate of their label whose onset is within ``collar``."""
    return [e for e in truth if not any(label == e.label and abs(t - e.onset) <= collar for t, label in estimated)]


def sed_eval_metrics(estimated: list[tuple[float, float, str]], truth: list[TrueEvent], collar: float) -> dict:
    """The same event-based figures by sed_eval (the DCASE reference implementation), when it
    is installed (a test extra): onsets within ``collar``, offsets ignored, micro-averaged."""
    import sed_eval  # noqa: PLC0415 - optional, heavy

    labels = sorted({e.label for e in truth} | {label for _, _, label in estimated})
    metric = sed_eval.sound_event.EventBasedMetrics(event_label_list=labels, t_collar=collar,
                                                    evaluate_onset=True, evaluate_offset=False)
    reference = [{"event_label": e.label, "onset": e.onset, "offset": e.offset, "filename": "scene"} for e in truth]
    estimate = [{"event_label": label, "onset": on, "offset": off, "filename": "scene"} for on, off, label in estimated]
    metric.evaluate(reference_event_list=reference, estimated_event_list=estimate)
    overall = metric.results_overall_metrics()["f_measure"]
    return {"precision": overall["precision"], "recall": overall["recall"], "f1": overall["f_measure"]}

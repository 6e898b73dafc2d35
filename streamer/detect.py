"""Offline detection over audio files: the live pipeline, fed from files as fast as it goes.

Each file is decoded in blocks and pushed through the same :class:`StreamWindows`
(frontend + scheduler) and :class:`InferenceEngine` that the daemon uses, so a file gives the
windows, start samples and scores the same audio would give live.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamer.capture.files import iter_audio
from streamer.features.fbank import FRAME_SHIFT
from streamer.events import Event, EventSmoother
from streamer.inference.engine import InferenceEngine
from streamer.constants import SAMPLE_RATE_HZ
from streamer.features.windows import StreamWindows, Window

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileScores:
    """Scores of every window of one file."""

    path: str
    start_sample: np.ndarray  # int64 (windows,)
    scores: np.ndarray  # float32 (windows, labels)
    events: list[Event] = field(default_factory=list)


def hop_to_frames(hop_seconds: float) -> int:
    """A hop in seconds as a whole number of 10 ms frames; anything else is refused."""
    frames = round(hop_seconds * SAMPLE_RATE_HZ / FRAME_SHIFT)
    if frames < 1 or abs(frames * FRAME_SHIFT / SAMPLE_RATE_HZ - hop_seconds) > 1e-9:
        raise ValueError(f"hop must be a positive multiple of 0.01 s, got {hop_seconds}")
    return frames


def iter_windows(path: str | Path, windows: StreamWindows) -> Iterator[Window]:
    for block in iter_audio(path):
        yield from windows.push(block)
    yield from windows.finish()


def score_file(
    path: str | Path,
    engine: InferenceEngine,
    hop_frames: int,
    on_batch: Callable[[list[Window], np.ndarray], None] | None = None,
    smoother: EventSmoother | None = None,
) -> FileScores:
    """Slide windows over one file and score them in batches of the engine's size.

    With a ``smoother``, its events are collected in ``FileScores.events`` (open ones
    closed at the end of the file, as a live stream that ends would close them).
    """
    stream = StreamWindows(stream_name(path), engine.loaded.features, hop_frames)
    events: list[Event] = []
    starts: list[int] = []
    scores: list[np.ndarray] = []
    pending: list[Window] = []

    def flush() -> None:
        probs = engine.score(pending)
        starts.extend(w.start_sample for w in pending)
        scores.append(probs)
        if smoother is not None:
            for window, row in zip(pending, probs):
                events.extend(smoother.update(window.start_sample, row, window.wall_time))
        if on_batch:
            on_batch(list(pending), probs)
        pending.clear()

    for window in iter_windows(path, stream):
        pending.append(window)
        if len(pending) == engine.max_batch:
            flush()
    if pending:
        flush()
    if smoother is not None:
        events.extend(smoother.close_all("stream-end"))
    labels = len(engine.labels)
    return FileScores(
        path=str(path),
        start_sample=np.asarray(starts, dtype=np.int64),
        scores=np.concatenate(scores) if scores else np.zeros((0, labels), dtype=np.float32),
        events=events,
    )


def stream_name(path: str | Path) -> str:
    """A file's stream name: its stem, as a daemon's file source would be named by default."""
    return Path(path).stem


def save_events(path: Path, results: list[FileScores]) -> None:
    """``--events-out``: one JSON object per ON and per OFF, in order, with the file it came from."""
    with open(path, "w", encoding="utf-8") as out:
        for result in results:
            for event in result.events:
                out.write(json.dumps({**event.as_dict(), "file": result.path}) + "\n")


def top_labels(probs: np.ndarray, labels: tuple[str, ...], k: int) -> list[tuple[str, float]]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [(labels[i], float(probs[i])) for i in order]


def save_scores(path: Path, results: list[FileScores], labels: tuple[str, ...]) -> None:
    """Write the ``--scores-out`` archive: labels, start_sample, scores, sample_rate.

    With several input files the windows are concatenated in input order; ``files`` and
    ``file_index`` say which file each window came from.
    """
    np.savez(
        path,
        labels=np.asarray(labels, dtype=str),
        start_sample=np.concatenate([r.start_sample for r in results]).astype(np.int64),
        scores=np.concatenate([r.scores for r in results]).astype(np.float32),
        sample_rate=np.int64(SAMPLE_RATE_HZ),
        files=np.asarray([r.path for r in results], dtype=str),
        file_index=np.concatenate([np.full(len(r.start_sample), i, dtype=np.int64) for i, r in enumerate(results)]),
    )

"""Offline detection over audio files: the live pipeline, fed from files as fast as it goes.

Each file is decoded in blocks and pushed through the same :class:`StreamWindows`
(frontend + scheduler) and :class:`InferenceEngine` that the daemon uses, so a file gives the
windows, start samples and scores the same audio would give live.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamer.capture.files import MAX_ABS_SAMPLE, audio_info, iter_audio
from streamer.capture.sources import FileSource
from streamer.errors import StreamerError
from streamer.features.fbank import FRAME_SHIFT
from streamer.events import Event, EventSmoother, Target
from streamer.inference.engine import InferenceEngine
from streamer.constants import SAMPLE_RATE_HZ
from streamer.features.windows import StreamWindows, Window

log = logging.getLogger(__name__)
INTERRUPT_STOP_S = 10.0  # an interrupted run waits this long for the scoring thread to finish its batch


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
    """The reference path, one stream at a time (tests and benchmarks compare against it)."""
    for block in iter_audio(path):
        yield from windows.push(block)
    yield from windows.finish()


def score_files(
    paths: Sequence[str | Path],
    engine: InferenceEngine,
    hop_frames: int,
    targets: Sequence[Target] = (),
    on_window: Callable[[int, int, np.ndarray], None] | None = None,
) -> list[FileScores]:
    """Score files through the live pipeline, as lossless file sources read as fast as it goes.

    Every file is a stream of one :class:`~streamer.pipeline.Pipeline`, so files are batched
    together and a file gives exactly the windows, scores and events that a live stream of
    the same audio gives. ``on_window(file index, start sample, probabilities)`` is called
    for each window as it is scored (in each file's order). A file that cannot be decoded
    stops the command with its one-line error.
    """
    from streamer.pipeline import Pipeline
    from streamer.sinks.base import SinkHub

    for path in paths:  # a missing, undecodable or empty file: its one-line error before anything starts
        if audio_info(Path(path))[2] == 0:
            raise StreamerError(f"{path}: no audio in it (0 samples): nothing to score")
    sources = [FileSource(stream_name(p), p, realtime=False) for p in paths]
    starts: list[list[int]] = [[] for _ in paths]
    rows: list[list[np.ndarray]] = [[] for _ in paths]
    events: list[list[Event]] = [[] for _ in paths]

    def window(ref, row, latency) -> None:
        starts[ref.stream].append(ref.start_sample)
        rows[ref.stream].append(row)
        if on_window is not None:
            on_window(ref.stream, ref.start_sample, row)

    def event(stream: int, e: Event) -> Event:
        events[stream].append(e)
        return e

    pipeline = Pipeline(engine, sources, hop_frames, list(targets), SinkHub(), max_wait_ms=0.0,
                        on_event=event, on_window=window, stop_when_done=True)
    pipeline.start()
    try:
        pipeline.wait()
    except BaseException:  # Ctrl-C: the scoring thread must end before the interpreter does (no torch op left running)
        pipeline.worker.stop(drain=False, timeout=INTERRUPT_STOP_S)
        raise
    finally:
        pipeline.ingest.stop()
    for source in sources:
        if source.state.value == "failed":
            raise StreamerError(source.error or f"{source.describe()}: cannot be read")
        if source.stats.nonfinite:  # counted by the daemon's metrics; a command has only its log to say it
            log.warning("%s: %d sample(s) were NaN, infinite or beyond ±%g and were replaced before scoring (the file is damaged)",
                        source.path, source.stats.nonfinite, MAX_ABS_SAMPLE)
    pipeline.close_events("stream-end")
    labels = len(engine.labels)
    return [FileScores(path=str(p), start_sample=np.asarray(starts[i], dtype=np.int64),
                       scores=np.stack(rows[i]).astype(np.float32) if rows[i] else np.zeros((0, labels), dtype=np.float32),
                       events=events[i])
            for i, p in enumerate(paths)]


def score_file(
    path: str | Path,
    engine: InferenceEngine,
    hop_frames: int,
    on_batch: Callable[[list[Window], np.ndarray], None] | None = None,
    smoother: EventSmoother | None = None,
) -> FileScores:
    """One file through :func:`score_files`; with a ``smoother``, its targets' events too."""
    return score_files([path], engine, hop_frames, smoother.targets if smoother is not None else ())[0]


def stream_name(path: str | Path) -> str:
    """A file's stream name: its stem, as a daemon's file source would be named by default."""
    return Path(path).stem


def check_output(path: Path) -> None:
    """Refuse, before any scoring, an output that could not be written: a folder, a device or
    pipe (``/dev/full``; a rename over it would replace the device node), a missing or
    unwritable folder — tried with a real file, as permissions alone do not tell root's."""
    if path.is_dir():
        raise StreamerError(f"{path}: a folder; give a file name (e.g. {path / 'events.jsonl'})")
    if path.exists() and not path.is_file():
        raise StreamerError(f"{path}: not a regular file (a device or a pipe); give a file name")
    if not path.parent.is_dir():
        raise StreamerError(f"{path}: the directory {path.parent} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise StreamerError(f"{path}: cannot write in {path.parent} ({exc.strerror or exc})") from None


@contextlib.contextmanager
def replaced_atomically(path: Path, mode: str = "w"):
    """A file object whose content replaces ``path`` only once it is whole: a full disk or a
    failure half way leaves the earlier file as it was, and no half-written one."""
    target = Path(os.path.realpath(path))  # through a symlink, as open() writes: the link stays a link
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would have made it, not mkstemp's 0600
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise StreamerError(f"{path}: writing failed ({exc.strerror or exc}); any earlier {path.name} is unchanged") from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_events(path: Path, results: list[FileScores]) -> None:
    """``--events-out``: one JSON object per ON and per OFF, in order, with the file it came from."""
    with replaced_atomically(path) as out:
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
    with replaced_atomically(path, "wb") as out:
        _savez(out, results, labels)


def _savez(out, results: list[FileScores], labels: tuple[str, ...]) -> None:
    np.savez(
        out,
        labels=np.asarray(labels, dtype=str),
        start_sample=np.concatenate([r.start_sample for r in results]).astype(np.int64),
        scores=np.concatenate([r.scores for r in results]).astype(np.float32),
        sample_rate=np.int64(SAMPLE_RATE_HZ),
        files=np.asarray([r.path for r in results], dtype=str),
        file_index=np.concatenate([np.full(len(r.start_sample), i, dtype=np.int64) for i, r in enumerate(results)]),
    )

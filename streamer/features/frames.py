"""Every stream's frames in one place, computed in one batched call, windows gathered by index.

:class:`FrameBank` replaces a frontend and a window scheduler per stream. Each call to
:meth:`FrameBank.push` takes the new audio of any number of streams, frames all of it
on the host (only the < 400 samples a stream's next frame still needs are kept between
calls), and computes every new frame of every stream in ONE filterbank call on the
model's device (:func:`~streamer.features.fbank.log_mel_frames`, the same arithmetic as
the offline frontend). The frames go into per-stream rings on that device; a window is
then only a reference (:class:`WindowRef`: stream, first frame, frame count), and
:meth:`FrameBank.gather` builds a whole batch of windows with one indexing op there — no
per-window copy on the host, no transfer of windows to the GPU.

The ring of a stream holds ``max_length + hop + slack`` frames, so a window's frames are
still there when the worker gathers it: a window is gathered at most one hop (plus one
read of audio) after it became due, because a newer window of the same stream replaces it
after that. Row ``capacity`` of each ring is a padding frame, so a short stream's single
window (right-padded as ``ASTFeatureExtractor`` pads a short clip) is gathered the same way.

Live streams' window grids are staggered (``phases``: stream ``i`` of ``n`` is shifted by
``i * hop / n`` frames), so that streams which started together do not all have a window
due at the same instant; offline (lossless) streams keep the reference grid exactly.

Timeline: frame ``j`` of a run begins at stream sample ``run_first_sample + 160 j``; a gap
(audio lost to an overrun, a source restart) ends the run — a run that never completed a
window still yields its padded window — and starts a new one at the new position, exactly
as the per-stream :class:`~streamer.features.windows.StreamWindows` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from streamer.features.fbank import (FRAME_LENGTH, FRAME_SHIFT, filterbank_constants, log_mel_frames, normalise,
                                     pad_value, window_samples)
from streamer.model.config import FeatureConfig

READ_SLACK_SECONDS = 2.0  # audio one push may bring beyond a due window (a late tick, a burst from a source)


@dataclass(frozen=True, slots=True)
class WindowRef:
    """A window that lives in a :class:`FrameBank`: where it is and where it sits on its stream."""

    stream: int  # the stream's index in the bank
    start_sample: int  # its first sample on the stream's 16 kHz timeline
    first_frame: int  # its first frame's index in the stream's ring (a running count, not wrapped)
    frames: int  # real frames: max_length, or fewer for a short stream's one padded window
    wall_time: float | None  # wall clock of its last sample, when the stream has one


class _Run:
    """Host-side state of one stream: the frames' timeline and the samples not yet framed."""

    __slots__ = ("tail", "next_sample", "first_sample", "frames", "windows", "frame_count", "seen")

    def __init__(self, position: int = 0, frame_count: int = 0) -> None:
        self.tail = np.zeros(0, dtype=np.float32)  # < FRAME_LENGTH samples the next frame needs
        self.next_sample = position  # stream position of the next sample expected
        self.first_sample = position  # stream sample where frame 0 of this run begins
        self.frames = 0  # frames in this run
        self.windows = 0  # windows this run has completed
        self.frame_count = frame_count  # frames ever stored for this stream (ring index base)
        self.seen = 0  # samples this run has received


class FrameBank:
    """Per-stream frame rings on the model's device, fed by one batched frontend."""

    def __init__(self, features: FeatureConfig, streams: int, hop_frames: int, device: torch.device | str = "cpu",
                 slack_frames: int | None = None, phases: list[int] | None = None) -> None:
        if hop_frames < 1:
            raise ValueError(f"hop must be at least one frame, got {hop_frames}")
        self.features = features
        self.device = torch.device(device)
        self.max_length = features.max_length
        self.bins = features.num_mel_bins
        self.hop_frames = hop_frames
        slack = slack_frames if slack_frames is not None else int(READ_SLACK_SECONDS * 100)
        self.capacity = self.max_length + hop_frames + slack
        self.rings = torch.empty((streams, self.capacity + 1, self.bins), device=self.device)
        self.rings[:, self.capacity] = pad_value(features)  # the padding row
        self._window, self._mel = filterbank_constants(self.bins, self.device)
        self._offsets = torch.arange(FRAME_LENGTH, device=self.device)
        self._positions = torch.arange(self.max_length, device=self.device)
        self.runs = [_Run() for _ in range(streams)]
        # frames each stream's window grid is shifted by (< hop): live streams that started
        # together would otherwise all have a window due at the same instant every hop
        self.phases = list(phases) if phases is not None else [0] * streams
        self.gaps = [0] * streams
        self.due_end = [0] * streams  # next_window_end(stream), kept current (see _refresh_due)
        for stream in range(streams):
            self._refresh_due(stream)

    # -- how much audio a stream's next window needs ------------------------------------------
    def next_window_end(self, stream: int, windows: int = 1) -> int:
        """Stream position just past the last sample that the stream's next ``windows`` windows need."""
        run = self.runs[stream]
        frames = self.max_length + self.phases[stream] + (run.windows + windows - 1) * self.hop_frames
        return run.first_sample + window_samples(frames)

    def samples_wanted(self, stream: int, windows: int = 1) -> int:
        """Samples to read so that exactly the next ``windows`` windows complete (lossless pacing)."""
        if windows == 1:  # asked for every marked stream at every feed: kept, not recomputed
            return max(0, self.due_end[stream] - self.runs[stream].next_sample)
        return max(0, self.next_window_end(stream, windows) - self.runs[stream].next_sample)

    def _refresh_due(self, stream: int) -> None:
        self.due_end[stream] = self.next_window_end(stream)

    # -- audio in ------------------------------------------------------------------------------
    def push(self, chunks: list[tuple[int, int, np.ndarray]], clocks: list | None = None) -> tuple[list[WindowRef], list[tuple[int, torch.Tensor]]]:
        """New audio ``(stream, position, samples)`` of any streams → the windows it completes.

        Returns the windows in stream order (each stream's oldest first) and, per stream,
        its new frames (a view on the device, for live views). ``clocks[stream](sample)``
        gives a sample's wall-clock time, when known.
        """
        refs: list[WindowRef] = []
        buffers: list[np.ndarray] = []
        starts: list[np.ndarray] = []
        plan: list[tuple[int, int, int]] = []  # stream, frames, first new frame index in the ring
        offset = 0
        for stream, position, samples in chunks:
            run = self.runs[stream]
            if position != run.next_sample:
                refs.extend(self.finish(stream, clocks))  # a run cut short still gets its padded window
                self.gaps[stream] += 1
                self.runs[stream] = run = _Run(position, run.frame_count)
                self._refresh_due(stream)
            run.next_sample += len(samples)
            run.seen += len(samples)
            buffer = np.concatenate((run.tail, samples)) if run.tail.size else np.asarray(samples, dtype=np.float32)
            count = (buffer.size - FRAME_LENGTH) // FRAME_SHIFT + 1 if buffer.size >= FRAME_LENGTH else 0
            run.tail = buffer[count * FRAME_SHIFT:].copy()
            if count == 0:
                continue
            buffers.append(buffer[: (count - 1) * FRAME_SHIFT + FRAME_LENGTH])
            starts.append(offset + FRAME_SHIFT * np.arange(count))
            offset += buffers[-1].size
            plan.append((stream, count, run.frame_count))
        if not plan:
            return refs, []
        samples_dev = self._to_device(np.concatenate(buffers))
        start_dev = self._to_device(np.concatenate(starts))
        frames = log_mel_frames(samples_dev[start_dev[:, None] + self._offsets], self._window, self._mel)
        frames = normalise(frames, self.features)
        stream_idx = np.concatenate([np.full(count, stream) for stream, count, _ in plan])
        slot_idx = np.concatenate([(base + np.arange(count)) % self.capacity for _, count, base in plan])
        where = self._to_device(np.stack((stream_idx, slot_idx)))
        self.rings[where[0], where[1]] = frames
        new_frames: list[tuple[int, torch.Tensor]] = []
        row = 0
        for stream, count, _ in plan:
            new_frames.append((stream, frames[row:row + count]))
            row += count
            run = self.runs[stream]
            run.frames += count
            run.frame_count += count
            while run.frames >= self.max_length + self.phases[stream] + run.windows * self.hop_frames:
                refs.append(self._window_ref(stream, run, clocks))
        return refs, new_frames

    def _window_ref(self, stream: int, run: _Run, clocks: list | None) -> WindowRef:
        end = self.max_length + self.phases[stream] + run.windows * self.hop_frames  # frames in the run at its end
        run.windows += 1
        self._refresh_due(stream)
        start = run.first_sample + (end - self.max_length) * FRAME_SHIFT
        first_frame = run.frame_count - run.frames + end - self.max_length
        clock = clocks[stream] if clocks else None
        wall = clock(start + window_samples(self.max_length) - 1) if clock else None
        return WindowRef(stream, start, first_frame, self.max_length, wall)

    def finish(self, stream: int, clocks: list | None = None) -> list[WindowRef]:
        """End of a stream (or of a run): a run too short for one window yields one padded window."""
        run = self.runs[stream]
        if run.windows or run.seen == 0:
            return []
        run.windows += 1
        self._refresh_due(stream)
        first_frame = run.frame_count - run.frames
        return [WindowRef(stream, run.first_sample, first_frame, min(run.frames, self.max_length), None)]

    def reset(self, stream: int, position: int = 0) -> None:
        self.runs[stream] = _Run(position, self.runs[stream].frame_count)
        self._refresh_due(stream)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """Host → the bank's device without waiting: through pinned memory, so the copy queues
        behind the batch being computed instead of blocking this thread until it is done (a
        copy from pageable memory would synchronise). PyTorch's pinned-memory cache reuses a
        buffer only after its copy has completed."""
        tensor = torch.from_numpy(array)
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    # -- windows out -----------------------------------------------------------------------------
    def gather(self, refs: list[WindowRef], out: torch.Tensor | None = None) -> torch.Tensor:
        """The windows ``refs`` as one ``(n, max_length, bins)`` tensor on the bank's device."""
        streams, first, real = self._to_device(np.array([(r.stream, r.first_frame, r.frames) for r in refs],
                                                        dtype=np.int64).T.copy())
        slots = torch.where(self._positions < real[:, None], (first[:, None] + self._positions) % self.capacity,
                            self.capacity)
        batch = self.rings[streams[:, None], slots]
        if out is not None:
            out.copy_(batch)
            return out
        return batch

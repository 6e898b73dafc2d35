"""The pipeline's spine: the batched frontend (FrameBank) against the per-stream reference,
the worker's batching and overload policy, and the pipeline over real-time and lossless sources."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from conftest import real_clips, write_wav
from mqtt_helpers import wait_for
from streamer.capture.files import read_audio
from streamer.capture.sources import FileSource
from streamer.events import DetectSettings
from streamer.features.frames import FrameBank, WindowRef
from streamer.features.windows import StreamWindows
from streamer.inference.engine import InferenceEngine
from streamer.inference.worker import Worker
from streamer.model import load_model
from streamer.model.config import FeatureConfig
from streamer.pipeline import Pipeline
from streamer.sinks.base import Scores, SinkHub


def real_samples(seconds: float, offset: int = 0) -> np.ndarray:
    samples = np.concatenate([read_audio(p) for p in real_clips(per_label=1)])
    n = int(seconds * 16000)
    assert len(samples) >= offset + n
    return samples[offset:offset + n]


def bank_windows(bank: FrameBank, refs: list[WindowRef]) -> list[torch.Tensor]:
    return list(bank.gather(refs)) if refs else []


def test_frame_bank_equals_the_per_stream_reference_with_any_chunks_gaps_and_short_streams():
    features = FeatureConfig(max_length=256)
    rng = np.random.default_rng(3)
    audio = [real_samples(9.0, 0), real_samples(6.5, 50_000), real_samples(1.3, 90_000), real_samples(0.01, 0)]
    bank = FrameBank(features, len(audio), hop_frames=40)
    got: dict[int, list] = {i: [] for i in range(len(audio))}
    positions = [0] * len(audio)
    # stream 1 loses 0.5 s in the middle (an overrun): a gap, handled as the reference handles it
    gap_at, gap = 3 * 16000, 8000
    cuts = {i: np.cumsum(rng.integers(1, 4000, size=400)) for i in range(len(audio))}
    done = [0] * len(audio)
    while any(d < len(a) for d, a in zip(done, audio)):
        chunks = []
        for i, a in enumerate(audio):  # every stream's next chunk goes into ONE push
            if done[i] >= len(a):
                continue
            end = int(min(len(a), cuts[i][np.searchsorted(cuts[i], done[i], side="right")]))
            position = positions[i]
            if i == 1 and done[i] < gap_at < end:
                end = gap_at
            chunks.append((i, position, a[done[i]:end]))
            positions[i] += end - done[i]
            if i == 1 and end == gap_at:
                positions[i] += gap  # the audio after this chunk comes 0.5 s later on the timeline
            done[i] = end
        refs, _ = bank.push(chunks)
        for ref, w in zip(refs, bank_windows(bank, refs)):
            got[ref.stream].append((ref, w))
    for i in range(len(audio)):
        last = bank.finish(i)
        got[i].extend(zip(last, bank_windows(bank, last)))

    for i, a in enumerate(audio):
        reference = StreamWindows(f"s{i}", features, 40)
        if i == 1:
            expected = reference.push(a[:gap_at], 0) + reference.push(a[gap_at:], gap_at + gap) + reference.finish()
        else:
            expected = reference.push(a, 0) + reference.finish()
        assert [r.start_sample for r, _ in got[i]] == [w.start_sample for w in expected], i
        assert [r.frames for r, _ in got[i]] == [w.frames for w in expected]
        for (_, w), e in zip(got[i], expected):
            assert (w - e.features).abs().max().item() <= 1e-5
    assert bank.gaps[1] == 1 and sum(bank.gaps) == 1
    assert [len(got[i]) for i in range(4)] == [len(got[i]) for i in range(4)] and len(got[3]) == 1  # 10 ms: padding


def engine_for(directory, max_batch: int) -> InferenceEngine:
    return InferenceEngine(load_model(directory), device="cpu", precision="fp32", max_batch=max_batch)


class SlowEngine:
    """A real engine whose every batch takes ``delay_s`` longer: inference slower than the audio."""

    def __init__(self, engine: InferenceEngine, delay_s: float) -> None:
        self.engine, self.delay_s, self.max_batch = engine, delay_s, engine.max_batch

    def submit(self, features):
        time.sleep(self.delay_s)
        return self.engine.submit(features)

    def collect(self, pending):
        return self.engine.collect(pending)


def test_worker_batches_every_stream_at_once_and_skips_stale_windows_when_behind(tiny_checkpoint):
    directory, _ = tiny_checkpoint(max_length=128)
    features = FeatureConfig(max_length=128)
    bank = FrameBank(features, 4, hop_frames=1)
    samples = real_samples(3.0)
    engine = engine_for(directory, max_batch=8)
    delivered: list[tuple[WindowRef, np.ndarray, float]] = []
    feed_queue: list[list[WindowRef]] = []

    def feed(stopping: bool) -> list[WindowRef]:  # every window that became due since the last look
        due = [ref for refs in feed_queue for ref in refs]
        feed_queue.clear()
        return due

    def deliver(refs, probs, latencies):
        delivered.extend(zip(refs, probs, latencies))

    refs, _ = bank.push([(i, 0, samples[: 128 * 160 + 240]) for i in range(4)])
    assert len(refs) == 4
    feed_queue.append(refs)
    worker = Worker(engine, feed, bank.gather, deliver, max_wait_ms=5000, active_streams=lambda: 4).start()
    worker.wake()
    t0 = time.monotonic()
    assert wait_for(lambda: len(delivered) == 4, 10)
    assert time.monotonic() - t0 < 2.5  # all four streams had a window: no waiting for max_wait
    worker.stop()
    assert engine.stats.batches == 1 and worker.stats.skipped == 0
    expected = engine.predict(bank.gather(refs))
    for ref, row, _ in delivered:
        assert np.abs(row - expected[ref.stream]).max() <= 1e-6

    # behind: one stream, 100 windows/s offered against 5 batches/s — the newest window wins
    slow = SlowEngine(engine_for(directory, max_batch=2), delay_s=0.2)
    bank = FrameBank(features, 1, hop_frames=1)
    delivered.clear()
    worker = Worker(slow, feed, bank.gather, deliver, max_wait_ms=0, active_streams=lambda: 1).start()
    offered = 0
    first = 127 * 160 + 400  # one full window, then one frame (one more window) per push
    for i in range(60):
        start, end = (0, first) if i == 0 else (first + (i - 1) * 160, first + i * 160)
        refs, _ = bank.push([(0, start, samples[start:end])])
        offered += len(refs)
        feed_queue.append(refs)
        worker.wake()
        time.sleep(0.01)
    assert wait_for(lambda: not feed_queue, 10)
    worker.stop(drain=True, timeout=10)
    s = worker.stats
    assert s.submitted == offered == 60
    assert s.skipped > 30
    assert s.processed + s.skipped == offered  # every window scored or counted as skipped
    assert max(lat for _, _, lat in delivered) < 3 * slow.delay_s  # bounded, not growing
    starts = [ref.start_sample for ref, _, _ in delivered]
    assert starts == sorted(starts) and starts[-1] == 59 * 160


def test_worker_survives_an_inference_error(tiny_checkpoint):
    directory, _ = tiny_checkpoint(max_length=128)
    bank = FrameBank(FeatureConfig(max_length=128), 1, hop_frames=10)
    engine = engine_for(directory, max_batch=1)
    samples = real_samples(2.0)
    due: list[WindowRef] = []
    delivered: list[WindowRef] = []
    broken = [True]

    def gather(refs):
        if broken.pop() if broken else False:
            return torch.zeros(len(refs), 5, 128)  # the wrong shape: the engine refuses the batch
        return bank.gather(refs)

    def feed(stopping):
        out = list(due)
        due.clear()
        return out

    worker = Worker(engine, feed, gather, lambda refs, p, l: delivered.extend(refs), 0, lambda: 1).start()
    refs, _ = bank.push([(0, 0, samples)])
    due.append(refs[0])
    worker.wake()
    assert wait_for(lambda: worker.stats.failed == 1, 10)
    due.append(refs[1])
    worker.wake()
    assert wait_for(lambda: len(delivered) == 1, 10)
    worker.stop()
    assert worker.stats.failed == 1 and delivered == [refs[1]]


class Collect:
    name = "collect"
    accepts = (Scores,)

    def __init__(self) -> None:
        self.items: list[Scores] = []

    def handle(self, item) -> None:
        self.items.append(item)

    def close(self) -> None:
        pass


def test_pipeline_over_real_time_sources_scores_every_window_and_wakes_on_data(tmp_path, tiny_checkpoint):
    directory, _ = tiny_checkpoint(max_length=128)
    engine = engine_for(directory, max_batch=8)
    paths = [write_wav(tmp_path / f"s{i}.wav", real_samples(3.0, 20_000 * i)) for i in range(3)]
    sources = [FileSource(f"s{i}", p, realtime=True) for i, p in enumerate(paths)]
    collect = Collect()
    hub = SinkHub()
    hub.add(collect, queue_items=0)
    targets = DetectSettings().targets(engine.labels)
    pipeline = Pipeline(engine, sources, 50, targets, hub, max_wait_ms=20)
    hub.start()
    pipeline.start()
    assert wait_for(pipeline.finished, 20)
    pipeline.stop(timeout=5)
    hub.close()
    # 3 s of audio, 128-frame windows every 0.5 s: the reference's windows, each stream's grid
    # shifted by its phase (i * hop / 3 frames) so that the three are not due at the same instant
    for i, path in enumerate(paths):
        shift = (i * 50 // 3) * 160
        assert pipeline.frames.phases[i] * 160 == shift
        reference = StreamWindows(f"s{i}", FeatureConfig(max_length=128), 50)
        expected = reference.push(read_audio(path)[shift:]) + reference.finish()
        got = [s for s in collect.items if s.stream == f"s{i}"]
        assert [s.start_sample for s in got] == [w.start_sample + shift for w in expected]
        assert all(s.wall_time is not None for s in got)
        probs = engine.predict([w.features for w in expected])
        assert np.abs(np.stack([s.probabilities for s in got]) - probs).max() <= 1e-5
    assert pipeline.worker.stats.skipped == 0


def test_detect_scores_many_files_together_exactly_as_one_at_a_time(tmp_path, tiny_checkpoint):
    from streamer.detect import score_files

    directory, _ = tiny_checkpoint(max_length=128)
    engine = engine_for(directory, max_batch=4)
    paths = [write_wav(tmp_path / f"f{i}.wav", real_samples(seconds, 7_000 * i))
             for i, seconds in enumerate((4.0, 0.7, 2.2))]
    together = score_files(paths, engine, 37)
    for path, result in zip(paths, together):
        alone = score_files([path], engine, 37)[0]
        reference = StreamWindows("x", FeatureConfig(max_length=128), 37)
        expected = reference.push(read_audio(path)) + reference.finish()
        assert list(result.start_sample) == list(alone.start_sample) == [w.start_sample for w in expected]
        assert np.abs(result.scores - alone.scores).max() <= 1e-5


def test_a_sink_that_blocks_costs_only_its_own_queue():
    class Stuck:
        name = "stuck"
        accepts = (Scores,)

        def __init__(self) -> None:
            self.release = threading.Event()

        def handle(self, item) -> None:
            self.release.wait()

        def close(self) -> None:
            pass

    stuck, fine = Stuck(), Collect()
    hub = SinkHub()
    hub.add(stuck, queue_items=4)
    hub.add(fine, queue_items=1000)
    hub.start()
    item = Scores("s", 0, 1, None, np.zeros(2), (), np.zeros(0), np.zeros(0), np.zeros(0))
    t0 = time.monotonic()
    for _ in range(100):
        hub.publish(item)
    assert time.monotonic() - t0 < 0.5  # publish never waits for a sink
    assert wait_for(lambda: len(fine.items) == 100, 5)
    stats = hub.stats()
    in_hand = 1 if stats["stuck"]["busy_s"] > 0 else 0
    # at most four queued and one in its hands, every other item shed and counted: none lost silently
    assert stats["stuck"]["shed"] + stats["stuck"]["queued"] + in_hand == 100 and stats["stuck"]["shed"] >= 95
    t0 = time.monotonic()
    hub.close(timeout=1.0)  # a sink stuck for good does not hold the shutdown beyond its budget
    assert time.monotonic() - t0 < 2.0
    stuck.release.set()


def test_the_silence_gate_skips_quiet_windows_only_and_counts_them(tmp_path, tiny_checkpoint):
    directory, _ = tiny_checkpoint(max_length=128)
    engine = engine_for(directory, max_batch=4)
    sound = real_samples(2.0, 30_000)
    audio = np.concatenate([np.zeros(16000 * 4, np.float32), sound, np.zeros(16000 * 3, np.float32)])
    path = write_wav(tmp_path / "quiet-loud-quiet.wav", audio)
    collect = Collect()
    hub = SinkHub()
    hub.add(collect, queue_items=0)
    pipeline = Pipeline(engine, [FileSource("q", path, realtime=False)], 25, DetectSettings().targets(engine.labels),
                        hub, max_wait_ms=0, stop_when_done=True, min_level_dbfs=-60.0)
    hub.start()
    pipeline.start()
    assert pipeline.wait(30)
    hub.close()
    span = (128 - 1) * 160 + 400
    loud = {s.start_sample for s in collect.items if np.abs(audio[s.start_sample:s.start_sample + span]).max() > 1e-3}
    gated = [s for s in collect.items if s.gated]
    assert gated and loud  # both kinds exist in this file
    assert all(s.start_sample not in loud for s in gated)  # nothing audible is skipped
    assert all(not s.probabilities.any() for s in gated)  # the smoother took them as silence
    assert all(s.probabilities.any() for s in collect.items if s.start_sample in loud)
    assert pipeline.worker.stats.gated == len(gated) == pipeline.gate.gated["q"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_frame_bank_on_the_gpu_equals_the_cpu_reference():
    features = FeatureConfig()
    audio = [real_samples(12.0, 0), real_samples(11.0, 40_000)]
    bank = FrameBank(features, 2, hop_frames=100, device="cuda")
    refs, _ = bank.push([(i, 0, a) for i, a in enumerate(audio)])
    got = bank.gather(refs).cpu()
    for ref, w in zip(refs, got):
        reference = StreamWindows("r", features, 100)
        expected = [x for x in reference.push(audio[ref.stream]) if x.start_sample == ref.start_sample]
        assert len(expected) == 1
        error = (w - expected[0].features).abs().max().item()
        assert error <= 5e-4, error  # the CPU reference is float32: its rounding near the log floor (2e-4 seen on an H100)

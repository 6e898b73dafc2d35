"""The inference engine (every precision, batching, CUDA graphs) and the multi-stream worker."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from conftest import real_clips
from streamer.capture.files import read_audio
from streamer.errors import StreamerError
from streamer.inference.engine import InferenceEngine, InferenceWorker, Result, graph_batch_sizes
from streamer.model import load_model
from streamer.model.config import FeatureConfig
from streamer.features.windows import StreamWindows, Window



def gpu(test):
    """Marked ``gpu`` (select with ``-m gpu``) and skipped where there is no CUDA GPU."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


FULL_SIZE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, num_labels=527)
BF16_BOUND = 0.02  # max |Δprobability| against fp32, bf16 and fp16


def real_windows(count: int, max_length: int = 1024) -> list[torch.Tensor]:
    """Windows of real recordings, joined, through the real frontend and scheduler."""
    samples = np.concatenate([read_audio(p) for p in real_clips(per_label=1)])
    stream = StreamWindows("real", FeatureConfig(max_length=max_length), hop_frames=50)
    windows = stream.push(samples) + stream.finish()
    assert len(windows) >= count
    return [w.features for w in windows[:count]]


def engine_for(directory, precision="fp32", device="cpu", **kwargs) -> InferenceEngine:
    return InferenceEngine(load_model(directory), device=device, precision=precision, **kwargs)


def test_graph_batch_sizes():
    assert graph_batch_sizes(1) == (1,)
    assert graph_batch_sizes(8) == (1, 2, 4, 8)
    assert graph_batch_sizes(48) == (1, 2, 4, 8, 16, 32, 48)


def test_fp32_engine_equals_the_model_and_batching_does_not_change_results(tiny_checkpoint):
    directory, hf = tiny_checkpoint(max_length=128, num_labels=527)
    feats = real_windows(7, max_length=128)
    engine = engine_for(directory, max_batch=4)
    batched = engine.predict(feats)
    single = np.concatenate([engine.predict(feats[i:i + 1]) for i in range(len(feats))])
    assert np.abs(batched - single).max() <= 1e-6
    with torch.no_grad():
        expected = hf(torch.stack(feats)).logits.sigmoid().numpy()
    assert np.abs(batched - expected).max() <= 1e-4
    assert engine.stats.windows == 14 and engine.stats.batches == 2 + 7
    assert engine._free_slots.qsize() == 2  # every staging slot came back


def test_int8_is_close_to_fp32_and_batch_independent(tiny_checkpoint):
    directory, _ = tiny_checkpoint(max_length=1024, num_labels=527, hidden_size=64, num_attention_heads=4, intermediate_size=128)
    feats = real_windows(6)
    reference = engine_for(directory).predict(feats)
    engine = engine_for(directory, "int8", max_batch=3)
    got = engine.predict(feats)
    single = np.concatenate([engine.predict(feats[i:i + 1]) for i in range(len(feats))])
    assert np.array_equal(got, single)
    assert np.abs(got - reference).max() < 0.05
    top = lambda p: [set(r) for r in np.argsort(-p, axis=1)[:, :5]]
    agreement = np.mean([len(a & b) / 5 for a, b in zip(top(got), top(reference))])
    assert agreement >= 0.6


def test_bf16_on_cpu_within_bound(tiny_checkpoint):
    directory, _ = tiny_checkpoint(max_length=128, num_labels=527, hidden_size=64, num_attention_heads=4, intermediate_size=128)
    feats = real_windows(4, max_length=128)
    reference = engine_for(directory).predict(feats)
    assert np.abs(engine_for(directory, "bf16").predict(feats) - reference).max() <= BF16_BOUND


def test_bad_engine_settings_are_clear_errors(tiny_checkpoint):
    directory, _ = tiny_checkpoint(max_length=128)
    with pytest.raises(StreamerError, match="unknown precision"):
        engine_for(directory, "fp8")
    with pytest.raises(StreamerError, match="not supported|unknown device"):
        engine_for(directory, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(StreamerError, match="no CUDA GPU"):
            engine_for(directory, device="cuda")


def _window(stream: str, start: int, features: torch.Tensor) -> Window:
    return Window(stream, start, features, features.shape[0])


class SlowEngine:
    """Wraps a real engine and sleeps first: an inference slower than real time."""

    def __init__(self, engine: InferenceEngine, delay_s: float) -> None:
        self.engine, self.delay_s, self.max_batch = engine, delay_s, engine.max_batch

    def submit(self, features):
        time.sleep(self.delay_s)
        return self.engine.submit(features)

    def collect(self, pending):
        return self.engine.collect(pending)


def test_worker_batches_all_streams_and_delivers_every_result(tiny_checkpoint):
    directory, _ = tiny_checkpoint(max_length=128)
    engine = engine_for(directory, max_batch=8)
    feats = real_windows(4, max_length=128)
    results: list[Result] = []
    done = threading.Event()

    def on_result(result: Result) -> None:
        results.append(result)
        if len(results) == 4:
            done.set()

    worker = InferenceWorker(engine, on_result, max_wait_ms=2000)
    for name in "abcd":
        worker.register_stream(name)
    worker.start()
    t0 = time.monotonic()
    for name, f in zip("abcd", feats):
        worker.submit(_window(name, 0, f))
    assert done.wait(10)
    # all four streams had a window, so the batch ran at once instead of waiting 2 s
    assert time.monotonic() - t0 < 1.5
    worker.stop()
    assert sorted(r.window.stream for r in results) == list("abcd")
    assert engine.stats.batches == 1
    expected = engine.predict(feats)
    for r in results:
        assert np.abs(r.probabilities - expected["abcd".index(r.window.stream)]).max() <= 1e-6
    assert worker.stats.processed == 4 and worker.stats.skipped == 0


def test_slow_worker_skips_stale_windows_and_keeps_latency_bounded(tiny_checkpoint):
    directory, _ = tiny_checkpoint(max_length=128)
    slow = SlowEngine(engine_for(directory, max_batch=2), delay_s=0.2)
    feats = real_windows(1, max_length=128)[0]
    results: list[Result] = []
    worker = InferenceWorker(slow, results.append, max_wait_ms=0)
    worker.register_stream("a")
    worker.start()
    submitted = 60
    for i in range(submitted):  # 100 windows/s against 5 batches/s
        worker.submit(_window("a", i * 160, feats))
        time.sleep(0.01)
    worker.stop(drain=True)
    s = worker.stats
    assert s.submitted == submitted
    assert s.skipped > 30
    assert s.processed + s.skipped == submitted  # every window scored or counted as skipped
    assert len(results) == s.processed
    # each scored window waited at most one inference plus its own: bounded, not growing
    assert max(r.latency_s for r in results) < 3 * slow.delay_s
    starts = [r.window.start_sample for r in results]
    assert starts == sorted(starts) and starts[-1] == (submitted - 1) * 160  # the newest one wins


def test_engine_refuses_windows_of_the_wrong_shape(tiny_checkpoint):
    directory, _ = tiny_checkpoint(max_length=128)
    engine = engine_for(directory, max_batch=2)
    with pytest.raises(ValueError, match="windows must be"):
        engine.predict([torch.zeros(5, 128)])
    good = real_windows(1, max_length=128)
    assert engine.predict(good).shape == (1, 5)  # the staging buffer was not disturbed


def test_worker_survives_an_inference_error(tiny_checkpoint):
    directory, _ = tiny_checkpoint(max_length=128)
    engine = engine_for(directory, max_batch=1)
    results: list[Result] = []
    worker = InferenceWorker(engine, results.append, max_wait_ms=0).start()
    worker.register_stream("a")
    worker.submit(_window("a", 0, torch.zeros(5, 128)))  # wrong shape: the model raises
    deadline = time.monotonic() + 5
    while worker.stats.failed == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.submit(_window("a", 160, real_windows(1, max_length=128)[0]))
    worker.stop(drain=True)
    assert worker.stats.failed == 1 and len(results) == 1


@gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_half_precision_full_size_within_bound_on_real_recordings(tiny_checkpoint, precision):
    directory, _ = tiny_checkpoint(**FULL_SIZE)
    feats = real_windows(24)
    reference = engine_for(directory, "fp32", device="cuda", max_batch=8).predict(feats)
    cpu_reference = engine_for(directory, "fp32", device="cpu", max_batch=8).predict(feats[:4])
    assert np.abs(reference[:4] - cpu_reference).max() <= 1e-4
    engine = engine_for(directory, precision, device="cuda", max_batch=8)
    got = engine.predict(feats)
    assert np.abs(got - reference).max() <= BF16_BOUND


@gpu
def test_gpu_graphs_pad_batches_without_changing_results(tiny_checkpoint):
    directory, _ = tiny_checkpoint(max_length=1024, num_labels=527)
    feats = real_windows(13)
    engine = engine_for(directory, "bf16", device="cuda", max_batch=16)
    assert engine.batch_sizes == (1, 2, 4, 8, 16)
    batched = engine.predict(feats)  # 13 → graph of 16, three rows of padding
    single = np.concatenate([engine.predict(feats[i:i + 1]) for i in range(len(feats))])
    assert engine.stats.padded == 3
    assert np.abs(batched - single).max() <= 1e-2  # bf16 kernels may differ by batch shape
    eager = engine_for(directory, "bf16", device="cuda", max_batch=16, cuda_graphs=False).predict(feats)
    assert np.abs(batched - eager).max() <= 1e-3


@gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_fused_path_matches_plain_path_and_fp32(tiny_checkpoint, precision):
    directory, _ = tiny_checkpoint(**FULL_SIZE)
    feats = real_windows(16)
    fused = engine_for(directory, precision, device="cuda", max_batch=8)
    assert fused.fused
    plain = engine_for(directory, precision, device="cuda", max_batch=8, fused=False)
    reference = engine_for(directory, "fp32", device="cpu", max_batch=8).predict(feats)
    got = fused.predict(feats)
    assert np.abs(got - plain.predict(feats)).max() <= BF16_BOUND
    assert np.abs(got - reference).max() <= BF16_BOUND

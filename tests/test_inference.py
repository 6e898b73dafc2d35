"""The inference engine: every precision, batching, CUDA graphs (the worker: test_pipeline.py)."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from conftest import real_clips
from streamer.capture.files import read_audio
from streamer.errors import StreamerError
from streamer.inference.engine import InferenceEngine, graph_batch_sizes
from streamer.model import load_model
from streamer.model.config import FeatureConfig
from streamer.features.windows import StreamWindows



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
    assert graph_batch_sizes(48) == (1, 2, 4, 8, 16, 24, 32, 40, 48)
    assert graph_batch_sizes(5) == (1, 2, 4, 5)
    assert graph_batch_sizes(20) == (1, 2, 4, 8, 16, 20)


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


def test_engine_refuses_windows_of_the_wrong_shape(tiny_checkpoint):
    directory, _ = tiny_checkpoint(max_length=128)
    engine = engine_for(directory, max_batch=2)
    with pytest.raises(ValueError, match="windows must be"):
        engine.predict([torch.zeros(5, 128)])
    good = real_windows(1, max_length=128)
    assert engine.predict(good).shape == (1, 5)  # the staging buffer was not disturbed


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

"""The silence gate: per-100 ms block peaks, and which windows it lets through (real clips)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import real_clips
from streamer.capture.files import read_audio
from streamer.errors import StreamerError
from streamer.events import DetectSettings
from streamer.features.fbank import window_samples
from streamer.features.gate import BLOCK_SAMPLES, FULL_SCALE_DBFS, SILENCE_DBFS, BlockLevels, dbfs, gated
from streamer.settings import ConfigError, parse_config

WINDOW = window_samples(1024)  # 164 080 samples, 10.25 s
HOP = 16000
LEVELS_DBFS = (-60.0, -45.0, -30.0, -20.0, -10.0)


def sample_peak_dbfs(x: np.ndarray) -> float:
    return dbfs(float(np.abs(x).max())) if x.size else SILENCE_DBFS


def pushed(samples: np.ndarray, chunks: np.ndarray | None = None) -> BlockLevels:
    levels = BlockLevels()
    if chunks is None:
        levels.push(samples)
        return levels
    for part in np.split(samples, np.cumsum(chunks)[:-1]):
        levels.push(part)
    return levels


@pytest.fixture(scope="module")
def real_stream() -> np.ndarray:
    """Real recordings joined, with quiet stretches in between (as a home day has)."""
    rng = np.random.default_rng(0)
    parts = []
    for clip in real_clips(per_label=2):
        parts.append(read_audio(clip))
        parts.append(rng.normal(0, 10 ** (-75 / 20), int(rng.integers(2, 30) * 16000)).astype(np.float32))
    return np.concatenate(parts)


def test_the_gate_never_skips_a_window_holding_a_sound_above_the_level(real_stream):
    rng = np.random.default_rng(1)
    levels = BlockLevels(keep_seconds=len(real_stream) / 16000 + 1)
    # pushed in odd chunk sizes, as capture delivers them
    for part in np.split(real_stream, np.sort(rng.integers(0, len(real_stream), 400))):
        levels.push(part)
    assert levels.next_sample == len(real_stream)
    gated_count = scored = 0
    for start in range(0, len(real_stream) - WINDOW + 1, HOP):
        span = real_stream[start:start + WINDOW]
        peak = sample_peak_dbfs(span)
        loudest = levels.loudest(start, start + WINDOW)
        assert loudest >= peak - 1e-4, f"window at {start}: gate {loudest:.2f} dBFS < sample peak {peak:.2f}"
        # and not looser than the blocks the span touches
        b0, b1 = start // BLOCK_SAMPLES * BLOCK_SAMPLES, math.ceil((start + WINDOW) / BLOCK_SAMPLES) * BLOCK_SAMPLES
        assert loudest <= sample_peak_dbfs(real_stream[b0:b1]) + 1e-4
        for level in LEVELS_DBFS:
            if peak >= level:
                assert not gated(loudest, level), f"window at {start} with a {peak:.1f} dBFS sound gated at {level}"
            gated_count += gated(loudest, level)
            scored += not gated(loudest, level)
    assert gated_count > 0 and scored > 0  # the levels do separate windows of this stream


def test_a_quiet_window_is_gated_and_one_loud_sample_at_its_edge_is_not():
    clip = read_audio(real_clips(per_label=1)[0])
    quiet = np.tile(clip, math.ceil(WINDOW / len(clip)))[:WINDOW] * 10 ** (-70 / 20) / max(1e-9, np.abs(clip).max())
    levels = pushed(quiet)
    assert gated(levels.loudest(0, WINDOW), -50.0)
    assert not gated(levels.loudest(0, WINDOW), -80.0)
    assert not gated(levels.loudest(0, WINDOW), None)  # gate off: everything scored
    edge = quiet.copy()
    edge[-1] = 0.05  # -26 dBFS in the window's very last sample
    assert not gated(pushed(edge).loudest(0, WINDOW), -50.0)
    edge = quiet.copy()
    edge[0] = -0.05
    assert not gated(pushed(edge).loudest(0, WINDOW), -50.0)


def test_chunked_pushes_equal_one_push_and_memory_is_bounded():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(16000 * 60) * np.repeat(rng.random(600) ** 4, 1600)).astype(np.float32)
    whole = pushed(x)
    chunked = pushed(x, rng.integers(1, 5000, 2000))
    assert whole.capacity == chunked.capacity == 300  # 30 s of 100 ms blocks, whatever was pushed
    for start in range(30 * 16000, 60 * 16000 - WINDOW, 7919):
        assert whole.loudest(start, start + WINDOW) == chunked.loudest(start, start + WINDOW)
    # forgotten (older than 30 s) and not yet pushed spans count as full scale: scored, never gated
    assert whole.loudest(0, WINDOW) == FULL_SCALE_DBFS
    assert whole.loudest(len(x) - 100, len(x) + 100) == FULL_SCALE_DBFS
    # the block still being filled is known up to the last pushed sample
    assert whole.loudest(len(x) - 100, len(x)) == pytest.approx(sample_peak_dbfs(x[-1600:]), abs=1e-4)
    part = pushed(x[:-700])  # a block still being filled is known up to the last pushed sample
    assert part.loudest(len(x) - 1000, len(x) - 700) == pytest.approx(sample_peak_dbfs(x[len(x) - 1600:-700]), abs=1e-4)


def test_silence_nan_and_restart():
    levels = pushed(np.zeros(WINDOW, dtype=np.float32))
    assert levels.loudest(0, WINDOW) == SILENCE_DBFS
    nan = np.zeros(WINDOW, dtype=np.float32)
    nan[5000] = np.nan
    assert pushed(nan).loudest(0, WINDOW) == FULL_SCALE_DBFS  # broken samples are never taken for silence
    levels.reset(first_sample=10 * WINDOW)
    assert levels.loudest(0, WINDOW) == FULL_SCALE_DBFS
    levels.push(np.full(WINDOW, 0.5, dtype=np.float32))
    assert levels.loudest(10 * WINDOW, 11 * WINDOW) == pytest.approx(dbfs(0.5))
    with pytest.raises(ValueError):
        levels.loudest(5, 5)


def test_min_level_dbfs_setting():
    assert DetectSettings.from_dict(None).min_level_dbfs is None  # off by default
    assert DetectSettings.from_dict({"min_level_dbfs": -50}).min_level_dbfs == -50.0
    for bad in ("-50", True, 3, -200):
        with pytest.raises(StreamerError, match="detect.min_level_dbfs: expected a level in dBFS"):
            DetectSettings.from_dict({"min_level_dbfs": bad})
    cfg = parse_config({"sources": [{"name": "a", "type": "file", "path": "x.wav"}], "detect": {"min_level_dbfs": -45.5}})
    assert cfg.detect.min_level_dbfs == -45.5
    with pytest.raises(ConfigError, match="min_level_dbfs"):
        parse_config({"sources": [{"name": "a", "type": "file", "path": "x.wav"}], "detect": {"min_level_dbfs": "quiet"}})


def test_window_gate_on_the_real_frontends_windows_counts_what_it_skips(real_stream):
    """Windows made by the real scheduler from real clips with silence between them."""
    from streamer.features.gate import WindowGate
    from streamer.features.windows import StreamWindows
    from streamer.model.config import FeatureConfig

    level = -45.0
    gate = WindowGate(level, keep_seconds=60)
    stream = StreamWindows("room", FeatureConfig(), hop_frames=100)
    admitted, skipped = [], []
    rng = np.random.default_rng(3)
    for part in np.split(real_stream, np.sort(rng.integers(0, len(real_stream), 300))):
        gate.push("room", part)  # the gate sees the samples before the frontend makes windows of them
        for w in stream.push(part):
            (admitted if gate.admit(w) else skipped).append(w)
    assert len(skipped) >= 20 and len(admitted) >= 20, (len(skipped), len(admitted))
    assert gate.gated["room"] == len(skipped) and gate.admitted["room"] == len(admitted)
    span = window_samples(1024)
    for w in skipped:  # nothing above the level in any skipped window
        assert sample_peak_dbfs(real_stream[w.start_sample:w.start_sample + span]) < level
    for w in admitted:  # and what was scored did hold something near the level (blocks straddle edges)
        b0 = w.start_sample // BLOCK_SAMPLES * BLOCK_SAMPLES
        assert sample_peak_dbfs(real_stream[b0:w.start_sample + span + BLOCK_SAMPLES]) >= level
    gate.min_level_dbfs = None  # a reload that turns the gate off: everything is scored, nothing counted
    assert gate.admit(skipped[0]) and gate.gated["room"] == len(skipped)

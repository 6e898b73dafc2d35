"""Event-based scoring of scenes: ours against sed_eval, the DCASE reference implementation."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.scenes import TrueEvent, background_false_events, build_scene, event_metrics, missed, sed_eval_metrics, sound_onset_s


@pytest.mark.parametrize("seed", range(5))
def test_event_metrics_equal_sed_eval(seed):
    rng = np.random.default_rng(seed)
    labels = ["a", "b", "c"]
    truth = [TrueEvent(t, t + rng.uniform(0.3, 3), str(rng.choice(labels))) for t in np.arange(2.0, 120.0, 8.0)]
    estimated = []
    for e in truth:  # found, late, mislabelled or missed, plus some false alarms
        kind = rng.integers(4)
        if kind < 3:
            onset = e.onset + rng.uniform(-2, 2)
            estimated.append((onset, onset + 1.0, e.label if kind < 2 else str(rng.choice(labels))))
    estimated += [(t, t + 0.5, str(rng.choice(labels))) for t in rng.uniform(0, 120, 5)]
    ours = event_metrics([(on, label) for on, _, label in estimated], truth, collar=1.29)
    reference = sed_eval_metrics(estimated, truth, collar=1.29)
    assert 0 < ours["hits"] < len(truth)
    for key in ("precision", "recall", "f1"):
        assert ours[key] == pytest.approx(reference[key]), key


def test_scene_truth_and_background_stretches():
    clip = np.ones(8000, dtype=np.float32) * 0.5
    scene, truth = build_scene([(clip, "x"), (clip, "y")], [np.full(16000, 0.01, np.float32)], gap_s=9, lead_s=4, tail_s=10)
    assert [(e.onset, e.offset, e.label) for e in truth] == [(4.0, 4.5, "x"), (13.5, 14.0, "y")]
    assert len(scene) == int((4 + 0.5 + 9 + 0.5 + 9 + 10) * 16000)
    assert scene[4 * 16000 + 10] > 0.5 and abs(scene[100]) < 0.1
    duration = len(scene) / 16000
    false, quiet_s = background_false_events([(1.0, "x"), (4.2, "x"), (20.0, "y")], truth, 1.0, duration)
    assert false == [(1.0, "x"), (20.0, "y")] and quiet_s == pytest.approx(duration - 2.5 - 2.5)
    assert missed([(4.2, "x"), (13.0, "x")], truth, 1.0) == [truth[1]]


def test_a_true_event_starts_where_the_clip_sounds_not_where_its_file_starts():
    """A crying-baby recording quiet for its first 2.65 s: a detection at the first cry is a hit."""
    rng = np.random.default_rng(0)
    quiet, cry = rng.normal(0, 1e-4, 40000), 0.3 * np.sin(2 * np.pi * 500 * np.arange(32000) / 16000)
    clip = np.concatenate([quiet, cry]).astype(np.float32)  # 2.5 s of near silence, then 2 s of sound
    scene, truth = build_scene([(clip, "cry")], [np.full(16000, 0.01, np.float32)], gap_s=6, lead_s=4, tail_s=6)
    assert truth[0].onset == pytest.approx(4 + 2.5) and truth[0].offset == pytest.approx(4 + 4.5)
    assert sound_onset_s(clip) == pytest.approx(2.5) and sound_onset_s(cry.astype(np.float32)) == 0.0
    assert sound_onset_s(np.ones(100, dtype=np.float32)) == 0.0  # shorter than one 50 ms frame
    assert missed([(6.6, "cry")], truth, 1.0) == [] and missed([(4.0, "cry")], truth, 1.0) == truth

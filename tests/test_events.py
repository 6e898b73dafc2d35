"""The event smoother on scripted score sequences, and events end to end through detect."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import real_clips, run_cli, write_wav
from streamer.capture.files import read_audio
from streamer.errors import StreamerError
from streamer.events import DetectSettings, EventSmoother, slug

LABELS = ("Smoke detector, smoke alarm", "Fire alarm", "Siren", "Speech", "Dog")
WINDOW = 164080
HOP = 16000  # 1 s


def run(sequence, labels=LABELS, **detect):
    """Feed score rows (dicts label → p, or one number for the first label) window by window."""
    settings = DetectSettings.from_dict(detect)
    smoother = EventSmoother("kitchen", labels, settings.targets(labels), WINDOW)
    events = []
    for k, row in enumerate(sequence):
        probs = np.zeros(len(labels))
        for label, p in (row.items() if isinstance(row, dict) else [(labels[0], row)]):
            probs[labels.index(label)] = p
        for e in smoother.update(k * HOP, probs, wall_time=1000.0 + k):
            events.append((k, e))
    return events, smoother


NO_SMOOTHING = {"smoothing": "none", "hold": 0.0}


def only(events, target):
    return [(k, e.state) for k, e in events if e.target == target]


def test_on_and_off_instants_with_hysteresis():
    # 0.45 sits between off (0.4) and on (0.5): the event stays ON through it
    seq = [0.1, 0.6, 0.45] + [0.6] * 11 + [0.3, 0.1]
    events, _ = run(seq, include=["Smoke*"], defaults={**NO_SMOOTHING, "on_threshold": 0.5, "off_threshold": 0.4})
    assert only(events, LABELS[0]) == [(1, "ON"), (14, "OFF")]
    on, off = events[0][1], events[1][1]
    assert on.start_sample == 0 * HOP + WINDOW  # the audio window 1 added: after window 0's end
    assert off.end_sample == 14 * HOP  # where the first quiet window starts: the sound has left it
    assert off.start_sample == on.start_sample
    assert on.id == off.id == f"kitchen:{slug(LABELS[0])}:{on.start_sample}"  # slug: injective (streamer.names)
    # peak and mean over the windows from ON to OFF, both included
    assert off.peak == pytest.approx(0.6) and off.mean == pytest.approx((0.6 + 0.45 + 0.6 * 11 + 0.3) / 14)
    assert off.closed_by == "audio"
    # wall clock: window k's last sample is at 1000 + k s
    assert on.start_time == pytest.approx(1001.0 - (HOP + WINDOW - 1 - on.start_sample) / 16000)
    assert off.end_time == pytest.approx(1014.0 - (14 * HOP + WINDOW - 1 - off.end_sample) / 16000)


def test_min_on_needs_the_score_to_stay_up():
    seq = [0.9, 0.1, 0.9, 0.9, 0.9, 0.1]
    defaults = {**NO_SMOOTHING, "min_on": 2.0, "off_threshold": 0.3}
    events, _ = run(seq, include=["Smoke*"], defaults=defaults)
    # window 0 alone (< 2 s of audio above) never fires; 2..4 covers 2 s of score positions
    assert only(events, LABELS[0]) == [(4, "ON"), (5, "OFF")]
    assert events[0][1].start_sample == 2 * HOP - HOP + WINDOW  # the run's first new audio


def test_hold_delays_off_until_quiet_long_enough():
    seq = [0.9, 0.1, 0.9, 0.1, 0.1, 0.1, 0.1]
    events, _ = run(seq, include=["Smoke*"], defaults={"smoothing": "none", "hold": 2.0})
    assert only(events, LABELS[0]) == [(0, "ON"), (5, "OFF")]
    assert events[1][1].end_sample == 3 * HOP  # where the quiet run began


def test_cooldown_blocks_refiring():
    seq = [0.9, 0.1, 0.9, 0.1, 0.1, 0.9, 0.1]
    events, _ = run(seq, include=["Smoke*"], defaults={**NO_SMOOTHING, "cooldown": 3.0})
    assert only(events, LABELS[0]) == [(0, "ON"), (1, "OFF"), (5, "ON"), (6, "OFF")]


def test_groups_max_and_noisy_or_and_per_target_overrides():
    seq = [{"Fire alarm": 0.4, "Siren": 0.4}, {"Siren": 0.7}, {}]
    events, smoother = run(
        seq, include=[], defaults=NO_SMOOTHING,
        groups={"alarm": ["Smoke detector, smoke alarm", "Fire alarm", "Siren"],
                "alarm_any": {"labels": ["Fire alarm", "Siren"], "combine": "noisy_or"}},
        targets={"alarm": {"on_threshold": 0.6}},
    )
    assert [t.name for t in smoother.targets] == ["alarm", "alarm_any"]
    assert only(events, "alarm") == [(1, "ON"), (2, "OFF")]  # max: 0.4 < 0.6, then 0.7
    assert only(events, "alarm_any") == [(0, "ON"), (2, "OFF")]  # 1 - 0.6·0.6 = 0.64 ≥ 0.5
    assert events[0][1].labels == ("Fire alarm", "Siren")
    assert [e.labels for k, e in events if e.target == "alarm"][0] == ("Siren",)


def test_ema_and_median_smoothing_keep_raw_and_smoothed_apart():
    _, smoother = run([0.0, 1.0], include=["Smoke*"], defaults={"smoothing": "ema", "ema_alpha": 0.25})
    assert smoother.raw[0] == 1.0 and smoother.smoothed[0] == pytest.approx(0.25)
    events, smoother = run([0.0, 1.0, 0.0, 1.0, 1.0], include=["Smoke*"],
                           defaults={"smoothing": "median", "median_windows": 3, "hold": 0})
    assert only(events, LABELS[0]) == [(3, "ON")]  # the lone spike at 1 does not pass; 1, 0, 1 does
    assert smoother.smoothed[0] == 1.0


def test_include_exclude_and_unknown_names():
    _, smoother = run([0.0], include=["*alarm*", "Dog"], exclude=["Fire*"])
    assert [t.name for t in smoother.targets] == ["Smoke detector, smoke alarm", "Dog"]
    with pytest.raises(StreamerError, match="no label 'Cat'"):
        run([0.0], groups={"pets": ["Dog", "Cat"]})
    with pytest.raises(StreamerError, match="did you mean 'on_threshold'"):
        run([0.0], defaults={"on_treshold": 0.3})
    with pytest.raises(StreamerError, match="outside 0..1"):
        run([0.0], defaults={"on_threshold": 1.5})
    # a label the model has that include leaves out: said so, with the fix (it was "excluded/unknown")
    with pytest.raises(StreamerError, match="Siren: a label of the model, but not a target: detect.include does not take it"):
        run([0.0], include=["Dog"], targets={"Siren": {"hold": 1}})
    with pytest.raises(StreamerError, match="Parrot: no such target: neither a group nor a label of the model"):
        run([0.0], include=["Dog"], targets={"Parrot": {"hold": 1}})


def test_a_threshold_wrong_in_itself_is_not_blamed_on_the_model_s_thresholds():
    calibrated = {"Dog": (0.6, 0.42)}
    for value, said in ((1.5, "on_threshold=1.5 is outside 0..1"), ("high", "on_threshold must be a finite number")):
        with pytest.raises(StreamerError, match=said) as caught:
            DetectSettings.from_dict({"include": ["Dog"], "targets": {"Dog": {"on_threshold": value}}}).targets(tuple(LABELS), calibrated)
        assert "thresholds.json" not in str(caught.value)
    with pytest.raises(StreamerError, match="the model's thresholds.json gives Dog on 0.6 / off 0.42"):  # the pair's order: it is
        DetectSettings.from_dict({"include": ["Dog"], "targets": {"Dog": {"off_threshold": 0.7}}}).targets(tuple(LABELS), calibrated)
    # nothing left to detect is an error, not a daemon that stays silent; a pattern matching nothing is named
    with pytest.raises(StreamerError, match=r"no targets: detect.include \['Cat'\] matches none of the model's"):
        run([0.0], include=["Cat"])
    assert DetectSettings.from_dict({"include": ["Dog", "Cat*", "*alarm*"]}).unmatched(tuple(LABELS)) == ["Cat*"]
    odd = ("a[1]", "b*", "c")  # label names a user gave their folders: named as they are, they match themselves
    assert [t.name for t in DetectSettings.from_dict({"include": ["A[1]", "b*"], "exclude": ["c"]}).targets(odd)] == ["a[1]", "b*"]


def test_close_all_marks_events_closed_by_shutdown():
    events, smoother = run([0.9, 0.9], include=["Smoke*"], defaults=NO_SMOOTHING)
    closing = smoother.close_all("shutdown")
    assert [(e.state, e.closed_by) for e in closing] == [("OFF", "shutdown")]
    assert closing[0].end_sample == HOP + WINDOW
    assert smoother.close_all("shutdown") == []


def test_events_are_the_same_whether_audio_comes_at_once_or_in_pieces(tiny_checkpoint):
    from streamer.inference.engine import InferenceEngine
    from streamer.model import load_model
    from streamer.features.windows import StreamWindows

    directory, _ = tiny_checkpoint(max_length=128, num_labels=527, seed=4)
    engine = InferenceEngine(load_model(directory), max_batch=8)
    samples = np.concatenate([read_audio(p) for p in real_clips(per_label=1)[:10]])
    features = engine.loaded.features
    labels = engine.labels

    def events_for(chunks):
        stream = StreamWindows("s", features, 25)
        windows = [w for c in chunks for w in stream.push(c)] + stream.finish()
        probs = engine.score(windows)
        # thresholds around this model's typical score for label 0, so that events happen
        return windows, probs

    once_windows, once_probs = events_for([samples])
    pieces = np.array_split(samples, 97)
    piece_windows, piece_probs = events_for(pieces)
    assert np.array_equal(once_probs, piece_probs)
    level = float(np.median(once_probs[:, 0]))
    settings = DetectSettings.from_dict({"include": [labels[0]], "defaults": {"on_threshold": level, "off_threshold": level - 1e-3, "hold": 0.25, "smoothing": "none"}})

    def smooth(windows, probs):
        smoother = EventSmoother("s", labels, settings.targets(labels), (128 - 1) * 160 + 400)
        out = [e for w, p in zip(windows, probs) for e in smoother.update(w.start_sample, p)]
        return out + smoother.close_all("stream-end")

    once, piece = smooth(once_windows, once_probs), smooth(piece_windows, piece_probs)
    assert len(once) >= 2 and once == piece


def test_detect_writes_events_jsonl(tiny_checkpoint, tmp_path):
    directory, hf = tiny_checkpoint(max_length=128, num_labels=527, seed=4)
    samples = np.concatenate([read_audio(p) for p in real_clips(per_label=1)[:10]])
    wav = write_wav(tmp_path / "scene.wav", samples)
    label = hf.config.id2label[0]
    config = tmp_path / "streamer.yaml"
    config.write_text("detect:\n  include: [" + json.dumps(label) + "]\n  defaults: {on_threshold: 0.000001, off_threshold: 0.0, hold: 0.0}\n")
    out = tmp_path / "events.jsonl"
    result = run_cli("detect", str(wav), "--model", str(directory), "--hop", "0.25", "--events-out", str(out), "--config", str(config))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    # on_threshold 0.000001: ON at the first window, closed at the end of the file
    assert [(e["state"], e["target"], e["closed_by"]) for e in lines] == [("ON", label, None), ("OFF", label, "stream-end")]
    assert lines[0]["start_sample"] == 0 and lines[0]["stream"] == "scene" and lines[0]["file"] == str(wav)
    assert lines[1]["end_sample"] > lines[1]["start_sample"]


def test_the_bank_updates_many_streams_at_once_exactly_as_one_smoother_each():
    """The pipeline's SmootherBank (one numpy pass per batch) against one EventSmoother per
    stream, on random score sequences that make events, with every kind of knob."""
    from streamer.events import SmootherBank, rounds

    rng = np.random.default_rng(7)
    settings = DetectSettings.from_dict({
        "groups": {"alarm": {"labels": [LABELS[0], LABELS[1]], "combine": "noisy_or"}, "loud": [LABELS[2], LABELS[4]]},
        "defaults": {"hold": 1.0, "cooldown": 2.0, "min_on": 1.0},
        "targets": {"Speech": {"smoothing": "median", "median_windows": 3}, "alarm": {"smoothing": "none"},
                    "Dog": {"smoothing": "median", "median_windows": 2, "on_threshold": 0.6}},
    })
    targets = settings.targets(LABELS)
    names = [f"s{k}" for k in range(6)]
    # bursts: runs of high scores, so that events open and close
    steps = 60
    probs = np.where(rng.random((len(names), steps, 1)) < 0.3, rng.random((len(names), steps, len(LABELS))),
                     0.05 * rng.random((len(names), steps, len(LABELS))))
    probs = np.repeat(probs, 2, axis=1)  # each value held 2 windows: long enough for min_on
    singles = [EventSmoother(n, LABELS, targets, WINDOW) for n in names]
    expected = []
    for s, smoother in enumerate(singles):
        for k in range(probs.shape[1]):
            wall = None if s == 3 else 500.0 + k
            expected += [(s, k, e) for e in smoother.update(k * HOP, probs[s, k], wall_time=wall)]
        expected += [(s, probs.shape[1], e) for e in smoother.close_all("shutdown")]
    bank = SmootherBank(names, LABELS, targets, WINDOW)
    got = []
    # a batch holds windows of streams in any mix, a stream's several windows in order
    order = [(s, k) for k in range(probs.shape[1]) for s in range(len(names))]
    batches = [order[i:i + 7] for i in range(0, len(order), 7)]
    for batch in batches:
        for positions in rounds([s for s, _ in batch]):
            items = [batch[p] for p in positions]
            rows = np.array([s for s, _ in items])
            walls = np.array([np.nan if s == 3 else 500.0 + k for s, k in items])
            out = bank.update(rows, np.array([k * HOP for _, k in items]), np.stack([probs[s, k] for s, k in items]),
                              walls)
            got += [(items[b][0], items[b][1], e) for b, e in out]
    for s in range(len(names)):
        got += [(s, probs.shape[1], e) for e in bank.close_all(s, "shutdown")]
    assert len(expected) > 20  # the sequences do make events
    key = lambda item: (item[0], item[1])  # noqa: E731
    assert sorted(got, key=key) == sorted(expected, key=key)
    np.testing.assert_array_equal(bank.smoothed, np.stack([s.smoothed for s in singles]))


def test_rounds_keep_each_streams_windows_in_order():
    from streamer.events import rounds

    assert rounds([0, 1, 2]) == [[0, 1, 2]]
    assert rounds([0, 0, 1, 0, 1]) == [[0, 2], [1, 4], [3]]
    assert rounds([]) == []


def test_a_number_yaml_reads_as_text_is_named_with_how_to_write_it(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-3 as the text "1e-3": the error says so and gives the decimal."""
    from streamer.settings import load_config

    config = tmp_path / "streamer.yaml"
    config.write_text("sources: [{name: a, type: file, path: x.wav}]\nhop: '0.5'\ndetect:\n  defaults: {on_threshold: 1e-3}\n")
    with pytest.raises(StreamerError) as caught:
        load_config(config)
    said = str(caught.value)
    assert "YAML reads 1e-3 as text: write it as a decimal, e.g. 0.001" in said
    assert "got '0.5' (a number in quotes is text: drop the quotes)" in said  # every problem at once

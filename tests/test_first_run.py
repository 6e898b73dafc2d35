"""A first run without surprises: wall times that never run backwards, check-config against the
model's labels, a trained model readable by the service, a whole-sentence hub error."""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest

from conftest import run_cli
from streamer.events import DetectSettings, EventSmoother

LABELS = ("Dog", "Speech")
WINDOW = 16000
HOP = 8000


def smoother():
    settings = DetectSettings.from_dict({"include": ["Dog"], "defaults": {"smoothing": "none", "hold": 0.0,
                                                                          "on_threshold": 0.5, "off_threshold": 0.4}})
    return EventSmoother("kitchen", LABELS, settings.targets(LABELS), WINDOW)


@pytest.mark.parametrize("jump_s", [-13.7, -3600.0, 40.0])
def test_event_end_time_never_precedes_its_start(jump_s):
    """A clock stepped back (NTP, a manual fix) or a process stopped for 40 s (SIGSTOP: the
    wall time of the next window jumps ahead) in the middle of an event."""
    s = smoother()
    events = []
    wall = 1000.0
    for k in range(12):
        if k == 5:
            wall += jump_s
        score = 0.9 if 2 <= k <= 8 else 0.0
        events += s.update(k * HOP, np.array([score, 0.0]), wall_time=wall + (k * HOP + WINDOW) / 16000)
    on, off = [e for e in events if e.state == "ON"], [e for e in events if e.state == "OFF"]
    assert len(on) == len(off) == 1
    assert off[0].end_time >= off[0].start_time == on[0].start_time
    audio_span = (off[0].end_sample - off[0].start_sample) / 16000
    if jump_s < 0:  # backwards: the audio timeline holds, the event lasts as long as its audio
        assert off[0].end_time - off[0].start_time == pytest.approx(audio_span)
    # the next event, after the jump and with no event open, follows the wall clock again
    more = []
    for k in range(12, 20):
        more += s.update(k * HOP, np.array([0.9 if k >= 14 else 0.0, 0.0]), wall_time=wall + (k * HOP + WINDOW) / 16000)
    (again,) = [e for e in more if e.state == "ON"]
    assert again.start_time == pytest.approx(wall + (again.start_sample + 1) / 16000)
    closing = s.close_all("shutdown")
    assert all(e.end_time >= e.start_time for e in closing)


@pytest.mark.slow  # over 8 s on 2 cores: CI runs it, the fast lane does not
def test_check_config_checks_targets_and_groups_against_the_model(tmp_path, tiny_checkpoint):
    directory, hf = tiny_checkpoint(num_labels=3)
    labels = [hf.config.id2label[i] for i in range(3)]

    def config(detect, model=str(directory)):
        path = tmp_path / "streamer.yaml"
        path.write_text(json.dumps({"model": {"path": model}, "sources": [{"name": "a", "type": "file", "path": "x.wav"}],
                                    "detect": detect}))
        return path

    good = run_cli("check-config", str(config({"include": [labels[0]], "groups": {"both": labels[1:]}})))
    assert good.returncode == 0, good.stderr
    assert "targets checked against the model's 3 labels" in good.stdout and "2 target(s)" in good.stdout
    bad = run_cli("check-config", str(config({"groups": {"alarm": ["Smoke detector, smoke alarm"]}})))
    assert bad.returncode == 2 and "the model has no label 'Smoke detector, smoke alarm'" in bad.stderr
    assert "Traceback" not in bad.stderr
    none = run_cli("check-config", str(config({"include": ["Nothing*"]})))
    assert none.returncode == 2 and "no targets" in none.stderr
    partly = run_cli("check-config", str(config({"include": [labels[0], "Dog"]})))
    assert partly.returncode == 0 and "1 target(s)" in partly.stdout
    assert "detect.include 'Dog' matches none of the model's labels" in partly.stderr
    # what `run` would refuse at start, check-config refuses now: a broken thresholds.json, broken weights
    (directory / "thresholds.json").write_text(json.dumps({"labels": {labels[0]: {"on_threshold": 7.0, "off_threshold": 0.1}}}))
    broken = run_cli("check-config", str(config({"include": [labels[0]]})))
    assert broken.returncode == 2 and "thresholds.json" in broken.stderr and "fix: train the model again" in broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 1
    (directory / "thresholds.json").write_text(json.dumps({"labels": {labels[0]: {"on_threshold": 0.7, "off_threshold": 0.4}}}))
    calibrated = run_cli("check-config", str(config({"include": [labels[0]], "targets": {labels[0]: {"off_threshold": 0.8}}})))
    assert calibrated.returncode == 2 and "the model's thresholds.json gives" in calibrated.stderr  # the model's on 0.7 is under 0.8
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    cut = run_cli("check-config", str(config({"include": [labels[0]]})))
    assert cut.returncode == 2 and "not a valid safetensors file" in cut.stderr and "Traceback" not in cut.stderr
    missing = run_cli("check-config", str(config({"include": ["x"]}, model=str(tmp_path / "missing-model"))),
                      env={"HF_HUB_OFFLINE": "1"})  # a folder that is not there: `run` would refuse it, so does the check
    assert missing.returncode == 2 and "model.path: model" in missing.stderr and "no such directory" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    (tmp_path / "not-a-model").mkdir()
    empty = run_cli("check-config", str(config({"include": ["x"]}, model=str(tmp_path / "not-a-model"))))
    assert empty.returncode == 2 and "config.json" in empty.stderr and "Traceback" not in empty.stderr
    unknown = run_cli("check-config", str(config({"include": ["x"]}, model="someone/some-model")),
                      env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})  # a hub id not downloaded yet: run may fetch it
    assert unknown.returncode == 0 and "targets not checked" in unknown.stdout  # says plainly it could not check
    assert "nor a folder here" in unknown.stdout


def test_a_trained_model_is_readable_by_others(tmp_path, tiny_checkpoint):
    """What train writes (through save_checkpoint and its reports) is 0644 in 0755 folders,
    whatever the umask of the user who trained it: the service's dynamic user reads it."""
    import os

    from streamer.model import load_model
    from streamer.train import make_readable

    directory, _ = tiny_checkpoint(num_labels=3)
    out = tmp_path / "models" / "home"
    out.mkdir(parents=True)
    old = os.umask(0o077)
    try:
        from streamer.model.checkpoint import save_checkpoint

        save_checkpoint(load_model(str(directory)), out)
        (out / "validation.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) & 0o044 == 0  # as written under umask 077
    secret = out / "private" / "key"  # not the model's: never made readable
    secret.parent.mkdir(mode=0o700)
    secret.write_text("x")
    secret.chmod(0o600)
    make_readable(out, sorted(p.name for p in out.iterdir() if p.is_file()))
    for path in [out, *out.glob("*.json"), out / "model.safetensors"]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and stat.S_IMODE(secret.parent.stat().st_mode) == 0o700


def test_hub_error_is_a_whole_sentence_with_the_fix(tmp_path):
    result = run_cli("labels", "--model", "MIT/ast-finetuned-audioset-10-10-0.4593",
                     env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("streamer: error: ") and line.endswith(".")
    assert "hf download MIT/ast-finetuned-audioset-10-10-0.4593 --local-dir" in line and "model.path" in line

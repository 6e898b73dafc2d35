"""``streamer detect`` end to end against transformers, and its errors on bad input."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from transformers import ASTFeatureExtractor

from conftest import real_clips, run_cli, write_wav
from streamer.capture.files import read_audio
from streamer.features.fbank import window_samples


def reference_scores(hf_model, samples: np.ndarray, starts, max_length: int, **fe) -> np.ndarray:
    extractor = ASTFeatureExtractor(max_length=max_length, **fe)
    span = window_samples(max_length)
    batch = [extractor(samples[s:s + span], sampling_rate=16000, return_tensors="pt")["input_values"][0] for s in starts]
    with torch.no_grad():
        logits = hf_model(torch.stack(batch)).logits
    return (logits.sigmoid() if hf_model.config.num_labels >= 100 else logits.softmax(-1)).numpy()


@pytest.mark.slow
def test_detect_scores_equal_transformers_on_a_real_clip(tiny_checkpoint, tmp_path):
    clip = next(p for p in real_clips() if p.parent.name == "crying_baby")  # ~7 s at 8 kHz
    directory, hf = tiny_checkpoint(max_length=128, num_labels=35)
    out = tmp_path / "scores.npz"
    result = run_cli("detect", str(clip), "--model", str(directory), "--hop", "0.5", "--top-k", "2", "--scores-out", str(out))
    assert result.returncode == 0, result.stderr
    data = np.load(out)
    samples = read_audio(clip)
    frames = (len(samples) - 400) // 160 + 1
    expected_starts = np.arange(0, frames - 128 + 1, 50) * 160
    assert data["start_sample"].dtype == np.int64
    assert np.array_equal(data["start_sample"], expected_starts)
    assert int(data["sample_rate"]) == 16000
    assert list(data["labels"]) == [hf.config.id2label[i] for i in range(35)]
    assert data["scores"].dtype == np.float32 and data["scores"].shape == (len(expected_starts), 35)
    expected = reference_scores(hf, samples, expected_starts, 128)
    assert np.abs(data["scores"] - expected).max() <= 1e-4
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(expected_starts)
    assert lines[1].split("\t")[1].strip() == "0.50s"


@pytest.mark.slow
def test_detect_full_length_windows_on_joined_real_clips(tiny_checkpoint, tmp_path):
    clips = [p for p in real_clips(per_label=1)][:12]
    joined = np.concatenate([read_audio(p) for p in clips])
    assert len(joined) > window_samples(1024) + 16000 * 2
    wav = write_wav(tmp_path / "joined.wav", joined)
    directory, hf = tiny_checkpoint(max_length=1024, num_labels=527, preprocessor=dict(mean=-5.0, std=3.0))
    out = tmp_path / "scores.npz"
    result = run_cli("detect", str(wav), "--model", str(directory), "--scores-out", str(out), "--batch", "3")
    assert result.returncode == 0, result.stderr
    data = np.load(out)
    starts = data["start_sample"]
    assert starts[0] == 0 and np.all(np.diff(starts) == 16000)
    assert starts[-1] + window_samples(1024) <= len(joined) < starts[-1] + 16000 + window_samples(1024)
    expected = reference_scores(hf, joined, starts, 1024, mean=-5.0, std=3.0)
    assert np.abs(data["scores"] - expected).max() <= 1e-4


@pytest.mark.slow
def test_short_file_gives_one_padded_window(tiny_checkpoint, tmp_path):
    clip = next(p for p in real_clips() if p.parent.name == "keys_drop")
    directory, hf = tiny_checkpoint(max_length=1024, num_labels=527)
    out = tmp_path / "s.npz"
    result = run_cli("detect", str(clip), "--model", str(directory), "--scores-out", str(out))
    assert result.returncode == 0, result.stderr
    data = np.load(out)
    assert list(data["start_sample"]) == [0]
    expected = reference_scores(hf, read_audio(clip), [0], 1024)
    assert np.abs(data["scores"] - expected).max() <= 1e-4


@pytest.mark.slow
def test_several_files_in_one_archive(tiny_checkpoint, tmp_path):
    a, b = real_clips(per_label=1)[:2]
    directory, _ = tiny_checkpoint(max_length=128)
    out = tmp_path / "s.npz"
    result = run_cli("detect", str(a), str(b), "--model", str(directory), "--scores-out", str(out))
    assert result.returncode == 0, result.stderr
    data = np.load(out)
    assert list(data["files"]) == [str(a), str(b)]
    assert len(data["file_index"]) == len(data["start_sample"]) == len(data["scores"])
    assert set(data["file_index"]) == {0, 1}


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("streamer: error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def model_dir(tiny_checkpoint):
    return tiny_checkpoint(max_length=128)[0]


@pytest.fixture
def clip():
    return real_clips(per_label=1)[0]


def test_missing_audio_file(model_dir, tmp_path):
    assert_one_line_error(run_cli("detect", str(tmp_path / "nope.wav"), "--model", str(model_dir)), "nope.wav", "no such file")


def test_corrupt_audio_file(model_dir, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256)) * 4)
    assert_one_line_error(run_cli("detect", str(bad), "--model", str(model_dir)), "bad.wav", "cannot decode audio")


def test_an_empty_audio_file_and_an_output_that_is_a_folder(model_dir, tmp_path, clip):
    empty = write_wav(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32))
    assert_one_line_error(run_cli("detect", str(empty), "--model", str(model_dir)), "empty.wav", "no audio in it (0 samples)")
    assert_one_line_error(run_cli("detect", str(clip), "--model", str(model_dir), "--events-out", str(tmp_path)),
                          str(tmp_path), "a folder; give a file name")


def test_directory_without_weights(tmp_path, clip, model_dir):
    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.json").write_text((model_dir / "config.json").read_text())
    assert_one_line_error(run_cli("detect", str(clip), "--model", str(empty)), "no weights found")


def test_config_that_is_not_ast(tmp_path, clip, model_dir):
    (model_dir / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    assert_one_line_error(run_cli("detect", str(clip), "--model", str(model_dir)), "model_type is 'bert'", "not an Audio Spectrogram Transformer")


def test_tensor_of_wrong_shape(tmp_path, clip, model_dir):
    from safetensors.torch import load_file, save_file

    state = load_file(model_dir / "model.safetensors")
    state["audio_spectrogram_transformer.embeddings.position_embeddings"] = torch.zeros(1, 10, 32)
    save_file(state, model_dir / "model.safetensors")
    assert_one_line_error(run_cli("detect", str(clip), "--model", str(model_dir)), "mis-shaped tensors: pos_embed (1, 10, 32)")


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path, clip, tiny_checkpoint):
    directory, hf = tiny_checkpoint(fmt="bin", max_length=128)
    marker = tmp_path / "pwned"
    state = dict(hf.state_dict())
    state["evil"] = _RunsCode(str(marker))
    torch.save(state, directory / "pytorch_model.bin")
    result = run_cli("detect", str(clip), "--model", str(directory))
    assert_one_line_error(result, "pytorch_model.bin", "refused", "would run code", "GLOBAL posix.system")
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # sanity: the file really carries a payload
        torch.load(directory / "pytorch_model.bin", weights_only=True)


def test_plain_weights_in_a_newer_pickle_protocol_are_refused_for_what_they_are(tmp_path, clip, tiny_checkpoint):
    """torch's safe loader reads protocol 2 only: plain weights saved with protocol 4 are not
    called hostile, and torch's own two-line warning does not join the one-line refusal."""
    directory, hf = tiny_checkpoint(fmt="bin", max_length=128)
    torch.save(dict(hf.state_dict()), directory / "pytorch_model.bin", pickle_protocol=4)
    result = run_cli("detect", str(clip), "--model", str(directory))
    assert_one_line_error(result, "pytorch_model.bin", "refused", "pickle protocol 4 or 5", "convert it to safetensors")
    assert "would run code" not in result.stderr


def test_absurd_config_is_refused_before_allocating(tmp_path, clip, model_dir):
    import json

    config = json.loads((model_dir / "config.json").read_text())
    config["hidden_size"] = 10**9
    config["num_attention_heads"] = 1
    (model_dir / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_cli("detect", str(clip), "--model", str(model_dir)), "hidden_size=1000000000 is outside")


def test_hub_id_offline_without_cache_says_how_to_fix(tmp_path, clip):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = run_cli("detect", str(clip), "--model", "MIT/ast-finetuned-audioset-10-10-0.4593", env=env)
    assert_one_line_error(result, "MIT/ast-finetuned-audioset-10-10-0.4593", "set model.path to it")


def test_hub_id_is_read_from_the_cache_offline(tmp_path, clip, tiny_checkpoint):
    """A model already in the hub cache loads with HF_HUB_OFFLINE=1 (no network needed)."""
    directory, _ = tiny_checkpoint(max_length=128)
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-ast"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in directory.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = run_cli("detect", str(clip), "--model", "acme/tiny-ast", env=env)
    assert result.returncode == 0, result.stderr
    assert str(clip) in result.stdout


def test_bad_hop_is_a_usage_error(model_dir, clip):
    result = run_cli("detect", str(clip), "--model", str(model_dir), "--hop", "0.015")
    assert result.returncode == 2
    assert "multiple of 0.01" in result.stderr


def test_a_hop_longer_than_the_model_s_window_is_a_warning_with_the_unheard_share(tiny_checkpoint, tmp_path):
    """A model with 1.3 s windows at hop 5 s scores a quarter of the audio: said, with the fix."""
    from streamer.inference.capacity import gap_warning

    directory, _ = tiny_checkpoint(max_length=128)
    wav = write_wav(tmp_path / "a.wav", np.random.default_rng(0).normal(0, 0.1, 16000 * 12).astype(np.float32))
    slow = run_cli("detect", str(wav), "--model", str(directory), "--device", "cpu", "--hop", "5")
    assert slow.returncode == 0 and "hop 5 s is longer than the model's 1.295 s window: 74% of the audio is never scored" in slow.stderr
    assert "fix: a hop of at most 1.29 s" in slow.stderr
    fine = run_cli("detect", str(wav), "--model", str(directory), "--device", "cpu", "--hop", "1")
    assert fine.returncode == 0 and "never scored" not in fine.stderr
    assert gap_warning(10.245, 10.0) is None and gap_warning(1.295, 1.29) is None


def test_a_detect_config_is_checked_against_the_model_and_named_in_its_error(tiny_checkpoint, tmp_path):
    """Without --events-out the config's targets were never built, so a broken one passed in silence."""
    directory, hf = tiny_checkpoint(max_length=128, num_labels=3)
    wav = write_wav(tmp_path / "a.wav", np.random.default_rng(0).normal(0, 0.1, 16000 * 2).astype(np.float32))
    config = tmp_path / "streamer.yaml"
    config.write_text("detect:\n  include: ['" + hf.config.id2label[0] + "']\n  targets: {Parrot: {hold: 1}}\n")
    result = run_cli("detect", str(wav), "--model", str(directory), "--device", "cpu", "--config", str(config))
    assert result.returncode == 1 and f"streamer: error: {config}: detect.targets.Parrot: no such target" in result.stderr, result.stderr
    missing = run_cli("record", f"file:{tmp_path / 'nope.wav'}", str(tmp_path / "x.wav"), "--seconds", "1")
    assert missing.returncode == 1 and missing.stderr.strip().splitlines() == [f"streamer: error: {tmp_path / 'nope.wav'}: no such file"]

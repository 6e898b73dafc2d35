"""The frontend against ASTFeatureExtractor, the resampler against torchaudio, streaming against offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio.functional as AF
from transformers import ASTFeatureExtractor

from conftest import real_clips
from streamer.capture.files import read_audio
from streamer.capture.resample import StreamingResampler, resample
from streamer.features.fbank import FRAME_LENGTH, Frontend, clip_features, log_mel, normalise
from streamer.model.config import FeatureConfig
from streamer.features.windows import StreamWindows

TOLERANCE = 1e-4
FEATURES = FeatureConfig()


def reference(samples: np.ndarray, **kwargs) -> np.ndarray:
    extractor = ASTFeatureExtractor(**kwargs)
    return extractor(samples, sampling_rate=16000, return_tensors="np")["input_values"][0]


@pytest.mark.parametrize("clip", real_clips(per_label=2), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_real_recordings_match_reference(clip):
    samples = read_audio(clip)
    ours = clip_features(samples, FEATURES).numpy()
    assert np.abs(ours - reference(samples)).max() <= TOLERANCE


def test_resampled_input_equals_torchaudio_resample():
    clip = next(p for p in real_clips() if "door_knock" in str(p))  # 44.1 kHz
    import soundfile as sf

    raw, rate = sf.read(clip, dtype="float32")
    assert rate == 44100
    expected = AF.resample(torch.from_numpy(raw), rate, 16000).numpy()
    assert np.abs(read_audio(clip) - expected).max() <= 1e-4


@pytest.mark.parametrize(
    "name,samples",
    [
        ("silence", np.zeros(16000 * 3, dtype=np.float32)),
        ("full-scale-square", np.sign(np.sin(2 * np.pi * 440 * np.arange(16000 * 2) / 16000)).astype(np.float32)),
        ("exactly-one-frame", np.random.default_rng(0).uniform(-1, 1, FRAME_LENGTH).astype(np.float32)),
        ("longer-than-window", np.random.default_rng(1).uniform(-0.5, 0.5, 16000 * 12).astype(np.float32)),
    ],
)
def test_synthetic_edge_cases_match_reference(name, samples):
    assert np.abs(clip_features(samples, FEATURES).numpy() - reference(samples)).max() <= TOLERANCE


@pytest.mark.parametrize("scale", [0.5, 1e-3, 0.0])
@pytest.mark.parametrize("bins", [128, 64])
def test_log_mel_equals_torchaudio_kaldi_fbank(scale, bins):
    import torchaudio.compliance.kaldi as kaldi

    x = torch.randn(30000, generator=torch.Generator().manual_seed(9)) * scale
    expected = kaldi.fbank(x[None], window_type="hanning", num_mel_bins=bins, dither=0.0)
    assert (log_mel(x, bins) - expected).abs().max().item() <= 1e-5


def test_clip_shorter_than_one_frame_is_all_padding():
    """Under 25 ms there is no frame: the reference raises, we give a window of zero frames
    right-padded and normalised, exactly what the reference makes of zero frames."""
    samples = np.full(200, 0.1, dtype=np.float32)
    with pytest.raises(Exception):
        reference(samples)
    extractor = ASTFeatureExtractor()
    expected = extractor.normalize(np.zeros((1024, 128), dtype=np.float32))
    assert np.abs(clip_features(samples, FEATURES).numpy() - expected).max() <= TOLERANCE


def test_custom_mean_std_and_max_length_match_reference():
    samples = np.random.default_rng(2).uniform(-0.3, 0.3, 16000 * 2).astype(np.float32)
    features = FeatureConfig(mean=-3.0, std=2.0, max_length=128)
    expected = reference(samples, mean=-3.0, std=2.0, max_length=128)
    assert np.abs(clip_features(samples, features).numpy() - expected).max() <= TOLERANCE


def test_incremental_frames_equal_offline_frames_for_any_chunking():
    rng = np.random.default_rng(3)
    samples = read_audio(real_clips()[0])
    samples = np.concatenate([samples, rng.uniform(-0.2, 0.2, 8000).astype(np.float32)])
    offline = normalise(log_mel(samples, 128), FEATURES)
    for sizes in ([1, 7, 399, 400, 401], [160], [5000], [len(samples)]):
        frontend = Frontend(FEATURES)
        parts, i, k = [], 0, 0
        while i < len(samples):
            n = sizes[k % len(sizes)]
            parts.append(frontend.push(samples[i:i + n]))
            i, k = i + n, k + 1
        streamed = torch.cat(parts)
        assert streamed.shape == offline.shape
        assert (streamed - offline).abs().max().item() <= 1e-5
        assert frontend.frames_done == offline.shape[0]


def test_nonfinite_samples_are_zeroed_and_counted():
    samples = np.random.default_rng(4).uniform(-0.5, 0.5, 1600).astype(np.float32)
    dirty = samples.copy()
    dirty[[10, 500]] = [np.nan, np.inf]
    clean = samples.copy()
    clean[[10, 500]] = 0.0
    frontend = Frontend(FEATURES)
    frames = frontend.push(dirty)
    assert frontend.nonfinite_samples == 2
    assert torch.isfinite(frames).all()
    assert torch.equal(frames, Frontend(FEATURES).push(clean))


@pytest.mark.parametrize("rates", [(44100, 16000), (8000, 16000), (48000, 16000), (22050, 16000), (16000, 16000)])
def test_streaming_resampler_equals_torchaudio_and_whole_signal(rates):
    orig, new = rates
    rng = np.random.default_rng(5)
    signal = rng.standard_normal(orig + 1234).astype(np.float32) * 0.3
    whole = resample(signal, orig, new)
    expected = AF.resample(torch.from_numpy(signal), orig, new).numpy()
    assert whole.shape == expected.shape
    assert np.abs(whole - expected).max() <= 1e-4
    resampler = StreamingResampler(orig, new)
    parts, i = [], 0
    while i < len(signal):
        n = int(rng.integers(1, 2000))
        parts.append(resampler.process(signal[i:i + n]))
        i += n
    parts.append(resampler.flush())
    assert np.abs(np.concatenate(parts) - whole).max() <= 1e-6


def test_windows_start_every_hop_and_equal_clip_features():
    rng = np.random.default_rng(6)
    samples = rng.uniform(-0.3, 0.3, 16000 * 13).astype(np.float32)
    stream = StreamWindows("s", FEATURES, hop_frames=100)
    windows = stream.push(samples[:70000]) + stream.push(samples[70000:]) + stream.finish()
    starts = [w.start_sample for w in windows]
    # 1300 frames - 1024 = 276 → windows at frames 0, 100, 200
    assert starts == [0, 16000, 32000]
    for w in windows:
        expected = clip_features(samples[w.start_sample:], FEATURES)
        assert (w.features - expected).abs().max().item() <= 1e-5


def test_short_stream_gives_one_padded_window_at_zero():
    samples = np.random.default_rng(7).uniform(-0.3, 0.3, 16000 * 3).astype(np.float32)
    stream = StreamWindows("s", FEATURES, hop_frames=100)
    assert stream.push(samples) == []
    [window] = stream.finish()
    assert window.start_sample == 0 and window.frames == 298
    assert np.abs(window.features.numpy() - reference(samples)).max() <= TOLERANCE


@pytest.mark.parametrize("fmt", ["flac", "ogg"])
def test_flac_and_ogg_decode_to_the_same_signal(tmp_path, fmt):
    import soundfile as sf

    clip = next(p for p in real_clips() if p.parent.name == "door_knock")  # 44.1 kHz
    raw, rate = sf.read(clip, dtype="float32")
    path = tmp_path / f"clip.{fmt}"
    sf.write(path, raw, rate, format=fmt.upper(), subtype="PCM_16" if fmt == "flac" else "VORBIS")
    wav, other = read_audio(clip), read_audio(path)
    assert other.shape == wav.shape
    # FLAC is lossless (the wav is 16-bit); Vorbis is lossy, so only roughly equal.
    tolerance = 1e-6 if fmt == "flac" else 0.05
    assert np.abs(other - wav).max() <= tolerance


def test_stereo_is_downmixed_to_the_channel_mean(tmp_path):
    import soundfile as sf

    rng = np.random.default_rng(8)
    left, right = rng.uniform(-0.5, 0.5, (2, 16000)).astype(np.float32)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    assert np.allclose(read_audio(path), (left + right) / 2, atol=1e-7)


def test_gpu_frame_batches_are_padded_to_a_few_sizes():
    """cuFFT plans are per batch size: the batched frontend pads to four sizes an octave."""
    from streamer.features.fbank import FFT_MIN_ROWS, fft_rows

    sizes = {fft_rows(n) for n in range(1, 200_000)}
    assert len(sizes) <= 4 * 18
    for n in (1, 63, 64, 65, 100, 1000, 3001, 150_000):
        assert n <= fft_rows(n) <= max(FFT_MIN_ROWS, 1.25 * n)

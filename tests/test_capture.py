"""Live audio in, with real parts: PortAudio from a virtual capture device, ffmpeg over HTTP."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, real_clips, run_cli, write_wav
from mqtt_helpers import free_port, wait_for
from streamer.capture.files import read_audio
from streamer.capture.ring import RingBuffer
from streamer.capture.sources import Backoff, FfmpegSource, FileSource, SourceState
from streamer.model.config import FeatureConfig
from streamer.features.windows import StreamWindows
from stream_reader import StreamReader



def need(tool: str) -> None:
    """Tools .ci/run installs: missing in CI is a failure, missing on a dev box a skip."""
    if shutil.which(tool) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed (.ci/run should have installed it)")
        pytest.skip(f"{tool} is not installed")


# ---------------------------------------------------------------- ring buffer


def test_ring_keeps_positions_and_counts_overruns():
    ring = RingBuffer(10)
    ring.write(np.arange(7, dtype=np.float32))
    assert ring.read(3) == (0, pytest.approx(np.arange(3)))
    ring.write(np.arange(7, 14, dtype=np.float32))
    pos, data = ring.read()
    assert pos == 4 and ring.lost == 1 and list(data) == list(range(4, 14))
    ring.write(np.arange(14, 40, dtype=np.float32))  # more than the capacity at once
    pos, data = ring.read()
    assert pos == 30 and list(data) == list(range(30, 40))
    assert ring.lost == 1 + 16 and ring.written == 40 and ring.read_pos == 40


def test_ring_blocking_writer_waits_for_the_reader():
    ring = RingBuffer(100)
    ring.write(np.zeros(90, dtype=np.float32))
    assert ring.write(np.ones(20, dtype=np.float32), block=True, timeout=0.1) == 0  # no room, timed out
    threading.Timer(0.1, ring.read).start()
    assert ring.write(np.ones(20, dtype=np.float32), block=True, timeout=5) == 20
    assert ring.lost == 0


def test_ring_wall_clock_of_a_position():
    ring = RingBuffer(16000)
    ring.write(np.zeros(1600, dtype=np.float32), wall_end=1000.0)
    assert ring.wall_time(1599, 16000) == pytest.approx(1000.0)
    assert ring.wall_time(0, 16000) == pytest.approx(1000.0 - 1599 / 16000)


# ---------------------------------------------------------------- file source and streaming windows


def joined_real_audio(tmp_path: Path, count: int = 30) -> tuple[Path, np.ndarray]:
    """Real clips joined into one 44.1 kHz file (so the resampler runs), and its 16 kHz samples."""
    clips = [p for p in real_clips() if sf.info(p).samplerate == 44100][:count]
    joined = np.concatenate([sf.read(p, dtype="float32")[0] for p in clips])
    path = tmp_path / "joined.wav"
    sf.write(path, joined, 44100, subtype="FLOAT")
    return path, read_audio(path)


def collect_windows(source, features: FeatureConfig, hop_frames: int, timeout: float = 60):
    windows = []
    reader = StreamReader(source, features, hop_frames, windows.append)
    source.start()
    reader.start()
    assert reader.done.wait(timeout)
    source.stop()
    return windows, reader


@pytest.mark.slow
def test_streamed_windows_equal_offline_windows_on_real_recordings(tmp_path, tiny_checkpoint):
    path, samples = joined_real_audio(tmp_path)
    features = FeatureConfig()
    streamed, reader = collect_windows(FileSource("f", path, realtime=False, ring_seconds=3), features, 50)
    offline_stream = StreamWindows("f", features, 50)
    offline = offline_stream.push(samples) + offline_stream.finish()
    assert len(streamed) == len(offline) > 3
    assert [w.start_sample for w in streamed] == [w.start_sample for w in offline]
    for a, b in zip(streamed, offline):
        assert (a.features - b.features).abs().max().item() <= 1e-5
    assert reader.source.ring.lost == 0 and reader.gaps == 0

    # ... and the start samples are those of `streamer detect` on the same file
    directory, _ = tiny_checkpoint(max_length=1024, num_labels=527)
    out = tmp_path / "s.npz"
    result = run_cli("detect", str(path), "--model", str(directory), "--hop", "0.5", "--scores-out", str(out))
    assert result.returncode == 0, result.stderr
    assert list(np.load(out)["start_sample"]) == [w.start_sample for w in streamed]


def test_realtime_file_source_windows_carry_wall_clock(tmp_path):
    samples = np.random.default_rng(0).uniform(-0.3, 0.3, 16000 * 3).astype(np.float32)
    path = write_wav(tmp_path / "short.wav", samples)
    features = FeatureConfig(max_length=128)
    t0 = time.time()
    windows, _ = collect_windows(FileSource("rt", path, realtime=True), features, 100, timeout=10)
    elapsed = time.time() - t0
    assert 2.5 < elapsed < 6  # paced like a live stream
    assert [w.start_sample for w in windows][:3] == [0, 16000, 32000][: len(windows[:3])]
    for w in windows:
        end = w.start_sample + (128 - 1) * 160 + 400
        assert t0 + end / 16000 - 0.5 < w.wall_time < t0 + end / 16000 + 1.0


@pytest.mark.slow
def test_slow_reader_counts_lost_audio_and_keeps_the_timeline(tmp_path):
    samples = np.random.default_rng(1).uniform(-0.3, 0.3, 16000 * 6).astype(np.float32)
    path = write_wav(tmp_path / "six.wav", samples)
    source = FileSource("slow", path, realtime=True, ring_seconds=1.0)
    windows = []
    reader = StreamReader(source, FeatureConfig(max_length=64), 25, windows.append)
    source.start()
    time.sleep(2.5)  # the reader is not running: over a second of audio is overwritten
    reader.start()
    assert reader.done.wait(10)
    assert source.ring.lost > 16000
    assert reader.gaps == 1
    starts = [w.start_sample for w in windows]
    assert starts == sorted(starts)
    # windows after the gap start at their true positions on the stream's timeline
    offline = StreamWindows("x", FeatureConfig(max_length=64), 25)
    gap_end = next(s for s in starts if s >= source.ring.lost)
    expected = offline.push(samples[gap_end:])[0]
    match = next(w for w in windows if w.start_sample == gap_end)
    assert (match.features - expected.features).abs().max().item() <= 1e-5


def test_file_source_errors_are_one_line_states(tmp_path):
    bad = tmp_path / "bad.flac"
    bad.write_bytes(b"fLaC" + os.urandom(512))
    source = FileSource("bad", bad, realtime=False).start()
    assert wait_for(lambda: source.finished, 5)
    assert source.state == SourceState.FAILED and "cannot decode audio" in source.error


# ---------------------------------------------------------------- ffmpeg source over HTTP


class ToneStream(http.server.BaseHTTPRequestHandler):
    """An endless live WAV stream: a 440 Hz tone, sent in real time."""

    paused = threading.Event()

    def do_GET(self):  # noqa: N802 - the http.server API
        rate = 16000
        self.send_response(200)
        self.send_header("Content-Type", "audio/wav")
        self.end_headers()
        header = b"RIFF\xff\xff\xff\x7fWAVEfmt " + (16).to_bytes(4, "little") + (1).to_bytes(2, "little") + (1).to_bytes(2, "little")
        header += rate.to_bytes(4, "little") + (rate * 2).to_bytes(4, "little") + (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
        header += b"data\xff\xff\xff\x7f"
        try:
            self.wfile.write(header)
            n = 0
            while not self.server.closing:
                if self.paused.is_set():  # a stalled stream: connected, silent
                    time.sleep(0.05)
                    continue
                t = np.arange(n, n + 1600) / rate
                self.wfile.write((np.sin(2 * np.pi * 440 * t) * 16000).astype("<i2").tobytes())
                n += 1600
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


def serve(port: int) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), ToneStream)
    server.closing = False
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def shut(server) -> None:
    server.closing = True
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_ffmpeg_source_survives_the_server_going_away_and_coming_back():
    need("ffmpeg")
    port = free_port()
    server = serve(port)
    source = FfmpegSource("cam", f"http://127.0.0.1:{port}/live.wav", backoff=Backoff(first=0.2, maximum=1.0), stall_seconds=5)
    source.start()
    try:
        assert wait_for(lambda: source.ring.written > 16000, 15), source.error
        assert source.state == SourceState.RUNNING
        _, audio = source.ring.read()
        peak = np.abs(audio[1000:]).max()
        assert 0.4 < peak < 0.55  # the tone arrives at the right level (16000 / 32768)
        shut(server)
        assert wait_for(lambda: source.state == SourceState.RETRYING, 10)
        assert source.stats.restarts >= 1 and "retrying" in source.error
        before = source.ring.written
        time.sleep(1.0)
        server = serve(port)
        assert wait_for(lambda: source.state == SourceState.RUNNING and source.ring.written > before + 8000, 15), source.error
    finally:
        source.stop()
        shut(server)
    assert source.state == SourceState.STOPPED


@pytest.mark.slow
def test_ffmpeg_source_restarts_a_stalled_stream():
    need("ffmpeg")
    port = free_port()
    server = serve(port)
    source = FfmpegSource("stall", f"http://127.0.0.1:{port}/live.wav", backoff=Backoff(first=0.1, maximum=0.5), stall_seconds=1.0)
    source.start()
    try:
        assert wait_for(lambda: source.ring.written > 8000, 15)
        ToneStream.paused.set()
        assert wait_for(lambda: source.stats.restarts >= 1, 10)
        assert "stalled" in (source.error or "") or source.state == SourceState.RUNNING
        ToneStream.paused.clear()
        written = source.ring.written
        assert wait_for(lambda: source.ring.written > written + 8000, 15)
    finally:
        ToneStream.paused.clear()
        source.stop()
        shut(server)


def test_ffmpeg_source_reports_a_bad_url_and_keeps_retrying():
    need("ffmpeg")
    source = FfmpegSource("nowhere", f"http://127.0.0.1:{free_port()}/x.wav", backoff=Backoff(first=0.1, maximum=0.2))
    source.start()
    try:
        assert wait_for(lambda: source.stats.restarts >= 2, 15)
        assert source.state == SourceState.RETRYING and "ffmpeg exited" in source.error
    finally:
        source.stop()


# ---------------------------------------------------------------- PortAudio capture from a virtual device

DEVICE_RATE = 48000  # the virtual device's rate: not 16 kHz, so the mic's resampler runs


@pytest.fixture
def virtual_mic(tmp_path):
    """An ALSA capture device that plays a known signal, seen by PortAudio like any microphone.

    ALSA's ``file`` plugin reads capture data from ``infile`` (raw S16_LE, 48 kHz, stereo:
    a 300 Hz tone on the left, a 1234 Hz tone on the right). Its ``null`` slave has no
    clock, so the device runs far faster than real time and, in this chain, hands
    PortAudio one period in three: blocks are exact copies of the file but not contiguous.
    That rules out a sample-for-sample comparison of the whole capture (a PulseAudio null
    sink was tried too and is not sample-accurate here), so the checks are: each tone at
    its frequency and level after the 48 → 16 kHz resampling, channel selection, and the
    overrun counters.
    """
    t = np.arange(DEVICE_RATE * 40) / DEVICE_RATE
    left = 0.3 * np.sin(2 * np.pi * 300 * t)
    right = 0.2 * np.sin(2 * np.pi * 1234 * t)
    pcm = (np.stack([left, right], axis=1) * 32767).round().astype("<i2")
    pcm.tofile(tmp_path / "signal.raw")
    (tmp_path / ".asoundrc").write_text(f"""
pcm.virtfile {{
    type file
    slave.pcm "null"
    file "/dev/null"
    infile "{tmp_path / 'signal.raw'}"
    format "raw"
}}
pcm.virtmic {{
    type plug
    slave {{ pcm "virtfile" format S16_LE rate {DEVICE_RATE} channels 2 }}
}}
""")
    return {"HOME": str(tmp_path)}


def tone_levels(audio: np.ndarray, freqs: list[float], rate: int = 16000, frame: int = 128) -> dict[float, float]:
    """Amplitude of each frequency: the median over short Hann-windowed frames.

    Short frames, because the device's blocks are exact but not contiguous: most 8 ms
    frames lie inside one block, and the median ignores those that straddle a seam.
    """
    window = np.hanning(frame)
    frames = np.lib.stride_tricks.sliding_window_view(audio, frame)[::32]
    spectra = np.abs(np.fft.rfft(frames * window, axis=1)) * 2 / window.sum()
    bins = np.fft.rfftfreq(frame, 1 / rate)
    return {f: float(np.median(spectra[:, np.argmin(np.abs(bins - f))])) for f in freqs}


def test_devices_lists_the_virtual_capture_device(virtual_mic):
    result = run_cli("devices", env=virtual_mic)
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()[1:]]
    virt = [r for r in rows if r[-1] == "virtmic"]
    assert virt and virt[0][2] == str(DEVICE_RATE)


def test_mic_capture_through_portaudio(virtual_mic, tmp_path):
    out = tmp_path / "captured.wav"
    result = run_cli("record", "mic:virtmic", str(out), "--seconds", "2", "--channels", "2", env=virtual_mic)
    assert result.returncode == 0, result.stderr
    captured, rate = sf.read(out, dtype="float32")
    assert rate == 16000 and len(captured) == 32000
    levels = tone_levels(captured, [1234, 5000])
    # the mix of the two channels: each tone at half its level, at its own frequency
    assert levels[1234] == pytest.approx(0.10, rel=0.2)
    assert levels[5000] < 0.01
    assert np.sqrt(np.mean(captured**2)) == pytest.approx(np.sqrt(0.15**2 / 2 + 0.1**2 / 2), rel=0.1)
    assert "lost samples" in result.stderr  # the count is reported (how many depends on the machine's speed)


MIC_OVERRUN_SCRIPT = """
import json, time
from streamer.capture.sources import MicSource
src = MicSource("m", "virtmic", channels=2, ring_seconds=0.25).start()
deadline = time.monotonic() + 20
while src.ring.written < 4 * src.ring.capacity and time.monotonic() < deadline:
    time.sleep(0.05)  # nobody reads: the ring must overwrite its oldest audio
start, samples = src.ring.read()
src.stop()
print(json.dumps({"written": src.ring.written, "capacity": src.ring.capacity, "start": start,
                  "read": len(samples), "lost": src.lost, "state": src.state.value}))
"""


def test_a_reader_that_falls_behind_the_mic_loses_counted_audio(virtual_mic):
    """What the ring overwrote is exactly what the reader missed: counted, never silent."""
    result = subprocess.run([sys.executable, "-c", MIC_OVERRUN_SCRIPT], capture_output=True, text=True,
                            timeout=60, cwd=REPO, env={**os.environ, **virtual_mic})
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["written"] >= 4 * got["capacity"], got
    # the first frame read is the oldest one still held; everything before it was lost and counted
    assert 0 < got["read"] <= got["capacity"]
    assert got["lost"] >= got["start"] >= 3 * got["capacity"]


def test_one_channel_of_the_device(virtual_mic, tmp_path):
    out = tmp_path / "right.wav"
    result = run_cli("record", "mic:virtmic", str(out), "--seconds", "1", "--channels", "2", "--channel", "1", env=virtual_mic)
    assert result.returncode == 0, result.stderr
    captured, _ = sf.read(out, dtype="float32")
    assert tone_levels(captured, [1234])[1234] == pytest.approx(0.2, rel=0.2)
    assert np.sqrt(np.mean(captured**2)) == pytest.approx(0.2 / np.sqrt(2), rel=0.1)  # the left tone is absent


def test_a_channel_the_device_lacks_is_a_clear_error(virtual_mic, tmp_path):
    result = run_cli("record", "mic:virtmic", str(tmp_path / "x.wav"), "--channels", "2", "--channel", "5", env=virtual_mic)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "channel 5 does not exist" in result.stderr


def test_missing_microphone_is_one_clear_line(tmp_path):
    env = {"HOME": str(tmp_path)}
    result = run_cli("record", "mic:nosuchdevice", str(tmp_path / "x.wav"), "--seconds", "1", env=env)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("streamer: error:")
    assert "file or ffmpeg source" in result.stderr or "streamer devices" in result.stderr


def test_several_streams_in_one_process_each_with_its_own_timeline(tmp_path):
    rng = np.random.default_rng(5)
    features = FeatureConfig(max_length=64)
    sources, expected = [], {}
    for i, seconds in enumerate((3, 4, 5)):
        samples = rng.uniform(-0.3, 0.3, 16000 * seconds).astype(np.float32)
        path = write_wav(tmp_path / f"s{i}.wav", samples)
        sources.append(FileSource(f"s{i}", path, realtime=False))
        offline = StreamWindows(f"s{i}", features, 30)
        expected[f"s{i}"] = offline.push(samples) + offline.finish()
    got: dict[str, list] = {s.name: [] for s in sources}
    readers = [StreamReader(s, features, 30, lambda w: got[w.stream].append(w)) for s in sources]
    for s, r in zip(sources, readers):
        s.start()
        r.start()
    for r in readers:
        assert r.done.wait(30)
    for name, windows in got.items():
        assert [w.start_sample for w in windows] == [w.start_sample for w in expected[name]]
        assert all((a.features - b.features).abs().max().item() <= 1e-5 for a, b in zip(windows, expected[name]))

"""The ingest loop: one thread for any number of sources, lossless files that stay lossless
for a slow reader, consumers woken by data, one source factory, and masked credentials."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings, strategies as st

from conftest import REPO, write_wav
from mqtt_helpers import free_port, wait_for
from streamer.capture.files import read_audio
from streamer.capture.ingest import Ingest
from streamer.capture.sources import (Backoff, FfmpegSource, FileSource, MicSource, SourceState,
                                      make_source, source_from_spec)
from streamer.capture.urls import mask_url
from streamer.errors import StreamerError
from streamer.settings import SourceConfig

WAKE_TIMEOUT_S = 10.0  # a consumer woken by on_data never waits anywhere near this


def noise_file(path: Path, seconds: float, rate: int = 44100, seed: int = 0) -> Path:
    """Random audio at 44.1 kHz (so the resampler runs), as float WAV."""
    samples = np.random.default_rng(seed).uniform(-0.5, 0.5, int(rate * seconds)).astype(np.float32)
    sf.write(path, samples, rate, subtype="FLOAT")
    return path


def consume(source, piece_frames: tuple[int, int] = (1, 4000), pause_every: int = 7, pause_s: float = 0.03,
            seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """A deliberately slow reader: random small reads, a pause now and then, woken only by
    ``on_data`` (never polling). Checks on the way that the source does not say ``ENDED``
    while audio it produced is still unread."""
    rng = np.random.default_rng(seed)
    woken = threading.Event()
    source.on_data = woken.set
    parts, positions, expected_pos, reads = [], [], 0, 0
    while True:
        woken.clear()
        ended_before = source.state == SourceState.ENDED
        unread_before = source.ring.written - source.ring.read_pos
        position, samples = source.ring.read(int(rng.integers(*piece_frames)))
        if ended_before:
            assert unread_before == 0, "ENDED with audio still unread"
        if len(samples):
            assert position == expected_pos  # contiguous: nothing skipped
            expected_pos += len(samples)
            parts.append(samples)
            positions.append(position)
            reads += 1
            if reads % pause_every == 0:
                time.sleep(pause_s)  # slower than the file decodes: the ring fills up
            continue
        if source.drained:
            break
        assert woken.wait(WAKE_TIMEOUT_S), f"no on_data wake-up (state {source.state.value})"
    return (np.concatenate(parts) if parts else np.zeros(0, np.float32)), positions


# ---------------------------------------------------------------- lossless file sources


def test_lossless_file_source_is_exact_for_a_slow_reader(tmp_path):
    path = noise_file(tmp_path / "n.wav", 12.0)
    expected = read_audio(path)
    ingest = Ingest()
    source = ingest.add(FileSource("slow", path, realtime=False, ring_seconds=0.25))
    ingest.start()
    try:
        got, _ = consume(source)
    finally:
        ingest.stop()
    assert source.state == SourceState.ENDED and source.error is None
    assert source.ring.lost == 0 and source.stats.samples == len(expected)
    assert len(got) == len(expected)
    np.testing.assert_array_equal(got, expected)


def test_a_full_lossless_ring_does_not_hold_up_the_other_sources(tmp_path):
    """One reader that stops reading: its source waits; a second lossless source and a
    real-time one on the same loop go on, and the waiting one loses nothing."""
    stuck_path = noise_file(tmp_path / "a.wav", 6.0, seed=1)
    free_path = noise_file(tmp_path / "b.wav", 6.0, seed=2)
    live_path = write_wav(tmp_path / "c.wav", np.zeros(16000 * 2, np.float32))
    ingest = Ingest()
    stuck = ingest.add(FileSource("stuck", stuck_path, realtime=False, ring_seconds=0.5))
    free = ingest.add(FileSource("free", free_path, realtime=False, ring_seconds=0.5))
    live = ingest.add(FileSource("live", live_path, realtime=True, ring_seconds=5))
    ingest.start()
    try:
        got_free, _ = consume(free, pause_every=1000)
        assert wait_for(lambda: live.state == SourceState.ENDED, 10)
        # the stuck source filled its ring and waits, holding the rest of its file
        assert stuck.ring.room() == 0 and stuck.state == SourceState.RUNNING
        assert stuck.stats.samples < len(read_audio(stuck_path))
        got_stuck, _ = consume(stuck)
    finally:
        ingest.stop()
    np.testing.assert_array_equal(got_free, read_audio(free_path))
    np.testing.assert_array_equal(got_stuck, read_audio(stuck_path))
    assert live.ring.written == 16000 * 2 and stuck.ring.lost == free.ring.lost == 0


def test_lossless_source_ends_only_once_its_audio_is_read(tmp_path):
    path = write_wav(tmp_path / "short.wav", np.full(8000, 0.25, np.float32))
    ingest = Ingest()
    woken = threading.Event()
    source = ingest.add(FileSource("s", path, realtime=False, ring_seconds=1.0, on_data=woken.set))
    ingest.start()
    try:
        assert wait_for(lambda: source.ring.written == 8000, 10)
        assert woken.is_set()
        time.sleep(0.2)  # the file is fully decoded; nothing read: not ended
        assert source.state == SourceState.RUNNING and not source.finished
        woken.clear()
        _, samples = source.ring.read()
        assert len(samples) == 8000
        assert woken.wait(WAKE_TIMEOUT_S)  # woken by the end itself
        assert source.state == SourceState.ENDED and source.drained
    finally:
        ingest.stop()


# ---------------------------------------------------------------- one thread for all


THREADS_SCRIPT = """
import json, sys, time
from streamer.capture.ingest import Ingest
from streamer.capture.sources import FileSource

def threads():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("Threads:")).split()[1])

count, path = int(sys.argv[1]), sys.argv[2]
before = threads()
ingest = Ingest()
sources = [ingest.add(FileSource(f"s{i}", path, realtime=True, loop=True, ring_seconds=2)) for i in range(count)]
ingest.start()
deadline = time.monotonic() + 30
while not all(s.ring.written >= 3200 for s in sources) and time.monotonic() < deadline:
    time.sleep(0.05)
during = threads()
written = min(s.ring.written for s in sources)
ingest.stop()
print(json.dumps({"before": before, "during": during, "written": written,
                  "running": sum(s.state.value == "running" for s in sources)}))
"""


def test_thread_count_does_not_grow_with_the_number_of_sources(tmp_path):
    path = write_wav(tmp_path / "tone.wav", (0.1 * np.sin(np.arange(16000) / 5)).astype(np.float32))
    got = {}
    for count in (1, 64):
        result = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(count), str(path)], capture_output=True,
                                text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert result.returncode == 0, result.stderr
        got[count] = json.loads(result.stdout)
        assert got[count]["written"] >= 3200 and got[count]["running"] == count  # every source produced audio
    assert got[64]["during"] == got[1]["during"] == got[1]["before"] + 1  # the loop's one thread


def test_sources_on_one_loop_and_restartable_ffmpeg_share_its_thread(tmp_path):
    """ffmpeg pipes and file clocks on the same thread: a file read by ffmpeg arrives
    exactly, twice over, while a file source runs beside it."""
    samples = np.random.default_rng(3).uniform(-0.5, 0.5, 16000 * 2).astype(np.float32)
    path = write_wav(tmp_path / "pcm.wav", samples)
    ingest = Ingest()
    threads_before = threading.active_count()
    a = ingest.add(FfmpegSource("a", str(path), restart=False, ring_seconds=5))
    b = ingest.add(FfmpegSource("b", str(path), restart=False, ring_seconds=5))
    f = ingest.add(FileSource("f", path, realtime=False, ring_seconds=5))
    ingest.start()
    try:
        assert threading.active_count() == threads_before + 1
        assert wait_for(lambda: a.finished and b.finished and f.ring.written == len(samples), 30), (a.error, b.error)
        for source in (a, b, f):
            _, got = source.ring.read()
            np.testing.assert_array_equal(got, samples)
        assert a.state == b.state == SourceState.ENDED
        assert wait_for(lambda: f.state == SourceState.ENDED, 5)
    finally:
        ingest.stop()


# ---------------------------------------------------------------- one factory


def test_one_factory_from_spec_and_config(tmp_path):
    path = write_wav(tmp_path / "x.wav", np.zeros(1600, np.float32))
    cases = {
        "mic": ("mic", MicSource), "mic:USB": ("mic", MicSource), f"file:{path}": ("x", FileSource),
        str(path): ("x", FileSource), "rtsp://u:p@cam/s": ("stream", FfmpegSource),
        "ffmpeg:/dev/video0": ("stream", FfmpegSource),
    }
    for spec, (name, cls) in cases.items():
        config = source_from_spec(spec)
        assert isinstance(config, SourceConfig) and config.name == name
        source = make_source(config, ring_seconds=2)
        assert type(source) is cls and source.ring.capacity == 32000
    assert source_from_spec("mic:USB").device == "USB"
    assert source_from_spec("rtsp://u:p@cam/s").url == "rtsp://u:p@cam/s"
    with pytest.raises(StreamerError, match="not a file, URL or mic") as info:
        source_from_spec(str(tmp_path / "missing.wav"))
    assert "\n" not in str(info.value)
    with pytest.raises(StreamerError, match="unknown type"):
        make_source(SourceConfig(name="z", type="carrier-pigeon"))


# ---------------------------------------------------------------- credentials masked

URL_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)


@settings(max_examples=300, deadline=None)
@given(user=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=":@/?#"), max_size=12)
       .map(lambda u: quote(u, safe="")),
       password=URL_TEXT, raw=st.booleans(),
       prefix=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=":@="), max_size=20), scheme=st.sampled_from(["rtsp", "rtsps", "http", "srt"]))
def test_mask_url_hides_any_password(user, password, raw, prefix, scheme):
    # a raw password (as people type them) may hold '@' or ':'; it cannot hold what ends the authority
    secret = password if raw and not set(password) & set("/?# \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0") else quote(password, safe="")
    if any(c.isspace() for c in secret):
        secret = quote(password, safe="")
    url = f"{scheme}://{user}:{secret}@cam.local:554/stream?x=1"
    masked = mask_url(f"{prefix} {url}: Connection refused")
    assert masked == f"{prefix} {scheme}://{user}:***@cam.local:554/stream?x=1: Connection refused"
    assert mask_url("no url here, user:pass") == "no url here, user:pass"


def test_mask_url_masks_every_url_and_secret_parameters():
    text = "a rtsp://u:p1@h/x and http://v:p2@g:80/y?token=abc&password=p3 rtsp://cam/s"
    assert mask_url(text) == "a rtsp://u:***@h/x and http://v:***@g:80/y?token=***&password=*** rtsp://cam/s"


@pytest.mark.parametrize("scheme", ["rtsp", "http"])
def test_a_failing_camera_never_logs_its_password(scheme, caplog):
    password = "S3cr3t-PW_q9"
    url = f"{scheme}://admin:{password}@127.0.0.1:{free_port()}/stream"
    caplog.set_level(logging.DEBUG)
    ingest = Ingest()
    source = ingest.add(FfmpegSource("cam", url, backoff=Backoff(first=0.1, maximum=0.2)))
    ingest.start()
    try:
        assert wait_for(lambda: source.stats.restarts >= 3, 30), source.error
        shown = [source.describe(), source.error or "", *source.stderr_tail]
    finally:
        ingest.stop()
    lines = [r.getMessage() for r in caplog.records] + shown
    assert any("admin:***@127.0.0.1" in line and "Connection refused" in line for line in lines), lines
    assert not [line for line in lines if password in line]


def test_the_pacer_runs_many_due_calls_on_one_timer_never_early_and_honours_cancel():
    import asyncio

    from streamer.capture.ingest import Pacer

    loop = asyncio.new_event_loop()
    try:
        pacer = Pacer(loop)
        start = loop.time()
        ran: list[tuple[int, float, float]] = []
        calls = {}
        for k in range(300):  # 300 sources, due times spread over 0.3 s, in shuffled order
            due = start + 0.05 + ((k * 37) % 300) / 1000
            calls[k] = pacer.call_at(due, lambda k=k, due=due: ran.append((k, due, loop.time())))
        for k in range(0, 300, 10):
            calls[k].cancel()
        timers = sum(not h.cancelled() for h in loop._scheduled)  # asyncio's timer heap: the pacer keeps one entry
        loop.call_at(start + 0.6, loop.stop)
        loop.run_forever()
    finally:
        loop.close()
    assert timers == 1
    assert sorted(k for k, _, _ in ran) == [k for k in range(300) if k % 10]
    assert all(at >= due for _, due, at in ran)  # never early
    dues = [due for _, due, _ in ran]
    assert dues == sorted(dues)  # in due order


def test_a_failing_paced_call_does_not_stop_the_others(caplog):
    import asyncio

    from streamer.capture.ingest import Pacer

    loop = asyncio.new_event_loop()
    try:
        pacer = Pacer(loop)
        ran = []
        start = loop.time()

        def boom():
            raise RuntimeError("a bug")

        pacer.call_at(start + 0.01, boom)
        pacer.call_at(start + 0.01, lambda: ran.append("same wake"))
        pacer.call_at(start + 0.1, lambda: ran.append("later"))
        loop.call_at(start + 0.3, loop.stop)
        loop.run_forever()
    finally:
        loop.close()
    assert ran == ["same wake", "later"]
    assert "a paced call failed" in caplog.text

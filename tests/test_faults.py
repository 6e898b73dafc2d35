"""Faults injected into the real daemon: the broker, the capture device, sources, overload,
signals and the watchdog. Each is survived, and counted."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, real_clips, write_wav
from daemon_helpers import metric, process_status, scrape_metrics
from mqtt_helpers import Broker, Subscriber, daemon_topics, free_port, wait_for
from streamer.capture.files import read_audio

D = daemon_topics()  # no mqtt.instance in these configs: the host name

STOP_LIMIT_S = 15.0  # SIGTERM to exit, as the unit's TimeoutStopSec allows more than this


@pytest.fixture
def scene(tmp_path):
    samples = np.concatenate([read_audio(p) for p in real_clips(per_label=1)[:8]])
    return write_wav(tmp_path / "scene.wav", samples)


@pytest.fixture
def model(tiny_checkpoint):
    directory, _ = tiny_checkpoint(max_length=128, num_labels=527, seed=4)
    return directory


def file_source(name, path, **extra):
    return {"name": name, "type": "file", "path": str(path), "realtime": True, "loop": True, **extra}


def write_config(tmp_path: Path, checkpoint: Path, sources: list[dict], **sections) -> Path:
    config = {
        "model": {"path": str(checkpoint), "max_batch": 4},
        "hop": 0.25,
        "sources": sources,
        "detect": {"include": ["LABEL_1*"], "defaults": {"on_threshold": 0.5, "off_threshold": 0.45, "hold": 0.25, "smoothing": "none"}},
        "console": {"mode": "json"},
        "logging": {"level": "info"},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / f"streamer-{time.monotonic_ns()}.yaml"
    path.write_text(json.dumps(config))
    return path


def start(config: Path, env: dict | None = None) -> subprocess.Popen:
    """The daemon, its output going to files (a pipe nobody reads would fill and block it)."""
    out, err = open(config.with_suffix(".out"), "w"), open(config.with_suffix(".err"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamer", "run", "--config", str(config)], cwd=REPO,
                            stdout=out, stderr=err, text=True, env={**os.environ, **(env or {})})
    proc.files = (config.with_suffix(".out"), config.with_suffix(".err"))
    return proc


def stop(proc: subprocess.Popen) -> tuple[str, str, float]:
    """SIGTERM; returns stdout, stderr and how long the exit took."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    took = time.monotonic() - t0
    return proc.files[0].read_text(), proc.files[1].read_text(), took


# -- the broker -----------------------------------------------------------------------------

@pytest.mark.slow  # over 15 s on 2 cores: CI runs it, the fast lane (-m 'not slow') does not
def test_broker_down_at_start_killed_and_restarted_every_event_accounted_for(tmp_path, model, scene):
    broker = Broker(tmp_path, persistence=True)
    # a recorder with a persistent session: the broker keeps its messages while it is away
    sub = Subscriber(broker.port, [D.events("scene")], client_id="recorder", persistent=True)
    assert sub.settled()  # the broker has taken the subscription (and keeps it in the session) before it goes down
    broker.stop()
    config = write_config(tmp_path, model, [file_source("scene", scene)],
                          mqtt={"host": "127.0.0.1", "port": broker.port, "homeassistant": False})
    proc = start(config)
    try:
        time.sleep(8)  # broker down at start-up: detection goes on, events queue
        assert proc.poll() is None
        broker.start()
        assert wait_for(lambda: sub.on(D.events("scene")), 30)
        broker.stop()  # down mid-run
        time.sleep(5)
        broker.start()
        time.sleep(5)
        out, err, _ = stop(proc)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    printed = [(e["id"], e["state"]) for e in map(json.loads, out.splitlines())]
    found = re.search(r"events: raised (\d+); mqtt delivered (\d+), dropped (\d+) \(queue full\), unsent (\d+)", err)
    assert found, err
    raised, delivered, dropped, unsent = map(int, found.groups())
    assert raised == len(printed) >= 4
    assert (delivered, dropped, unsent) == (raised, 0, 0)
    # the recorder got every one of them, first arrivals in the order they were raised
    def firsts():
        seen = []
        for m in sub.on(D.events("scene")):
            key = (json.loads(m.payload)["id"], json.loads(m.payload)["state"])
            if key not in seen:
                seen.append(key)
        return seen
    assert wait_for(lambda: len(firsts()) == len(printed), 20), (len(firsts()), len(printed))
    assert firsts() == printed
    sub.close()
    broker.stop()


@pytest.mark.slow
def test_sigkill_mid_event_the_last_will_tells_home_assistant(tmp_path, model, scene):
    broker = Broker(tmp_path)
    detect = {"include": ["LABEL_1"], "defaults": {"on_threshold": 0.0, "off_threshold": 0.0, "hold": 0}}
    config = write_config(tmp_path, model, [file_source("scene", scene)], detect=detect,
                          mqtt={"host": "127.0.0.1", "port": broker.port, "homeassistant": True})
    sub = Subscriber(broker.port, ["streamer/#", "homeassistant/#"])
    proc = start(config)
    try:
        assert wait_for(lambda: any(m.payload == "ON" for m in sub.on(D.state("scene", "LABEL_1"))), 60)
        discovery = [json.loads(m.payload) for m in sub.messages if m.topic.startswith("homeassistant/") and m.payload]
        assert discovery and all(d["avty"][0]["t"] == D.status for d in discovery)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # no OFF could be sent: the broker's last will marks every entity unavailable instead
        assert wait_for(lambda: sub.on(D.status)[-1].payload == "offline", 15)
        assert sub.on(D.state("scene", "LABEL_1"))[-1].payload == "ON"
    finally:
        proc.kill()
        sub.close()
        broker.stop()


# -- overload, SIGTERM under load, the watchdog ---------------------------------------------------

@pytest.mark.slow  # over 15 s on 2 cores: CI runs it, the fast lane (-m 'not slow') does not
def test_overload_skips_windows_with_bounded_latency_flat_memory_and_a_clean_stop(tmp_path, model, scene):
    port = free_port()
    sources = [file_source(f"s{i}", scene) for i in range(3)]
    # 3 streams × 4 windows/s, but each batch of at most 2 takes 0.7 s: ~3 windows/s get scored
    config = write_config(tmp_path, model, sources, model={"max_batch": 2, "added_delay_ms": 700},
                          metrics={"enabled": True, "port": port})
    proc = start(config)
    try:
        assert wait_for(lambda: metric(scrape_metrics(port), "streamer_windows_total") > 6, 60)
        time.sleep(6)
        first, m1 = process_status(proc.pid), scrape_metrics(port)
        time.sleep(20)
        last, m2 = process_status(proc.pid), scrape_metrics(port)
        out, err, took = stop(proc)
    finally:
        proc.kill()
    assert proc.returncode == 0 and took < STOP_LIMIT_S and "Traceback" not in err
    scored = metric(m2, "streamer_windows_total") - metric(m1, "streamer_windows_total")
    skipped = metric(m2, "streamer_windows_skipped") - metric(m1, "streamer_windows_skipped")
    assert 40 <= scored <= 80  # about 2 windows per 0.7 s batch over 20 s
    assert skipped > scored  # most windows are replaced by newer ones, and counted
    # latency bounded by the batches ahead of a window, not by how far behind the worker is
    assert metric(m2, "streamer_inference_latency_seconds_bucket", le="2.5") == metric(m2, "streamer_inference_latency_seconds_count")
    assert metric(m2, "streamer_worker_pending_windows") <= 3
    assert last["rss_kib"] - first["rss_kib"] < 20 * 1024, (first, last)
    assert last["threads"] == first["threads"] and last["fds"] <= first["fds"] + 2, (first, last)


@pytest.mark.slow  # over 15 s on 2 cores: CI runs it, the fast lane (-m 'not slow') does not
def test_watchdog_pings_stop_when_inference_stalls(tmp_path, model, scene):
    config = write_config(tmp_path, model, [file_source("scene", scene)], model={"added_delay_ms": 60_000})
    path = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(1)
    proc = start(config, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    received: list[tuple[float, str]] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not any(m == "READY=1" for _, m in received):
            try:
                received.append((time.monotonic(), server.recv(4096).decode()))
            except socket.timeout:
                pass
        ready = next(t for t, m in received if m == "READY=1")
        while time.monotonic() < ready + 12:
            try:
                received.append((time.monotonic(), server.recv(4096).decode()))
            except socket.timeout:
                pass
        _, err, took = stop(proc)
    finally:
        proc.kill()
        server.close()
    pings = [t - ready for t, m in received if m == "WATCHDOG=1"]
    # the first batch never finishes: pings for at most the watchdog interval, then none,
    # so systemd (WatchdogSec) would kill and restart the daemon
    assert pings and max(pings) < 3.0, pings
    assert proc.returncode == 0 and took < STOP_LIMIT_S, err


# -- sources ------------------------------------------------------------------------------------

@pytest.mark.slow  # over 15 s on 2 cores: CI runs it, the fast lane (-m 'not slow') does not
def test_each_source_fails_or_recovers_alone(tmp_path, model, scene):
    rng = np.random.default_rng(8)
    clean = read_audio(scene)[: 16000 * 6]
    weird = clean.copy()
    weird[1000:1100] = np.nan
    weird[5000:5050] = np.inf
    weird[16000:32000] += 0.5  # DC offset
    weird[40000:56000] = np.clip(weird[40000:56000] * 50, -1, 1)  # full-scale clipping
    write_wav(tmp_path / "weird.wav", weird)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF" + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(scene.read_bytes()[: 60_000])
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    port = free_port()
    sources = [
        file_source("good", scene),
        file_source("weird", tmp_path / "weird.wav"),
        file_source("corrupt", corrupt),
        file_source("truncated", truncated),
        {"name": "garbage", "type": "ffmpeg", "url": str(garbage)},
        {"name": "gone", "type": "ffmpeg", "url": str(tmp_path / "not-there.wav")},
    ]
    config = write_config(tmp_path, model, sources, metrics={"enabled": True, "port": port})
    proc = start(config)
    try:
        assert wait_for(lambda: metric(scrape_metrics(port), "streamer_windows_total", stream="good") > 4, 60)
        time.sleep(10)
        m1 = scrape_metrics(port)
        time.sleep(8)
        m2 = scrape_metrics(port)
        assert proc.poll() is None
        out, err, took = stop(proc)
    finally:
        proc.kill()
    assert proc.returncode == 0 and took < STOP_LIMIT_S
    assert "Traceback" not in err
    # the good streams keep going at their pace, whatever the others do
    for name in ("good", "weird", "truncated"):
        grew = metric(m2, "streamer_windows_total", stream=name) - metric(m1, "streamer_windows_total", stream=name)
        assert grew >= 8 / 0.25 * 0.7, (name, grew)
    assert metric(m2, "streamer_nonfinite_samples", stream="weird") >= 150  # zeroed and counted, every loop
    assert metric(m2, "streamer_source_up", stream="corrupt", state="failed") == 1
    assert np.isnan(metric(m2, "streamer_windows_total", stream="corrupt"))  # no audio, so no (padded) window
    for name in ("garbage", "gone"):  # ffmpeg cannot read them: retried with backoff, never fatal
        assert metric(m2, "streamer_source_up", stream=name, state="retrying") == 1 or \
            metric(m2, "streamer_source_restarts", stream=name) >= 1
        assert metric(m2, "streamer_source_restarts", stream=name) >= 1
    assert "corrupt" in err and "cannot decode audio" in err


PULSE = shutil.which("pulseaudio") and shutil.which("pactl")


@pytest.fixture
def pulse(tmp_path):
    """A private PulseAudio server with a null sink: its monitor is a capture device whose
    module can be unloaded (the device disappears) and loaded again (it comes back)."""
    if not PULSE:
        if os.environ.get("CI"):
            pytest.fail("pulseaudio is not installed (.ci/run should have installed it)")
        pytest.skip("pulseaudio is not installed")
    runtime = tmp_path / "pulse"
    runtime.mkdir()
    env = {**os.environ, "HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(runtime), "PULSE_RUNTIME_PATH": str(runtime),
           "PULSE_SOURCE": "virt.monitor"}
    server = subprocess.Popen(["pulseaudio", "--daemonize=no", "--exit-idle-time=-1", "-n", "--disallow-exit",
                               "--load=module-native-protocol-unix", "--load=module-null-sink sink_name=virt",
                               "--log-target=stderr"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def pactl(*args):
        return subprocess.run(["pactl", *args], env=env, capture_output=True, text=True, timeout=10)
    assert wait_for(lambda: pactl("info").returncode == 0, 15), "pulseaudio did not start"
    yield env, pactl
    server.terminate()
    server.wait(10)


@pytest.mark.slow  # over 15 s on 2 cores: CI runs it, the fast lane (-m 'not slow') does not
def test_capture_device_disappears_and_reappears(tmp_path, model, scene, pulse):
    env, pactl = pulse
    port = free_port()
    broker = Broker(tmp_path)
    sub = Subscriber(broker.port, [f"{D.base}/+/availability"])
    sources = [{"name": "room", "type": "mic", "device": "pulse", "channels": 1}, file_source("file", scene)]
    config = write_config(tmp_path, model, sources, metrics={"enabled": True, "port": port},
                          mqtt={"host": "127.0.0.1", "port": broker.port, "homeassistant": False})
    proc = start(config, env=env)
    try:
        windows = lambda name: metric(scrape_metrics(port), "streamer_windows_total", stream=name)  # noqa: E731
        assert wait_for(lambda: windows("room") > 4, 60)  # a 44.1 kHz device, resampled
        assert pactl("unload-module", "module-null-sink").returncode == 0  # unplugged
        assert wait_for(lambda: metric(scrape_metrics(port), "streamer_source_up", stream="room", state="retrying") == 1, 20)
        assert wait_for(lambda: sub.on(D.availability("room"))[-1].payload == "offline", 10)
        file_before, room_before = windows("file"), windows("room")
        time.sleep(5)
        assert windows("file") - file_before >= 10  # the other source never stops
        assert windows("room") - room_before <= 1
        assert pactl("load-module", "module-null-sink", "sink_name=virt").returncode == 0  # plugged back in
        assert wait_for(lambda: metric(scrape_metrics(port), "streamer_source_up", stream="room", state="running") == 1, 30)
        room_back = windows("room")
        assert wait_for(lambda: windows("room") > room_back + 8, 20)
        assert sub.on(D.availability("room"))[-1].payload == "online"
        assert metric(scrape_metrics(port), "streamer_source_restarts", stream="room") >= 1
        out, err, took = stop(proc)
    finally:
        proc.kill()
        sub.close()
        broker.stop()
    assert proc.returncode == 0 and took < STOP_LIMIT_S
    assert "Traceback" not in err and "room" in err and "device gone" in err


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs: the clips directory fills up after a few clips."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.slow
def test_disk_full_still_publishes_every_event_and_logs_once_per_interval(tmp_path, model, scene, tiny_disk):
    detect = {"include": ["LABEL_1*"], "defaults": {"on_threshold": 0.5, "off_threshold": 0.45, "hold": 0.25, "smoothing": "none"}}
    config = write_config(tmp_path, model, [file_source("scene", scene, realtime=False, loop=False)], detect=detect,
                          clips={"enabled": True, "directory": str(tiny_disk / "clips"), "pre": 2, "post": 2},
                          logging={"level": "warning"}, console={"mode": "json"})
    proc = start(config)
    assert proc.wait(300) == 0
    out, err = proc.files[0].read_text(), proc.files[1].read_text()
    events = [json.loads(line) for line in out.splitlines()]
    offs = [e for e in events if e["state"] == "OFF"]
    # the clip's path is announced with the event, before it is written: once the disk cannot hold
    # a clip, its event has none (it named files that never came); a path given just before the
    # disk filled may still be left without its file, as the writer is behind the events
    saved = [e for e in offs if e["clip"] and Path(e["clip"]).exists()]
    assert len(offs) >= 10 and 0 < len(saved) < len(offs)  # some clips fit, then the disk was full
    assert any(e["clip"] is None for e in offs)
    assert all(Path(e["clip"]).stat().st_size > 0 for e in saved)  # and no half-written ones are left
    assert len(list((tiny_disk / "clips").glob("*.flac"))) == len(saved)
    assert err.count("cannot write clips") == 1 and "No space left" in err  # once per interval, not per event

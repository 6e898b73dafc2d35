"""The daemon as users run it: `streamer run` against a real mosquitto, signals, config errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, real_clips, run_cli, write_wav
from mqtt_helpers import Broker, Subscriber, daemon_topics, wait_for

D = daemon_topics()  # no mqtt.instance in these configs: the host name
from streamer.capture.files import read_audio


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path)
    yield b
    b.stop()


@pytest.fixture
def scene(tmp_path):
    samples = np.concatenate([read_audio(p) for p in real_clips(per_label=1)[:12]])
    return write_wav(tmp_path / "scene.wav", samples)


def write_config(path, model, audio, port=None, realtime=False, detect=None, name="scene", loop=False):
    config = {
        "model": {"path": str(model), "max_batch": 4},
        "hop": 0.25,
        "sources": [{"name": name, "type": "file", "path": str(audio), "realtime": realtime, "loop": loop}],
        "detect": detect or {"include": ["LABEL_1*"], "defaults": {"on_threshold": 0.5, "off_threshold": 0.45, "hold": 0.25, "smoothing": "none"}},
        "console": {"mode": "json"},
        "logging": {"level": "warning"},
    }
    if port:
        config["mqtt"] = {"host": "127.0.0.1", "port": port, "homeassistant": False}
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def daemon(config, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "streamer", "run", "--config", str(config)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_daemon_events_on_mqtt_equal_detect_events_out(tmp_path, tiny_checkpoint, broker, scene):
    directory, _ = tiny_checkpoint(max_length=128, num_labels=527, seed=4)
    config = write_config(tmp_path / "streamer.yaml", directory, scene, port=broker.port)
    sub = Subscriber(broker.port, [D.events("scene"), D.status])
    result = subprocess.run([sys.executable, "-m", "streamer", "run", "--config", str(config)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    offline = tmp_path / "events.jsonl"
    det = run_cli("detect", str(scene), "--model", str(directory), "--hop", "0.25", "--batch", "4",
                  "--events-out", str(offline), "--config", str(config))
    assert det.returncode == 0, det.stderr
    expected = [json.loads(line) for line in offline.read_text().splitlines()]
    assert len(expected) >= 4
    assert wait_for(lambda: len(sub.on(D.events("scene"))) >= len(expected), 10)
    got = [json.loads(m.payload) for m in sub.on(D.events("scene"))]
    keys = ("id", "target", "state", "start_sample", "end_sample", "closed_by")
    assert [{k: e[k] for k in keys} for e in got] == [{k: e[k] for k in keys} for e in expected]
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["id"] for e in printed] == [e["id"] for e in expected]
    assert sub.on(D.status)[-1].payload == "offline"
    sub.close()


@pytest.mark.slow
def test_sigterm_mid_event_publishes_off_and_offline(tmp_path, tiny_checkpoint, broker, scene):
    directory, hf = tiny_checkpoint(max_length=128, num_labels=527, seed=4)
    label = hf.config.id2label[0]
    detect = {"include": [label], "defaults": {"on_threshold": 0.0, "off_threshold": 0.0, "hold": 0}}
    config = write_config(tmp_path / "streamer.yaml", directory, scene, port=broker.port, realtime=True, detect=detect, loop=True)
    sub = Subscriber(broker.port, ["streamer/#"])
    proc = daemon(config)
    try:
        assert wait_for(lambda: any(json.loads(m.payload)["state"] == "ON" for m in sub.on(D.events("scene"))), 60)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert time.monotonic() - t0 < 15
        assert wait_for(lambda: any(json.loads(m.payload)["state"] == "OFF" for m in sub.on(D.events("scene"))), 10)
        off = [json.loads(m.payload) for m in sub.on(D.events("scene")) if json.loads(m.payload)["state"] == "OFF"][0]
        assert off["closed_by"] == "shutdown"
        assert sub.on(D.state("scene", label))[-1].payload == "OFF"
        assert sub.on(D.status)[-1].payload == "offline"
    finally:
        proc.kill()
        sub.close()


@pytest.mark.slow
def test_sighup_with_the_detect_section_unchanged_keeps_events_open_and_names_what_needs_a_restart(tmp_path, tiny_checkpoint, scene):
    """A SIGHUP whose detect section is as before cuts no event; changes it does not apply (the
    hop, the model's files) are named in one warning with the fix, and the daemon runs on."""
    import threading

    directory, hf = tiny_checkpoint(max_length=128, num_labels=527, seed=4)
    label = hf.config.id2label[0]
    always = {"include": [label], "defaults": {"on_threshold": 0.0, "off_threshold": 0.0, "hold": 0}}
    config = write_config(tmp_path / "streamer.yaml", directory, scene, realtime=True, detect=always, loop=True)
    proc = daemon(config)
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    try:
        assert json.loads(proc.stdout.readline())["state"] == "ON"  # an event is open
        raw = json.loads(config.read_text())
        config.write_text(json.dumps({**raw, "hop": 0.5}))  # detect unchanged; the hop is not reloaded
        (directory / "thresholds.json").write_text(json.dumps({"labels": {label: {"on_threshold": 0.9, "off_threshold": 0.5}}}))
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: any("changed since start" in line for line in err), 30), "".join(err)
        line = next(line for line in err if "changed since start" in line)
        assert "hop (in" in line and f"the model at {directory}" in line and "restart" in line
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0
        events = [json.loads(x) for x in out.splitlines()]
        assert [e["state"] for e in events] == ["OFF"] and events[0]["closed_by"] == "shutdown"  # open until the end, not cut by the reload
    finally:
        proc.kill()


@pytest.mark.slow
def test_a_storm_of_signals_gives_reloads_and_a_clean_stop(tmp_path, tiny_checkpoint, scene):
    """20000 SIGHUPs: a handler's Event.set() interrupting the loop's own Event.set() waited on a
    lock its frame held — the loop hung (1 run in 3), and SIGTERM with it. Then a SIGTERM storm:
    the stop is clean (exit 0), not death by a SIGTERM arriving after it."""
    import threading

    directory, hf = tiny_checkpoint(max_length=128, num_labels=527, seed=4)
    label = hf.config.id2label[0]
    always = {"include": [label], "defaults": {"on_threshold": 0.0, "off_threshold": 0.0, "hold": 0}}
    config = write_config(tmp_path / "streamer.yaml", directory, scene, realtime=True, detect=always, loop=True)
    proc = daemon(config)
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    try:
        assert json.loads(proc.stdout.readline())["state"] == "ON"  # running, its signal handlers installed
        for _ in range(3):
            for _ in range(20000):
                os.kill(proc.pid, signal.SIGHUP)
        raw = json.loads(config.read_text())
        config.write_text(json.dumps({**raw, "hop": 0.5}))  # a change the next reload names: the loop is alive
        os.kill(proc.pid, signal.SIGHUP)
        assert wait_for(lambda: any("changed since start" in line for line in err), 60), "".join(err[-5:])
        for _ in range(2000):
            os.kill(proc.pid, signal.SIGTERM)
        proc.stdout.read()
        assert proc.wait(timeout=60) == 0, "".join(err[-5:])
    finally:
        proc.kill()


@pytest.mark.slow  # over 8 s on 2 cores: CI runs it, the fast lane does not
def test_sighup_reloads_thresholds_and_refuses_a_broken_file(tmp_path, tiny_checkpoint, scene):
    directory, hf = tiny_checkpoint(max_length=128, num_labels=527, seed=4)
    label = hf.config.id2label[0]
    never = {"include": [label], "defaults": {"on_threshold": 1.0, "off_threshold": 1.0, "hold": 0}}
    config = write_config(tmp_path / "streamer.yaml", directory, scene, realtime=True, detect=never, loop=True)
    proc = daemon(config)
    try:
        time.sleep(6)  # model loaded, windows flowing, nothing fires at 1.0
        always = {"include": [label], "defaults": {"on_threshold": 0.0, "off_threshold": 0.0, "hold": 0}}
        write_config(config, directory, scene, realtime=True, detect=always, loop=True)
        proc.send_signal(signal.SIGHUP)
        line = proc.stdout.readline()  # the first event printed (JSON lines)
        assert json.loads(line)["state"] == "ON"
        config.write_text("detect: {defaults: {on_threshold: 7}}\n  bad: [")
        proc.send_signal(signal.SIGHUP)
        time.sleep(2)
        assert proc.poll() is None  # still running on the old settings
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert "reload refused" in err
    finally:
        proc.kill()


@pytest.mark.slow
def test_systemd_notify_ready_watchdog_stopping(tmp_path, tiny_checkpoint, scene):
    directory, _ = tiny_checkpoint(max_length=128, num_labels=527, seed=4)
    config = write_config(tmp_path / "streamer.yaml", directory, scene, realtime=True, loop=True)
    path = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(30)
    proc = daemon(config, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    messages = []
    try:
        while not any("READY=1" in m for m in messages):
            messages.append(server.recv(4096).decode())
        while not any("WATCHDOG=1" in m for m in messages):
            messages.append(server.recv(4096).decode())
        proc.send_signal(signal.SIGTERM)
        while not any("STOPPING=1" in m for m in messages):
            messages.append(server.recv(4096).decode())
        assert proc.wait(20) == 0
        assert any(m.startswith("STATUS=") for m in messages)
    finally:
        proc.kill()
        server.close()


BAD_CONFIGS = [
    ("model: {path: x, devcie: cpu}\nsources: [{name: a, type: mic}]\n", ":1: model.devcie: unknown key (did you mean 'device'?)"),
    ("sources: [{name: a, type: mic}, {name: a, type: mic}]\n", "sources[1].name: two sources are named 'a'"),
    ("sources: [{name: a, type: mic}]\ndetect:\n  defaults: {on_threshold: 2}\n", ":3: detect.defaults: on_threshold=2 is outside 0..1"),
    ("sources: [{name: a, type: mic}]\nhop: 20\n", ":2: hop: 20 is outside 0.1..10.0"),
    ("sources: [{name: a, type: mic}]\nhop: yes\n", "hop: expected int or float, got True"),
    ("sources: [{name: a, type: radio}]\n", "sources[0].type: must be one of mic, file, ffmpeg"),
    ("sources: []\n", "sources: no sources"),
    ("sources: [{name: a, type: mic}]\nmqtt: {password: '${NO_SUCH_VAR_X}'}\n", "mqtt.password: environment variable NO_SUCH_VAR_X is not set"),
    ("sources: [{name: a, type: mic}\n", "not valid YAML"),
    ("sources: [{name: a, type: mic}]\nmqtt: {enabled: 'false', host: broker}\n", ":2: mqtt.enabled: expected bool, got 'false' (quoted"),
    ("sources: [{name: a, type: mic}]\nmqtt: {tls: {ca: /nonexistent/ca.pem}}\n", "mqtt.tls.ca: /nonexistent/ca.pem: no such file"),
    ("hop: 1\x00\nsources: [{name: a, type: mic}]\n", ":1: not valid YAML (unacceptable character #x0000"),  # one line, its place
]


@pytest.mark.parametrize("text,message", BAD_CONFIGS, ids=[m[:30] for _, m in BAD_CONFIGS])
def test_config_errors_are_reported_with_their_place(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr, result.stderr


def test_tls_files_that_hold_no_certificate_are_config_errors(tmp_path):
    """A garbage CA or client certificate passed check-config and became `internal error: SSLError`
    at the daemon's start: it is now named by its key, with its file."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(bytes(range(256)) * 2)
    for tls, said in (({"ca": str(garbage)}, "mqtt.tls.ca: " + str(garbage) + ": not a PEM CA certificate"),
                      ({"cert": str(garbage), "key": str(garbage)}, "mqtt.tls.cert: " + str(garbage))):
        path = tmp_path / "tls.yaml"
        path.write_text(json.dumps({"sources": [{"name": "a", "type": "mic"}], "mqtt": {"host": "127.0.0.1", "tls": tls}}))
        result = run_cli("check-config", str(path))
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and said in lines[0], result.stderr


def test_check_config_warns_of_a_file_source_that_cannot_be_read(tmp_path, tiny_checkpoint):
    """A missing or undecodable file source passed as OK: the daemon starts, and that source fails."""
    (tmp_path / "notes.wav").write_text("not audio")
    path = tmp_path / "files.yaml"
    path.write_text(json.dumps({"sources": [{"name": "gone", "type": "file", "path": str(tmp_path / "gone.wav")},
                                            {"name": "notes", "type": "file", "path": str(tmp_path / "notes.wav")}],
                                "model": {"path": str(tiny_checkpoint(num_labels=3)[0])}}))
    result = run_cli("check-config", str(path))
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 2 and "sources[0] gone" in warnings[0] and "no such file" in warnings[0], result.stderr
    assert "sources[1] notes" in warnings[1] and "cannot decode audio" in warnings[1] and result.returncode == 0


def test_all_config_errors_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("modle: {}\nhop: 0.015\nsources: [{name: a, type: file}]\n")
    result = run_cli("check-config", str(path))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 3
    assert "did you mean 'model'" in lines[0] and "hop" in result.stderr and "needs a path" in result.stderr


def test_the_shipped_config_is_valid():
    result = run_cli("check-config", str(REPO / "config" / "streamer.yaml"))
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_metrics_health_and_clips(tmp_path, tiny_checkpoint, scene):
    import urllib.request

    from mqtt_helpers import free_port

    directory, hf = tiny_checkpoint(max_length=128, num_labels=527, seed=4)
    label = hf.config.id2label[0]
    config = write_config(tmp_path / "streamer.yaml", directory, scene, realtime=True, loop=True,
                          detect={"include": [label], "defaults": {"on_threshold": 0.0, "off_threshold": 0.0, "hold": 0}})
    raw = json.loads(config.read_text())
    port = free_port()
    raw["metrics"] = {"enabled": True, "port": port}
    raw["clips"] = {"enabled": True, "directory": str(tmp_path / "clips"), "pre": 1, "post": 1}
    config.write_text(json.dumps(raw))
    proc = daemon(config)
    try:
        def get(path):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                    return r.status, r.read().decode()
            except OSError:
                return None, ""
        assert wait_for(lambda: "streamer_windows_total{stream=\"scene\"}" in get("/metrics")[1], 60)
        assert get("/healthz") == (200, "ok\n")
        assert wait_for(lambda: 'streamer_events_total{state="ON",stream="scene"' in get("/metrics")[1], 30)
        text = get("/metrics")[1]
        for name in ("streamer_inference_latency_seconds_bucket", "streamer_batch_size_bucket", "streamer_lost_samples",
                     "streamer_source_up", "streamer_worker_pending_windows"):
            assert name in text, name
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
    finally:
        proc.kill()
    events = [json.loads(line) for line in out.splitlines()]
    off = [e for e in events if e["state"] == "OFF"][0]
    clip = off["clip"]
    assert clip and clip.endswith(".flac")
    import soundfile as sf

    audio, rate = sf.read(clip)
    expected = (off["end_sample"] + 16000) - max(0, off["start_sample"] - 16000)
    assert rate == 16000 and abs(len(audio) - expected) <= 16000  # clipped to what was written at the time


@pytest.mark.slow
def test_unwritable_clips_directory_still_publishes_events(tmp_path, tiny_checkpoint, scene):
    directory, hf = tiny_checkpoint(max_length=128, num_labels=527, seed=4)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the clips directory should be")
    config = write_config(tmp_path / "streamer.yaml", directory, scene)
    raw = json.loads(config.read_text())
    raw["clips"] = {"enabled": True, "directory": str(blocker / "clips")}
    raw["logging"] = {"level": "error"}
    config.write_text(json.dumps(raw))
    result = subprocess.run([sys.executable, "-m", "streamer", "run", "--config", str(config)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(events) >= 4  # every event still reported
    assert result.stderr.count("cannot write clips") == 1  # logged once, not per event


@pytest.mark.slow
def test_two_daemons_share_one_broker(tmp_path, tiny_checkpoint, broker, scene):
    directory, _ = tiny_checkpoint(max_length=128, num_labels=527, seed=4)
    sub = Subscriber(broker.port, ["streamer/#", "homeassistant/#"])
    procs = []
    try:
        for instance in ("kitchen-box", "garage-box"):
            config = write_config(tmp_path / f"{instance}.yaml", directory, scene, port=broker.port, realtime=True, loop=True)
            raw = json.loads(config.read_text())
            raw["mqtt"].update({"instance": instance, "homeassistant": True})
            config.write_text(json.dumps(raw))
            procs.append(daemon(config))
        for instance in ("kitchen-box", "garage-box"):
            assert wait_for(lambda i=instance: sub.on(f"streamer/{i}/status") and sub.on(f"streamer/{i}/status")[-1].payload == "online", 60)
        kitchen, garage = daemon_topics("kitchen-box"), daemon_topics("garage-box")
        assert wait_for(lambda: sub.on(kitchen.device_config("scene")) and sub.on(garage.device_config("scene")), 30)
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(30) == 0
        assert wait_for(lambda: sub.on("streamer/kitchen-box/status")[-1].payload == "offline", 10)
        assert sub.on("streamer/garage-box/status")[-1].payload == "online"  # the other one is unaffected
        assert all(m.payload for m in sub.on(garage.device_config("scene")))  # its entities were never removed
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        sub.close()


@pytest.mark.slow  # over 8 s on 2 cores: CI runs it, the fast lane does not
def test_daemon_warns_once_when_the_models_thresholds_were_chosen_at_another_hop(tmp_path, tiny_checkpoint):
    directory, hf = tiny_checkpoint(max_length=128, num_labels=3)
    entry = {"on_threshold": 0.6, "off_threshold": 0.4}
    (directory / "thresholds.json").write_text(json.dumps({"hop_s": 1.0, "labels": {hf.config.id2label[1]: entry}}))
    audio = write_wav(tmp_path / "noise.wav", np.random.default_rng(0).normal(0, 0.1, 16000 * 3).astype(np.float32))
    config = write_config(tmp_path / "streamer.yaml", directory, audio)  # hop 0.25 s
    result = subprocess.run([sys.executable, "-m", "streamer", "run", "--config", str(config)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "thresholds were chosen at hop 1 s but this runs at hop 0.25 s" in line]
    assert len(lines) == 1 and "train with --hop 0.25" in lines[0], result.stderr
    # hop: auto goes no faster than the hop the thresholds were chosen at (this box could do 0.5 s)
    raw = json.loads(config.read_text())
    config.write_text(json.dumps({**raw, "hop": "auto", "logging": {"level": "info"}}))
    result = subprocess.run([sys.executable, "-m", "streamer", "run", "--config", str(config)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "hop auto: 1.00 s" in result.stderr and "thresholds were chosen at hop" not in result.stderr, result.stderr

"""The web page (#13): its history store, its server's privacy, its live feed under a slow
browser, and the page itself in headless Chromium against the real daemon, real-time file
sources of real recordings and a real mosquitto. Screenshots go to tests/artifacts/."""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, real_clips, write_wav
from mqtt_helpers import Broker, free_port, wait_for
from streamer.capture.files import read_audio
from streamer.events import Event
from streamer.settings import ConfigError, parse_config
from streamer.sinks.base import Level, Scores, Spectrogram
from streamer.sinks.history import HistorySink, HistoryStore
from streamer.sinks.web import SPECTRO_FRAME_STEP, SpectrogramTap, WebSettings, WebSink
from web_helpers import ARTIFACTS, launch_browser, lively_checkpoint

TOKEN = "correct-horse-battery-staple-42"
MQTT_TO_PAGE_S = 2.0  # an event must be in the page's history this soon after its MQTT message


def event(state: str, stream: str = "kitchen", target: str = "Dog", start: int = 16000, end: int | None = None,
          t: float | None = 1000.0, peak: float = 0.8, clip: str | None = None) -> Event:
    return Event(id=f"{stream}:{target.lower()}:{start}", stream=stream, target=target, state=state, labels=(target,),
                 start_sample=start, end_sample=end, start_time=t, end_time=None if end is None else (t or 0) + 2,
                 peak=peak, mean=peak - 0.1, closed_by=None if state == "ON" else "audio", clip=clip)


# ------------------------------------------------------------------------------------ history
def test_history_on_inserts_off_completes_filters_and_survives_reopen(tmp_path):
    path = tmp_path / "h.sqlite3"
    store = HistoryStore(path, clock=lambda: 5000.0)
    store.record(event("ON", t=1000.0))
    store.record(event("ON", stream="hall", target="Glass", t=2000.0))
    store.record(event("OFF", end=48000, t=1000.0, peak=0.9, clip="/var/clips/kitchen-dog-16000.flac"))
    rows = store.query()
    assert [r["stream"] for r in rows] == ["hall", "kitchen"]  # newest first
    kitchen = rows[1]
    assert (kitchen["end_sample"], kitchen["peak"], kitchen["clip"], kitchen["closed_by"]) == (48000, 0.9, "kitchen-dog-16000.flac", "audio")
    assert rows[0]["end_sample"] is None
    assert [r["target"] for r in store.query(stream="hall")] == ["Glass"]
    assert [r["target"] for r in store.query(target="Dog")] == ["Dog"]
    assert [r["target"] for r in store.query(since=1500)] == ["Glass"]
    assert [r["target"] for r in store.query(until=1500)] == ["Dog"]
    assert store.facets() == {"streams": ["hall", "kitchen"], "targets": ["Dog", "Glass"]}
    store.close()
    again = HistoryStore(path, clock=lambda: 5000.0)  # a restart: the rows are there, the open one marked
    rows = again.query()
    assert len(rows) == 2
    assert rows[0]["closed_by"] == "interrupted" and rows[1]["closed_by"] == "audio"
    # a file replayed after the restart repeats the detection id: a new row, completed by its own OFF
    again.record(event("ON", t=3000.0))
    again.record(event("OFF", end=40000, t=3000.0))
    assert [r["end_sample"] for r in again.query(stream="kitchen")] == [40000, 48000]
    again.close()


def test_history_is_bounded_by_rows_and_age(tmp_path):
    now = [10_000.0]
    store = HistoryStore(tmp_path / "h.sqlite3", max_rows=50, max_age_s=1000, clock=lambda: now[0])
    for i in range(300):
        store.record(event("ON", start=i, t=9000.0 + i))
        store.record(event("OFF", start=i, end=i + 10, t=9000.0 + i))
    store.prune()
    assert store.count() == 50
    assert min(r["start_sample"] for r in store.query(limit=1000)) == 250  # the newest kept
    now[0] = 10_280.0  # rows older than 1000 s go
    store.prune()
    assert {r["start_sample"] for r in store.query(limit=1000)} == set(range(280, 300))
    store.close()


def test_history_sink_tells_the_page_after_each_write(tmp_path):
    calls = []
    sink = HistorySink(HistoryStore(tmp_path / "h.sqlite3"), on_change=lambda: calls.append(1))
    sink.handle(event("ON"))
    sink.handle(event("OFF", end=40000))
    assert len(calls) == 2 and sink.store.count() == 1
    sink.close()


# ------------------------------------------------------------------------------------ config
def test_config_refuses_a_lan_binding_without_a_token_and_never_shows_it():
    base = {"sources": [{"name": "a", "type": "mic"}]}
    assert parse_config({**base, "web": {"enabled": True}}).web.host == "127.0.0.1"
    with pytest.raises(ConfigError, match=r"web\.host: 0\.0\.0\.0 is reachable from other machines: set web\.token"):
        parse_config({**base, "web": {"enabled": True, "host": "0.0.0.0"}})
    with pytest.raises(ConfigError) as short:
        parse_config({**base, "web": {"enabled": True, "host": "0.0.0.0", "token": "hunter2"}})
    assert "web.token: too short" in str(short.value) and "hunter2" not in str(short.value)
    for spaced in (" " * 20, f" {TOKEN}", f"{TOKEN}\n"):  # a Bearer header drops them: the token could never match
        with pytest.raises(ConfigError, match=r"web\.token: (too short|starts or ends with a space)") as bad:
            parse_config({**base, "web": {"enabled": True, "host": "0.0.0.0", "token": spaced}})
        assert TOKEN not in str(bad.value)
    cfg = parse_config({**base, "web": {"enabled": True, "host": "::", "token": TOKEN}})
    assert TOKEN not in repr(cfg)
    assert parse_config({**base, "web": {"enabled": True, "host": "::1"}}).web.token is None  # loopback: fine


# ------------------------------------------------------------------------------------ the server
def raw_get(port: int, path: str, headers: dict | None = None, host: str = "box") -> tuple[int, dict, bytes]:
    """One GET with the path sent exactly as given (no client-side normalisation of ``..``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    out = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        out.setdefault(k.strip().lower(), []).append(v.strip())
    return int(status_line.split()[1]), out, body


@pytest.fixture
def lan_server(tmp_path):
    """A WebSink bound to every address with a token, a clips folder, a secret beside it and a symlink out."""
    clips = tmp_path / "clips"
    clips.mkdir()
    sf.write(str(clips / "kitchen-dog-16000.flac"), np.zeros(16000, np.float32), 16000, format="FLAC")
    (tmp_path / "secret.txt").write_text("the neighbours' audio\n")
    (clips / "escape.flac").symlink_to(tmp_path / "secret.txt")
    (clips / "sub").mkdir()
    settings = WebSettings(enabled=True, host="0.0.0.0", port=free_port(), token=TOKEN)
    sink = WebSink(settings, ("Dog", "Cat"), status=lambda: {"sources": []}, metrics=lambda: b"streamer_up 1\n",
                   healthy=lambda: True, clips_dir=clips, history=HistoryStore(tmp_path / "h.sqlite3")).start()
    yield sink
    sink.close()


def test_closing_the_page_leaves_no_task_pending(tmp_path):
    """A task still cancelling when the loop closes is destroyed pending: asyncio then prints
    "Task was destroyed but it is pending!" on stderr at every stop of the daemon."""
    import asyncio

    sink = WebSink(WebSettings(enabled=True, port=free_port()), ("Dog",), status=lambda: {"sources": []},
                   metrics=lambda: b"", healthy=lambda: True, clips_dir=tmp_path,
                   history=HistoryStore(tmp_path / "h.sqlite3")).start()
    sink.close()
    assert sink._loop.is_closed() and not asyncio.all_tasks(sink._loop)


def test_lan_binding_needs_the_token_and_gives_no_hint(lan_server, caplog):
    caplog.set_level(logging.DEBUG)
    port = lan_server.port
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/", "/api/state", "/api/history", "/metrics", "/clips/kitchen-dog-16000.flac", "/static/app.js"):
        missing, wrong = raw_get(port, path), raw_get(port, path, {"Authorization": "Bearer " + TOKEN[:-1] + "x"})
        assert missing[0] == wrong[0] == 401, path
        assert missing[2] == wrong[2] == b"401: Unauthorized\n"  # the same bare answer either way
        assert raw_get(port, path, {"Cookie": "streamer_token=nope"})[0] == 401
        assert raw_get(port, path, auth)[0] == 200, path
    assert raw_get(port, "/healthz")[0] == 200  # health checks carry no secret and reveal nothing
    assert b"streamer_up 1" in raw_get(port, "/metrics", auth)[2]
    # ?token= once: an HttpOnly cookie, and the token leaves the address bar
    status, headers, _ = raw_get(port, f"/?token={TOKEN}&x=1")
    assert status == 302 and headers["location"] == ["/?x=1"]
    cookie = headers["set-cookie"][0]
    assert cookie.startswith(f"streamer_token={TOKEN}") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert raw_get(port, "/api/state", {"Cookie": f"streamer_token={TOKEN}"})[0] == 200
    assert lan_server.unauthorized == 18  # 6 paths × (missing, wrong, bad cookie)
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("path", [
    "/clips/../secret.txt", "/clips/..%2fsecret.txt", "/clips/%2e%2e/secret.txt", "/clips/sub/../../secret.txt",
    "/clips/escape.flac", "/clips/sub", "/clips/", "/clips/.", "/clips/%2Fetc%2Fpasswd", "/clips//etc/passwd",
    "/clips/..%5csecret.txt", "/static/../web.py", "/static/vendor/..%2f..%2fweb.py",
])
def test_only_regular_files_inside_the_clips_folder_are_served(lan_server, path):
    status, _, body = raw_get(lan_server.port, path, {"Authorization": f"Bearer {TOKEN}"})
    assert status in (400, 404), (path, status)
    assert b"neighbours" not in body and b"import" not in body


def test_a_clip_is_served_with_ranges_for_the_audio_element(lan_server):
    status, headers, body = raw_get(lan_server.port, "/clips/kitchen-dog-16000.flac",
                                    {"Authorization": f"Bearer {TOKEN}", "Range": "bytes=0-3"})
    assert status == 206 and body == b"fLaC"


def test_history_api_filters_and_refuses_bad_numbers_in_one_line(lan_server):
    store = lan_server.history
    store.record(event("ON", t=1000.0))
    store.record(event("ON", stream="hall", target="Glass", t=2000.0))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, _, body = raw_get(lan_server.port, "/api/history?stream=hall&since=1500", auth)
    got = json.loads(body)
    assert status == 200 and [e["target"] for e in got["events"]] == ["Glass"]
    assert got["streams"] == ["hall", "kitchen"] and got["targets"] == ["Dog", "Glass"]
    for bad in ("since=yesterday", "until=nan", "limit=inf"):
        status, _, body = raw_get(lan_server.port, f"/api/history?{bad}", auth)
        assert status == 400 and body.count(b"\n") == 1, bad


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send bytes as they are (a malformed request too); what the server answers before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    return data


def test_hostile_requests_are_refused_counted_and_never_logged_with_their_bytes(lan_server, caplog):
    """What a client on the LAN can send without the token: one answer each, no traceback, no
    token in the log (aiohttp logs a request that breaks its parser with the request's bytes)."""
    caplog.set_level(logging.DEBUG)
    port, auth = lan_server.port, {"Authorization": f"Bearer {TOKEN}"}

    def status(data: bytes) -> int:
        return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0  # 0: closed without an answer

    # a token that is not UTF-8 (in the header and in the cookie): refused as any wrong token
    for line in (b"Authorization: Bearer \xff\xfe", b"Cookie: streamer_token=\xff"):
        assert status(raw_exchange(port, b"GET /api/state HTTP/1.1\r\nHost: box\r\n" + line + b"\r\nConnection: close\r\n\r\n")) == 401
    assert lan_server.unauthorized == 2
    # the token beside a cookie line too long for the parser, in a query too long, in a folded
    # header; too many headers; both a length and chunked
    too_long = f"Cookie: streamer_token={TOKEN}; other_app=" + "x" * 9000
    bad = [f"GET / HTTP/1.1\r\nHost: box\r\n{too_long}\r\n\r\n",
           f"GET /api/history?token={TOKEN}&stream={'y' * 9000} HTTP/1.1\r\nHost: box\r\n\r\n",
           f"GET / HTTP/1.1\r\nHost: box\r\nX-A: 1\r\n Authorization: Bearer {TOKEN}\r\n\r\n",
           "GET / HTTP/1.1\r\nHost: box\r\n" + "".join(f"X-{i}: {i}\r\n" for i in range(60)) + "\r\n",
           "POST / HTTP/1.1\r\nHost: box\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc"]
    for request in bad:
        assert status(raw_exchange(port, request.encode())) in (0, 400, 413, 431), request[:40]
    assert wait_for(lambda: lan_server.bad_requests >= len(bad), 10)
    # a name longer than the file system allows is simply not there
    for path in ("/clips/" + "a" * 300, "/static/" + "a" * 300, "/static/vendor/" + "a" * 300):
        assert raw_get(port, path, auth)[0] == 404, path
    # the token taken from the address bar sends the browser to this site, never to another
    code, headers, _ = raw_get(port, f"//evil.example/x?token={TOKEN}&y=1")
    assert code == 302 and headers["location"] == ["/evil.example/x?y=1"]
    assert raw_get(port, "/api/history?limit=0", auth)[0] == 400
    # live pages closed the moment they open: no traceback either
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(f"GET /api/live HTTP/1.1\r\nHost: box\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close with a reset
        s.close()
    assert raw_get(port, "/api/state", auth)[0] == 200  # and the server still answers
    assert wait_for(lambda: not lan_server._clients, 10)
    assert TOKEN not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage()[:100] for r in caplog.records]


def test_connections_that_never_finish_a_request_are_closed_and_capped(tmp_path, monkeypatch):
    """Half-sent headers hold memory before any token is read: a connection that finishes no
    request is closed after IDLE_CLOSE_S, and past MAX_CONNECTIONS new ones are closed at once."""
    from streamer.sinks import web as web_module

    monkeypatch.setattr(web_module, "MAX_CONNECTIONS", 6)
    monkeypatch.setattr(web_module, "IDLE_CLOSE_S", 2.0)
    sink = WebSink(WebSettings(enabled=True, host="0.0.0.0", port=free_port(), token=TOKEN), ("Dog",), status=dict,
                   metrics=None, healthy=lambda: True, clips_dir=None).start()
    try:
        held = []
        for _ in range(6):
            s = socket.create_connection(("127.0.0.1", sink.port), timeout=30)
            s.sendall(b"GET / HTTP/1.1\r\nHost: box\r\nX-Slow: ")  # and never the rest
            held.append(s)
        assert wait_for(lambda: len(sink._runner.server.connections) == 6, 10)
        extra = socket.create_connection(("127.0.0.1", sink.port), timeout=30)
        assert wait_for(lambda: sink.refused_connections == 1, 10)
        assert extra.recv(1) == b""  # closed by the server
        extra.close()
        for s in held:  # closed by the server: without the limit they stayed an hour
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
            s.close()
        assert wait_for(lambda: not sink._runner.server.connections, 10)
        status, _, _ = raw_get(sink.port, "/api/state", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200  # a real request is served as before
    finally:
        sink.close()


def test_a_busy_port_is_one_clear_line(lan_server):
    from streamer.errors import StreamerError

    other = WebSink(WebSettings(enabled=True, host="0.0.0.0", port=lan_server.port, token=TOKEN), (), status=dict,
                    metrics=None, healthy=lambda: True, clips_dir=None)
    with pytest.raises(StreamerError, match=rf"web: cannot listen on 0\.0\.0\.0:{lan_server.port} .*; change web\.port"):
        other.start()


def sse_reader(port: int, frames: list, stop: threading.Event) -> threading.Thread:
    def run():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/api/live")
        resp = conn.getresponse()
        kind = None
        while not stop.is_set():
            line = resp.readline()
            if not line:
                return
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                frames.append((time.monotonic(), kind, json.loads(line[6:])))
        conn.close()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_stalled_browser_loses_frames_counted_and_never_slows_the_sink(tmp_path):
    sink = WebSink(WebSettings(enabled=True, port=free_port()), tuple(f"L{i}" for i in range(527)), status=lambda: {},
                   metrics=None, healthy=lambda: True, clips_dir=None).start()
    stop = threading.Event()
    frames: list = []
    try:
        # a browser that stops reading: tiny receive buffer, never reads after the request
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", sink.port))
        stalled.sendall(b"GET /api/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sse_reader(sink.port, frames, stop)  # and a healthy one
        assert wait_for(lambda: len(sink._clients) == 2, 10)
        rows = np.random.default_rng(0).normal(0, 1, (300, 128)).astype(np.float16)  # big frames fill the socket fast
        slowest = [0.0]
        handled = [0]

        def pipeline():  # 16 streams' items, as the hub's thread hands them over, until the test ends
            end = 0
            while not stop.is_set():
                for s in range(16):
                    end += 3000
                    for item in (Spectrogram(f"s{s}", rows, end, SPECTRO_FRAME_STEP), Level(f"s{s}", -20.0, time.time()),
                                 Scores(f"s{s}", 0, 1, time.time(), np.random.random(527).astype(np.float32), ("a", "b"),
                                        np.array([0.2, 0.6]), np.array([0.5, 0.5]), np.array([0.3, 0.3]))):
                        t0 = time.perf_counter()
                        sink.handle(item)
                        slowest[0] = max(slowest[0], time.perf_counter() - t0)
                        handled[0] += 1
                time.sleep(0.05)

        threading.Thread(target=pipeline, daemon=True).start()
        assert wait_for(lambda: sink.dropped >= 3, 20), "the stalled browser's frames should have been dropped"
        got = len(frames)
        assert wait_for(lambda: len(frames) > got + 4, 5), "the healthy browser stopped getting frames"
        # handle() never waits on a socket: a write to the stalled reader would block for good, so the
        # pipeline's thread keeps going (typically well under a millisecond a call; the bound only
        # leaves room for a loaded machine's scheduling)
        done = handled[0]
        assert wait_for(lambda: handled[0] > done + 100, 10), "handle() stopped with a stalled browser"
        assert slowest[0] < 2.0, f"handle() took {slowest[0] * 1000:.1f} ms with a stalled browser"
        assert any(kind == "snapshot" for _, kind, _ in frames)
        assert raw_get(sink.port, "/metrics", host="evil.example:80")[0] == 403  # DNS rebinding
        assert raw_get(sink.port, "/healthz", host="evil.example")[0] == 200
        status, _, body = raw_get(sink.port, "/metrics", host=f"localhost:{sink.port}")
        dropped = [line for line in body.decode().splitlines() if line.startswith("streamer_web_frames_dropped ")]
        assert len(dropped) == 1 and float(dropped[0].split()[1]) >= 3
        stalled.close()
        assert wait_for(lambda: len(sink._clients) == 1, 15), "a vanished browser must be forgotten"
    finally:
        stop.set()
        sink.close()


def test_nan_scores_from_a_broken_model_still_give_valid_frames():
    from streamer.sinks.web import LiveState

    state = LiveState(("a", "b", "c"))
    bad = np.array([np.nan, np.inf, 0.5], dtype=np.float32)
    state.apply(Scores("s", 0, 1, 100.0, bad, ("a", "b"), bad[:2], np.array([0.5, np.nan]), np.array([0.3, 0.3])), 100.0)
    state.apply(Level("s", float("-inf"), 100.0), 100.0)
    for frame in (state.snapshot(101.0), state.delta(101.0)):
        json.dumps(frame, allow_nan=False)  # raises on NaN/inf
    assert state.snapshot(101.0)["streams"]["s"]["top"][0] == ["b", 1.0]


def test_spectrogram_tap_gives_each_row_once_across_overlapping_windows():
    tap = SpectrogramTap()
    feats = np.arange(300 * 4, dtype=np.float32).reshape(300, 4)  # frame f's values start at 4f
    first = tap.rows("a", 0, feats[:128], 128)
    second = tap.rows("a", 25 * 160, feats[25:153], 128)  # the next window, 25 frames later
    assert first.end_frame == 120 and first.frames.shape == (12, 4)
    assert second.end_frame == 150 and second.frames.shape == (3, 4)
    assert float(second.frames[0, 0]) == pytest.approx(np.mean(np.arange(120, 130) * 4), rel=1e-3)
    assert tap.rows("a", 26 * 160, feats[26:154], 128) is None  # nothing new yet


# ------------------------------------------------------------------------------------ the page
@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Two real-time streams of real recordings, and a tiny model whose scores follow them."""
    folder = tmp_path_factory.mktemp("web")
    clips = real_clips(per_label=2)
    kitchen = write_wav(folder / "kitchen.wav", np.concatenate([read_audio(p) for p in clips[0::2][:12]]))
    hall = write_wav(folder / "hall.wav", np.concatenate([read_audio(p) for p in clips[1::2][:12]]))
    model = lively_checkpoint(folder / "model", kitchen)
    return folder, model, kitchen, hall


def web_config(path: Path, model: Path, audio: list[Path], broker_port: int, web: dict, folder: Path) -> Path:
    config = {
        "model": {"path": str(model), "max_batch": 4},
        "hop": 0.25,
        "sources": [{"name": a.stem, "type": "file", "path": str(a), "realtime": True, "loop": True} for a in audio],
        "detect": {"include": ["LABEL_0", "LABEL_1", "LABEL_3"],
                   "defaults": {"on_threshold": 0.75, "off_threshold": 0.4, "hold": 0.5, "smoothing": "ema", "ema_alpha": 0.6}},
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "homeassistant": False},
        "clips": {"enabled": True, "directory": str(folder / "clips"), "pre": 0.5, "post": 0.5},
        "console": {"mode": "off"},
        "logging": {"level": "info"},
        "web": {"history": str(folder / "history.sqlite3"), "enabled": True, **web},
    }
    path.write_text(json.dumps(config))
    return path


def start_daemon(config: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "streamer", "run", "--config", str(config)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return proc.poll() is not None

    assert wait_for(up, 60, 0.1) and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else "no web server"
    return proc


def stop_daemon(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "Task was destroyed" not in err, err  # a clean stop
    return err


class EventLog:
    """MQTT events with the moment each arrived."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.walls: list[tuple[float, dict]] = []  # (wall clock of arrival, payload)
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"web-test-{time.monotonic_ns()}")
        ready = threading.Event()
        # {prefix}/{instance}/{stream}/events
        self.client.on_connect = lambda c, *a: (c.subscribe("streamer/+/+/events", qos=1), ready.set())
        self.client.on_message = lambda c, u, m: self._add(json.loads(m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(10)

    def _add(self, payload: dict) -> None:
        with self.lock:
            self.walls.append((time.time(), payload))

    def first(self, predicate) -> tuple[float, dict] | None:
        with self.lock:
            return next((item for item in self.walls if predicate(item[1])), None)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def open_page(browser, url: str, errors: list, width: int = 1280, height: int = 900):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.on("requestfailed", lambda r: errors.append(f"requestfailed: {r.url} {r.failure}")
            if "/api/live" not in r.url else None)  # the live feed is cut when the daemon stops: expected
    page.goto(url)
    return page


def card_number(page, stream: str, key: str) -> int:
    return int(page.get_attribute(f'article[data-stream="{stream}"]', f"data-{key}") or 0)


@pytest.mark.slow  # about 45 s on 2 cores: waits for real-time events, restarts the daemon
def test_page_in_a_real_browser_against_the_real_daemon(tmp_path, scenes):
    from playwright.sync_api import sync_playwright

    folder, model, kitchen, hall = scenes
    ARTIFACTS.mkdir(exist_ok=True)
    broker = Broker(tmp_path)
    port = free_port()
    config = web_config(tmp_path / "streamer.yaml", model, [kitchen, hall], broker.port, {"port": port}, tmp_path)
    events = EventLog(broker.port)
    proc = start_daemon(config, port)
    errors: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = launch_browser(pw)
            page = open_page(browser, f"http://127.0.0.1:{port}/", errors)
            # the spectrogram and the scores move
            for stream in ("kitchen", "hall"):
                page.wait_for_selector(f'article[data-stream="{stream}"] .uplot', timeout=30_000)
            rows, points = card_number(page, "kitchen", "spectro-rows"), card_number(page, "kitchen", "points")
            page.wait_for_function(
                f"""() => {{ const c = document.querySelector('article[data-stream="kitchen"]');
                            return +c.dataset.spectroRows > {rows} + 10 && +c.dataset.points > {points} + 4; }}""",
                timeout=10_000)
            assert page.locator('article[data-stream="kitchen"] .bar').count() == 5  # the top labels
            assert "running" in page.inner_text('article[data-stream="kitchen"] .state')
            # every event reaches the history within 2 s of its MQTT message: the page notes when each row first appears
            page.evaluate("""() => { window.rowSeen = {};
                new MutationObserver(() => { for (const tr of document.querySelectorAll('#history-table tr[data-id]'))
                    if (!(tr.dataset.id in rowSeen)) rowSeen[tr.dataset.id] = Date.now() / 1000; })
                .observe(document.querySelector('#history-table tbody'), {childList: true}); }""")
            watching = time.time()
            fresh = lambda: [p for w, p in list(events.walls) if w > watching + 0.1 and p["state"] == "ON"]
            assert wait_for(lambda: len(fresh()) >= 3, 90), "fewer than 3 events in 90 s"
            arrivals = {p["id"]: w for w, p in list(events.walls) if p["state"] == "ON" and w > watching + 0.1}
            ids = [p["id"] for p in fresh()][:3]
            page.wait_for_function(f"() => {json.dumps(ids)}.every(id => id in window.rowSeen)", timeout=10_000)
            seen = page.evaluate("window.rowSeen")
            delays = {i: round(seen[i] - arrivals[i], 2) for i in ids}
            print("MQTT -> page history delays (s):", delays)
            assert all(d <= MQTT_TO_PAGE_S for d in delays.values()), delays
            # its clip plays: the audio element loads it, with the clip's duration
            assert wait_for(lambda: events.first(lambda e: e["state"] == "OFF" and e.get("clip")), 60), "no clip"
            _, off = events.first(lambda e: e["state"] == "OFF" and e.get("clip"))
            clip = Path(off["clip"])
            assert wait_for(clip.exists, 10)
            page.locator(f'#history-table tr[data-id="{off["id"]}"][data-clip="{clip.name}"] button.play').click(timeout=5000)
            page.wait_for_function("() => { const a = document.getElementById('player'); return a.readyState >= 1 && a.duration > 0; }",
                                   timeout=10_000)
            duration = page.evaluate("document.getElementById('player').duration")
            assert duration == pytest.approx(sf.info(str(clip)).duration, abs=0.02)
            assert page.evaluate("document.getElementById('player').error") is None
            # the box panel
            page.wait_for_selector("#box-panel table.sources td >> text=kitchen")
            assert "connected" in page.inner_text("#box-panel")
            page.wait_for_timeout(1500)  # let the charts gather a few seconds for the picture
            page.screenshot(path=str(ARTIFACTS / "web-desktop.png"), full_page=True)
            phone = open_page(browser, f"http://127.0.0.1:{port}/", errors, width=390, height=844)
            phone.wait_for_selector('article[data-stream="hall"] .uplot', timeout=30_000)
            phone.wait_for_timeout(2000)
            phone.screenshot(path=str(ARTIFACTS / "web-phone.png"), full_page=True)
            assert phone.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling on a phone
            phone.close()
            before = {r["id"] for r in json.loads(page.evaluate("fetch('/api/history?limit=1000').then(r => r.text())"))["events"]}
            assert off["id"] in before

            assert errors == []
            # restart: the history is still there (the live feed's reconnection attempts meanwhile fail: expected)
            stop_daemon(proc)
            proc = start_daemon(config, port)
            page.reload()
            errors.clear()
            page.wait_for_selector(f'#history-table tr[data-id="{off["id"]}"]', state="attached", timeout=10_000)
            page.wait_for_selector('article[data-stream="kitchen"] .uplot', timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "web-after-restart.png"), full_page=True)
            # the history filter
            page.select_option('select[name="stream"]', "hall")
            page.wait_for_function("() => [...document.querySelectorAll('#history-table tbody tr td:nth-child(2)')]"
                                   ".every(td => td.textContent === 'hall')", timeout=5000)
            browser.close()
        assert errors == []
    finally:
        events.close()
        if proc.poll() is None:
            stop_daemon(proc)
        broker.stop()


@pytest.mark.slow
def test_lan_binding_of_the_real_daemon(tmp_path, scenes):
    """host 0.0.0.0 with a token (reached through 127.0.0.1): 401 without it, traversal and links refused."""
    from playwright.sync_api import sync_playwright

    folder, model, kitchen, _ = scenes
    broker = Broker(tmp_path)
    port = free_port()
    config = web_config(tmp_path / "streamer.yaml", model, [kitchen], broker.port,
                        {"port": port, "host": "0.0.0.0", "token": "${STREAMER_WEB_TOKEN}"}, tmp_path)
    metrics_port = free_port()
    raw = json.loads(config.read_text())
    config.write_text(json.dumps({**raw, "metrics": {"enabled": True, "port": metrics_port}}))
    (tmp_path / "clips").mkdir()
    (tmp_path / "private.txt").write_text("not for the network\n")
    (tmp_path / "clips" / "link.flac").symlink_to(tmp_path / "private.txt")
    os.environ["STREAMER_WEB_TOKEN"] = TOKEN
    try:
        proc = start_daemon(config, port)
    finally:
        del os.environ["STREAMER_WEB_TOKEN"]
    try:
        assert raw_get(port, "/")[0] == 401
        assert raw_get(port, "/api/history")[0] == 401
        assert raw_get(port, "/metrics")[0] == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for path in ("/clips/../private.txt", "/clips/..%2fprivate.txt", "/clips/link.flac", "/clips/%2e%2e%2fprivate.txt"):
            status, _, body = raw_get(port, path, auth)
            assert status in (400, 404) and b"not for the network" not in body, path
        scored = 'streamer_windows_total{stream="kitchen"}'  # the daemon's metrics, from the one server
        assert wait_for(lambda: scored in raw_get(port, "/metrics", auth)[2].decode(), 30)
        metrics = raw_get(port, "/metrics", auth)[2].decode()
        with pytest.raises(OSError):  # and not from a second one
            socket.create_connection(("127.0.0.1", metrics_port), timeout=1).close()
        assert "streamer_web_unauthorized 3.0" in metrics
        errors: list[str] = []
        with sync_playwright() as pw:
            browser = launch_browser(pw)
            page = open_page(browser, f"http://127.0.0.1:{port}/?token={TOKEN}", errors)
            page.wait_for_selector('article[data-stream="kitchen"] .uplot', timeout=30_000)
            assert "token" not in page.url  # the token left the address bar for an HttpOnly cookie
            assert page.evaluate("document.cookie") == ""
            browser.close()
        assert errors == []
        err = stop_daemon(proc)
        assert TOKEN not in err
    finally:
        if proc.poll() is None:
            proc.kill()
        broker.stop()

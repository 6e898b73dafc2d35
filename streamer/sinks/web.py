"""The box's web page: what each stream hears now, what it heard, and the box itself.

One aiohttp server on one asyncio loop in one thread serves the page (``static/``), its
live feed (Server-Sent Events at ``/api/live``), the history (``/api/history``, from the
SQLite :mod:`streamer.sinks.history`), saved clips (``/clips/<name>``), ``/metrics`` and
``/healthz``.

Why it cannot slow the pipeline: :class:`WebSink` is a hub sink, so the scoring path only
ever does a ``put_nowait`` on its queue. Its ``handle`` (the sink's own thread) updates a
bounded per-stream live state under a lock. Every ``PUSH_INTERVAL_S`` the server's loop
takes what changed since the last tick, encodes it **once** as one SSE frame, and offers
that frame to every client's bounded queue; a client whose queue is full (a slow phone, a
tab asleep, a vanished peer with a full socket buffer) loses that frame — counted in
``streamer_web_frames_dropped`` — and gets a fresh snapshot once it catches up, so what
it shows is never silently wrong.

Private by default: bound to 127.0.0.1 unless configured; with a token (required by the
config on any other address) every path but ``/healthz`` needs it — ``Authorization:
Bearer <token>``, or ``?token=<token>`` once, which sets an HttpOnly cookie and redirects
to the same URL without it. Tokens are compared with :func:`hmac.compare_digest`, never
logged (aiohttp's access log is off: it would print query strings); a wrong or missing one
gets the same bare 401. ``/clips/`` serves only regular files directly inside the clips
folder, after ``resolve()``: no ``..``, no symlink out, no listing.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hmac
import ipaddress
import json
import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import http_exceptions, web
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from streamer.events import Event
from streamer.sinks.base import Level, Scores, SinkItem, SourceStatus, Spectrogram

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
PUSH_INTERVAL_S = 0.25  # live frames to the browsers: 4 Hz, coalesced
STATUS_INTERVAL_S = 1.0  # how often the box panel (status callable) is refreshed
KEEPALIVE_S = 15.0  # an SSE comment when nothing else went out, so proxies keep the stream
CLIENT_QUEUE_FRAMES = 8  # frames one browser may lag behind before its frames are dropped
MAX_CLIENTS = 32  # live feeds at once; more get 503
SCORE_HISTORY_S = 600.0  # the score chart's span: the last 10 minutes
SCORE_SPACING_S = 0.25  # at most one chart point per this (closer windows are merged by max)
MAX_SCORE_ELEMENTS = 400_000  # points × targets kept per stream (float16): bounds memory with many targets
CHART_TARGETS = 8  # targets drawn per stream; with more, the loudest recent ones (and any active)
CHART_RESELECT_S = 5.0  # how often that choice is revisited
TOP_LABELS = 5  # bars of the strongest labels right now
SPECTRO_ROWS = 600  # spectrogram rows kept per stream (60 s at 100 ms per row)
SPECTRO_BINS = 64  # mel bins shown (the model's are averaged down to this)
SPECTRO_FRAME_STEP = 10  # 10 ms frames per displayed row
SPECTRO_RANGE = (-1.6, 1.4)  # normalised log-mel mapped onto 0..255
RECENT_EVENTS = 50  # finished events kept in the live state (the history has the rest)
COOKIE = "streamer_token"
HISTORY_DEFAULT_LIMIT = 200
SHUTDOWN_TIMEOUT_S = 5.0
# the server's own limits, against a LAN client that opens connections and never finishes a
# request (each held up to max headers × max field size of buffered header bytes, before the
# token is even read): at most this many connections at once (more are closed at once, counted)
# and a connection that completes no request within IDLE_CLOSE_S is closed (aiohttp's keep-alive
# timer, which also runs from the connection's start; a response in progress is not cut)
MAX_CONNECTIONS = 128
IDLE_CLOSE_S = 15.0
MAX_HEADERS = 48  # a browser sends about 15
MAX_FIELD_BYTES = 8190  # aiohttp's default: one header line (cookies of other apps on this host count)
MAX_HISTORY_ROWS = 1000  # the most events one /api/history answer holds (the store caps it too)
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (the default binding needs no token)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class WebSettings:
    """The ``web`` section."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    history: Path = Path("history.sqlite3")
    history_days: float = 30.0

    def __repr__(self) -> str:  # the token never reaches a log line through a repr
        return (f"WebSettings(enabled={self.enabled}, host={self.host!r}, port={self.port}, "
                f"token={'set' if self.token else None}, history={str(self.history)!r}, history_days={self.history_days})")


# --------------------------------------------------------------------------------------------
# Spectrogram rows from the model's input windows (until the frontend publishes its frames)
# --------------------------------------------------------------------------------------------
class SpectrogramTap:
    """Turns successive windows of a stream into the mel rows not shown yet, decimated.

    A window holds ``frames`` real frames starting at frame ``start_sample // 160``; only the
    frames past the last one already published are new. Rows average ``SPECTRO_FRAME_STEP``
    frames and are aligned to multiples of it, so overlapping windows give each row once.
    """

    def __init__(self, frame_step: int = SPECTRO_FRAME_STEP, hop_samples: int = 160) -> None:
        self.frame_step = frame_step
        self.hop_samples = hop_samples
        self._next: dict[str, int] = {}  # per stream: first frame index not yet published

    def rows(self, stream: str, start_sample: int, features: Any, frames: int) -> Spectrogram | None:
        first = start_sample // self.hop_samples
        end = first + int(frames)
        end_aligned = end - end % self.frame_step
        begin = max(self._next.get(stream, 0), first + (-first) % self.frame_step)
        if end_aligned <= begin:
            return None
        block = features[begin - first:end_aligned - first]
        block = block.numpy() if hasattr(block, "numpy") else np.asarray(block)
        n = (end_aligned - begin) // self.frame_step
        rows = block.reshape(n, self.frame_step, -1).mean(axis=1)
        self._next[stream] = end_aligned
        return Spectrogram(stream=stream, frames=rows.astype(np.float16), end_frame=end_aligned, frame_step=self.frame_step)


# --------------------------------------------------------------------------------------------
# Live state (written by the sink thread, read by the server loop)
# --------------------------------------------------------------------------------------------
def _round(values, digits: int = 3) -> list[float]:
    """JSON-safe: a NaN or inf (a broken model) becomes 0, never an unencodable frame."""
    clean = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    return [round(float(v), digits) for v in clean]


def _quantise(rows: np.ndarray) -> np.ndarray:
    """(n, bins) normalised log-mel → (n, SPECTRO_BINS) uint8."""
    rows = np.asarray(rows, dtype=np.float32)
    bins = rows.shape[1]
    if bins > SPECTRO_BINS and bins % SPECTRO_BINS == 0:
        rows = rows.reshape(rows.shape[0], SPECTRO_BINS, bins // SPECTRO_BINS).mean(axis=2)
    elif bins > SPECTRO_BINS:
        idx = np.linspace(0, bins, SPECTRO_BINS + 1).astype(int)
        rows = np.add.reduceat(rows, idx[:-1], axis=1) / np.diff(idx)
    lo, hi = SPECTRO_RANGE
    scaled = (np.nan_to_num(rows, nan=lo) - lo) * (255.0 / (hi - lo))
    return np.clip(scaled, 0, 255).astype(np.uint8)


@dataclass
class StreamState:
    """One stream's bounded live view."""

    name: str
    state: str = "starting"
    error: str | None = None
    level: float | None = None
    top: list = field(default_factory=list)  # [[label, p], …]
    targets: tuple[str, ...] = ()
    on: list[float] = field(default_factory=list)
    off: list[float] = field(default_factory=list)
    times: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float16))
    count: int = 0  # points in the ring
    head: int = 0  # next slot
    chart: list[int] = field(default_factory=list)  # target indices drawn
    chart_at: float = 0.0
    spectro: deque = field(default_factory=lambda: deque(maxlen=SPECTRO_ROWS))  # uint8 rows
    spectro_end: int = 0
    spectro_step: int = SPECTRO_FRAME_STEP
    active: dict[str, dict] = field(default_factory=dict)  # target → event summary
    # what changed since the last tick
    new_points: list = field(default_factory=list)  # [(t, [v per chart target])]
    new_rows: list = field(default_factory=list)
    series_dirty: bool = True
    dirty: set = field(default_factory=set)

    def reset_scores(self, targets: tuple[str, ...]) -> None:
        self.targets = targets
        rows = max(16, min(int(SCORE_HISTORY_S / SCORE_SPACING_S), MAX_SCORE_ELEMENTS // max(1, len(targets))))
        self.times = np.zeros(rows)
        self.scores = np.zeros((rows, len(targets)), dtype=np.float16)
        self.count = self.head = 0
        self.chart = list(range(min(CHART_TARGETS, len(targets))))
        self.chart_at = 0.0
        self.new_points.clear()
        self.series_dirty = True

    def ordered(self) -> tuple[np.ndarray, np.ndarray]:
        """The ring's points, oldest first."""
        n, rows = self.count, len(self.times)
        idx = (np.arange(self.head - n, self.head)) % rows
        return self.times[idx], self.scores[idx]

    def series(self, now: float) -> dict:
        times, scores = self.ordered()
        keep = times >= now - SCORE_HISTORY_S
        times, scores = times[keep], scores[keep]
        return {"targets": [self.targets[i] for i in self.chart], "on": [self.on[i] for i in self.chart],
                "off": [self.off[i] for i in self.chart], "t": _round(times, 2),
                "v": [_round(scores[:, i]) for i in self.chart]}


class LiveState:
    """Every stream's live view; bounded; one lock (held for microseconds per item)."""

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.labels = labels
        self.lock = threading.Lock()
        self.streams: dict[str, StreamState] = {}
        self.recent: deque = deque(maxlen=RECENT_EVENTS)
        self.new_events: list[dict] = []
        self.history_rev = 0

    def _stream(self, name: str) -> StreamState:
        st = self.streams.get(name)
        if st is None:
            st = self.streams[name] = StreamState(name)
        return st

    def apply(self, item: SinkItem, now: float) -> None:
        with self.lock:
            if isinstance(item, Scores):
                self._scores(item, now)
            elif isinstance(item, Spectrogram):
                st = self._stream(item.stream)
                rows = _quantise(item.frames)
                st.spectro.extend(rows)
                st.new_rows.extend(rows)
                del st.new_rows[:-SPECTRO_ROWS]
                st.spectro_end, st.spectro_step = item.end_frame, item.frame_step
            elif isinstance(item, Level):
                st = self._stream(item.stream)
                st.level = round(float(item.dbfs), 1) if math.isfinite(item.dbfs) else None
                st.dirty.add("level")
            elif isinstance(item, SourceStatus):
                st = self._stream(item.stream)
                st.state, st.error = item.state, item.error
                st.dirty.add("state")
            elif isinstance(item, Event):
                self._event(item)

    def _scores(self, s: Scores, now: float) -> None:
        st = self._stream(s.stream)
        if s.targets != st.targets:
            st.reset_scores(s.targets)
        on, off = _round(s.on_thresholds), _round(s.off_thresholds)
        if on != st.on or off != st.off:
            st.on, st.off = on, off
            st.series_dirty = True
        t = s.wall_time if s.wall_time is not None else now
        values = np.asarray(s.target_scores, dtype=np.float32)
        rows = len(st.times)
        last = (st.head - 1) % rows
        if st.count and t - st.times[last] < SCORE_SPACING_S:  # merge: keep the peak, not the latest
            st.scores[last] = np.maximum(st.scores[last], values)
            if st.new_points:
                st.new_points[-1] = (st.new_points[-1][0], np.maximum(st.new_points[-1][1], values))
            else:
                st.new_points.append((float(st.times[last]), values))
        else:
            st.times[st.head], st.scores[st.head] = t, values
            st.head = (st.head + 1) % rows
            st.count = min(st.count + 1, rows)
            st.new_points.append((t, values))
        del st.new_points[:-int(SCORE_HISTORY_S / SCORE_SPACING_S)]
        probs = np.nan_to_num(np.asarray(s.probabilities, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        if len(probs):
            k = min(TOP_LABELS, len(probs))
            best = np.argpartition(-probs, k - 1)[:k]
            best = best[np.argsort(-probs[best])]
            names = self.labels
            st.top = [[names[i] if i < len(names) else str(i), v] for i, v in zip(best, _round(probs[best]))]
            st.dirty.add("top")
        if len(st.targets) > CHART_TARGETS and now - st.chart_at >= CHART_RESELECT_S:
            st.chart_at = now
            _, scores = st.ordered()
            loud = scores.max(axis=0).astype(np.float32) if len(scores) else np.zeros(len(st.targets))
            active = [i for i, name in enumerate(st.targets) if name in st.active]
            ranked = active + [int(i) for i in np.argsort(-loud, kind="stable") if int(i) not in active]
            chart = sorted(ranked[:CHART_TARGETS])
            if chart != st.chart:
                st.chart = chart
                st.series_dirty = True

    def _event(self, e: Event) -> None:
        st = self._stream(e.stream)
        summary = {"id": e.id, "stream": e.stream, "target": e.target, "state": e.state, "labels": list(e.labels),
                   "start_sample": e.start_sample, "end_sample": e.end_sample,
                   "start_time": e.start_time, "end_time": e.end_time, "peak": _round([e.peak], 4)[0],
                   "clip": Path(e.clip).name if e.clip else None, "closed_by": e.closed_by}
        if e.state == "ON":
            st.active[e.target] = summary
        else:
            st.active.pop(e.target, None)
            self.recent.append(summary)
        st.dirty.add("active")
        self.new_events.append(summary)

    def snapshot(self, now: float) -> dict:
        with self.lock:
            return {"kind": "snapshot", "t": now, "labels": len(self.labels), "history_rev": self.history_rev,
                    "recent": list(self.recent),
                    "streams": {name: self._stream_full(st, now) for name, st in self.streams.items()}}

    def _stream_full(self, st: StreamState, now: float) -> dict:
        return {"state": st.state, "error": st.error, "level": st.level, "top": st.top,
                "active": list(st.active.values()), "series": st.series(now) if st.targets else None,
                "spectro": _spectro(list(st.spectro), st)}

    def delta(self, now: float) -> dict | None:
        """What changed since the last call (and forget it); None when nothing did."""
        with self.lock:
            out: dict[str, Any] = {}
            for name, st in self.streams.items():
                d: dict[str, Any] = {}
                if st.series_dirty and st.targets:
                    d["series"] = st.series(now)
                    st.series_dirty = False
                elif st.new_points:
                    d["points"] = {"t": [round(p[0], 2) for p in st.new_points],
                                   "v": [_round(p[1][st.chart]) for p in st.new_points]}
                st.new_points.clear()
                if st.new_rows:
                    d["spectro"] = _spectro(st.new_rows, st)
                    st.new_rows = []
                for key in st.dirty:
                    d[key] = list(st.active.values()) if key == "active" else (
                        {"state": st.state, "error": st.error} if key == "state" else getattr(st, key))
                st.dirty.clear()
                if d:
                    out[name] = d
            events, self.new_events = self.new_events, []
            if not out and not events:
                return None
            return {"kind": "delta", "t": now, "streams": out, "events": events, "history_rev": self.history_rev}


def _spectro(rows: list, st: StreamState) -> dict | None:
    if not rows:
        return None
    block = np.stack(rows)
    return {"n": block.shape[0], "bins": block.shape[1], "end": st.spectro_end, "step": st.spectro_step,
            "rows": base64.b64encode(block.tobytes()).decode("ascii")}


# --------------------------------------------------------------------------------------------
# The sink and its server
# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Client:
    queue: asyncio.Queue
    resync: bool = False
    dropped: int = 0


def _host_name(host: str) -> str:
    """The name in a Host header, without its port ("[::1]:8765" → "::1")."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class _ServerLog(logging.LoggerAdapter):
    """aiohttp's request-handling log, made safe for a server on a LAN.

    aiohttp logs a malformed request at ERROR with a traceback and the offending bytes — the
    token among them when it sat in the header or query that broke the parser — so any client
    could write secrets and megabytes of tracebacks into the journal. A request broken by the
    client (a parse error, a connection reset) is counted in ``bad_requests`` and logged at
    debug level by its exception's name alone; anything else is a bug of ours and is logged
    as aiohttp would.
    """

    def __init__(self, sink: "WebSink") -> None:
        super().__init__(log, {})
        self.sink = sink

    def log(self, level: int, msg: object, *args: object, exc_info: Any = None, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1] if exc_info else None
        if isinstance(exc, (http_exceptions.HttpProcessingError, ConnectionError, UnicodeError)):
            self.sink.bad_requests += 1
            self.logger.debug("web: a malformed or broken request refused (%s)", type(exc).__name__)
            return
        super().log(level, msg, *args, exc_info=exc_info, **kwargs)


def _regular_file_in(folder: Path, name: str) -> tuple[Path | None, bool]:
    """``(path, inside)``: the regular file ``name`` directly inside the resolved ``folder`` after
    resolving links, else None; ``inside`` says whether it resolved to that folder at all. A name
    too long for the file system or a link loop is simply not there."""
    try:
        path = (folder / name).resolve()
        inside = path.parent == folder
        return (path if inside and path.is_file() else None), inside
    except (OSError, RuntimeError, ValueError):
        return None, False


def _sse(kind: str, payload: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'), allow_nan=False)}\n\n".encode()


class WebSink:
    """A hub sink holding the live state, and the aiohttp server that shows it.

    ``status`` gives the box panel (sources, MQTT, counters, model); ``metrics`` the
    daemon's Prometheus text (None: only the web's own counters); ``healthy`` decides
    ``/healthz``; ``history`` is the store the history table reads (None: no table).
    """

    name = "web"
    accepts = (Scores, Level, SourceStatus, Spectrogram, Event)

    def __init__(self, settings: WebSettings, labels: tuple[str, ...], status: Callable[[], dict],
                 metrics: Callable[[], bytes] | None, healthy: Callable[[], bool],
                 clips_dir: Path | None, history=None) -> None:
        self.settings = settings
        self.status = status
        self.metrics = metrics
        self.healthy = healthy
        self.clips_dir = Path(clips_dir).resolve() if clips_dir else None
        self.history = history
        self.state = LiveState(tuple(labels))
        self._token = settings.token.encode() if settings.token else None
        self._clients: set[_Client] = set()
        self._box: dict = {}
        self._box_json = ""
        self.dropped = 0  # live frames dropped for lagging browsers
        self.sent = 0  # live frames queued for browsers
        self.unauthorized = 0  # requests refused for a missing or wrong token
        self.refused_paths = 0  # clip requests for something not a file inside the clips folder
        self.bad_requests = 0  # requests the client broke (malformed, reset): refused, not logged with their bytes
        self.refused_connections = 0  # connections closed at once, MAX_CONNECTIONS being open
        self.status_errors = 0  # box status reads that failed
        self.sink_cpu_s = 0.0  # CPU time spent in handle() (the hub's thread for this sink)
        self.loop_cpu_s = 0.0  # CPU time of the server's thread (encoding, sending, requests)
        r = self.registry = CollectorRegistry()
        for name, doc, read in (
                ("streamer_web_frames_dropped", "Live frames not sent to a browser that lagged behind", lambda: self.dropped),
                ("streamer_web_frames_sent", "Live frames queued for browsers", lambda: self.sent),
                ("streamer_web_clients", "Browsers on the live feed", lambda: len(self._clients)),
                ("streamer_web_unauthorized", "Requests refused for a missing or wrong token", lambda: self.unauthorized),
                ("streamer_web_refused_paths", "Clip requests outside the clips folder, refused", lambda: self.refused_paths),
                ("streamer_web_bad_requests", "Requests the client broke (malformed, reset), refused", lambda: self.bad_requests),
                ("streamer_web_refused_connections", "Connections closed at once, the most allowed being open",
                 lambda: self.refused_connections),
                ("streamer_web_status_errors", "Box status reads that failed", lambda: self.status_errors),
                ("streamer_web_sink_cpu_seconds", "CPU time taking pipeline items into the live state", lambda: self.sink_cpu_s),
                ("streamer_web_server_cpu_seconds", "CPU time of the web server's thread", lambda: self.loop_cpu_s)):
            Gauge(name, doc, registry=r).set_function(read)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._io = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="web-io")
        self.port: int | None = None

    # -- the Sink protocol ---------------------------------------------------------------------
    def handle(self, item: SinkItem) -> None:
        t0 = time.thread_time()
        self.state.apply(item, time.time())
        self.sink_cpu_s += time.thread_time() - t0
        if isinstance(item, Event):  # rare and what people wait for: pushed now, not at the next tick
            self._wake_up()

    def history_changed(self) -> None:
        """The history store was written: pages refetch their table on the next frame."""
        with self.state.lock:
            self.state.history_rev += 1
        self._wake_up()

    def _wake_up(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the loop closed in between (shutting down)
                pass

    def close(self) -> None:
        self.stop()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> "WebSink":
        """Bind and serve on a thread of its own; a busy port is a one-line StreamerError."""
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="web", daemon=True)
        self._thread.start()
        try:
            self.port = ready.result(timeout=30)
        except OSError as exc:
            from streamer.errors import StreamerError

            raise StreamerError(f"web: cannot listen on {self.settings.host}:{self.settings.port} "
                                f"({exc.strerror or exc}); change web.port") from None
        shown = f"[{self.settings.host}]" if ":" in self.settings.host else self.settings.host
        log.info("web page on http://%s:%d/%s", shown, self.port, " (token required)" if self._token else "")
        return self

    def _serve(self, ready: concurrent.futures.Future) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main(ready))
        except Exception as exc:  # anything after start-up: logged, the pipeline goes on
            if not ready.done():
                ready.set_exception(exc)
            else:
                log.error("web server stopped: %s", exc)
        finally:
            loop.close()

    async def _main(self, ready: concurrent.futures.Future) -> None:
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        app = self._app()
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0,
                                     logger=_ServerLog(self), keepalive_timeout=IDLE_CLOSE_S, max_headers=MAX_HEADERS,
                                     max_field_size=MAX_FIELD_BYTES, max_line_size=MAX_FIELD_BYTES)
        await self._runner.setup()
        self._cap_connections(self._runner.server)
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            ready.set_exception(exc)
            return
        sockets = site._server.sockets if site._server else []  # aiohttp exposes no public bound-port accessor
        ready.set_result(sockets[0].getsockname()[1] if sockets else self.settings.port)
        ticker = asyncio.ensure_future(self._tick())
        await self._stopping.wait()
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)  # let it finish cancelling: no task left pending at loop close
        for client in list(self._clients):
            self._offer(client, None)
        await self._runner.cleanup()

    def _cap_connections(self, server: web.Server) -> None:
        """Close a connection at once when ``MAX_CONNECTIONS`` are already open (aiohttp has no such
        limit): wraps the server's ``connection_made``, which each new connection's handler calls."""
        admit = server.connection_made

        def connection_made(handler, transport) -> None:
            admit(handler, transport)
            if len(server.connections) > MAX_CONNECTIONS:
                self.refused_connections += 1
                transport.abort()

        server.connection_made = connection_made  # type: ignore[method-assign]

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(self._stopping.set)
        thread.join(SHUTDOWN_TIMEOUT_S)
        self._io.shutdown(wait=False)

    # -- the live feed ---------------------------------------------------------------------------
    async def _tick(self) -> None:
        """Push loop; one bad frame is logged (rate-limited) and skipped, the feed goes on."""
        failures = 0
        while True:
            try:
                await self._push_forever()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                if failures == 1 or failures % 100 == 0:
                    log.error("web: live frame failed (%d so far): %s", failures, exc)
                await asyncio.sleep(PUSH_INTERVAL_S)

    async def _push_forever(self) -> None:
        next_status = 0.0
        while True:
            try:  # every PUSH_INTERVAL_S, or at once for an event
                await asyncio.wait_for(self._wake.wait(), PUSH_INTERVAL_S)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            self.loop_cpu_s = time.thread_time()  # this thread's CPU so far (the loop runs on it alone)
            now = time.time()
            if now >= next_status:
                next_status = now + STATUS_INTERVAL_S
                self._refresh_box()
            delta = self.state.delta(now)  # taken even with no browser: the deltas must not pile up
            if not self._clients:
                continue
            frames = []
            if delta is not None:
                frames.append(_sse("delta", delta))
            if self._box_changed:
                frames.append(_sse("box", self._box))
                self._box_changed = False
            if not frames:
                continue
            frame = b"".join(frames)
            for client in list(self._clients):
                if client.resync and client.queue.empty():
                    client.resync = False
                    self._offer(client, self._snapshot_frame(now))
                else:
                    self._offer(client, frame)

    _box_changed = False

    def _refresh_box(self) -> None:
        try:
            box = self.status()
            text = json.dumps(box, sort_keys=True, default=str)
        except Exception as exc:  # the status callable reads another thread's objects: never fatal
            self.status_errors += 1
            log.debug("web: box status failed: %s", exc)
            return
        if text != self._box_json:
            self._box_json, self._box, self._box_changed = text, json.loads(text), True

    def _offer(self, client: _Client, frame: bytes | None) -> None:
        try:
            client.queue.put_nowait(frame)
            if frame is not None:
                self.sent += 1
        except asyncio.QueueFull:
            client.dropped += 1
            self.dropped += 1
            client.resync = True
            if frame is None:  # shutting down: make room for the end marker
                while not client.queue.empty():
                    client.queue.get_nowait()
                client.queue.put_nowait(None)

    def _snapshot_frame(self, now: float) -> bytes:
        return _sse("snapshot", self.state.snapshot(now)) + (_sse("box", self._box) if self._box else b"")

    async def _live(self, request: web.Request) -> web.StreamResponse:
        if len(self._clients) >= MAX_CLIENTS:
            return web.Response(status=503, text="too many live pages open\n")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        client = _Client(asyncio.Queue(maxsize=CLIENT_QUEUE_FRAMES))
        self._clients.add(client)
        try:
            await resp.prepare(request)  # inside: a page reloaded at once is gone before its headers go out
            await resp.write(b"retry: 2000\n\n" + self._snapshot_frame(time.time()))
            while True:
                try:
                    frame = await asyncio.wait_for(client.queue.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    frame = b": keepalive\n\n"
                if frame is None:
                    break
                await resp.write(frame)
        except (ConnectionResetError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(client)
        return resp

    # -- the app -------------------------------------------------------------------------------
    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=64 * 1024)
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name:[A-Za-z0-9_.-]+}", self._static)
        app.router.add_get("/static/vendor/{name:[A-Za-z0-9_.-]+}", self._vendor)
        app.router.add_get("/api/live", self._live)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/api/history", self._history)
        app.router.add_get("/clips/{name:.*}", self._clip)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if self._token is None:
            # no token, so loopback only: refuse names other than loopback ones in Host, or a web
            # page elsewhere could rebind its own name to 127.0.0.1 and read this one (DNS rebinding)
            if not is_loopback(_host_name(request.host)) and request.path != "/healthz":
                return web.Response(status=403, text="403: Forbidden (use http://127.0.0.1 or http://localhost)\n")
            return await handler(request)
        if request.path == "/healthz":
            return await handler(request)
        offered = None
        header = request.headers.get("Authorization", "")
        if header[:7].lower() == "bearer ":
            offered = header[7:].strip()
        from_query = request.query.get("token")
        if offered is None and from_query is not None:
            offered = from_query
        if offered is None:
            offered = request.cookies.get(COOKIE)
        # surrogateescape: aiohttp hands undecodable header bytes over as lone surrogates
        if offered is None or not hmac.compare_digest(offered.encode("utf-8", "surrogateescape"), self._token):
            self.unauthorized += 1
            return web.Response(status=401, text="401: Unauthorized\n")
        if from_query is not None and offered is from_query:  # keep it out of the address bar from now on
            target = request.rel_url.with_query([(k, v) for k, v in request.query.items() if k != "token"])
            # one leading slash: "//host/…" would send the browser to another site
            location = "/" + target.raw_path.lstrip("/") + (f"?{target.raw_query_string}" if target.raw_query_string else "")
            resp = web.Response(status=302, headers={"Location": location})
            resp.set_cookie(COOKIE, from_query, httponly=True, samesite="Strict", path="/",
                            secure=request.secure)
            return resp
        return await handler(request)

    async def _index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def _static(self, request: web.Request) -> web.StreamResponse:
        return self._file_in(STATIC_DIR, request.match_info["name"])

    async def _vendor(self, request: web.Request) -> web.StreamResponse:
        return self._file_in(STATIC_DIR / "vendor", request.match_info["name"])

    def _file_in(self, folder: Path, name: str) -> web.StreamResponse:
        path, _ = _regular_file_in(folder.resolve(), name)
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    async def _state(self, request: web.Request) -> web.Response:
        body = self.state.snapshot(time.time())
        body["box"] = self._box
        return web.json_response(body)

    async def _history(self, request: web.Request) -> web.Response:
        if self.history is None:
            return web.json_response({"events": [], "streams": [], "targets": [], "enabled": False})
        q = request.query

        def number(key: str) -> float | None:
            value = q.get(key)
            if value in (None, ""):
                return None
            try:
                out = float(value)
            except ValueError:
                raise web.HTTPBadRequest(text=f"{key}: expected a number{' (unix seconds)' if key != 'limit' else ''}\n") from None
            if not math.isfinite(out):
                raise web.HTTPBadRequest(text=f"{key}: expected a finite number\n")
            return out

        since, until, limit = number("since"), number("until"), number("limit")
        if limit is not None and not (1 <= limit <= MAX_HISTORY_ROWS and limit == int(limit)):
            raise web.HTTPBadRequest(text=f"limit: expected a whole number of events from 1 to {MAX_HISTORY_ROWS}\n")

        def read() -> dict:
            rows = self.history.query(stream=q.get("stream") or None, target=q.get("target") or None, since=since,
                                      until=until, limit=int(limit) if limit else HISTORY_DEFAULT_LIMIT)
            return {"events": rows, **self.history.facets(), "enabled": True}

        body = await asyncio.get_running_loop().run_in_executor(self._io, read)
        return web.json_response(body)

    async def _clip(self, request: web.Request) -> web.StreamResponse:
        """Only a regular file directly inside the clips folder, after resolving links."""
        name = request.match_info["name"]
        folder = self.clips_dir
        if folder is None or not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
            self.refused_paths += 1
            raise web.HTTPNotFound()
        path, inside = _regular_file_in(folder, name)
        if path is None:
            if not inside:
                self.refused_paths += 1
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Cache-Control": "private, max-age=3600"})

    async def _metrics(self, request: web.Request) -> web.Response:
        body = (self.metrics() if self.metrics else b"") + generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        ok = bool(self.healthy())
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else "stalled\n")

"""``streamer run``: sources → frontend → scheduler → one inference worker → smoothers → publishers.

Start order: config (already validated) → model loaded and warmed → sources opened →
MQTT connecting → ready (``READY=1`` to systemd when ``NOTIFY_SOCKET`` is set). SIGTERM or
SIGINT: stop capture, score the windows already taken, close open events (their OFF is
published), publish ``offline``, exit 0. SIGHUP: reload the ``detect`` section only; a bad
file is refused with a log line and the old settings kept.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from dataclasses import replace

from streamer.capture.sources import FfmpegSource, FileSource, MicSource, Source
from streamer.sinks.clips import ClipWriter
from streamer.settings import Config, ConfigError, load_config
from streamer.detect import hop_to_frames
from streamer.events import Event, EventSmoother
from streamer.features.fbank import window_samples
from streamer.inference.engine import InferenceEngine, InferenceWorker, Result
from streamer.sinks.metrics import Metrics, MetricsServer, stalled
from streamer.model import load_model
from streamer.sinks.console import ConsoleView, LinePrinter
from streamer.sinks.mqtt import MqttPublisher
from streamer.streams import StreamReader
import numpy as np  # web (#13)
from streamer.sinks.base import Level, Scores, SinkHub, SourceStatus  # web (#13)
from streamer.sinks.history import HistoryStore, HistorySink  # web (#13)
from streamer.sinks.web import SpectrogramTap, WebSink  # web (#13)

log = logging.getLogger(__name__)

LOOP_INTERVAL_S = 0.25
STOP_TIMEOUT_S = 10.0
STALL_SECONDS = 30.0  # no window scored this long while sources run: unhealthy


def notify(message: str) -> None:
    """sd_notify(3): one datagram to ``$NOTIFY_SOCKET``; nothing without systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log.debug("sd_notify failed: %s", exc)


def make_source(sc, ring_seconds: float) -> Source:
    if sc.type == "mic":
        return MicSource(sc.name, device=sc.device, channels=sc.channels, channel=sc.channel, gain=sc.gain, ring_seconds=ring_seconds)
    if sc.type == "ffmpeg":
        return FfmpegSource(sc.name, sc.url, realtime=sc.realtime, gain=sc.gain, ring_seconds=ring_seconds)
    return FileSource(sc.name, sc.path, realtime=sc.realtime, loop=sc.loop, gain=sc.gain, ring_seconds=ring_seconds)


class Daemon:
    def __init__(self, config: Config, config_path: Path | None = None, output: str = "auto") -> None:
        self.config = config
        self.config_path = config_path
        self.output = output
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._lock = threading.Lock()
        self.hub: SinkHub | None = None  # web (#13)
        self.raised = 0  # events (ON and OFF) handed to the sinks: counted, not kept, so memory stays flat

    # -- wiring ---------------------------------------------------------------------------
    def _sinks(self, event: Event) -> None:
        if self.clips and event.state == "OFF":
            path = self.clips.save(event, self.source_by_name[event.stream].ring)
            if path is not None:
                event = replace(event, clip=str(path))
        if self.metrics:
            self.metrics.events.labels(event.stream, event.target, event.state).inc()
        self.raised += 1
        if self.hub:  # web (#13)
            self.hub.publish(event)
        if self.mqtt:
            self.mqtt.publish_event(event)
        self.printer.event(event)

    def _on_result(self, result: Result) -> None:
        window = result.window
        if self.metrics:
            self.metrics.windows.labels(window.stream).inc()
            self.metrics.latency.observe(result.latency_s)
        with self._lock:
            smoother = self.smoothers[window.stream]
            for event in smoother.update(window.start_sample, result.probabilities, window.wall_time):
                self._sinks(event)
            if self.hub:  # web (#13)
                self._web_publish_result(result, smoother)
            if self.view:
                self.view.update_scores(window.stream, self.labels, result.probabilities)
                self.view.update_stream(window.stream, active=smoother.active_targets())

    def _build_smoothers(self) -> dict[str, EventSmoother]:
        targets = self.config.detect.targets(self.labels)
        span = window_samples(self.engine.loaded.features.max_length)
        return {s.name: EventSmoother(s.name, self.labels, targets, span) for s in self.config.sources}

    def run(self) -> int:
        cfg = self.config
        notify("STATUS=loading model")
        loaded = load_model(cfg.model.path)
        self.labels = loaded.labels
        self.engine = InferenceEngine(loaded, cfg.model.device, cfg.model.precision, cfg.model.max_batch, cfg.model.threads)
        self.smoothers = self._build_smoothers()
        hop_frames = hop_to_frames(cfg.hop)
        self.sources = [make_source(sc, cfg.ring_seconds) for sc in cfg.sources]
        for source in self.sources:
            if isinstance(source, MicSource):
                source.open_check()
        self.source_by_name = {s.name: s for s in self.sources}
        self.metrics = Metrics() if cfg.metrics else None
        self.clips = ClipWriter(cfg.clips) if cfg.clips else None
        self.worker = InferenceWorker(self.engine, self._on_result, cfg.model.max_wait_ms,
                                      on_batch=self.metrics.batch.observe if self.metrics else None,
                                      added_delay_s=cfg.model.added_delay_ms / 1000)
        self.readers = []
        for source in self.sources:
            self.worker.register_stream(source.name)
            lossless = isinstance(source, FileSource) and not source.realtime
            self.readers.append(StreamReader(source, loaded.features, hop_frames,
                                             lambda w, lossless=lossless: self.worker.submit(w, block=lossless)))
        targets = {s.name: [t.name for t in next(iter(self.smoothers.values())).targets] for s in self.sources}
        self.mqtt = MqttPublisher(cfg.mqtt, targets) if cfg.mqtt else None
        mode = cfg.console.mode if self.output == "auto" else self.output
        live = mode == "live" or (mode == "auto" and sys.stdout.isatty())
        self.view = ConsoleView([s.name for s in self.sources]) if live else None
        self.printer = self.view or LinePrinter(as_json=mode == "json", stream=open(os.devnull, "w") if mode == "off" else None)

        self.hub = self._web_start(loaded) if cfg.web.enabled else None  # web (#13), before the first result
        self.worker.start()
        for source, reader in zip(self.sources, self.readers):
            source.start()
            reader.start()
        if self.mqtt:
            self.mqtt.start()
        if self.view:
            self.view.start()
        self.metrics_server = None
        if self.metrics and not self.hub:  # with the web page on, /metrics and /healthz are served by it
            limit = max(STALL_SECONDS, 3 * cfg.hop + 20)
            self.metrics_server = MetricsServer(
                self.metrics, lambda: not stalled(self.worker.last_progress, self._expecting_windows(), limit),
                cfg.metrics.host, cfg.metrics.port).start()
        self._install_signals()
        notify("READY=1")
        notify(f"STATUS=listening to {len(self.sources)} source(s)")
        log.info("streamer ready: %d source(s), model %s", len(self.sources), loaded.source)
        try:
            self._loop()
        finally:
            self._shutdown()
        return 0

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())

    def _loop(self) -> None:
        watchdog = int(os.environ.get("WATCHDOG_USEC", "0")) / 1e6
        last_level = 0.0
        source_states: dict[str, str] = {}
        while not self._stop.wait(LOOP_INTERVAL_S):
            if self._reload.is_set():
                self._reload.clear()
                self._reload_detect()
            now = time.monotonic()
            for source in self.sources:
                state = source.state.value
                if source_states.get(source.name) != state:
                    source_states[source.name] = state
                    if self.hub:  # web (#13)
                        self.hub.publish(SourceStatus(source.name, state, source.error))
                    if self.mqtt:
                        self.mqtt.publish_source_state(source.name, state)
            if self.metrics:
                self._update_metrics()
            for source, reader in zip(self.sources, self.readers):
                if self.hub:  # web (#13)
                    self.hub.publish(Level(source.name, reader.level_dbfs, time.time()))
                if self.view:
                    self.view.update_stream(source.name, state=source.state.value, level_dbfs=reader.level_dbfs,
                                            windows=reader.emitted, overruns=source.ring.lost)
                if self.mqtt and now - last_level >= self.config.level_interval_s:
                    self.mqtt.publish_level(source.name, reader.level_dbfs)
            if now - last_level >= self.config.level_interval_s:
                last_level = now
            if self.view:
                self.view.mqtt_state = "off" if not self.mqtt else ("connected" if self.mqtt.connected else (self.mqtt.last_error or "connecting"))
                self.view.mqtt_queue = self.mqtt.queue_length() if self.mqtt else None
            # the watchdog is fed by progress: a stalled pipeline stops the pings
            if watchdog and (now - self.worker.last_progress < watchdog or not self._expecting_windows()):
                notify("WATCHDOG=1")
            if all(r.done.is_set() for r in self.readers) and self.worker.pending() == 0:
                log.info("all sources have ended")
                break

    def _update_metrics(self) -> None:
        m = self.metrics
        m.skipped.set(self.worker.stats.skipped)
        m.pending.set(self.worker.pending())
        for source in self.sources:
            m.lost.labels(source.name).set(source.lost)
            m.overflows.labels(source.name).set(source.stats.overflows)
            m.nonfinite.labels(source.name).set(source.stats.nonfinite)
            m.restarts.labels(source.name).set(source.stats.restarts)
            for state in ("starting", "running", "retrying", "ended", "failed", "stopped"):
                m.source_up.labels(source.name, state).set(1 if source.state.value == state else 0)
        if self.mqtt:
            m.mqtt_queue.set(self.mqtt.queue_length())
            m.mqtt_dropped.set(self.mqtt.stats.dropped)
            m.mqtt_events_delivered.set(self.mqtt.stats.events_delivered)
            m.mqtt_events_dropped.set(self.mqtt.stats.events_dropped)
            m.mqtt_connected.set(1 if self.mqtt.connected else 0)
        if self.clips:
            m.clip_errors.set(self.clips.errors)

    # -- web page (issue #13) --------------------------------------------------------------------
    # One clearly marked block for the pipeline rewrite to port: a SinkHub with the WebSink and
    # the HistorySink; Events are published in _sinks, Scores and Spectrogram rows in
    # _on_result, Level and SourceStatus in _loop; the hub is closed in _shutdown.
    def _web_start(self, loaded) -> SinkHub:
        cfg = self.config
        limit = max(STALL_SECONDS, 3 * cfg.hop + 20)
        history = cfg.web.history
        if not history.is_absolute() and os.environ.get("STATE_DIRECTORY"):  # systemd's StateDirectory=
            history = Path(os.environ["STATE_DIRECTORY"].split(":")[0]) / history
        store = HistoryStore(history, max_age_s=cfg.web.history_days * 86400)
        web = WebSink(cfg.web, loaded.labels, status=self._web_status,
                      metrics=self.metrics.render if self.metrics else None,
                      healthy=lambda: not stalled(self.worker.last_progress, self._expecting_windows(), limit),
                      clips_dir=cfg.clips.directory if cfg.clips else None, history=store)
        hub = SinkHub()
        hub.add(web)
        hub.add(HistorySink(store, on_change=web.history_changed), queue_items=100_000)
        self._web, self._web_tap, self._web_targets = web, SpectrogramTap(), {}
        web.start()
        return hub.start()

    def _web_publish_result(self, result: Result, smoother: EventSmoother) -> None:
        window = result.window
        meta = self._web_targets.get(window.stream)
        if meta is None or meta[0] is not smoother:  # built once per smoother (a reload makes new ones)
            settings = [t.settings for t in smoother.targets]
            meta = self._web_targets[window.stream] = (
                smoother, tuple(t.name for t in smoother.targets),
                np.array([x.on_threshold for x in settings]), np.array([x.off_threshold for x in settings]))
        _, names, on, off = meta
        self.hub.publish(Scores(window.stream, window.start_sample, window.start_sample + smoother.window_samples,
                                window.wall_time, result.probabilities, names, smoother.smoothed.copy(), on, off,
                                tuple(smoother.active_targets())))
        rows = self._web_tap.rows(window.stream, window.start_sample, window.features, window.frames)
        if rows is not None:
            self.hub.publish(rows)

    def _web_status(self) -> dict:
        """The box panel: sources, MQTT, counters, model (read from the web server's thread)."""
        sources = [{"name": s.name, "type": s.kind, "state": s.state.value, "error": s.error,
                    "level": round(r.level_dbfs, 1), "windows": r.emitted, "lost": s.lost, "restarts": s.stats.restarts}
                   for s, r in zip(self.sources, self.readers)]
        mqtt = {"state": "off"}
        if self.mqtt:
            mqtt = {"state": "connected" if self.mqtt.connected else (self.mqtt.last_error or "connecting"),
                    "queue": self.mqtt.queue_length(), "dropped": self.mqtt.stats.dropped,
                    "events_delivered": self.mqtt.stats.events_delivered}
        shed = sum(int(v["shed"]) for v in self.hub.stats().values()) if self.hub else 0
        counters = {"events": self.raised, "windows_skipped": self.worker.stats.skipped,
                    "windows_gated": getattr(self.worker.stats, "gated", 0),
                    "lost_samples": sum(s.lost for s in self.sources),
                    "mqtt_dropped": self.mqtt.stats.dropped if self.mqtt else 0, "sink_items_shed": shed,
                    "web_frames_dropped": self._web.dropped}
        model = {"path": self.config.model.path, "device": str(self.engine.device), "precision": self.engine.precision,
                 "labels": len(self.labels)}
        return {"sources": sources, "mqtt": mqtt, "counters": counters, "model": model}
    # -- end of the web block -----------------------------------------------------------------------

    def _expecting_windows(self) -> bool:
        return any(s.state.value == "running" for s in self.sources)

    def _reload_detect(self) -> None:
        try:
            fresh = load_config(self.config_path) if self.config_path else None
            if fresh is None:
                return
            candidate = replace(self.config, detect=fresh.detect)
            candidate.detect.targets(self.labels)
        except (ConfigError, Exception) as exc:  # keep running on the old settings
            log.error("reload refused, keeping the old detect settings: %s", str(exc).replace("\n", "; "))
            return
        with self._lock:
            for smoother in self.smoothers.values():
                for event in smoother.close_all("reload"):
                    self._sinks(event)
            self.config = candidate
            self.smoothers = self._build_smoothers()
        log.info("reloaded the detect section from %s", self.config_path)
        notify("STATUS=reloaded detect settings")

    def _shutdown(self) -> None:
        notify("STOPPING=1")
        for source in self.sources:
            source.stop()
        for reader in self.readers:
            reader.stop()
        self.worker.stop(drain=True, timeout=STOP_TIMEOUT_S)
        with self._lock:
            for source in self.sources:
                reason = "stream-end" if source.state.value in ("ended", "failed") else "shutdown"
                for event in self.smoothers[source.name].close_all(reason):
                    self._sinks(event)
        if self.view:
            self.view.stop()
        if self.mqtt:
            self.mqtt.stop(timeout=STOP_TIMEOUT_S)
            st = self.mqtt.stats
            log.info("events: raised %d; mqtt delivered %d, dropped %d (queue full), unsent %d (broker unreachable at exit)",
                     self.raised, st.events_delivered, st.events_dropped, st.events_unsent)
        else:
            log.info("events: raised %d", self.raised)
        if self.clips:
            self.clips.close()
        if self.hub:  # web (#13): the history gets the last OFFs, then the server stops
            self.hub.close()
        if self.metrics_server:
            self.metrics_server.stop()
        log.info("stopped")

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
from streamer.sinks.journal import EventJournal, JournalSink
from streamer.sinks.mqtt import MqttPublisher
from streamer.streams import StreamReader

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
        if self.journal_sink:  # journal (issue 14): durable first; the MQTT sender delivers from it
            self.journal_sink.handle(event)
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
        # --- event journal (issue 14); the lead ports this block to pipeline.py -----------
        # Events go to the journal before they count as raised; the MQTT sender delivers from
        # it (what an earlier run left pending first). No MQTT: nothing would ever deliver
        # from a journal, so there is none.
        self.journal = EventJournal(cfg.journal.path, cfg.journal.max_events, cfg.journal.max_age_s) if cfg.mqtt else None
        self.mqtt = MqttPublisher(cfg.mqtt, targets, journal=self.journal) if cfg.mqtt else None
        self.journal_sink = JournalSink(self.journal, [self.mqtt.event_journaled]) if self.journal else None
        if self.journal:
            c = self.journal.counts()
            log.info("journal %s: %d event(s) pending from earlier runs (raised %d, delivered %d, shed %d in all)",
                     cfg.journal.path, c.pending, c.raised, c.delivered, c.shed)
        # --- end of the journal block -------------------------------------------------------
        mode = cfg.console.mode if self.output == "auto" else self.output
        live = mode == "live" or (mode == "auto" and sys.stdout.isatty())
        self.view = ConsoleView([s.name for s in self.sources]) if live else None
        self.printer = self.view or LinePrinter(as_json=mode == "json", stream=open(os.devnull, "w") if mode == "off" else None)

        self.worker.start()
        for source, reader in zip(self.sources, self.readers):
            source.start()
            reader.start()
        if self.mqtt:
            self.mqtt.start()
        if self.view:
            self.view.start()
        self.metrics_server = None
        if self.metrics:
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
                    if self.mqtt:
                        self.mqtt.publish_source_state(source.name, state)
            if self.metrics:
                self._update_metrics()
            for source, reader in zip(self.sources, self.readers):
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
            # journal (issue 14)
            c, st = self.journal.counts(), self.mqtt.stats
            for name in ("raised", "delivered", "shed", "pending"):
                m.journal_events.labels(name).set(getattr(c, name))
            for name in ("refused", "connect_failures", "connect_refusals", "invalid_topics", "network_restarts"):
                m.mqtt_failures.labels(name).set(getattr(st, name))
        if self.clips:
            m.clip_errors.set(self.clips.errors)

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
            # journal (issue 14): the account across restarts, and the failures seen
            c = self.journal.counts()
            log.info("journal: raised %d = delivered %d + shed %d + pending %d (across restarts); this run: refused %d, "
                     "write failures %d, connect failures %d, refusals %d", c.raised, c.delivered, c.shed, c.pending,
                     st.events_refused, self.journal_sink.failed, st.connect_failures, st.connect_refusals)
            self.journal.close()
        else:
            log.info("events: raised %d", self.raised)
        if self.clips:
            self.clips.close()
        if self.metrics_server:
            self.metrics_server.stop()
        log.info("stopped")

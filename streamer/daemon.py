"""``streamer run``: the daemon around :class:`~streamer.pipeline.Pipeline` — its lifecycle only.

Start order: config (already validated) → model loaded and warmed → sources opened →
MQTT connecting → ready (``READY=1`` to systemd when ``NOTIFY_SOCKET`` is set). SIGTERM or
SIGINT: stop capture, score the windows already taken, close open events (their OFF is
published), publish ``offline``, exit 0. SIGHUP: reload the ``detect`` section only; a bad
file is refused with a log line and the old settings kept.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from dataclasses import fields, replace

from streamer.capture.sources import MicSource, make_source
from streamer.constants import SAMPLE_RATE_HZ
from streamer.detect import hop_to_frames
from streamer.features.fbank import window_samples
from streamer.events import Event
from streamer.inference.engine import InferenceEngine
from streamer.model import load_model
from streamer.model.thresholds import hop_mismatch
from streamer.pipeline import Pipeline
from streamer.settings import Config, ConfigError, load_config
from streamer.sinks.base import Level, SinkHub, SourceStatus
from streamer.sinks.clips import ClipWriter
from streamer.sinks.console import ConsoleView, LinePrinter
from streamer.inference import capacity
from streamer.sinks.history import HistorySink, HistoryStore
from streamer.sinks.journal import EventJournal, JournalSink
from streamer.sinks.web import WebSink
from streamer.sinks.metrics import Metrics, MetricsServer, stalled
from streamer.sinks.mqtt import MqttPublisher

log = logging.getLogger(__name__)

LOOP_INTERVAL_S = 0.25
METRICS_INTERVAL_S = 1.0  # per-stream gauges refreshed this often (thousands of series on a big box)
STOP_TIMEOUT_S = 10.0
HISTORY_LANE_ITEMS = 100_000  # events waiting for the page's history store
JOURNAL_LANE_MIN_ITEMS = 10_000  # events waiting to be journaled (a burst of ONs), at least
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


class Daemon:
    """Lifecycle only: build the pipeline, start it, signals, sd_notify/watchdog, reload, status loop."""

    def __init__(self, config: Config, config_path: Path | None = None, output: str = "auto") -> None:
        self.config = config
        self.config_path = config_path
        self.output = output
        self._stop = threading.Event()  # set by other threads (tests, embedders)
        # what the signal handlers set: a plain flag, never a lock — an Event.set() in a handler that
        # interrupts an Event.set() or wait() on the same thread waits for a lock its own frame holds
        # (a burst of SIGHUPs hung the loop, and SIGTERM with it); the loop reads them every LOOP_INTERVAL_S
        self._stop_signalled = False
        self._reload_signalled = False

    @property
    def raised(self) -> int:
        return self.pipeline.raised

    # -- wiring ---------------------------------------------------------------------------
    def _on_event(self, stream: int, event: Event) -> Event:
        """On the results thread, before the fan-out: the run, the clip (copied out of the ring now), the count."""
        event = replace(event, run=self.run_id)
        if self.clips and event.state == "OFF":
            path = self.clips.save(event, self.pipeline.streams[stream].source.ring)
            if path is not None:
                event = replace(event, clip=str(path))
        if self.metrics:
            self.metrics.events.labels(event.stream, event.target, event.state).inc()
        return event

    def _on_window(self, ref, probabilities, latency_s: float) -> None:
        if self.metrics:
            self.metrics.windows.labels(self.pipeline.streams[ref.stream].name).inc()
            self.metrics.latency.observe(latency_s)
            if ref.wall_time is not None:
                self.metrics.audio_latency.observe(max(0.0, time.time() - ref.wall_time))

    def _build(self) -> None:
        cfg = self.config
        notify("STATUS=loading model")
        loaded = load_model(cfg.model.path)
        self._model_files = _fingerprint(cfg.model.path)  # a later SIGHUP says when the model changed under it
        self._file_config = self._read_file_config()
        self.labels = loaded.labels
        self.thresholds = loaded.thresholds  # chosen by `streamer train`: defaults the config can override
        self.engine = InferenceEngine(loaded, cfg.model.device, cfg.model.precision, cfg.model.max_batch, cfg.model.threads)
        self.sources = [make_source(sc, cfg.ring_seconds) for sc in cfg.sources]
        for source in self.sources:
            if isinstance(source, MicSource):
                source.open_check()
        self.metrics = Metrics() if cfg.metrics else None
        self.clips = ClipWriter(cfg.clips) if cfg.clips else None
        targets = cfg.detect.targets(self.labels, self.thresholds)
        for pattern in cfg.detect.unmatched(self.labels):
            log.warning("detect.include %r matches none of the model's labels (`streamer labels %s` lists them)", pattern, cfg.model.path)
        self.calibrated_targets = cfg.detect.calibrated_targets(targets, self.thresholds)
        # Events go to the journal (on its own sink thread); the MQTT sender delivers
        # from it (what an earlier run left pending first). No MQTT: nothing would ever deliver
        # from a journal, so there is none.
        self.journal = EventJournal(cfg.journal.path, cfg.journal.max_events, cfg.journal.max_age_s) if cfg.mqtt else None
        self.mqtt = MqttPublisher(cfg.mqtt, {s.name: [t.name for t in targets] for s in self.sources},
                                  journal=self.journal) if cfg.mqtt else None
        # the journal's run number (one more each start, kept with the events), else the start time
        self.run_id = self.journal.run if self.journal else int(time.time())
        if self.journal:
            c = self.journal.counts()
            log.info("journal %s: %d event(s) pending from earlier runs (raised %d, delivered %d, shed %d in all)",
                     cfg.journal.path, c.pending, c.raised, c.delivered, c.shed)
        mode = cfg.console.mode if self.output == "auto" else self.output
        live = mode == "live" or (mode == "auto" and sys.stdout.isatty())
        self.view = ConsoleView([s.name for s in self.sources], labels=self.labels) if live else None
        self.hub = SinkHub()
        self.web = None
        if self.view:
            self.hub.add(self.view)
        elif mode != "off":
            self.hub.add(LinePrinter(as_json=mode == "json"))
        self.journal_sink = None
        if self.journal:  # its own lane, as long as the journal: an event is never shed before it is journaled
            self.journal_sink = self.hub.add(JournalSink(self.journal, [self.mqtt.event_journaled]),
                                             queue_items=max(JOURNAL_LANE_MIN_ITEMS, cfg.journal.max_events))
        self.hop = self._choose_hop()
        if cfg.web.enabled:
            self._web_setup()
        self.pipeline = Pipeline(self.engine, self.sources, hop_to_frames(self.hop), targets, self.hub,
                                 max_wait_ms=cfg.model.max_wait_ms, added_delay_s=cfg.model.added_delay_ms / 1000,
                                 on_event=self._on_event, on_window=self._on_window,
                                 on_batch=self.metrics.batch.observe if self.metrics else None,
                                 min_level_dbfs=cfg.detect.min_level_dbfs)

    def run(self) -> int:
        cfg = self.config
        if threading.current_thread() is threading.main_thread():
            # a reload asked for while the model loads is kept for when the loop runs (its default
            # action would kill the daemon); SIGTERM/SIGINT keep theirs until ready: nothing to lose yet
            signal.signal(signal.SIGHUP, self._on_reload_signal)
        self._build()
        # What exists now (the model, the sources, their rings, the config) lives as long as the
        # daemon: moved out of the collector's sight, a full collection no longer walks ~250k
        # objects with the GIL held — a 0.2–0.7 s stall of every stream at 1500 sources
        gc.collect()
        gc.freeze()
        if self.web:
            self.web.start()  # the page, its live feed, /metrics and /healthz: one server (a busy port fails here, first)
        self.hub.start()
        self.pipeline.start()
        if self.mqtt:
            self.mqtt.start()
        if self.view:
            self.view.start()
        self.metrics_server = None
        if self.metrics and not self.web:
            self.metrics_server = MetricsServer(self.metrics, self._healthy, cfg.metrics.host, cfg.metrics.port).start()
        self._install_signals()
        notify("READY=1")
        notify(f"STATUS=listening to {len(self.sources)} source(s)")
        log.info("streamer ready: %d source(s), model %s", len(self.sources), self.engine.loaded.source)
        try:
            self._loop()
        finally:
            self._shutdown()
            if threading.current_thread() is threading.main_thread():
                # stopped cleanly: a SIGTERM still arriving (a storm; systemd's second) must not turn
                # exit 0 into death by signal once the interpreter restores the default handlers
                for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(signum, signal.SIG_IGN)
        return 0

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_reload_signal)

    def _on_stop_signal(self, signum, frame) -> None:
        self._stop_signalled = True

    def _on_reload_signal(self, signum, frame) -> None:
        self._reload_signalled = True  # any number of SIGHUPs before the loop looks: one reload

    def _loop(self) -> None:
        watchdog = int(os.environ.get("WATCHDOG_USEC", "0")) / 1e6
        last_level = last_metrics = 0.0
        source_states: dict[str, str] = {}
        while not self._stop.wait(LOOP_INTERVAL_S) and not self._stop_signalled:
            if self._reload_signalled:
                self._reload_signalled = False
                self._reload_detect()
            now = time.monotonic()
            for source in self.sources:
                state = source.state.value
                if source_states.get(source.name) != state:
                    source_states[source.name] = state
                    self.hub.publish(SourceStatus(source.name, state, source.error))
                    if self.mqtt:
                        self.mqtt.publish_source_state(source.name, state)
            if self.metrics and now - last_metrics >= METRICS_INTERVAL_S:
                last_metrics = now
                self._update_metrics()
            level_due = now - last_level >= self.config.level_interval_s
            for slot in self.pipeline.streams:
                if self.view:
                    self.view.update_stream(slot.name, state=slot.source.state.value, level_dbfs=slot.level_dbfs,
                                            windows=slot.windows, overruns=slot.source.ring.lost,
                                            gated=self.pipeline.gate.gated.get(slot.name, 0))
                if level_due:
                    self.hub.publish(Level(slot.name, slot.level_dbfs, time.time()))
                    if self.mqtt:
                        self.mqtt.publish_level(slot.name, slot.level_dbfs)
            if level_due:
                last_level = now
            if self.view:
                self.view.mqtt_state = "off" if not self.mqtt else ("connected" if self.mqtt.connected else (self.mqtt.last_error or "connecting"))
                self.view.mqtt_queue = self.mqtt.queue_length() if self.mqtt else None
            # the watchdog is fed by progress: a stalled pipeline stops the pings
            if watchdog and (now - self.pipeline.last_progress < watchdog or not self._expecting_windows()):
                notify("WATCHDOG=1")
            if self.pipeline.finished():
                log.info("all sources have ended")
                break

    def _update_metrics(self) -> None:
        m = self.metrics
        m.skipped.set(self.pipeline.worker.stats.skipped)
        for name, count in self.pipeline.gate.gated.items():
            m.gated.labels(name).set(count)
        m.pending.set(self.pipeline.worker.pending())
        for source in self.sources:
            m.lost.labels(source.name).set(source.lost)
            m.overflows.labels(source.name).set(source.stats.overflows)
            m.nonfinite.labels(source.name).set(source.stats.nonfinite)
            m.restarts.labels(source.name).set(source.stats.restarts)
            for state in ("starting", "running", "retrying", "ended", "failed", "stopped"):
                m.source_up.labels(source.name, state).set(1 if source.state.value == state else 0)
        for name, lane in self.hub.stats().items():
            m.sink_shed.labels(name).set(lane["shed"])
            m.sink_queue.labels(name).set(lane["queued"])
            m.sink_busy.labels(name).set(lane["busy_s"])
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
            for name in ("refused", "connect_failures", "connect_refusals", "invalid_topics", "network_restarts", "journal_errors",
                         "sender_restarts"):
                m.mqtt_failures.labels(name).set(getattr(st, name))
            js = self.journal_sink
            for name, value in (("write_errors", js.write_errors), ("waiting", js.unwritten), ("lost", js.failed)):
                m.journal_unwritten.labels(name).set(value)
        if self.clips:
            m.clip_errors.set(self.clips.errors)

    def _healthy(self) -> bool:
        limit = max(STALL_SECONDS, 3 * self.hop + 20)
        return not stalled(self.pipeline.last_progress, self._expecting_windows(), limit)

    def _choose_hop(self) -> float:
        """``hop: auto`` from the engine's measured speed; a hop the box cannot hold gets one warning."""
        cfg, n = self.config, len(self.sources)
        if not cfg.sources:
            return cfg.hop
        spw = self.engine.seconds_per_window(min(n, self.engine.max_batch))
        # a model's thresholds hold at the hop they were chosen at: auto goes no faster than that
        # (where the config leaves some target to them)
        calibrated = self.engine.loaded.thresholds_hop_s if self.calibrated_targets else None
        minimum = max(capacity.AUTO_HOP_MIN_S, calibrated or 0.0)
        hop = capacity.auto_hop(spw, n, self.engine.max_batch, minimum=minimum) if cfg.hop_auto else cfg.hop
        if cfg.hop_auto:
            log.info("hop auto: %.2f s (%d stream(s) × %.3f s per window on %s, 30%% headroom)",
                     hop, n, spw, self.engine.precision)
        if line := capacity.hop_warning(spw, n, hop, self.engine.max_batch, path=self.engine.precision,
                                        model_gflop=self.engine.loaded.config.window_gflop(),
                                        auto_precision=cfg.model.precision == "auto"):
            log.warning(line)
        if line := hop_mismatch(str(cfg.model.path), calibrated, hop):
            log.warning(line)
        if line := capacity.gap_warning(window_samples(self.engine.loaded.features.max_length) / SAMPLE_RATE_HZ, hop):
            log.warning(line)
        return hop

    # -- the web page (its sinks, and the box panel it shows) -------------------------------------
    def _web_setup(self) -> None:
        cfg = self.config
        store = HistoryStore(cfg.web.history, max_age_s=cfg.web.history_days * 86400)
        self.web = WebSink(cfg.web, self.labels, status=self._web_status,
                           metrics=self.metrics.render if self.metrics else None, healthy=self._healthy,
                           clips_dir=cfg.clips.directory if cfg.clips else None, history=store)
        self.hub.add(self.web)
        self.hub.add(HistorySink(store, on_change=self.web.history_changed), queue_items=HISTORY_LANE_ITEMS)

    def _web_status(self) -> dict:
        """The box panel: sources, MQTT, counters, model (read from the web server's thread)."""
        worker = self.pipeline.worker
        sources = [{"name": s.name, "type": s.source.kind, "state": s.source.state.value, "error": s.source.error,
                    "level": round(s.level_dbfs, 1), "windows": s.windows, "lost": s.source.lost,
                    "restarts": s.source.stats.restarts} for s in self.pipeline.streams]
        mqtt = {"state": "off"}
        if self.mqtt:
            mqtt = {"state": "connected" if self.mqtt.connected else (self.mqtt.last_error or "connecting"),
                    "queue": self.mqtt.queue_length(), "dropped": self.mqtt.stats.dropped,
                    "events_delivered": self.mqtt.stats.events_delivered}
        counters = {"events": self.raised, "windows_skipped": worker.stats.skipped, "windows_gated": worker.stats.gated,
                    "lost_samples": sum(s.lost for s in self.sources),
                    "mqtt_dropped": self.mqtt.stats.dropped if self.mqtt else 0,
                    "sink_items_shed": sum(int(v["shed"]) for v in self.hub.stats().values()),
                    "web_frames_dropped": self.web.dropped}
        model = {"path": self.config.model.path, "device": str(self.engine.device), "precision": self.engine.precision,
                 "labels": len(self.labels)}
        return {"sources": sources, "mqtt": mqtt, "counters": counters, "model": model}

    def _expecting_windows(self) -> bool:
        return any(s.state.value == "running" for s in self.sources)

    def _reload_detect(self) -> None:
        try:
            fresh = load_config(self.config_path) if self.config_path else None
            if fresh is None:
                return
            candidate = replace(self.config, detect=fresh.detect)
            targets = candidate.detect.targets(self.labels, self.thresholds)
        except (ConfigError, Exception) as exc:  # keep running on the old settings
            log.error("reload refused, keeping the old detect settings: %s", str(exc).replace("\n", "; "))
            return
        ignored = self._not_reloaded(fresh)
        if ignored:
            log.warning("%s changed since start: SIGHUP reloads the detect section only, so the daemon runs on as before; "
                        "fix: restart it to apply (systemctl restart streamer)", ", ".join(ignored))
        if fresh.detect == self.config.detect:  # nothing to apply: open events go on
            log.info("reload: the detect section of %s is unchanged", self.config_path)
            notify("STATUS=reloaded: detect settings unchanged")
            return
        for pattern in fresh.detect.unmatched(self.labels):
            log.warning("detect.include %r matches none of the model's labels", pattern)
        self.pipeline.reload(targets, candidate.detect.min_level_dbfs)
        self.config = candidate
        if self.mqtt:  # Home Assistant's entities follow the reloaded targets
            self.mqtt.set_targets({s.name: [t.name for t in targets] for s in self.sources})
        log.info("reloaded the detect section from %s", self.config_path)
        notify("STATUS=reloaded detect settings")

    def _read_file_config(self) -> Config | None:
        """The config file as it read at start, without command-line overrides: what a SIGHUP compares against."""
        try:
            return load_config(self.config_path) if self.config_path else None
        except (ConfigError, Exception):  # e.g. a source given only on the command line
            return None

    def _not_reloaded(self, fresh: Config) -> list[str]:
        """What changed since start that a SIGHUP does not apply: config sections, the model's files."""
        changed = []
        if self._file_config is not None:
            changed = [f"{f.name} (in {self.config_path})" for f in fields(Config)
                       if f.name != "detect" and getattr(fresh, f.name) != getattr(self._file_config, f.name)]
        if _fingerprint(self.config.model.path) != self._model_files:
            changed.append(f"the model at {self.config.model.path}")
        return changed

    def _shutdown(self) -> None:
        notify("STOPPING=1")
        self.pipeline.stop(timeout=STOP_TIMEOUT_S)  # open events are closed: their OFFs go to the sinks
        self.hub.close(timeout=STOP_TIMEOUT_S)
        if self.mqtt:
            self.mqtt.stop(timeout=STOP_TIMEOUT_S)
            st = self.mqtt.stats
            log.info("events: raised %d; mqtt delivered %d, dropped %d (queue full), unsent %d (not acknowledged by the stop: kept in the journal for the next start)",
                     self.raised, st.events_delivered, st.events_dropped, st.events_unsent)
            # journal (issue 14): the account across restarts, and the failures seen
            c = self.journal.counts()
            log.info("journal: raised %d = delivered %d + shed %d + pending %d (across restarts); this run: refused %d, "
                     "write failures %d (events lost %d), connect failures %d, refusals %d", c.raised, c.delivered, c.shed,
                     c.pending, st.events_refused, self.journal_sink.write_errors, self.journal_sink.failed, st.connect_failures,
                     st.connect_refusals)
            self.journal.close()
        else:
            log.info("events: raised %d", self.raised)
        shed = {name: lane["shed"] for name, lane in self.hub.stats().items() if lane["shed"]}
        if shed:
            log.warning("sinks that could not keep up shed: %s", ", ".join(f"{k} {v}" for k, v in shed.items()))
        if self.clips:
            self.clips.close()
        if self.metrics_server:
            self.metrics_server.stop()
        log.info("stopped")


def _fingerprint(model: str) -> tuple | None:
    """Names, sizes and modification times of a local model directory's files (None for a hub id)."""
    path = Path(model).expanduser()
    try:
        return tuple(sorted((f.name, st.st_size, st.st_mtime_ns) for f in path.iterdir() if f.is_file() and (st := f.stat())))
    except OSError:  # not a directory (a hub id), or gone
        return None if not path.exists() else ("unreadable",)

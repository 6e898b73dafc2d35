"""Prometheus metrics and a health endpoint, served from one small HTTP server.

``/metrics`` is the Prometheus text format (prometheus-client); ``/healthz`` answers 200
while the pipeline makes progress (or has nothing to do) and 503 when it has stalled, for
load balancers and container health checks.
"""

from __future__ import annotations

import http.server
import logging
import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# window complete (its last sample captured) → its scores delivered: what a user waits for
AUDIO_LATENCY_BUCKETS_S = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Every number the daemon exposes; one registry per daemon (tests run several)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.windows = Counter("streamer_windows_total", "Windows scored", ["stream"], registry=r)
        self.skipped = Gauge("streamer_windows_skipped", "Windows replaced by a newer one before inference (all streams)", registry=r)
        self.latency = Histogram("streamer_inference_latency_seconds", "Window submitted → probabilities", buckets=LATENCY_BUCKETS_S, registry=r)
        self.audio_latency = Histogram("streamer_window_latency_seconds", "Window's last sample captured → its scores delivered",
                                       buckets=AUDIO_LATENCY_BUCKETS_S, registry=r)
        self.batch = Histogram("streamer_batch_size", "Windows per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.gated = Gauge("streamer_windows_gated", "Windows not scored: quieter than detect.min_level_dbfs", ["stream"], registry=r)
        self.pending = Gauge("streamer_worker_pending_windows", "Windows waiting for the inference worker", registry=r)
        self.lost = Gauge("streamer_lost_samples", "Samples lost to ring overruns", ["stream"], registry=r)
        self.overflows = Gauge("streamer_input_overflows", "PortAudio input overflows", ["stream"], registry=r)
        self.nonfinite = Gauge("streamer_nonfinite_samples", "NaN/inf samples replaced by zero", ["stream"], registry=r)
        self.restarts = Gauge("streamer_source_restarts", "Times a source was reopened", ["stream"], registry=r)
        self.source_up = Gauge("streamer_source_up", "1 while the source delivers audio", ["stream", "state"], registry=r)
        self.events = Counter("streamer_events_total", "ON/OFF events", ["stream", "target", "state"], registry=r)
        self.mqtt_queue = Gauge("streamer_mqtt_queue_length", "Messages waiting for the broker", registry=r)
        self.mqtt_dropped = Gauge("streamer_mqtt_dropped", "Messages dropped from a full MQTT queue", registry=r)
        self.mqtt_events_delivered = Gauge("streamer_mqtt_events_delivered", "Event messages acknowledged by the broker", registry=r)
        self.mqtt_events_dropped = Gauge("streamer_mqtt_events_dropped", "Event messages dropped from a full MQTT queue", registry=r)
        self.mqtt_connected = Gauge("streamer_mqtt_connected", "1 while connected to the broker", registry=r)
        self.journal_events = Gauge("streamer_journal_events", "Event journal totals across restarts: raised = delivered + shed + pending",
                                    ["count"], registry=r)
        self.mqtt_failures = Gauge("streamer_mqtt_failures", "MQTT failures this run, by kind (refused publishes, connect failures…)",
                                   ["kind"], registry=r)
        self.journal_unwritten = Gauge("streamer_journal_unwritten", "Journal writes this run, by outcome: write_errors (failed "
                                       "tries), waiting (events held in memory until it can be written), lost", ["kind"], registry=r)
        self.clip_errors = Gauge("streamer_clip_errors", "Clips that could not be written", registry=r)
        self.sink_shed = Gauge("streamer_sink_shed", "Items a sink's full queue shed (it could not keep up)", ["sink"], registry=r)
        self.sink_queue = Gauge("streamer_sink_queue_length", "Items waiting for a sink", ["sink"], registry=r)
        self.sink_busy = Gauge("streamer_sink_busy_seconds", "How long the sink has been on its current item (a stuck sink grows)", ["sink"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# this server's own limits (http.server has none: a thread per connection, held as long as the
# client likes): a client on the LAN that opens connections and sends nothing would otherwise
# hold a thread each, without end
METRICS_MAX_CONNECTIONS = 16  # at once; more are closed at once and counted
METRICS_IDLE_S = 10.0  # a connection silent this long is closed (a scrape takes milliseconds)


class _BoundedServer(http.server.ThreadingHTTPServer):
    """A thread per connection, at most ``METRICS_MAX_CONNECTIONS`` of them."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type) -> None:
        self._slots = threading.BoundedSemaphore(METRICS_MAX_CONNECTIONS)
        self.refused = 0
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class MetricsServer:
    """``/metrics`` and ``/healthz`` on ``host:port`` (a daemon thread, and one per open connection, bounded)."""

    def __init__(self, metrics: Metrics, healthy: Callable[[], bool], host: str = "127.0.0.1", port: int = 9464) -> None:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = METRICS_IDLE_S

            def do_GET(self):  # noqa: N802 - the http.server API
                if self.path.startswith("/metrics"):
                    body, status, kind = outer.metrics.render(), 200, CONTENT_TYPE_LATEST
                elif self.path.startswith("/healthz"):
                    ok = outer.healthy()
                    body, status, kind = (b"ok\n" if ok else b"stalled\n"), (200 if ok else 503), "text/plain"
                else:
                    body, status, kind = b"not found\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.metrics, self.healthy = metrics, healthy
        try:
            self.server = _BoundedServer((host, port), Handler)
        except OSError as exc:
            from streamer.errors import StreamerError

            raise StreamerError(f"metrics: cannot listen on {host}:{port} ({exc.strerror}); change metrics.port") from None
        Gauge("streamer_metrics_refused_connections", "Connections to this server closed at once, the most allowed being open",
              registry=metrics.registry).set_function(lambda: self.server.refused)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", *self.server.server_address[:2])
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def stalled(last_progress: float, expecting: bool, limit_s: float) -> bool:
    return expecting and time.monotonic() - last_progress > limit_s

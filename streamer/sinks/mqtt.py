"""Publishing events to MQTT (paho-mqtt 2.x), with Home Assistant discovery.

Topics under ``prefix`` (default ``streamer``):

- ``{prefix}/status``: retained ``online``; the last will publishes a retained ``offline``
  (a clean stop publishes it too). With an ``instance`` name, ``{prefix}/{instance}/status``.
- ``{prefix}/{stream}/{target}/state``: retained ``ON`` / ``OFF``.
- ``{prefix}/{stream}/events``: one JSON object per ON and per OFF, QoS 1, not retained
  (with a message expiry on MQTT 5).
- ``{prefix}/{stream}/level``: the stream's level in dBFS, now and then (QoS 0, only while
  connected: a level is not worth queueing).

Nothing here blocks the pipeline. Events are delivered from the durable event journal
(:mod:`streamer.sinks.journal`): one sender thread reads the pending rows in order, keeps a
window of up to ``INFLIGHT_WINDOW`` QoS 1 publishes in flight, and marks a row delivered
only when its PUBACK arrives (an ``on_publish`` callback wakes the sender: no sleeping per
message). On MQTT 5 a PUBACK whose reason code is a failure (e.g. 135, not authorized) is a
refusal: never counted delivered, counted, logged once per change, retried later. A crash,
a SIGKILL or a power cut loses nothing: the next start delivers what is still pending.
Without a journal of its own the publisher keeps one in memory (tests, tools).

Everything else (states, availability, discovery, the greeting sent after each connect) goes
through a bounded in-memory queue: ``queue_size`` is a real bound, greetings included (a
fresh greeting replaces the unsent one); when it is full the oldest message is dropped and
counted. Levels are not queued: only the newest per stream is sent, only while connected.

Every failure is seen: connection refusals, unreachable brokers, refused publishes, invalid
topics and a dead network thread are each logged once per change of state and counted in
:class:`MqttStats`. paho reconnects with backoff; its network thread is restarted if it dies.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from streamer import __version__
from streamer.events import Event, slug
from streamer.sinks.journal import MEMORY, EventJournal, JournalRow

log = logging.getLogger(__name__)

DROP_LOG_INTERVAL_S = 10.0
QOS_EVENTS = 1
QOS_LEVEL = 0
INFLIGHT_WINDOW = 64  # QoS 1 publishes awaiting their PUBACK at once (paho's own limit is set to match)
JOURNAL_READ_ROWS = 256  # pending rows fetched from the journal per read
SETTLE_BATCH = INFLIGHT_WINDOW // 4  # acknowledgements marked in the journal together (one transaction)
HEALTH_CHECK_S = 1.0  # how often an idle sender looks at paho's network thread and the journal's age bound
NETWORK_RESTART_S = 5.0  # at most one restart of a dead network thread this often
REFUSED_RETRY_S = 60.0  # events the broker refused are offered again after this long
MQTT_REFUSAL = 0x80  # reason codes from here up are failures (MQTT 5, 2.4)


@dataclass(frozen=True)
class TlsSettings:
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    keyfile_password: str | None = field(default=None, repr=False)
    insecure: bool = False  # skip the host name check (self-signed test brokers)


@dataclass(frozen=True)
class MqttSettings:
    host: str = "localhost"
    port: int = 1883
    prefix: str = "streamer"
    instance: str | None = None
    client_id: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    keepalive: int = 30
    protocol: str = "3.1.1"  # or "5"
    tls: TlsSettings | None = None
    queue_size: int = 10_000
    homeassistant: bool = True
    discovery_prefix: str = "homeassistant"
    event_expiry_s: int = 3600
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0

    @property
    def status_topic(self) -> str:
        return f"{self.prefix}/{self.instance}/status" if self.instance else f"{self.prefix}/status"

    @property
    def node_id(self) -> str:
        return slug(f"streamer_{self.instance}") if self.instance else "streamer"


@dataclass(frozen=True)
class Message:
    topic: str
    payload: str
    qos: int = QOS_EVENTS
    retain: bool = False
    expiry_s: int | None = None
    is_event: bool = False  # an ON/OFF event message, counted on its own so events can be accounted for
    greeting: bool = False  # sent after a (re)connect; a fresh greeting replaces one still unsent


@dataclass
class MqttStats:
    """This run's counts. Non-event messages: ``queued`` = ``delivered + dropped + superseded
    + refused`` + still queued or in flight. Events: what the journal says is pending stays
    there for the next start (``events_unsent`` at exit); the journal's own counters are the
    account across restarts."""

    queued: int = 0  # non-event messages put on the queue
    delivered: int = 0  # messages of every kind acknowledged by the broker
    dropped: int = 0  # non-event messages dropped from a full queue (or never acknowledged at stop)
    superseded: int = 0  # unsent greeting messages replaced by a fresh greeting
    connects: int = 0
    connect_failures: int = 0  # the broker could not be reached
    connect_refusals: int = 0  # the broker answered CONNACK with a failure (bad credentials, bad client id…)
    disconnects: int = 0
    refused: int = 0  # publishes the broker answered with a failure reason code (MQTT 5)
    invalid_topics: int = 0  # publishes paho refused to send (topic not valid)
    network_restarts: int = 0  # paho's network thread died and was started again
    events_queued: int = 0  # events handed to this publisher (journaled) this run
    events_delivered: int = 0
    events_refused: int = 0
    events_dropped: int = 0  # events shed by the journal's bounds this run
    events_unsent: int = 0  # journal rows still pending at stop (delivered by the next start)


class _RetryNoise(logging.Filter):
    """paho logs "Client is not connected" at ERROR on every retry; our own line, once per
    change of the connection's state, says it instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("Client is not connected")


@dataclass
class _Flight:
    """One publish awaiting its PUBACK: a journal row (``seq``) or a queued message."""

    message: Message
    seq: int | None = None


class MqttPublisher:
    """Events, states, levels and discovery to one broker, through a bounded queue."""

    def __init__(self, settings: MqttSettings, targets: dict[str, list[str]], journal: EventJournal | None = None) -> None:
        self.settings = settings
        self.targets = targets  # stream → target names
        self.stats = MqttStats()
        self.connected = False
        self.last_error: str | None = None
        # events come from the journal; without one, an in-memory journal bounded by queue_size
        self._own_journal = journal is None
        self.journal = journal if journal is not None else EventJournal(MEMORY, max_events=settings.queue_size)
        self._queue: deque[Message] = deque()  # non-event messages, at most queue_size
        self._levels: dict[str, str] = {}  # stream → newest level payload not yet sent
        self._cond = threading.Condition()
        self._states: dict[tuple[str, str], str] = {(s, t): "OFF" for s, names in targets.items() for t in names}
        self._stopping = False
        self._last_drop_log = 0.0
        self._dropped_since_log = 0
        self._inflight: dict[int, _Flight] = {}  # mid → publish awaiting its PUBACK
        self._acks: dict[int, Any] = {}  # mid → PUBACK reason code, filled by on_publish
        self._busy: set[int] = set()  # journal seqs in flight or acknowledged but not yet marked
        self._rows: deque[JournalRow] = deque()  # pending rows read ahead, in order
        self._cursor = 0  # the last journal seq handed to paho (or skipped)
        self._journal_dirty = True  # the journal may hold rows past the cursor
        self._refusing = False
        self._retry_refused_at: float | None = None
        self._conn_state: str | None = None  # the last connection state logged
        self._bad_topics: set[str] = set()
        self._network_dead = False
        self._network_thread: threading.Thread | None = None
        self._last_network_restart = -1e9
        self._last_expire = time.monotonic()
        self._shed_base = self.journal.counts().shed  # events_dropped: what the journal sheds from now on
        self._client = self._make_client()
        self._sender = threading.Thread(target=self._send_loop, name="mqtt-sender", daemon=True)

    # -- topics and payloads -------------------------------------------------------------
    def state_topic(self, stream: str, target: str) -> str:
        return f"{self.settings.prefix}/{slug(stream)}/{slug(target)}/state"

    def events_topic(self, stream: str) -> str:
        return f"{self.settings.prefix}/{slug(stream)}/events"

    def level_topic(self, stream: str) -> str:
        return f"{self.settings.prefix}/{slug(stream)}/level"

    def _device(self, stream: str) -> dict[str, Any]:
        node = self.settings.node_id
        return {
            "identifiers": [f"{node}_{slug(stream)}"],
            "name": f"{self.settings.instance + ' ' if self.settings.instance else ''}{stream} sounds",
            "manufacturer": "streamer",
            "model": "AST audio event detector",
            "sw_version": __version__,
        }

    def _availability(self) -> dict[str, str]:
        return {"availability_topic": self.settings.status_topic, "payload_available": "online", "payload_not_available": "offline"}

    def discovery(self) -> dict[str, dict[str, Any]]:
        """Home Assistant discovery configs: topic → payload, for every stream × target and level."""
        s, node = self.settings, self.settings.node_id
        configs: dict[str, dict[str, Any]] = {}
        for stream, names in self.targets.items():
            for target in names:
                object_id = f"{slug(stream)}_{slug(target)}"
                configs[f"{s.discovery_prefix}/binary_sensor/{node}/{object_id}/config"] = {
                    "name": target,
                    "unique_id": f"{node}_{object_id}",
                    "state_topic": self.state_topic(stream, target),
                    "payload_on": "ON",
                    "payload_off": "OFF",
                    "device_class": "sound",
                    "qos": QOS_EVENTS,
                    **self._availability(),
                    "device": self._device(stream),
                }
            configs[f"{s.discovery_prefix}/sensor/{node}/{slug(stream)}_level/config"] = {
                "name": "Sound level",
                "unique_id": f"{node}_{slug(stream)}_level",
                "state_topic": self.level_topic(stream),
                "device_class": "sound_pressure",
                "unit_of_measurement": "dB",
                "state_class": "measurement",
                **self._availability(),
                "device": self._device(stream),
            }
        return configs

    # -- client --------------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        s = self.settings
        protocol = mqtt.MQTTv5 if s.protocol == "5" else mqtt.MQTTv311
        client_id = s.client_id or f"{s.node_id}-{int(time.time())}"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        paho_log = logging.getLogger("streamer.sinks.paho")
        if not any(isinstance(f, _RetryNoise) for f in paho_log.filters):
            paho_log.addFilter(_RetryNoise())
        client.enable_logger(paho_log)
        client.suppress_exceptions = True  # a callback's exception is logged by paho, not fatal to its thread
        client.max_inflight_messages_set(INFLIGHT_WINDOW)
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.tls is not None:
            client.tls_set(ca_certs=s.tls.ca_certs, certfile=s.tls.certfile, keyfile=s.tls.keyfile,
                           keyfile_password=s.tls.keyfile_password)
            client.tls_insecure_set(s.tls.insecure)
        client.will_set(s.status_topic, "offline", qos=QOS_EVENTS, retain=True)
        client.reconnect_delay_set(min_delay=max(1, int(s.reconnect_min_s)), max_delay=max(1, int(s.reconnect_max_s)))
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def start(self) -> "MqttPublisher":
        s = self.settings
        try:
            self._client.connect_async(s.host, s.port, keepalive=s.keepalive)
        except (OSError, ValueError) as exc:
            self._connection_state(f"cannot connect to {s.host}:{s.port} ({exc})", logging.WARNING, "will keep trying")
        self._client.loop_start()
        self._network_thread = getattr(self._client, "_thread", None)  # paho forgets it when it dies
        self._sender.start()
        return self

    def _connection_state(self, error: str | None, level: int = logging.WARNING, hint: str = "") -> None:
        """Record the connection's state; log it only when it changes (not once per retry)."""
        self.last_error = error
        state = error or "connected"
        if state != self._conn_state:
            self._conn_state = state
            if error is None:
                log.info("mqtt: connected to %s:%d", self.settings.host, self.settings.port)
            else:
                log.log(level, "mqtt: %s%s", error, f"; {hint}" if hint else "")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.stats.connect_refusals += 1
            self._connection_state(f"broker {self.settings.host}:{self.settings.port} refused the connection: {reason_code}",
                                   logging.ERROR, "check mqtt.username / mqtt.password / mqtt.client_id; retrying")
            return
        self.stats.connects += 1
        self._connection_state(None)
        if self.settings.homeassistant:
            client.subscribe(f"{self.settings.discovery_prefix}/status", qos=1)
            client.subscribe(f"{self.settings.discovery_prefix}/+/{self.settings.node_id}/+/config", qos=1)
        # after every (re)connect: status, then discovery, then the current states
        greeting = [Message(self.settings.status_topic, "online", retain=True)]
        if self.settings.homeassistant:
            greeting += [Message(t, json.dumps(p), retain=True) for t, p in self.discovery().items()]
        greeting += [Message(self.state_topic(s, t), v, retain=True) for (s, t), v in self._states.items()]
        with self._cond:
            self.connected = True
            self._greet(greeting)
            self._rewind()  # offer every pending event not in flight (refused ones included)
            self._cond.notify_all()

    def _on_connect_fail(self, client, userdata) -> None:
        self.stats.connect_failures += 1
        self._connection_state(f"cannot reach broker {self.settings.host}:{self.settings.port}", logging.WARNING,
                               "retrying with backoff")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            was = self.connected
            self.connected = False
            self._cond.notify_all()
        if was:
            self.stats.disconnects += 1
            if not self._stopping:
                self._connection_state(f"disconnected from {self.settings.host}:{self.settings.port} ({reason_code})",
                                       logging.WARNING, "reconnecting")

    def _on_message(self, client, userdata, message) -> None:
        topic, payload = message.topic, message.payload.decode("utf-8", "replace")
        if topic == f"{self.settings.discovery_prefix}/status" and payload == "online":
            log.info("mqtt: Home Assistant restarted; announcing again")
            for t, p in self.discovery().items():
                self._enqueue(Message(t, json.dumps(p), retain=True))
        elif topic.endswith("/config") and payload and topic not in self.discovery():
            log.info("mqtt: removing stale discovery config %s", topic)
            self._enqueue(Message(topic, "", retain=True))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        """paho's network thread: a PUBACK (or a QoS 0 send) for ``mid``; the sender settles it."""
        with self._cond:
            self._acks[mid] = reason_code
            self._cond.notify_all()

    # -- publishing ----------------------------------------------------------------------
    def publish_event(self, event: Event) -> None:
        """Journal an event (ON or OFF) and queue the target's new retained state.

        With a journal shared with a :class:`~streamer.sinks.journal.JournalSink`, the sink
        appends and calls :meth:`event_journaled` instead; do not call both.
        """
        seq = self.journal.append(event)
        self.event_journaled(event, seq)

    def event_journaled(self, event: Event, seq: int) -> None:
        """An event is in the journal (a JournalSink listener): update its state, wake the sender."""
        self._states[(event.stream, event.target)] = event.state
        self.stats.events_queued += 1
        self.stats.events_dropped = self.journal.counts().shed - self._shed_base
        with self._cond:
            self._journal_dirty = True
            self._cond.notify_all()
        self._enqueue(Message(self.state_topic(event.stream, event.target), event.state, retain=True))

    def publish_source_state(self, stream: str, state: str) -> None:
        """Retained ``{prefix}/{stream}/availability``: ``online`` while the source delivers audio."""
        self._enqueue(Message(f"{self.settings.prefix}/{slug(stream)}/availability",
                              "online" if state == "running" else "offline", retain=True))

    def publish_level(self, stream: str, dbfs: float) -> None:
        """The newest level per stream, sent by the sender while connected (never queued up)."""
        if self.connected:
            with self._cond:
                self._levels[stream] = f"{dbfs:.1f}"
                self._cond.notify_all()

    def _enqueue(self, message: Message) -> None:
        with self._cond:
            self._queue.append(message)
            self.stats.queued += 1
            self._trim()
            self._cond.notify_all()

    def _greet(self, messages: list[Message]) -> None:
        """Put the (re)connect greeting first; it replaces a greeting still unsent. Lock held."""
        stale = sum(m.greeting for m in self._queue)
        if stale:
            self._queue = deque(m for m in self._queue if not m.greeting)
            self.stats.superseded += stale
        self._queue.extendleft(reversed([replace(m, greeting=True) for m in messages]))
        self.stats.queued += len(messages)
        self._trim()

    def _trim(self) -> None:
        """Hold the queue to ``queue_size``: drop the oldest non-greeting messages first. Lock held."""
        while len(self._queue) > self.settings.queue_size:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        index = next((i for i, m in enumerate(self._queue) if not m.greeting), len(self._queue) - 1)
        dropped = self._queue[index]
        del self._queue[index]
        self.stats.dropped += 1
        self._dropped_since_log += 1
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_INTERVAL_S:
            log.warning("mqtt: queue full (%d): dropped %d oldest message(s), e.g. %s", self.settings.queue_size,
                        self._dropped_since_log, dropped.topic)
            self._last_drop_log, self._dropped_since_log = now, 0

    def queue_length(self) -> int:
        """Messages not yet acknowledged: queued, in flight, and events pending in the journal."""
        return len(self._queue) + sum(f.seq is None for f in list(self._inflight.values())) + self.journal.pending_count()

    def control_queue_length(self) -> int:
        """Non-event messages waiting to be sent: never more than ``queue_size``."""
        return len(self._queue)

    def inflight(self) -> int:
        return len(self._inflight)

    # -- the sender ----------------------------------------------------------------------
    def _rewind(self) -> None:
        """Read the journal from its start again (skipping rows in flight). Lock held."""
        self._cursor = 0
        self._rows.clear()
        self._journal_dirty = True
        self._retry_refused_at = None

    def _idle(self) -> bool:
        """Nothing left that could be sent now. Lock held."""
        return not self._queue and not self._inflight and not self._rows and not self._journal_dirty and not self._acks

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                busy = self.connected and len(self._inflight) < INFLIGHT_WINDOW and (
                    self._queue or self._levels or self._rows or self._journal_dirty)
                settle = len(self._acks) >= SETTLE_BATCH or (self._acks and not busy)
            if settle:  # in batches while sending, at once when there is nothing else to do
                self._settle()
            item: Message | JournalRow | None = None
            with self._cond:
                if self._stopping:
                    return
                room = self.connected and len(self._inflight) < INFLIGHT_WINDOW
                if room and self._levels:
                    stream, payload = self._levels.popitem()
                    item = Message(self.level_topic(stream), payload, qos=QOS_LEVEL)
                elif room and self._queue:
                    item = self._queue.popleft()
                elif room and (self._rows or self._journal_dirty):
                    item = None  # read the journal below, outside the lock
                elif not self._acks:
                    if self._retry_refused_at is not None and time.monotonic() >= self._retry_refused_at:
                        self._rewind()
                        continue
                    self._cond.wait(HEALTH_CHECK_S)
                    self._housekeeping()
                    continue
                else:
                    continue  # acknowledgements to settle first
            if item is None:
                item = self._next_row()
                if item is None:
                    continue
            self._publish(item)

    def _next_row(self) -> JournalRow | None:
        with self._cond:
            if not self._rows:
                self._journal_dirty = False  # an append from now on sets it again
                after = self._cursor
            else:
                after = None
        if after is not None:
            rows = self.journal.pending(after=after, limit=JOURNAL_READ_ROWS)
            with self._cond:
                if self._cursor == after:  # not rewound meanwhile
                    self._rows.extend(rows)
                    if rows:
                        self._cursor = rows[-1].seq
                    if len(rows) == JOURNAL_READ_ROWS:
                        self._journal_dirty = True  # there may be more
        with self._cond:
            while self._rows:
                row = self._rows.popleft()
                if row.seq not in self._busy:
                    self._busy.add(row.seq)
                    return row
        return None

    def _publish(self, item: Message | JournalRow) -> None:
        if isinstance(item, JournalRow):
            expiry = self.settings.event_expiry_s if self.settings.protocol == "5" else None
            message, seq = Message(self.events_topic(item.stream), item.payload, expiry_s=expiry, is_event=True), item.seq
        else:
            message, seq = item, None
        properties = None
        if message.expiry_s and self.settings.protocol == "5":
            properties = Properties(PacketTypes.PUBLISH)
            properties.MessageExpiryInterval = message.expiry_s
        try:
            info = self._client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain,
                                        properties=properties)
        except (ValueError, TypeError) as exc:  # a topic or payload paho will not send: it never will
            self._invalid(message, seq, str(exc))
            return
        with self._cond:
            if message.qos == 0:
                self._acks.pop(info.mid, None)
                if info.rc == mqtt.MQTT_ERR_SUCCESS:
                    self.stats.delivered += 1
                return
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: paho keeps it for the reconnect
                self._busy.discard(seq)
                if seq is None:
                    self._queue.appendleft(message)
                else:
                    self._rewind()
                log.warning("mqtt: paho would not take a publish (%s); trying again", mqtt.error_string(info.rc))
                self._cond.wait(HEALTH_CHECK_S)
                return
            self._inflight[info.mid] = _Flight(message, seq)

    def _invalid(self, message: Message, seq: int | None, reason: str) -> None:
        self.stats.invalid_topics += 1
        if message.topic not in self._bad_topics:
            self._bad_topics.add(message.topic)
            log.error("mqtt: cannot publish to %r (%s); dropped", message.topic[:200], reason)
        if seq is None:
            self.stats.dropped += 1
        else:
            self.journal.mark_shed(seq, f"invalid topic {message.topic[:200]!r}")
            self.stats.events_dropped = self.journal.counts().shed - self._shed_base
            with self._cond:
                self._busy.discard(seq)

    def _settle(self) -> None:
        """Account for every acknowledged publish: mark events delivered (one transaction)."""
        delivered: list[int] = []
        with self._cond:
            if not self._acks:
                return
            for mid in [m for m in self._acks if m in self._inflight]:
                flight, reason = self._inflight.pop(mid), self._acks.pop(mid)
                value = getattr(reason, "value", 0)
                if value >= MQTT_REFUSAL:
                    self._refused(flight, reason)
                    continue
                self.stats.delivered += 1
                if flight.seq is not None:
                    delivered.append(flight.seq)
            self._acks = {m: r for m, r in self._acks.items() if m in self._inflight}  # stray ones (a resent QoS 0)
            if delivered and self._refusing:
                self._refusing = False
                log.info("mqtt: the broker accepts publishes again")
        if delivered:
            self.journal.mark_delivered(delivered)
            with self._cond:
                self.stats.events_delivered += len(delivered)
                self._busy.difference_update(delivered)
                self._cond.notify_all()

    def _refused(self, flight: _Flight, reason: Any) -> None:
        """A PUBACK with a failure reason: never delivered; the event stays pending. Lock held."""
        self.stats.refused += 1
        if flight.seq is not None:
            self.stats.events_refused += 1
            self._busy.discard(flight.seq)
            if self._retry_refused_at is None:
                self._retry_refused_at = time.monotonic() + REFUSED_RETRY_S
        else:
            self.stats.dropped += 1
        if not self._refusing:
            self._refusing = True
            log.error("mqtt: the broker refused a publish to %s (%s); refused events stay in the journal and are "
                      "offered again every %.0f s", flight.message.topic, reason, REFUSED_RETRY_S)

    def _housekeeping(self) -> None:
        """While idle: restart a dead network thread, apply the journal's age bound. Lock held."""
        thread = self._network_thread
        now = time.monotonic()
        if not self._stopping and thread is not None and not thread.is_alive():
            if not self._network_dead:
                self._network_dead = True
                self.last_error = "the MQTT network thread died"
                log.error("mqtt: the network thread died (see the paho log line before this); restarting it")
            if now - self._last_network_restart >= NETWORK_RESTART_S:
                self._last_network_restart = now
                self.stats.network_restarts += 1
                self._client.loop_stop()
                self._client.loop_start()
                self._network_thread = getattr(self._client, "_thread", None)
        elif self._network_dead and thread is not None and thread.is_alive() and self.connected:
            self._network_dead = False
            log.info("mqtt: the network thread runs again")
        if now - self._last_expire >= HEALTH_CHECK_S * 60:
            self._last_expire = now
            if self.journal.expire():
                self.stats.events_dropped = self.journal.counts().shed - self._shed_base

    def stop(self, timeout: float = 5.0) -> None:
        """Deliver what is pending (up to ``timeout``), publish ``offline``, disconnect.

        Events not acknowledged by then stay in the journal for the next start."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.connected and not self._idle() and time.monotonic() < deadline:
                self._cond.wait(min(HEALTH_CHECK_S, max(0.0, deadline - time.monotonic())))
            self._stopping = True
            self._cond.notify_all()
        self._sender.join(max(0.1, deadline - time.monotonic()))
        self._settle()
        if self.connected:
            info = self._client.publish(self.settings.status_topic, "offline", qos=QOS_EVENTS, retain=True)
            try:
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                pass
        self._client.disconnect()
        self._client.loop_stop()
        with self._cond:
            lost = len(self._queue) + sum(f.seq is None for f in self._inflight.values())
            self.stats.dropped += lost
        self.stats.events_unsent = self.journal.pending_count()
        if lost or self.stats.events_unsent:
            where = "lost with this in-memory journal" if self._own_journal else "kept in the journal for the next start"
            log.warning("mqtt: at exit %d message(s) were unsent and %d event(s) pending (%s)", lost,
                        self.stats.events_unsent, where)

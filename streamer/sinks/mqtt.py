"""Publishing events to MQTT (paho-mqtt 2.x), with Home Assistant discovery.

Every topic is under ``{prefix}/{instance}/`` (``prefix`` default ``streamer``), so
several boxes share one broker without touching each other's topics. ``instance`` is
``mqtt.instance`` or, unset, this host's name (see :func:`streamer.names.host_instance`);
stream and target names become ids with :func:`streamer.names.ident` (injective):

- ``{base}/status``: retained ``online``; the last will publishes a retained ``offline``
  (a clean stop publishes it too).
- ``{base}/{stream}/{target}/state``: retained ``ON`` / ``OFF``.
- ``{base}/{stream}/events``: one JSON object per ON and per OFF, QoS 1, not retained
  (with a message expiry on MQTT 5).
- ``{base}/{stream}/ha_event``: with Home Assistant on, one ``{"event_type": target, ...}``
  per ON, for HA's event entity.
- ``{base}/{stream}/level``: the stream's level in dBFS, now and then (QoS 0, only while
  connected: a level is not worth queueing).
- ``{base}/{stream}/availability``: retained ``online`` while the source delivers audio
  (``offline`` from a clean stop on).

Home Assistant discovery (:mod:`streamer.sinks.homeassistant`): one device per stream,
following the config — :meth:`MqttPublisher.set_targets` on a reload announces added
targets, removes taken-out ones and clears their retained state; at a start, the targets a
configured stream's retained device still holds from an earlier config are removed the same way. Everything is announced
again once per Home Assistant birth message (a burst of births is debounced).

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
import os
import sqlite3
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from functools import cached_property

from streamer.errors import StreamerError
from streamer.events import Event
from streamer.names import host_instance, ident, machine_id
from streamer.sinks import homeassistant as ha
from streamer.sinks.journal import MEMORY, EventJournal, JournalRow

log = logging.getLogger(__name__)

DROP_LOG_INTERVAL_S = 10.0
QOS_EVENTS = 1
QOS_LEVEL = 0
BIRTH_DEBOUNCE_S = 2.0  # Home Assistant births within this long of the first: one announcement
INFLIGHT_WINDOW = 64  # QoS 1 publishes awaiting their PUBACK at once (paho's own limit is set to match)
JOURNAL_READ_ROWS = 256  # pending rows fetched from the journal per read
SETTLE_BATCH = INFLIGHT_WINDOW // 4  # acknowledgements marked in the journal together (one transaction)
HEALTH_CHECK_S = 1.0  # how often an idle sender looks at paho's network thread and the journal's age bound
NETWORK_RESTART_S = 5.0  # at most one restart of a dead network thread this often
SENDER_RESTART_S = 1.0  # the sender goes on this long after an error it did not expect
REFUSED_RETRY_S = 60.0  # events the broker refused are offered again after this long
MQTT_REFUSAL = 0x80  # reason codes from here up are failures (MQTT 5, 2.4)
# discovery configs of this instance's streams no longer configured, removed per run at most:
# another client can leave any number of retained configs under our device prefix
MAX_DEVICE_CLEANUPS = 1024
# a connection the broker accepted but ended within this long counts as a flap: paho starts its
# backoff over at every CONNACK, so a broker that accepts and drops at once was retried every
# reconnect_min_s for ever; each flap doubles the next delay instead (up to reconnect_max_s)
STABLE_CONNECTION_S = 10.0


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

    @cached_property
    def instance_id(self) -> str:
        """``mqtt.instance`` as an id, or this host's name: stable across restarts, one per host."""
        return ident(self.instance) if self.instance else host_instance()

    @property
    def instance_label(self) -> str:
        return self.instance or self.instance_id

    @property
    def topics(self) -> ha.Topics:
        return ha.Topics(self.prefix, self.instance_id, self.discovery_prefix)

    @property
    def status_topic(self) -> str:
        return self.topics.status

    @property
    def node_id(self) -> str:
        return f"streamer-{self.instance_id}"


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
    journal_errors: int = 0  # acknowledged events the journal could not mark delivered (a full disk): marked later
    sender_restarts: int = 0  # the sender thread met an error it did not expect and was started again


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


class _DeadThread:
    """Stands for a network thread that ended before it could be looked at."""

    @staticmethod
    def is_alive() -> bool:
        return False


_DEAD_THREAD = _DeadThread()


class MqttPublisher:
    """Events, states, levels and discovery to one broker, through a bounded queue."""

    def __init__(self, settings: MqttSettings, targets: dict[str, list[str]], journal: EventJournal | None = None) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.targets = {stream: list(names) for stream, names in targets.items()}  # stream → target names
        self.announcements = 0  # full discovery announcements made (connects and HA births)
        self._topology = threading.Lock()  # guards targets and states against the paho thread
        self._birth_timer: threading.Timer | None = None
        self._machine_id = machine_id()
        self._owner = f"{self._machine_id} {uuid.uuid4().hex[:8]}"  # this host, this run
        self._peer_online = False  # the retained status said "online" before we announced ourselves
        self._conflict = False  # another live daemon uses this instance: remove nothing we do not know
        self._legacy_cleared: set[str] = set()
        self._devices_cleared: set[str] = set()  # foreign-looking device configs already removed this run
        self._cleanups_capped = False  # MAX_DEVICE_CLEANUPS reached (said once)
        self._connected_at = 0.0
        self._flaps = 0  # accepted connections in a row that ended within STABLE_CONNECTION_S
        self._accepted = False  # this connection attempt got its CONNACK (a later disconnect is not a refusal)
        how = "from mqtt.instance" if settings.instance else "from the host name; set mqtt.instance to choose another"
        log.info("mqtt: instance %r (%s): topics under %s/", settings.instance_id, how, self.topics.base)
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
        self._connack_refused = False  # the last CONNACK was a refusal
        self._unmarked: list[int] = []  # acknowledged, but the journal could not mark them yet (a full disk)
        self._marking_failed = False
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
        return self.topics.state(stream, target)

    def events_topic(self, stream: str) -> str:
        return self.topics.events(stream)

    def level_topic(self, stream: str) -> str:
        return self.topics.level(stream)

    def _device(self, stream: str) -> dict[str, Any]:
        return ha.device(self.topics, stream, self.settings.instance_label)

    def _availability(self, stream: str) -> list[dict[str, str]]:
        return ha.availability(self.topics, stream)

    def discovery(self) -> dict[str, dict[str, Any]]:
        """Home Assistant discovery: topic → payload, one device per configured stream."""
        with self._topology:
            targets = {stream: list(names) for stream, names in self.targets.items()}
        return ha.discovery(self.topics, targets, self.settings.instance_label, QOS_EVENTS)

    def set_targets(self, targets: dict[str, list[str]]) -> None:
        """Follow a reloaded config: announce added targets and streams, remove taken-out
        ones from Home Assistant and clear their retained state. Idempotent."""
        fresh = {stream: list(names) for stream, names in targets.items()}
        with self._topology:
            old = self.targets
            self.targets = fresh
            for key in [k for k in self._states if k[1] not in fresh.get(k[0], ())]:
                del self._states[key]
            for stream, names in fresh.items():
                for target in names:
                    self._states.setdefault((stream, target), "OFF")
        messages: list[Message] = []
        hass = self.settings.homeassistant
        for stream, names in old.items():
            gone = [t for t in names if t not in fresh.get(stream, ())]
            messages += [Message(self.state_topic(stream, t), "", retain=True) for t in gone]
            if stream not in fresh:
                messages.append(Message(self.topics.availability(stream), "", retain=True))
                if hass:
                    messages.append(Message(self.topics.device_config(stream), "", retain=True))
        for stream, names in fresh.items():
            before = old.get(stream)
            added = [t for t in names if before is None or t not in before]
            gone = [t for t in (before or ()) if t not in names]
            if hass and (added or gone or before is None):
                removed = {ha.target_key(t): "binary_sensor" for t in gone}
                if not names and before:
                    removed[ha.EVENT_KEY] = "event"
                payload = ha.device_payload(self.topics, stream, names, self.settings.instance_label, QOS_EVENTS, removed)
                messages.append(Message(self.topics.device_config(stream), json.dumps(payload), retain=True))
            messages += [Message(self.state_topic(stream, t), "OFF", retain=True) for t in added]
        for message in messages:
            self._enqueue(message)
        if messages:
            log.info("mqtt: targets reloaded: %d stream(s), %d target(s); %d message(s) to announce the change",
                     len(fresh), sum(len(v) for v in fresh.values()), len(messages))

    def _announcement(self) -> list[Message]:
        """Discovery configs and current states: what Home Assistant needs to know us."""
        messages = [Message(t, json.dumps(p), retain=True) for t, p in self.discovery().items()] \
            if self.settings.homeassistant else []
        with self._topology:
            states = list(self._states.items())
        return messages + [Message(self.state_topic(s, t), v, retain=True) for (s, t), v in states]

    def _announce_after_birth(self) -> None:
        with self._cond:
            self._birth_timer = None
            self.announcements += 1
        log.info("mqtt: Home Assistant came online; announcing %d device(s) again", len(self.targets))
        for message in self._announcement():
            self._enqueue(message)

    # -- client --------------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        s = self.settings
        protocol = mqtt.MQTTv5 if s.protocol == "5" else mqtt.MQTTv311
        client_id = s.client_id or f"{s.node_id}-{os.getpid()}-{uuid.uuid4().hex[:6]}"  # unique: two starts in one second must not kick each other off
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
            from streamer.settings import tls_file_problems  # noqa: PLC0415 - settings imports this module

            if problems := tls_file_problems(s.tls):  # what check-config says, said at start in one line
                raise StreamerError("; ".join(f"mqtt.tls.{key}: {problem}" for key, problem in problems))
            try:
                client.tls_set(ca_certs=s.tls.ca_certs, certfile=s.tls.certfile, keyfile=s.tls.keyfile,
                               keyfile_password=s.tls.keyfile_password)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: a file that holds no certificate, a wrong key
                which = "the CA file" if "CERTIFICATE" in str(exc).upper() and s.tls.ca_certs else "the certificate or key"
                raise StreamerError(f"mqtt.tls: {which} cannot be used ({' '.join(str(exc).split())[:160]}); give PEM files "
                                    f"(mqtt.tls.ca, and mqtt.tls.cert with mqtt.tls.key for a client certificate)") from None
            client.tls_insecure_set(s.tls.insecure)
        client.will_set(s.status_topic, "offline", qos=QOS_EVENTS, retain=True)
        client.reconnect_delay_set(min_delay=max(1, int(s.reconnect_min_s)), max_delay=max(1, int(s.reconnect_max_s)))
        client.on_connect = self._on_connect
        client.on_pre_connect = self._on_pre_connect
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
        # paho forgets its thread when it dies; one that died before we looked is dead, not absent
        self._network_thread = getattr(self._client, "_thread", None) or _DEAD_THREAD
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
        self._connack_refused = reason_code.is_failure  # the disconnect that follows a refusal is not another failure
        if reason_code.is_failure:
            self.stats.connect_refusals += 1
            self._connection_state(f"broker {self.settings.host}:{self.settings.port} refused the connection: {reason_code}",
                                   logging.ERROR, "check mqtt.username / mqtt.password / mqtt.client_id; retrying")
            return
        self.stats.connects += 1
        self._accepted = True
        self._connected_at = time.monotonic()
        self.last_error = None
        self._connection_state(None)
        # -- what is announced on (re)connect: status, owner, discovery, current states
        client.subscribe(self.topics.status, qos=1)  # the retained status and owner, before ours replace them
        client.subscribe(self.topics.owner, qos=1)
        if self.settings.homeassistant:
            client.subscribe(self.topics.birth, qos=1)
            client.subscribe(self.topics.device_config_filter, qos=1)
            for legacy in ha.legacy_filters(self.settings.discovery_prefix, self.settings.instance):
                client.subscribe(legacy, qos=1)
        greeting = [Message(self.settings.status_topic, "online", retain=True),
                    Message(self.topics.owner, self._owner, retain=True)] + self._announcement()
        with self._cond:
            self.connected = True
            self.announcements += 1
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
            self._back_off_if_flapping(client)
            if not self._stopping:
                self._connection_state(f"disconnected from {self.settings.host}:{self.settings.port} ({reason_code})",
                                       logging.WARNING, "reconnecting")
        elif self._connack_refused:
            self._connack_refused = False
        elif self._accepted:  # the same accepted connection reported ended again (a write after the drop)
            pass
        elif not self._stopping:  # reached, but no CONNACK: closed, garbage, a TLS port spoken to in plain MQTT, a silent peer
            self.stats.connect_failures += 1
            self._connection_state(f"the peer at {self.settings.host}:{self.settings.port} ended the connection before "
                                   f"accepting it", logging.WARNING,  # its reason code varies by try: one line, not one per code
                                   "is it an MQTT broker, and does it expect TLS (mqtt.tls)? retrying with backoff")

    def _on_pre_connect(self, client, userdata) -> None:
        self._accepted = False

    def _back_off_if_flapping(self, client) -> None:
        """A connection that lived under ``STABLE_CONNECTION_S`` doubles paho's next reconnect delay
        (paho restarts it at ``reconnect_min_s`` after every CONNACK); a stable one resets it."""
        low, high = max(1, int(self.settings.reconnect_min_s)), max(1, int(self.settings.reconnect_max_s))  # as at start
        if time.monotonic() - self._connected_at < STABLE_CONNECTION_S:
            self._flaps += 1
            delay = min(high, low * 2 ** min(self._flaps, 16))
            client.reconnect_delay_set(min_delay=delay, max_delay=max(delay, high))
        elif self._flaps:
            self._flaps = 0
            client.reconnect_delay_set(min_delay=low, max_delay=high)

    def _on_message(self, client, userdata, message) -> None:
        """Home Assistant births, retained discovery configs and the instance's owner."""
        topic, payload = message.topic, message.payload.decode("utf-8", "replace")
        if topic == self.topics.birth:
            # a retained "online" is an old birth, already answered by the connect greeting
            if payload == "online" and not message.retain:
                with self._cond:
                    if self._birth_timer is None:  # a burst of births: one announcement
                        self._birth_timer = threading.Timer(BIRTH_DEBOUNCE_S, self._announce_after_birth)
                        self._birth_timer.daemon = True
                        self._birth_timer.start()
        elif topic == self.topics.status:
            if message.retain:
                self._peer_online = payload == "online"
        elif topic == self.topics.owner:
            if message.retain and payload and payload != self._owner:
                other_host = payload.split(" ")[0] != self._machine_id
                if other_host or self._peer_online:
                    self._conflict = True
                    log.error("mqtt: %s also uses instance %r on this broker; set a distinct mqtt.instance for each "
                              "(until then this one removes no discovery config it did not announce itself)",
                              "another host" if other_host else "another running streamer on this host",
                              self.settings.instance_id)
        elif not payload:
            return
        elif self.topics.owns_device_config(topic):
            # only what the broker held when we subscribed is an earlier run's leftover: a live one is our
            # own announcement echoed back, or another client publishing there (a flood of them would
            # have had the queue answer each with a removal, ahead of the events)
            if not message.retain or self._conflict:
                return
            current = self.discovery()
            if topic in current:
                self._remove_stale_components(topic, payload, current[topic])
            elif topic not in self._devices_cleared:
                if len(self._devices_cleared) >= MAX_DEVICE_CLEANUPS:
                    if not self._cleanups_capped:  # one warning, not one a topic
                        self._cleanups_capped = True
                        log.warning("mqtt: over %d discovery configs under this instance's prefix that no configured stream "
                                    "has; leaving the rest (clear them with mosquitto_pub -r -n -t TOPIC)", MAX_DEVICE_CLEANUPS)
                    return
                self._devices_cleared.add(topic)
                log.info("mqtt: removing the discovery config of a stream no longer configured: %s", topic)
                self._enqueue(Message(topic, "", retain=True))
        elif topic in self._legacy_topics() and topic not in self._legacy_cleared:
            self._legacy_cleared.add(topic)
            log.info("mqtt: migrating to device discovery: removing the old per-entity config %s", topic)
            self._enqueue(Message(topic, "", retain=True))

    def _remove_stale_components(self, topic: str, retained: str, now: dict[str, Any]) -> None:
        """A configured stream's device as an earlier run left it on the broker: the targets it
        had and this run has not (the config changed while the daemon was stopped) are taken out
        of Home Assistant (platform-only) and their retained state cleared, as a reload does.
        Only the retained copy is read (what the broker held at subscribe time), so the daemon's
        own announcements, echoed back live, never trigger this again."""
        try:
            old = json.loads(retained).get("cmps")
        except (ValueError, AttributeError):
            return
        if not isinstance(old, dict):
            return
        gone = {key: c for key, c in old.items() if key not in now["cmps"] and isinstance(c, dict)
                and isinstance(c.get("p"), str) and set(c) != {"p"}}  # platform-only: already a removal
        if not gone:
            return
        with self._topology:
            stream = next((s for s in self.targets if self.topics.device_config(s) == topic), None)
            names = list(self.targets.get(stream, ())) if stream is not None else []
        if stream is None:
            return
        payload = ha.device_payload(self.topics, stream, names, self.settings.instance_label, QOS_EVENTS,
                                    {key: c["p"] for key, c in gone.items()})
        log.info("mqtt: removing %d entit%s no longer configured from %s: %s", len(gone), "y" if len(gone) == 1 else "ies",
                 topic, ", ".join(str(c.get("name", key)) for key, c in gone.items()))
        self._enqueue(Message(topic, json.dumps(payload), retain=True))
        mine = f"{self.topics.base}/"
        for c in gone.values():  # a removed sound sensor's retained ON/OFF: ours only, never a topic outside this instance
            state = c.get("state_topic")
            if isinstance(state, str) and state.startswith(mine) and state.endswith("/state"):
                self._enqueue(Message(state, "", retain=True))

    def _legacy_topics(self) -> set[str]:
        with self._topology:
            targets = {stream: list(names) for stream, names in self.targets.items()}
        return ha.legacy_topics(self.settings.discovery_prefix, self.settings.instance, targets)

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
        with self._topology:
            self._states[(event.stream, event.target)] = event.state
        self.stats.events_queued += 1
        self.stats.events_dropped = self.journal.counts().shed - self._shed_base
        with self._cond:
            self._journal_dirty = True
            self._cond.notify_all()
        self._enqueue(Message(self.state_topic(event.stream, event.target), event.state, retain=True))
        if self.settings.homeassistant and event.state == "ON":  # HA's event entity: one per ON
            expiry = self.settings.event_expiry_s if self.settings.protocol == "5" else None
            payload = ha.ha_event_payload(event.target, event.stream, event.id, event.peak, event.start_time)
            self._enqueue(Message(self.topics.ha_event(event.stream), json.dumps(payload), expiry_s=expiry))

    def publish_source_state(self, stream: str, state: str) -> None:
        """Retained ``{base}/{stream}/availability``: ``online`` while the source delivers audio."""
        self._enqueue(Message(self.topics.availability(stream), "online" if state == "running" else "offline", retain=True))

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
        """The sender thread: an error it did not expect is logged, counted, and it goes on —
        dead, it would leave every event in the journal unsent until a restart, in silence."""
        while True:
            try:
                self._send_until_stopped()
                return
            except Exception:
                self.stats.sender_restarts += 1
                log.exception("mqtt: the sender failed (%d time(s)); it goes on in %.0f s", self.stats.sender_restarts,
                              SENDER_RESTART_S)
                with self._cond:
                    if self._stopping:
                        return
                    self._cond.wait(SENDER_RESTART_S)

    def _send_until_stopped(self) -> None:
        while True:
            with self._cond:
                busy = self.connected and len(self._inflight) < INFLIGHT_WINDOW and (
                    self._queue or self._levels or self._rows or self._journal_dirty)
                settle = len(self._acks) >= SETTLE_BATCH or (self._acks and not busy)
            if settle:  # in batches while sending, at once when there is nothing else to do
                self._settle()
            item: Message | JournalRow | None = None
            retry_marks = False
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
                    if not self._unmarked:
                        continue
                    retry_marks = True  # idle with marks the journal could not take: tried again now
                else:
                    continue  # acknowledgements to settle first
            if retry_marks:
                self._settle()
                continue
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
            if not self._acks and not self._unmarked:
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
        with self._cond:
            self.stats.events_delivered += len(delivered)
            batch, self._unmarked = self._unmarked + delivered, []
        if not batch:
            return
        try:
            self.journal.mark_delivered(batch)
        except sqlite3.Error as exc:  # a full disk: the broker has them; kept busy (not sent again) and marked later
            with self._cond:
                self._unmarked = batch
                self.stats.journal_errors += 1
            if not self._marking_failed:
                self._marking_failed = True
                log.error("mqtt: the journal cannot mark %d delivered event(s) (%s); tried again while running "
                          "(unmarked at exit, they are sent again by the next start)", len(batch), exc)
            return
        if self._marking_failed:
            self._marking_failed = False
            log.warning("mqtt: the journal marks delivered events again")
        with self._cond:
            self._busy.difference_update(batch)
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
                self._network_thread = getattr(self._client, "_thread", None) or _DEAD_THREAD
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
            with self._topology:
                streams = list(self.targets)
            for stream in streams:  # no stream delivers audio now: its retained availability says so too
                self._client.publish(self.topics.availability(stream), "offline", qos=QOS_EVENTS, retain=True)
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

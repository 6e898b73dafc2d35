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
- ``{base}/{stream}/availability``: retained ``online`` while the source delivers audio.

Home Assistant discovery (:mod:`streamer.sinks.homeassistant`): one device per stream,
following the config — :meth:`MqttPublisher.set_targets` on a reload announces added
targets, removes taken-out ones and clears their retained state. Everything is announced
again once per Home Assistant birth message (a burst of births is debounced).

Nothing here blocks the pipeline: messages go into a bounded queue of our own, and one
sender thread hands them to paho one at a time, waiting for each QoS 1 PUBACK, so order is
kept and a broker outage loses nothing that fits in the queue. When the queue is full the
oldest message is dropped and counted (a log line, a metric). paho reconnects with backoff;
after every reconnect the status, the current states and the discovery configs are sent
again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from functools import cached_property

from streamer.events import Event
from streamer.names import host_instance, ident, machine_id
from streamer.sinks import homeassistant as ha

log = logging.getLogger(__name__)

DROP_LOG_INTERVAL_S = 10.0
PUBACK_POLL_S = 0.01
QOS_EVENTS = 1
QOS_LEVEL = 0
BIRTH_DEBOUNCE_S = 2.0  # Home Assistant births within this long of the first: one announcement


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


@dataclass
class MqttStats:
    """Messages of every kind, and event messages alone: ``events_queued`` ends up as
    ``events_delivered + events_dropped + events_unsent`` (still queued at exit)."""

    queued: int = 0
    delivered: int = 0
    dropped: int = 0
    connects: int = 0
    events_queued: int = 0
    events_delivered: int = 0
    events_dropped: int = 0
    events_unsent: int = 0


class MqttPublisher:
    """Events, states, levels and discovery to one broker, through a bounded queue."""

    def __init__(self, settings: MqttSettings, targets: dict[str, list[str]]) -> None:
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
        how = "from mqtt.instance" if settings.instance else "from the host name; set mqtt.instance to choose another"
        log.info("mqtt: instance %r (%s): topics under %s/", settings.instance_id, how, self.topics.base)
        self.stats = MqttStats()
        self.connected = False
        self.last_error: str | None = None
        self._queue: deque[Message] = deque()
        self._cond = threading.Condition()
        self._states: dict[tuple[str, str], str] = {(s, t): "OFF" for s, names in targets.items() for t in names}
        self._stopping = False
        self._last_drop_log = 0.0
        self._dropped_since_log = 0
        self._in_flight: Message | None = None  # the message the sender is waiting on
        self._released: Message | None = None  # the in-flight message, if a full queue let it go
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
        client_id = s.client_id or f"{s.node_id}-{int(time.time())}"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        client.enable_logger(logging.getLogger("streamer.sinks.paho"))
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
        return client

    def start(self) -> "MqttPublisher":
        s = self.settings
        try:
            self._client.connect_async(s.host, s.port, keepalive=s.keepalive)
        except (OSError, ValueError) as exc:
            self.last_error = f"cannot connect to {s.host}:{s.port} ({exc})"
            log.warning("mqtt: %s; will keep trying", self.last_error)
        self._client.loop_start()
        self._sender.start()
        return self

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.last_error = f"broker {self.settings.host}:{self.settings.port} refused the connection: {reason_code}"
            log.error("mqtt: %s (check mqtt.username / mqtt.password); retrying", self.last_error)
            return
        self.stats.connects += 1
        self.last_error = None
        log.info("mqtt: connected to %s:%d", self.settings.host, self.settings.port)
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
            self._queue.extendleft(reversed(greeting))
            self._cond.notify_all()

    def _on_connect_fail(self, client, userdata) -> None:
        self.last_error = f"cannot reach broker {self.settings.host}:{self.settings.port}"
        log.warning("mqtt: %s; retrying with backoff", self.last_error)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            was = self.connected
            self.connected = False
            self._cond.notify_all()
        if was and not self._stopping:
            log.warning("mqtt: disconnected (%s); reconnecting", reason_code)

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
            if topic not in self.discovery() and not self._conflict:
                log.info("mqtt: removing the discovery config of a stream no longer configured: %s", topic)
                self._enqueue(Message(topic, "", retain=True))
        elif topic in self._legacy_topics() and topic not in self._legacy_cleared:
            self._legacy_cleared.add(topic)
            log.info("mqtt: migrating to device discovery: removing the old per-entity config %s", topic)
            self._enqueue(Message(topic, "", retain=True))

    def _legacy_topics(self) -> set[str]:
        with self._topology:
            targets = {stream: list(names) for stream, names in self.targets.items()}
        return ha.legacy_topics(self.settings.discovery_prefix, self.settings.instance, targets)

    # -- publishing ----------------------------------------------------------------------
    def publish_event(self, event: Event) -> None:
        """Queue an event (ON or OFF) and the target's new retained state."""
        with self._topology:
            self._states[(event.stream, event.target)] = event.state
        expiry = self.settings.event_expiry_s if self.settings.protocol == "5" else None
        self._enqueue(Message(self.events_topic(event.stream), json.dumps(event.as_dict()), expiry_s=expiry, is_event=True))
        self._enqueue(Message(self.state_topic(event.stream, event.target), event.state, retain=True))
        if self.settings.homeassistant and event.state == "ON":  # HA's event entity: one per ON
            payload = ha.ha_event_payload(event.target, event.stream, event.id, event.peak, event.start_time)
            self._enqueue(Message(self.topics.ha_event(event.stream), json.dumps(payload), expiry_s=expiry))

    def publish_source_state(self, stream: str, state: str) -> None:
        """Retained ``{base}/{stream}/availability``: ``online`` while the source delivers audio."""
        self._enqueue(Message(self.topics.availability(stream), "online" if state == "running" else "offline", retain=True))

    def publish_level(self, stream: str, dbfs: float) -> None:
        if self.connected:
            self._client.publish(self.level_topic(stream), f"{dbfs:.1f}", qos=QOS_LEVEL)

    def _enqueue(self, message: Message) -> None:
        with self._cond:
            if len(self._queue) >= self.settings.queue_size:
                self._drop_oldest()
            self._queue.append(message)
            self.stats.queued += 1
            self.stats.events_queued += message.is_event
            self._cond.notify_all()

    def _drop_oldest(self) -> None:
        """Make room in a full queue. The message being sent stays: its fate (delivered or
        not) is counted by the sender, so every message is counted exactly once."""
        index = 1 if self._queue[0] is self._in_flight and len(self._queue) > 1 else 0
        oldest = self._queue[index]
        del self._queue[index]
        if oldest is self._in_flight:  # a queue of one: the sender counts it
            self._released = oldest
            return
        self.stats.dropped += 1
        self.stats.events_dropped += oldest.is_event
        self._dropped_since_log += 1
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_INTERVAL_S:
            log.warning("mqtt: queue full (%d): dropped %d oldest messages", self.settings.queue_size, self._dropped_since_log)
            self._last_drop_log, self._dropped_since_log = now, 0

    def queue_length(self) -> int:
        return len(self._queue)

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not (self.connected and self._queue):
                    self._cond.wait(0.5)
                if self._stopping and (not self._queue or not self.connected):
                    return
                message = self._in_flight = self._queue[0]
            sent = self._send(message)
            with self._cond:
                self._in_flight = None
                released, self._released = self._released is message, None
                if sent:
                    # by identity: a reconnect may have put its greeting in front of it
                    for i, queued in enumerate(self._queue):
                        if queued is message:
                            del self._queue[i]
                            break
                    self.stats.delivered += 1
                    self.stats.events_delivered += message.is_event
                elif released:  # let go by a full queue while the connection failed under it
                    self.stats.dropped += 1
                    self.stats.events_dropped += message.is_event

    def _send(self, message: Message) -> bool:
        """Hand one message to paho and wait for its PUBACK; False if the connection went."""
        properties = None
        if message.expiry_s and self.settings.protocol == "5":
            properties = Properties(PacketTypes.PUBLISH)
            properties.MessageExpiryInterval = message.expiry_s
        info = self._client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain, properties=properties)
        if message.qos == 0:
            return info.rc == mqtt.MQTT_ERR_SUCCESS
        # paho keeps an unacknowledged QoS 1 message and sends it again after a reconnect:
        # waiting on the same message (not publishing it again) keeps delivery in order.
        while not info.is_published():
            if self._stopping and not self.connected:
                return False
            time.sleep(PUBACK_POLL_S)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (up to ``timeout``), publish ``offline``, disconnect."""
        deadline = time.monotonic() + timeout
        while self._queue and self.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._sender.join(max(0.1, deadline - time.monotonic()))
        if self.connected:
            info = self._client.publish(self.settings.status_topic, "offline", qos=QOS_EVENTS, retain=True)
            try:
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                pass
        self._client.disconnect()
        self._client.loop_stop()
        self.stats.events_unsent = sum(m.is_event for m in self._queue)
        if self._queue:
            log.warning("mqtt: %d messages (%d events) were still queued at exit", len(self._queue), self.stats.events_unsent)


class MqttEventSink:
    """The publisher as a sink: events reach its queue from the hub's thread, never the scorer's."""

    name = "mqtt"
    accepts = (Event,)

    def __init__(self, publisher: MqttPublisher) -> None:
        self.publisher = publisher

    def handle(self, item: Event) -> None:
        self.publisher.publish_event(item)

    def close(self) -> None:  # the daemon stops the publisher itself, after the last OFFs
        pass

"""Publishing events to MQTT (paho-mqtt 2.x), with Home Assistant discovery.

Topics under ``prefix`` (default ``streamer``):

- ``{prefix}/status``: retained ``online``; the last will publishes a retained ``offline``
  (a clean stop publishes it too). With an ``instance`` name, ``{prefix}/{instance}/status``.
- ``{prefix}/{stream}/{target}/state``: retained ``ON`` / ``OFF``.
- ``{prefix}/{stream}/events``: one JSON object per ON and per OFF, QoS 1, not retained
  (with a message expiry on MQTT 5).
- ``{prefix}/{stream}/level``: the stream's level in dBFS, now and then (QoS 0, only while
  connected: a level is not worth queueing).

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
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from streamer import __version__
from streamer.events import Event, slug

log = logging.getLogger(__name__)

DROP_LOG_INTERVAL_S = 10.0
PUBACK_POLL_S = 0.01
QOS_EVENTS = 1
QOS_LEVEL = 0


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
        self.targets = targets  # stream → target names
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
        if self.settings.homeassistant:
            client.subscribe(f"{self.settings.discovery_prefix}/status", qos=1)
            client.subscribe(f"{self.settings.discovery_prefix}/+/{self.settings.node_id}/+/config", qos=1)
        with self._cond:
            self.connected = True
            # after every (re)connect: status, then discovery, then the current states
            greeting = [Message(self.settings.status_topic, "online", retain=True)]
            if self.settings.homeassistant:
                greeting += [Message(t, json.dumps(p), retain=True) for t, p in self.discovery().items()]
            greeting += [Message(self.state_topic(s, t), v, retain=True) for (s, t), v in self._states.items()]
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
        topic, payload = message.topic, message.payload.decode("utf-8", "replace")
        if topic == f"{self.settings.discovery_prefix}/status" and payload == "online":
            log.info("mqtt: Home Assistant restarted; announcing again")
            with self._cond:
                self._queue.extend(Message(t, json.dumps(p), retain=True) for t, p in self.discovery().items())
                self._cond.notify_all()
        elif topic.endswith("/config") and payload and topic not in self.discovery():
            log.info("mqtt: removing stale discovery config %s", topic)
            self._enqueue(Message(topic, "", retain=True))

    # -- publishing ----------------------------------------------------------------------
    def publish_event(self, event: Event) -> None:
        """Queue an event (ON or OFF) and the target's new retained state."""
        self._states[(event.stream, event.target)] = event.state
        expiry = self.settings.event_expiry_s if self.settings.protocol == "5" else None
        self._enqueue(Message(self.events_topic(event.stream), json.dumps(event.as_dict()), expiry_s=expiry, is_event=True))
        self._enqueue(Message(self.state_topic(event.stream, event.target), event.state, retain=True))

    def publish_source_state(self, stream: str, state: str) -> None:
        """Retained ``{prefix}/{stream}/availability``: ``online`` while the source delivers audio."""
        self._enqueue(Message(f"{self.settings.prefix}/{slug(stream)}/availability",
                              "online" if state == "running" else "offline", retain=True))

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

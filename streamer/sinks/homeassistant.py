"""Home Assistant MQTT discovery payloads: pure functions, no I/O.

One *device* per stream, announced with Home Assistant's device-based discovery (one
retained ``<discovery_prefix>/device/<object_id>/config`` payload, HA 2024.11+):

- ``dev`` (the device), ``o`` (origin: who publishes it — required by HA), ``avty``
  (available while this daemon's status topic says ``online`` *and* the stream's source
  delivers audio), ``qos``;
- ``cmps``: a ``binary_sensor`` (device class ``sound``) per target, the stream's level
  ``sensor`` (dB), and one ``event`` entity whose ``event_types`` are the targets: the
  daemon publishes ``{"event_type": <target>, ...}`` on it once per ON, so automations
  can trigger on "a dog barked in the kitchen" without watching every binary sensor.

A component taken out of a device is announced once as ``{"p": <platform>}`` (platform
only), which HA takes as "remove this component"; a whole device is removed with an empty
retained payload. Ids come from :mod:`streamer.names`, so they are injective: no two
streams, targets or instances share a device, entity or topic.

Until now (single-component discovery) each entity had its own topic
``<prefix>/binary_sensor/<node>/<stream>_<target>/config``; :func:`legacy_topics` names
them so the publisher can clear the ones still retained on the broker (once: a cleared
topic holds nothing that would make it clear it again).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from streamer import __version__
from streamer.names import ident, join

ORIGIN_NAME = "streamer"
MANUFACTURER = "streamer"
MODEL = "AST audio event detector"
PAYLOAD_ON, PAYLOAD_OFF = "ON", "OFF"
ONLINE, OFFLINE = "online", "offline"
TARGET_KEY_PREFIX = "sound_"  # component keys of targets; "level" and "event" cannot clash with them
LEVEL_KEY, EVENT_KEY = "level", "event"
DEVICE_ID_PREFIX = "streamer"


@dataclass(frozen=True)
class Topics:
    """Every topic of one daemon instance: all under ``<prefix>/<instance id>/``."""

    prefix: str
    instance_id: str
    discovery_prefix: str = "homeassistant"

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.instance_id}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def owner(self) -> str:
        """Retained machine id of the host using this instance (to notice a second host)."""
        return f"{self.base}/owner"

    def stream(self, stream: str) -> str:
        return f"{self.base}/{ident(stream)}"

    def state(self, stream: str, target: str) -> str:
        return f"{self.stream(stream)}/{ident(target)}/state"

    def events(self, stream: str) -> str:
        return f"{self.stream(stream)}/events"

    def ha_event(self, stream: str) -> str:
        """The Home Assistant event entity's topic: one JSON object per ON."""
        return f"{self.stream(stream)}/ha_event"

    def level(self, stream: str) -> str:
        return f"{self.stream(stream)}/level"

    def availability(self, stream: str) -> str:
        return f"{self.stream(stream)}/availability"

    # -- Home Assistant ----------------------------------------------------------------
    @property
    def birth(self) -> str:
        return f"{self.discovery_prefix}/status"

    @property
    def device_prefix(self) -> str:
        """Object ids of this instance's devices start with this (and no other's do)."""
        return join(DEVICE_ID_PREFIX, self.instance_id) + "__"

    def device_id(self, stream: str) -> str:
        return join(DEVICE_ID_PREFIX, self.instance_id, ident(stream))

    def device_config(self, stream: str) -> str:
        return f"{self.discovery_prefix}/device/{self.device_id(stream)}/config"

    @property
    def device_config_filter(self) -> str:
        return f"{self.discovery_prefix}/device/+/config"

    def owns_device_config(self, topic: str) -> bool:
        """Whether a ``<dp>/device/<id>/config`` topic is one of this instance's."""
        head = f"{self.discovery_prefix}/device/"
        return topic.startswith(head + self.device_prefix) and topic.endswith("/config") \
            and topic.count("/") == self.discovery_prefix.count("/") + 3


def target_key(target: str) -> str:
    return TARGET_KEY_PREFIX + ident(target)


def project_url() -> str | None:
    """The package's home page (``[project.urls]`` in pyproject.toml), if it declares one."""
    try:
        from importlib.metadata import PackageNotFoundError, metadata
    except ImportError:  # pragma: no cover
        return None
    try:
        entries = metadata("streamer").get_all("Project-URL") or []
    except PackageNotFoundError:
        return None
    urls = [e.split(",", 1)[1].strip() for e in entries if "," in e]
    return next((u for u in urls if u.startswith(("http://", "https://"))), None)


def origin() -> dict[str, str]:
    """``o``: the application that publishes the discovery payload (required by HA):
    name, software version and, when the package declares a home page, its ``url``."""
    out = {"name": ORIGIN_NAME, "sw": __version__}
    url = project_url()
    if url:
        out["url"] = url
    return out


def device(topics: Topics, stream: str, instance_label: str) -> dict[str, Any]:
    return {
        "ids": [topics.device_id(stream)],
        "name": f"{stream} sounds ({instance_label})",
        "mf": MANUFACTURER,
        "mdl": MODEL,
        "sw": __version__,
    }


def availability(topics: Topics, stream: str) -> list[dict[str, str]]:
    """Available while the daemon is online and the stream's source delivers audio."""
    return [{"t": topics.status, "pl_avail": ONLINE, "pl_not_avail": OFFLINE},
            {"t": topics.availability(stream), "pl_avail": ONLINE, "pl_not_avail": OFFLINE}]


def components(topics: Topics, stream: str, targets: list[str]) -> dict[str, dict[str, Any]]:
    """``cmps``: a sound binary_sensor per target, the level sensor, the event entity."""
    device_id = topics.device_id(stream)
    out: dict[str, dict[str, Any]] = {}
    for target in targets:
        key = target_key(target)
        out[key] = {
            "p": "binary_sensor",
            "name": target,
            "unique_id": join(device_id, key),
            "state_topic": topics.state(stream, target),
            "payload_on": PAYLOAD_ON,
            "payload_off": PAYLOAD_OFF,
            "device_class": "sound",
        }
    out[LEVEL_KEY] = {
        "p": "sensor",
        "name": "Sound level",
        "unique_id": join(device_id, LEVEL_KEY),
        "state_topic": topics.level(stream),
        "device_class": "sound_pressure",
        "unit_of_measurement": "dB",
        "state_class": "measurement",
        "suggested_display_precision": 0,
    }
    if targets:  # an event entity needs at least one event type
        out[EVENT_KEY] = {
            "p": "event",
            "name": "Sound detected",
            "unique_id": join(device_id, EVENT_KEY),
            "state_topic": topics.ha_event(stream),
            "event_types": list(targets),
        }
    return out


def device_payload(topics: Topics, stream: str, targets: list[str], instance_label: str, qos: int,
                   removed: dict[str, str] | None = None) -> dict[str, Any]:
    """The whole discovery payload of one stream's device.

    ``removed``: component key → platform of components to take out of the device now
    (announced platform-only, which HA treats as a removal).
    """
    cmps = components(topics, stream, targets)
    for key, platform in (removed or {}).items():
        cmps.setdefault(key, {"p": platform})
    return {
        "dev": device(topics, stream, instance_label),
        "o": origin(),
        "avty": availability(topics, stream),
        "avty_mode": "all",
        "qos": qos,
        "cmps": cmps,
    }


def discovery(topics: Topics, targets: dict[str, list[str]], instance_label: str, qos: int) -> dict[str, dict[str, Any]]:
    """Topic → payload for every configured stream (one device each)."""
    return {topics.device_config(stream): device_payload(topics, stream, names, instance_label, qos)
            for stream, names in targets.items()}


def ha_event_payload(target: str, stream: str, event_id: str, score: float, start_time: float | None) -> dict[str, Any]:
    """What the event entity receives per ON: ``event_type`` (required by HA) and attributes."""
    return {"event_type": target, "score": round(float(score), 4), "stream": stream, "event_id": event_id,
            "start_time": start_time}


# -- the previous, single-component layout ---------------------------------------------
def legacy_slug(name: str) -> str:
    """The lossy slug of earlier versions (kept only to find their old discovery topics)."""
    return re.sub(r"[^a-z0-9]+", "_", name.casefold()).strip("_") or "x"


def legacy_node(instance: str | None) -> str:
    return legacy_slug(f"streamer_{instance}") if instance else "streamer"


def legacy_topics(discovery_prefix: str, instance: str | None, targets: dict[str, list[str]]) -> set[str]:
    """The per-entity discovery topics that earlier versions used for these streams × targets."""
    node = legacy_node(instance)
    out = set()
    for stream, names in targets.items():
        for target in names:
            out.add(f"{discovery_prefix}/binary_sensor/{node}/{legacy_slug(stream)}_{legacy_slug(target)}/config")
        out.add(f"{discovery_prefix}/sensor/{node}/{legacy_slug(stream)}_level/config")
    return out


def legacy_filters(discovery_prefix: str, instance: str | None) -> list[str]:
    node = legacy_node(instance)
    return [f"{discovery_prefix}/binary_sensor/{node}/+/config", f"{discovery_prefix}/sensor/{node}/+/config"]

"""Home Assistant discovery payloads against HA's documented schema, and injective names.

The key sets below are taken from Home Assistant's MQTT documentation (integrations/mqtt:
"Device discovery payload", "Supported abbreviations"; integrations/event.mqtt,
binary_sensor.mqtt, sensor.mqtt): a device payload must carry ``dev`` (device) and ``o``
(origin, whose ``name`` is required) at its root and its components under ``cmps``, each
with a ``p`` (platform) and a ``unique_id``; an event entity requires ``state_topic`` and
``event_types`` and receives JSON with an ``event_type`` that is one of them.
"""

from __future__ import annotations

import json
import re

from hypothesis import given, settings, strategies as st

from streamer.names import JOINER, MAX_SLUG_CHARS, ident, join
from streamer.sinks import homeassistant as ha

ID_CHARS = re.compile(r"[a-zA-Z0-9_-]+")  # HA: node_id / object_id character class

# documented full names and abbreviations
ROOT_REQUIRED = {"dev", "o", "cmps"}
ROOT_SHARED = {"availability", "avty", "availability_mode", "avty_mode", "availability_topic", "avty_t",
               "availability_template", "avty_tpl", "payload_available", "pl_avail", "payload_not_available",
               "pl_not_avail", "origin", "device", "components", "qos", "encoding", "e", "state_topic", "stat_t",
               "command_topic", "cmd_t", "~", "migrate_discovery", "migr_discvry"}
DEVICE_KEYS = {"identifiers", "ids", "connections", "cns", "name", "manufacturer", "mf", "model", "mdl", "model_id",
               "mdl_id", "sw_version", "sw", "hw_version", "hw", "serial_number", "sn", "suggested_area", "sa",
               "configuration_url", "cu", "via_device"}
ORIGIN_KEYS = {"name", "sw_version", "sw", "support_url", "url"}
AVAILABILITY_ENTRY = {"topic", "t", "payload_available", "pl_avail", "payload_not_available", "pl_not_avail",
                      "value_template", "val_tpl"}
COMMON = {"p", "platform", "name", "unique_id", "uniq_id", "state_topic", "stat_t", "qos", "availability", "avty",
          "availability_mode", "avty_mode", "availability_topic", "avty_t", "device", "dev", "enabled_by_default", "en",
          "encoding", "e", "entity_category", "ent_cat", "icon", "ic", "json_attributes_template", "json_attributes_topic",
          "object_id", "default_entity_id", "value_template", "val_tpl", "payload_available", "payload_not_available"}
PLATFORM_KEYS = {
    "binary_sensor": COMMON | {"device_class", "dev_cla", "expire_after", "force_update", "off_delay", "payload_on",
                               "pl_on", "payload_off", "pl_off"},
    "sensor": COMMON | {"device_class", "dev_cla", "expire_after", "force_update", "last_reset_value_template",
                        "state_class", "stat_cla", "suggested_display_precision", "unit_of_measurement",
                        "unit_of_meas", "options"},
    "event": COMMON | {"device_class", "dev_cla", "event_types"},
}
PLATFORM_REQUIRED = {"binary_sensor": {"state_topic"}, "sensor": {"state_topic"}, "event": {"state_topic", "event_types"}}
BINARY_SENSOR_CLASSES = {"sound", "smoke", "safety", "problem", "occupancy", "motion"}
SENSOR_CLASSES_DB = {"sound_pressure", "signal_strength"}

TOPICS = ha.Topics("streamer", "garage-box", "homeassistant")
STREAMS = {"Kitchen": ["Smoke alarm", "Dog", "a/b", "a b"], "front-door": ["Doorbell"]}


def check_device_payload(payload: dict, targets: list[str]) -> None:
    assert ROOT_REQUIRED <= set(payload) and set(payload) <= ROOT_SHARED | ROOT_REQUIRED
    assert set(payload["dev"]) <= DEVICE_KEYS and payload["dev"]["ids"]
    assert set(payload["o"]) <= ORIGIN_KEYS and payload["o"]["name"] == "streamer" and payload["o"]["sw"]
    for entry in payload["avty"]:
        assert set(entry) <= AVAILABILITY_ENTRY and entry["t"]
    assert payload["avty_mode"] in ("all", "any", "latest")
    unique_ids = []
    for key, component in payload["cmps"].items():
        assert ID_CHARS.fullmatch(key), key
        platform = component["p"]
        assert set(component) <= PLATFORM_KEYS[platform], set(component) - PLATFORM_KEYS[platform]
        assert PLATFORM_REQUIRED[platform] <= set(component)
        unique_ids.append(component["unique_id"])
    assert len(set(unique_ids)) == len(unique_ids)
    binaries = [c for c in payload["cmps"].values() if c["p"] == "binary_sensor"]
    assert sorted(c["name"] for c in binaries) == sorted(targets)
    assert all(c["device_class"] in BINARY_SENSOR_CLASSES and c["device_class"] == "sound" for c in binaries)
    assert all((c["payload_on"], c["payload_off"]) == ("ON", "OFF") for c in binaries)
    (level,) = [c for c in payload["cmps"].values() if c["p"] == "sensor"]
    assert level["device_class"] in SENSOR_CLASSES_DB and level["unit_of_measurement"] == "dB"
    (event,) = [c for c in payload["cmps"].values() if c["p"] == "event"]
    assert event["event_types"] == targets


def test_device_payloads_follow_the_documented_schema():
    configs = ha.discovery(TOPICS, STREAMS, "garage box", qos=1)
    assert set(configs) == {TOPICS.device_config(s) for s in STREAMS}
    for stream, targets in STREAMS.items():
        topic = TOPICS.device_config(stream)
        parts = topic.split("/")
        assert parts[0] == "homeassistant" and parts[1] == "device" and parts[3] == "config" and len(parts) == 4
        assert ID_CHARS.fullmatch(parts[2])
        payload = configs[topic]
        json.dumps(payload)  # serialisable
        check_device_payload(payload, targets)
        assert payload["dev"]["ids"] == [TOPICS.device_id(stream)]
        assert [a["t"] for a in payload["avty"]] == [TOPICS.status, TOPICS.availability(stream)]
    kitchen = configs[TOPICS.device_config("Kitchen")]["cmps"]
    # "a/b" and "a b" keep their own entities and state topics
    topics = [c["state_topic"] for c in kitchen.values() if c["p"] == "binary_sensor"]
    assert len(set(topics)) == 4 and all(t.startswith("streamer/garage-box/") for t in topics)
    # no unique id is shared between the two devices
    ids = [c["unique_id"] for p in configs.values() for c in p["cmps"].values()]
    assert len(set(ids)) == len(ids)


def test_event_payload_carries_a_documented_event_type():
    payload = ha.ha_event_payload("Dog", "Kitchen", "Kitchen:dog:16000", 0.91234, 1.7e9)
    assert payload["event_type"] == "Dog"
    assert payload["event_type"] in ha.components(TOPICS, "Kitchen", ["Dog", "Cat"])["event"]["event_types"]
    assert {"score", "stream", "event_id"} <= set(payload) and payload["score"] == 0.9123


def test_removed_components_are_announced_platform_only():
    payload = ha.device_payload(TOPICS, "Kitchen", ["Dog"], "garage box", 1, removed={ha.target_key("Cat"): "binary_sensor"})
    assert payload["cmps"][ha.target_key("Cat")] == {"p": "binary_sensor"}
    assert payload["cmps"][ha.target_key("Dog")]["name"] == "Dog"
    empty = ha.device_payload(TOPICS, "Kitchen", [], "garage box", 1, removed={ha.EVENT_KEY: "event"})
    assert empty["cmps"][ha.EVENT_KEY] == {"p": "event"}  # no event types left: the event entity goes


def test_device_ids_belong_to_one_instance_only():
    other = ha.Topics("streamer", "garage", "homeassistant")
    mine = TOPICS.device_config("Kitchen")
    assert TOPICS.owns_device_config(mine)
    assert not other.owns_device_config(mine)  # "garage" is a prefix of "garage-box" as text, not as an id
    assert not TOPICS.owns_device_config(other.device_config("Kitchen"))
    assert not TOPICS.owns_device_config("homeassistant/device/somebody_else/config")
    assert not TOPICS.owns_device_config(mine.replace("/config", "/x/config"))


def test_legacy_topics_name_the_old_per_entity_configs():
    old = ha.legacy_topics("homeassistant", "Garage Box", {"Kitchen": ["Smoke alarm"]})
    assert old == {"homeassistant/binary_sensor/streamer_garage_box/kitchen_smoke_alarm/config",
                   "homeassistant/sensor/streamer_garage_box/kitchen_level/config"}
    assert ha.legacy_topics("homeassistant", None, {"k": ["d"]}) == {
        "homeassistant/binary_sensor/streamer/k_d/config", "homeassistant/sensor/streamer/k_level/config"}


# -- names ---------------------------------------------------------------------------------
HOSTILE = ["a/b", "a b", "a_b", "A_B", "a-b", "+", "#", "++", "🔥", "🔥🔥", "厨房", "廚房", "", " ", "x", "x_1234abcd",
           "Smoke alarm", "smoke alarm", "smoke_alarm", "a__b", "a\u0000b", "\ud800", "ß", "ss"]


def test_hostile_names_never_collide():
    ids = [ident(n) for n in HOSTILE]
    assert len(set(ids)) == len(HOSTILE)
    for i in ids:
        assert ID_CHARS.fullmatch(i) and JOINER not in i and len(i) <= MAX_SLUG_CHARS + 9
    assert ident("kitchen") == "kitchen" and ident("front-door") == "front-door"  # plain names stay as they are
    assert ident("Smoke alarm").startswith("smoke_alarm_")  # readable, plus a hash


def test_eight_sources_by_six_targets_are_fifty_six_entities():
    sources = ["a/b", "a b", "+", "#", "🔥", "厨房", "Kitchen", "kitchen"]
    targets = ["Dog", "dog", "a/b", "a b", "🔔", "Smoke alarm"]
    configs = ha.discovery(TOPICS, {s: targets for s in sources}, "box", qos=1)
    assert len(configs) == 8
    ids = {c["unique_id"] for p in configs.values() for c in p["cmps"].values()}
    binaries = {c["state_topic"] for p in configs.values() for c in p["cmps"].values() if c["p"] == "binary_sensor"}
    assert len(binaries) == 48 and len(ids) == 48 + 8 + 8  # 48 binary sensors, 8 levels, 8 event entities


@settings(max_examples=500, deadline=None)
@given(st.lists(st.text(max_size=60), min_size=2, max_size=30, unique=True))
def test_distinct_names_give_distinct_ids(names):
    ids = [ident(n) for n in names]
    assert len(set(ids)) == len(names)
    for i in ids:
        assert ID_CHARS.fullmatch(i) and JOINER not in i


@settings(max_examples=300, deadline=None)
@given(st.tuples(st.text(max_size=20), st.text(max_size=20)), st.tuples(st.text(max_size=20), st.text(max_size=20)))
def test_joined_ids_are_injective(a, b):
    if a != b:
        assert join(ident(a[0]), ident(a[1])) != join(ident(b[0]), ident(b[1]))

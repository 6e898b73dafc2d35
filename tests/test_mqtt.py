"""MQTT against a real mosquitto: topics, retain, QoS, last will, outages, TLS, auth, discovery."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from mqtt_helpers import Broker, Subscriber, free_port, wait_for
from streamer.events import Event
from streamer.sinks.mqtt import MqttPublisher, MqttSettings, TlsSettings

STREAM, TARGET = "Kitchen", "Smoke alarm"


def event(n: int, state: str = "ON", target: str = TARGET) -> Event:
    return Event(id=f"kitchen:smoke_alarm:{n}", stream=STREAM, target=target, state=state, labels=("Smoke detector, smoke alarm",),
                 start_sample=n * 16000, end_sample=None if state == "ON" else n * 16000 + 8000, start_time=None,
                 end_time=None, peak=0.9, mean=0.8, closed_by=None if state == "ON" else "audio")


def publisher(port: int, **kwargs) -> MqttPublisher:
    settings = MqttSettings(host="127.0.0.1", port=port, reconnect_min_s=1, reconnect_max_s=1, **kwargs)
    return MqttPublisher(settings, {STREAM: [TARGET, "Dog"]}).start()


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path)
    yield b
    b.stop()


def test_topics_payloads_retain_and_qos(broker):
    pub = publisher(broker.port, protocol="5")
    assert wait_for(lambda: pub.connected, 10)
    pub.publish_event(event(1, "ON"))
    pub.publish_event(event(1, "OFF"))
    pub.publish_level(STREAM, -23.45)
    assert wait_for(lambda: pub.queue_length() == 0 and pub.stats.delivered >= 4, 10)
    # a subscriber arriving later sees the retained ones, flagged as retained
    sub = Subscriber(broker.port, ["streamer/#"])
    try:
        assert wait_for(lambda: sub.on("streamer/kitchen/smoke_alarm/state"), 5)
        status = sub.on("streamer/status")
        assert status[-1].payload == "online" and status[-1].retain
        state = sub.on("streamer/kitchen/smoke_alarm/state")
        assert state[-1].payload == "OFF" and state[-1].retain
        assert sub.on("streamer/kitchen/dog/state")[-1].payload == "OFF"
        assert sub.on("streamer/kitchen/events") == []  # events are not retained
        pub.publish_event(event(2, "ON"))
        assert wait_for(lambda: sub.on("streamer/kitchen/events"), 5)
        live = sub.on("streamer/kitchen/events")[0]
        assert live.qos == 1 and not live.retain
        payload = json.loads(live.payload)
        assert {k: payload[k] for k in ("id", "stream", "target", "state", "start_sample", "peak")} == {
            "id": "kitchen:smoke_alarm:2", "stream": STREAM, "target": TARGET, "state": "ON", "start_sample": 32000, "peak": 0.9}
        assert wait_for(lambda: sub.on("streamer/kitchen/smoke_alarm/state")[-1].payload == "ON", 5)
    finally:
        sub.close()
        pub.stop()
    sub = Subscriber(broker.port, ["streamer/status"])
    try:
        assert wait_for(lambda: sub.on("streamer/status"), 5)
        assert sub.on("streamer/status")[-1].payload == "offline"  # a clean stop says so itself
    finally:
        sub.close()


def test_last_will_on_sigkill(broker):
    code = f"""
import time, sys
sys.path.insert(0, {str(os.getcwd())!r})
from streamer.sinks.mqtt import MqttPublisher, MqttSettings
pub = MqttPublisher(MqttSettings(host="127.0.0.1", port={broker.port}), {{"kitchen": ["x"]}}).start()
while not pub.connected or pub.queue_length():
    time.sleep(0.05)
print("ready", flush=True)
time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        sub = Subscriber(broker.port, ["streamer/status"])
        assert wait_for(lambda: sub.on("streamer/status") and sub.on("streamer/status")[-1].payload == "online", 5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        assert wait_for(lambda: sub.on("streamer/status")[-1].payload == "offline", 10)
        sub.close()
        later = Subscriber(broker.port, ["streamer/status"])
        assert wait_for(lambda: later.on("streamer/status"), 5)
        assert later.on("streamer/status")[-1].payload == "offline" and later.on("streamer/status")[-1].retain
        later.close()
    finally:
        proc.kill()


def test_broker_outage_loses_no_event_and_keeps_order(tmp_path):
    broker = Broker(tmp_path, persistence=True)
    sub = Subscriber(broker.port, ["streamer/kitchen/events"], client_id="recorder", persistent=True)
    pub = publisher(broker.port)
    raised = []
    try:
        assert wait_for(lambda: pub.connected, 10)
        for n in range(5):
            raised.append(event(n, "ON" if n % 2 == 0 else "OFF"))
            pub.publish_event(raised[-1])
        assert wait_for(lambda: len(sub.on("streamer/kitchen/events")) == 5, 10)
        broker.stop()
        assert wait_for(lambda: not pub.connected, 10)
        for n in range(5, 15):  # raised while the broker is down: queued
            raised.append(event(n, "ON" if n % 2 == 0 else "OFF"))
            pub.publish_event(raised[-1])
            time.sleep(0.2)
        assert pub.queue_length() >= 20  # events and states
        broker.start()
        assert wait_for(lambda: len({json.loads(m.payload)["start_sample"] for m in sub.on("streamer/kitchen/events")}) == 15, 30)
        got = [json.loads(m.payload) for m in sub.on("streamer/kitchen/events")]
        firsts = []
        for g in got:  # QoS 1 is at least once: order of first arrivals, and the exact set
            key = (g["id"], g["state"])
            if key not in firsts:
                firsts.append(key)
        assert firsts == [(e.id, e.state) for e in raised]
        assert pub.stats.dropped == 0
    finally:
        pub.stop()
        sub.close()
        broker.stop()


def test_queue_full_drops_oldest_and_counts(tmp_path):
    pub = MqttPublisher(MqttSettings(host="127.0.0.1", port=1, queue_size=4, reconnect_min_s=1, reconnect_max_s=1), {STREAM: [TARGET]}).start()
    try:
        for n in range(5):
            pub.publish_event(event(n))  # an event (to the in-memory journal) and a state message each
        assert pub.stats.dropped == 1 and pub.control_queue_length() == 4  # five states into a queue of four
        assert pub.stats.events_dropped == 1 and pub.journal.counts().shed == 1  # five events into a journal of four
        assert [json.loads(r.payload)["start_sample"] for r in pub.journal.pending()] == [n * 16000 for n in range(1, 5)]
        assert wait_for(lambda: pub.last_error is not None, 10) and "cannot reach broker" in pub.last_error
    finally:
        pub.stop(timeout=0.5)


def test_wrong_password_is_a_clear_error_that_keeps_retrying(tmp_path, caplog):
    broker = Broker(tmp_path, password=("streamer", "s3cret-pw"))
    try:
        pub = publisher(broker.port, username="streamer", password="wrong-password")
        assert wait_for(lambda: pub.last_error and "refused" in pub.last_error, 10)
        assert not pub.connected
        pub.publish_event(event(1))
        time.sleep(2.5)  # retried, still alive, still queued
        assert pub.queue_length() == 2 and pub._sender.is_alive()
        pub.stop(timeout=0.5)
        assert "wrong-password" not in caplog.text and "wrong-password" not in repr(pub.settings)
        good = publisher(broker.port, username="streamer", password="s3cret-pw")
        assert wait_for(lambda: good.connected, 10)
        good.stop()
    finally:
        broker.stop()


def make_certificates(directory):
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca", "-keyout", "ca.key", "-out", "ca.crt")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr")
    (directory / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "san.ext", "-out", "server.crt")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=other-ca", "-keyout", "other.key", "-out", "other.crt")
    return {"ca": str(directory / "ca.crt"), "cert": str(directory / "server.crt"), "key": str(directory / "server.key"),
            "other": str(directory / "other.crt")}


def test_tls_with_a_certificate_made_by_the_test(tmp_path):
    certs = make_certificates(tmp_path)
    broker = Broker(tmp_path, tls=certs)
    try:
        pub = publisher(broker.port, tls=TlsSettings(ca_certs=certs["ca"]))
        assert wait_for(lambda: pub.connected, 10), pub.last_error
        sub = Subscriber(broker.port, ["streamer/kitchen/events"], ca=certs["ca"])
        pub.publish_event(event(7))
        assert wait_for(lambda: sub.on("streamer/kitchen/events"), 10)
        sub.close()
        pub.stop()
        wrong = publisher(broker.port, tls=TlsSettings(ca_certs=certs["other"]))
        assert wait_for(lambda: wrong.last_error is not None, 10)
        assert not wrong.connected and "cannot reach broker" in wrong.last_error
        wrong.stop(timeout=0.5)
    finally:
        broker.stop()


# Home Assistant's MQTT discovery schemas (binary_sensor and sensor): the keys each accepts.
HA_COMMON = {"availability", "availability_mode", "availability_template", "availability_topic", "device", "default_entity_id",
             "enabled_by_default", "encoding", "entity_category", "expire_after", "force_update", "icon",
             "json_attributes_template", "json_attributes_topic", "name", "object_id", "payload_available",
             "payload_not_available", "qos", "state_topic", "unique_id", "value_template", "platform", "origin"}
HA_BINARY_SENSOR = HA_COMMON | {"device_class", "off_delay", "payload_off", "payload_on"}
HA_SENSOR = HA_COMMON | {"device_class", "last_reset_value_template", "state_class", "suggested_display_precision", "unit_of_measurement", "options"}
HA_DEVICE = {"configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model", "model_id", "name",
             "serial_number", "suggested_area", "sw_version", "via_device"}
HA_BINARY_SENSOR_CLASSES = {"sound", "smoke", "safety", "problem", "occupancy", "motion"}


def test_home_assistant_discovery_payloads(broker):
    sub = Subscriber(broker.port, ["homeassistant/#"])
    pub = publisher(broker.port, instance="Garage Box")
    try:
        node = "streamer_garage_box"
        binary = f"homeassistant/binary_sensor/{node}/kitchen_smoke_alarm/config"
        sensor = f"homeassistant/sensor/{node}/kitchen_level/config"
        assert wait_for(lambda: sub.on(binary) and sub.on(sensor), 10)
        b = json.loads(sub.on(binary)[-1].payload)
        assert set(b) <= HA_BINARY_SENSOR and set(b["device"]) <= HA_DEVICE
        assert b["device_class"] in HA_BINARY_SENSOR_CLASSES and b["device_class"] == "sound"
        assert b["state_topic"] == "streamer/kitchen/smoke_alarm/state"
        assert (b["payload_on"], b["payload_off"]) == ("ON", "OFF")
        assert b["availability_topic"] == "streamer/Garage Box/status" and b["payload_available"] == "online"
        assert b["unique_id"] == f"{node}_kitchen_smoke_alarm" and b["name"] == TARGET
        assert b["device"]["identifiers"] == [f"{node}_kitchen"] and b["device"]["manufacturer"] == "streamer"
        s = json.loads(sub.on(sensor)[-1].payload)
        assert set(s) <= HA_SENSOR
        assert (s["device_class"], s["unit_of_measurement"], s["state_class"]) == ("sound_pressure", "dB", "measurement")
        assert s["state_topic"] == "streamer/kitchen/level"
        assert len({json.loads(sub.on(t)[-1].payload)["unique_id"] for t in (binary, sensor)}) == 2
        # Home Assistant restarts: everything is announced again
        count = len(sub.on(binary))
        helper = Subscriber(broker.port, [])
        helper.client.publish("homeassistant/status", "online", qos=1)
        assert wait_for(lambda: len(sub.on(binary)) > count, 10)
        # a target taken out of the config: its retained config is removed
        pub.stop()
        helper.close()
        smaller = MqttPublisher(MqttSettings(host="127.0.0.1", port=broker.port, instance="Garage Box"), {STREAM: ["Dog"]}).start()
        assert wait_for(lambda: sub.on(binary)[-1].payload == "", 10)
        assert json.loads(sub.on(f"homeassistant/binary_sensor/{node}/kitchen_dog/config")[-1].payload)["name"] == "Dog"
        smaller.stop()
    finally:
        sub.close()


def test_level_is_published_while_connected(broker):
    sub = Subscriber(broker.port, ["streamer/kitchen/level"])
    pub = publisher(broker.port)
    try:
        assert wait_for(lambda: pub.connected, 10)
        pub.publish_level(STREAM, -31.26)
        assert wait_for(lambda: sub.on("streamer/kitchen/level"), 5)
        message = sub.on("streamer/kitchen/level")[0]
        assert message.payload == "-31.3" and not message.retain
    finally:
        pub.stop()
        sub.close()


# -- the journal, refusals, flapping brokers, dead threads (issue 14) ------------------------

from streamer.sinks.journal import EventJournal, JournalSink  # noqa: E402


def firsts_by_identity(messages) -> list[tuple[str, str]]:
    """The (id, state) of each event message in order of first arrival: what a deduplicating consumer keeps."""
    seen, out = set(), []
    for m in messages:
        p = json.loads(m.payload)
        key = (p["id"], p["state"])
        if key not in seen:
            seen.add(key)
            out.append(key)
    return out


def test_backlog_from_the_journal_drains_in_order_each_once(tmp_path):
    broker = Broker(tmp_path)
    journal = EventJournal(tmp_path / "state" / "journal.db")
    raised = [event(n, s) for n in range(1000) for s in ("ON", "OFF")]
    for e in raised:  # a backlog written before the publisher starts (an earlier run's)
        journal.append(e)
    sub = Subscriber(broker.port, ["streamer/kitchen/events"])
    pub = MqttPublisher(MqttSettings(host="127.0.0.1", port=broker.port, reconnect_min_s=1, reconnect_max_s=1),
                        {STREAM: [TARGET]}, journal=journal).start()
    try:
        assert wait_for(lambda: journal.counts().pending == 0, 60), journal.counts()
        assert wait_for(lambda: len(sub.on("streamer/kitchen/events")) >= 2000, 10)
        got = sub.on("streamer/kitchen/events")
        assert len(got) == 2000  # no broker trouble: each exactly once
        assert firsts_by_identity(got) == [(e.id, e.state) for e in raised]
        c = journal.counts()
        assert (c.raised, c.delivered, c.shed, c.pending) == (2000, 2000, 0, 0)
        assert pub.stats.events_delivered == 2000
    finally:
        pub.stop()
        sub.close()
        broker.stop()


SIGKILLED_PUBLISHER = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from streamer.events import Event
from streamer.sinks.journal import EventJournal, JournalSink
from streamer.sinks.mqtt import MqttPublisher, MqttSettings
journal = EventJournal({path!r})
pub = MqttPublisher(MqttSettings(host="127.0.0.1", port={port}, reconnect_min_s=1, reconnect_max_s=1), {{"Kitchen": ["Dog"]}},
                    journal=journal).start()
sink = JournalSink(journal, [pub.event_journaled])
for n in range({count}):
    sink.handle(Event(id=f"kitchen:dog:{{n}}", stream="Kitchen", target="Dog", state="ON", labels=("Dog",), start_sample=n,
                      end_sample=None, start_time=None, end_time=None, peak=0.9, mean=0.8))
print("raised", flush=True)
time.sleep(60)
"""


def test_sigkill_mid_outage_then_restart_delivers_every_pending_event(tmp_path):
    """The publisher-level version of the daemon test in test_daemon_journal: 1000 raised while
    the broker is down, SIGKILL, a new process, the broker back: 1000 of 1000, in order."""
    broker = Broker(tmp_path, persistence=True, extra=["max_queued_messages 0"])  # the default 1000 is the backlog's size
    sub = Subscriber(broker.port, ["streamer/kitchen/events"], client_id="recorder", persistent=True)
    broker.stop()
    path = str(tmp_path / "journal.db")
    code = SIGKILLED_PUBLISHER.format(repo=os.getcwd(), path=path, port=broker.port, count=1000)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "raised"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert EventJournal(path).counts().pending == 1000
        sub.connected.clear()
        broker.start()
        assert sub.connected.wait(15)
        journal = EventJournal(path)
        pub = MqttPublisher(MqttSettings(host="127.0.0.1", port=broker.port, reconnect_min_s=1, reconnect_max_s=1),
                            {STREAM: ["Dog"]}, journal=journal).start()
        try:
            assert wait_for(lambda: journal.counts().pending == 0, 60), journal.counts()
            assert wait_for(lambda: len(firsts_by_identity(sub.on("streamer/kitchen/events"))) == 1000, 30)
            got = sub.on("streamer/kitchen/events")
            assert firsts_by_identity(got) == [(f"kitchen:dog:{n}", "ON") for n in range(1000)]
            assert len(got) == 1000
            c = journal.counts()
            assert (c.raised, c.delivered, c.shed, c.pending) == (1000, 1000, 0, 0)
        finally:
            pub.stop()
    finally:
        proc.kill()
        sub.close()
        broker.stop()


def test_publishes_refused_by_an_acl_are_never_counted_delivered(tmp_path, caplog):
    acl = tmp_path / "acl"
    acl.write_text("topic read #\n")  # anonymous clients may read, not write
    broker = Broker(tmp_path, extra=[f"acl_file {acl}"])
    journal = EventJournal(tmp_path / "journal.db")
    pub = MqttPublisher(MqttSettings(host="127.0.0.1", port=broker.port, protocol="5", homeassistant=False,
                                     reconnect_min_s=1, reconnect_max_s=1), {STREAM: [TARGET]}, journal=journal).start()
    try:
        assert wait_for(lambda: pub.connected, 10)
        for n in range(5):
            pub.publish_event(event(n))
        assert wait_for(lambda: pub.stats.events_refused == 5, 10), pub.stats
        assert pub.stats.events_delivered == 0
        c = journal.counts()
        assert (c.delivered, c.pending) == (0, 5)  # still owed: kept for when the broker accepts them
        refusals = [r for r in caplog.records if "refused a publish" in r.getMessage()]
        assert len(refusals) == 1 and "Not authorized" in refusals[0].getMessage()  # once per change, not per message
    finally:
        pub.stop(timeout=1)
        broker.stop()


class HangUpBroker:
    """Accepts a connection, says CONNACK success, reads a little, hangs up; again and again."""

    def __init__(self) -> None:
        import socket
        import threading
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.port = self.server.getsockname()[1]
        self.accepted = 0
        self.closing = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.closing:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.settimeout(1)
                try:
                    conn.recv(65536)  # CONNECT
                    conn.sendall(b"\x20\x02\x00\x00")  # CONNACK, accepted
                    conn.recv(65536)  # the first publishes
                except OSError:
                    pass

    def close(self) -> None:
        self.closing = True
        self.server.close()


def test_a_broker_that_accepts_then_hangs_up_cannot_grow_the_queue(tmp_path):
    broker = HangUpBroker()
    targets = {f"Room {i}": [f"Target {j}" for j in range(5)] for i in range(4)}  # a greeting of ~45 messages
    pub = MqttPublisher(MqttSettings(host="127.0.0.1", port=broker.port, queue_size=20, reconnect_min_s=1,
                                     reconnect_max_s=1), targets).start()
    peak = 0
    try:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            for i in range(3):
                pub.publish_source_state(f"Room {i}", "running")
            peak = max(peak, pub.control_queue_length())
            time.sleep(0.02)
        assert pub.stats.connects >= 3 and broker.accepted >= 3
        assert peak <= 20 and pub.control_queue_length() <= 20
        assert pub.inflight() <= 64
        assert pub.stats.dropped > 0 and pub.stats.superseded > 0  # what did not fit is counted
    finally:
        pub.stop(timeout=0.5)
        broker.close()


def test_a_dead_network_thread_is_logged_once_counted_and_restarted(tmp_path, caplog):
    """paho's thread dies on anything that is not an Exception (here a SystemExit raised in a
    callback, twice): the sender notices, says so once, counts it and starts the thread again."""
    import streamer.sinks.mqtt as module
    broker = Broker(tmp_path)
    broker.stop()  # unreachable at first, so that on_connect_fail runs
    pub = MqttPublisher(MqttSettings(host="127.0.0.1", port=broker.port, reconnect_min_s=1, reconnect_max_s=1), {STREAM: [TARGET]})
    original, deaths = pub._client.on_connect_fail, []

    def dies_twice(client, userdata):
        if len(deaths) < 2:
            deaths.append(1)
            raise SystemExit
        original(client, userdata)

    pub._client.on_connect_fail = dies_twice
    caplog.set_level(logging.INFO, logger="streamer.sinks.mqtt")
    old, module.NETWORK_RESTART_S = module.NETWORK_RESTART_S, 0.5
    try:
        pub.start()
        assert wait_for(lambda: pub.stats.network_restarts >= 2, 15), pub.stats
        broker.start()
        assert wait_for(lambda: pub.connected, 15)  # the restarted thread does its work
        pub.publish_event(event(1))
        assert wait_for(lambda: pub.stats.events_delivered == 1, 10)
        assert len([r for r in caplog.records if "network thread died" in r.getMessage()]) == 1
        assert wait_for(lambda: any("network thread runs again" in r.getMessage() for r in caplog.records), 5)
    finally:
        module.NETWORK_RESTART_S = old
        pub.stop(timeout=0.5)
        broker.stop()


def test_connection_failures_are_logged_once_per_change(tmp_path, caplog):
    pub = MqttPublisher(MqttSettings(host="127.0.0.1", port=free_port(), reconnect_min_s=1, reconnect_max_s=1),
                        {STREAM: [TARGET]}).start()
    try:
        assert wait_for(lambda: pub.stats.connect_failures >= 3, 15)
        assert len([r for r in caplog.records if "cannot reach broker" in r.getMessage()]) == 1
    finally:
        pub.stop(timeout=0.5)


def test_refused_events_are_offered_again_once_the_broker_accepts_them(tmp_path, monkeypatch):
    import streamer.sinks.mqtt as module
    monkeypatch.setattr(module, "REFUSED_RETRY_S", 1.0)
    acl = tmp_path / "acl"
    acl.write_text("topic read #\n")
    broker = Broker(tmp_path, extra=[f"acl_file {acl}"])
    sub = Subscriber(broker.port, ["streamer/kitchen/events"])
    pub = MqttPublisher(MqttSettings(host="127.0.0.1", port=broker.port, protocol="5", homeassistant=False,
                                     reconnect_min_s=1, reconnect_max_s=1), {STREAM: [TARGET]},
                        journal=EventJournal(tmp_path / "journal.db")).start()
    try:
        assert wait_for(lambda: pub.connected, 10)
        for n in range(3):
            pub.publish_event(event(n))
        assert wait_for(lambda: pub.stats.events_refused >= 3, 10)
        acl.write_text("topic readwrite #\n")  # the operator fixes the ACL; mosquitto rereads it on SIGHUP
        broker.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: pub.journal.counts().pending == 0, 20), pub.stats
        assert wait_for(lambda: len(sub.on("streamer/kitchen/events")) >= 3, 5)
        assert firsts_by_identity(sub.on("streamer/kitchen/events")) == [(f"kitchen:smoke_alarm:{n}", "ON") for n in range(3)]
        assert pub.stats.events_delivered == 3
    finally:
        pub.stop(timeout=1)
        sub.close()
        broker.stop()

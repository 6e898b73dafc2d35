"""A real mosquitto broker for tests, and a subscriber that records what it receives."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class FakePeer:
    """A TCP port that is no real broker: each connection is handed to ``respond(conn)`` and then
    closed; ``accepted`` holds when each came. For what mosquitto cannot be made to do (accept
    and drop, answer garbage)."""

    def __init__(self, respond) -> None:
        self.accepted: list[float] = []
        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(16)
        self._server.settimeout(0.2)
        self.port = self._server.getsockname()[1]
        self._done = threading.Event()
        self._respond = respond
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._done.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                continue
            self.accepted.append(time.monotonic())
            with conn:
                conn.settimeout(2)
                try:
                    self._respond(conn)
                except OSError:
                    pass

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)
        self._server.close()


class Broker:
    """``mosquitto`` on a free port of 127.0.0.1, with optional auth, TLS and persistence."""

    def __init__(self, directory: Path, password: tuple[str, str] | None = None, tls: dict | None = None,
                 persistence: bool = False, extra: list[str] | None = None) -> None:
        if shutil.which("mosquitto") is None:
            if os.environ.get("CI"):
                pytest.fail("mosquitto is not installed (.ci/run should have installed it)")
            pytest.skip("mosquitto is not installed")
        self.directory = directory
        self.port = free_port()
        # stay this user (as root mosquitto would switch to "mosquitto", who cannot read pytest's tmp dirs)
        lines = [f"listener {self.port} 127.0.0.1", "log_dest stderr", "log_type error", f"user {getpass.getuser()}"]
        if password:
            pwfile = directory / "passwd"
            subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), *password], check=True, capture_output=True)
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        if tls:
            lines += [f"cafile {tls['ca']}", f"certfile {tls['cert']}", f"keyfile {tls['key']}"]
        if persistence:
            lines += ["persistence true", f"persistence_location {directory}/", "autosave_interval 1"]
        lines += extra or []
        self.config = directory / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        def accepting() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            except OSError:
                return False
        assert wait_for(accepting, 10), "mosquitto did not start"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@dataclass
class Received:
    topic: str
    payload: str
    qos: int
    retain: bool


class Subscriber:
    """A separate paho client that records every message on the given topics."""

    def __init__(self, port: int, topics: list[str], client_id: str | None = None, persistent: bool = False,
                 username: str | None = None, password: str | None = None, **tls) -> None:
        self.messages: list[Received] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"sub-{time.monotonic_ns()}",
                                  clean_session=not persistent)
        if tls:
            self.client.tls_set(ca_certs=tls["ca"])
        if username:
            self.client.username_pw_set(username, password)
        self.topics = topics
        self._marker_topic = f"streamer-test-marker/{time.monotonic_ns()}"
        self._markers: list[str] = []
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 1)
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        assert self.connected.wait(10), "subscriber could not connect"

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        for topic in self.topics:
            client.subscribe(topic, qos=1)
        client.subscribe(self._marker_topic, qos=1)
        self.connected.set()

    def _on_message(self, client, userdata, message):
        with self.lock:
            if message.topic == self._marker_topic:
                self._markers.append(message.payload.decode())
                return
            self.messages.append(Received(message.topic, message.payload.decode(), message.qos, bool(message.retain)))

    def settled(self, timeout: float = 10) -> bool:
        """True once everything the broker had queued for us before now has arrived.

        The broker handles one client's packets in order and delivers to it in order, so a marker
        we publish after our subscriptions comes back after every retained message they brought:
        a late subscriber's view is complete without sleeping and hoping."""
        marker = str(time.monotonic_ns())
        self.client.publish(self._marker_topic, marker, qos=1)
        return wait_for(lambda: marker in self._markers, timeout)

    def on(self, topic: str) -> list[Received]:
        with self.lock:
            return [m for m in self.messages if m.topic == topic]

    def on_prefix(self, prefix: str) -> list[Received]:
        with self.lock:
            return [m for m in self.messages if m.topic.startswith(prefix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def daemon_topics(instance: str | None = None, prefix: str = "streamer"):
    """The topics a daemon publishes under: ``mqtt.instance`` or, unset, this host's name."""
    from streamer.names import host_instance, ident
    from streamer.sinks.homeassistant import Topics

    return Topics(prefix, ident(instance) if instance else host_instance())

"""Hostile input: any config document, random audio bytes, lying checkpoints, secrets.

Every case ends in a value or a clear one-line error of our own type — never another
exception, never a hang, and never a secret in what the user or the broker sees.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import REPO, run_cli, write_wav
from mqtt_helpers import Broker, Subscriber, wait_for
from streamer.capture.files import read_audio
from streamer.features.fbank import window_samples
from streamer.capture.sources import Backoff, FfmpegSource, SourceState
from streamer.settings import JOURNAL_KEYS, MODEL_KEYS, MQTT_KEYS, SECTIONS, SOURCE_KEYS, TLS_KEYS, Config, ConfigError, load_config
from streamer.errors import StreamerError
from streamer.model import load_model

# -- the config loader --------------------------------------------------------------------

KNOWN_KEYS = sorted(SECTIONS | MODEL_KEYS | SOURCE_KEYS | MQTT_KEYS | TLS_KEYS | JOURNAL_KEYS | {
    "defaults", "targets", "include", "exclude", "groups", "on_threshold", "off_threshold", "hold", "min_on",
    "smoothing", "cooldown", "labels", "mode", "level", "enabled", "directory", "pre", "post", "max_mb", "max_days",
})
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["mic", "file", "ffmpeg", "fp32", "int8", "cpu", "max", "ema", "${HOME}", "${NOPE_X}", "3.1.1"]),
)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=12), st.integers(-5, 5), st.booleans())
documents = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=6)),
    max_leaves=30,
)
# whole documents shaped like ours, so that the deep branches are reached, not just the top
shaped = st.fixed_dictionaries({}, optional={
    "model": st.dictionaries(st.sampled_from(sorted(MODEL_KEYS)), scalars, max_size=4),
    "sources": st.one_of(scalars, st.lists(st.dictionaries(st.sampled_from(sorted(SOURCE_KEYS)), scalars, max_size=6), max_size=3)),
    "hop": scalars, "ring_seconds": scalars, "level_interval": scalars,
    "detect": documents, "mqtt": st.one_of(scalars, st.dictionaries(st.sampled_from(sorted(MQTT_KEYS)), st.one_of(scalars, documents), max_size=6)),
    "console": documents, "logging": documents, "metrics": documents, "clips": documents,
    "state_dir": scalars, "journal": st.one_of(scalars, st.dictionaries(st.sampled_from(sorted(JOURNAL_KEYS)), scalars, max_size=3)),
})


def _load(tmp_path: Path, text: str):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        return load_config(path)
    except ConfigError as exc:
        assert exc.problems and all(p.strip() for p in exc.problems)
        return exc


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(doc=st.one_of(documents, shaped))
def test_any_yaml_document_is_a_config_or_a_config_error(tmp_path, doc):
    result = _load(tmp_path, yaml.safe_dump(doc, allow_unicode=True))
    assert isinstance(result, (Config, ConfigError))


VALID = {
    "model": {"path": "/models/ast", "device": "cpu", "precision": "fp32", "max_batch": 8, "max_wait_ms": 20, "threads": 2},
    "hop": 0.5, "ring_seconds": 30, "level_interval": 10,
    "sources": [{"name": "kitchen", "type": "mic", "device": "USB", "channels": 2, "channel": 0, "gain": 1.0},
                {"name": "cam", "type": "ffmpeg", "url": "rtsp://cam/stream", "realtime": True},
                {"name": "f", "type": "file", "path": "x.wav", "loop": True}],
    "detect": {"defaults": {"on_threshold": 0.5, "off_threshold": 0.3, "hold": 1.0, "min_on": 0.0, "smoothing": "ema"},
               "targets": {"Speech": {"on_threshold": 0.6}}, "include": ["Speech"], "groups": {"alarm": ["Smoke*"]}},
    "mqtt": {"host": "localhost", "port": 1883, "username": "u", "password": "p", "keepalive": 30, "protocol": "5",
             "queue_size": 100, "homeassistant": True, "tls": {"ca": "ca.pem", "insecure": False}},
    "console": {"mode": "lines"}, "logging": {"level": "info"},
    "metrics": {"enabled": True, "port": 9464}, "clips": {"enabled": True, "directory": "clips", "max_mb": 10},
    "web": {"enabled": True, "host": "0.0.0.0", "port": 8765, "token": "a-token-of-20-chars!", "history": "h.sqlite3",
            "history_days": 30},
}


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


VALID_PATHS = [p for p in _paths(VALID) if p]


def test_the_valid_base_document_is_valid(tmp_path):
    assert isinstance(_load(tmp_path, yaml.safe_dump(VALID)), Config)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(VALID_PATHS), value=documents, delete=st.booleans())
def test_one_changed_value_in_a_valid_config_is_a_config_or_a_config_error(tmp_path, path, value, delete):
    """Mutations of a valid document reach every branch of the checks, one at a time."""
    doc = json.loads(json.dumps(VALID))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    result = _load(tmp_path, yaml.safe_dump(doc, allow_unicode=True))
    assert isinstance(result, (Config, ConfigError))
    if isinstance(result, ConfigError):  # the place of the problem is named
        assert all(":" in p for p in result.problems)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_any_text_is_a_config_or_a_config_error(tmp_path, text):
    assert isinstance(_load(tmp_path, text), (Config, ConfigError))


def test_yaml_bombs_and_binary_are_config_errors(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
    assert isinstance(_load(tmp_path, bomb), ConfigError)  # unknown keys, found without expanding the aliases
    (tmp_path / "bin.yaml").write_bytes(os.urandom(512))
    result = run_cli("check-config", str(tmp_path / "bin.yaml"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("streamer: error:")


# -- audio decoding and the ffmpeg PCM reader ------------------------------------------------

@pytest.fixture(scope="module")
def real_wav(tmp_path_factory) -> bytes:
    t = np.arange(400) / 16000  # short: hypothesis prints the bytes of a failing example
    path = write_wav(tmp_path_factory.mktemp("a") / "tone.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    return path.read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_and_damaged_audio_files_decode_or_fail_clearly(tmp_path, real_wav, data):
    kind = data.draw(st.sampled_from(["random", "truncated", "flipped", "header"]))
    if kind == "random":
        blob = data.draw(st.binary(max_size=4096))
    elif kind == "truncated":
        blob = real_wav[: data.draw(st.integers(0, len(real_wav)))]
    elif kind == "flipped":  # bytes overwritten anywhere, the header included
        blob = bytearray(real_wav)
        for _ in range(data.draw(st.integers(1, 20))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
        blob = bytes(blob)
    else:  # a valid header that lies about what follows
        blob = real_wav[:44] + data.draw(st.binary(max_size=2048))
    path = tmp_path / f"fuzz.{data.draw(st.sampled_from(['wav', 'flac', 'ogg', 'mp3']))}"
    path.write_bytes(blob)
    started = time.monotonic()
    try:
        audio = read_audio(path)
    except StreamerError as exc:
        assert str(exc) and "\n" not in str(exc) and str(path) in str(exc)
    else:
        assert audio.dtype == np.float32 and audio.ndim == 1 and np.isfinite(audio).all()
    assert time.monotonic() - started < 10


def test_a_header_with_an_absurd_sample_rate_is_refused_at_once(tmp_path):
    """Found by the fuzzer: a flipped byte made a 7 Hz file, whose resampling to 16 kHz took minutes."""
    import soundfile as sf

    path = tmp_path / "slow.wav"
    sf.write(path, np.zeros(400, dtype=np.float32), 7)
    started = time.monotonic()
    with pytest.raises(StreamerError, match="invalid header"):
        read_audio(path)
    assert time.monotonic() - started < 1


def test_a_wav_cut_short_is_read_for_what_it_holds_and_said_once(tmp_path, caplog):
    """A copy cut off (or a recorder killed) leaves a header that promises more than the file
    holds: the audio that is there is scored, and one warning says the file is short."""
    import logging

    import soundfile as sf

    whole = tmp_path / "whole.wav"
    sf.write(whole, np.full(32000, 0.1, dtype=np.float32), 16000, subtype="PCM_16")  # 2 s
    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole.read_bytes()[:44 + 2 * 16000])  # 1 s of it
    with caplog.at_level(logging.WARNING, logger="streamer.capture.files"):
        assert read_audio(cut).size == 16000 and read_audio(cut).size == 16000
        assert read_audio(whole).size == 32000
    said = [r.getMessage() for r in caplog.records if "cut short" in r.getMessage()]
    assert said == [f"{cut}: cut short: its header promises 2.00 s, the file holds 1.00 s; reading what it holds"]
    # a writer that streams (ffmpeg to a pipe) leaves the length unknown (0xFFFFFFFF): no promise broken
    streamed = bytearray(whole.read_bytes())
    streamed[40:44] = struct.pack("<I", 0xFFFFFFFF)
    (tmp_path / "streamed.wav").write_bytes(bytes(streamed))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="streamer.capture.files"):
        assert read_audio(tmp_path / "streamed.wav").size == 32000
    assert not [r for r in caplog.records if "cut short" in r.getMessage()]


def test_detect_on_an_impossible_header_says_one_line(tmp_path, tiny_checkpoint):
    """A 1 Hz file: the command's one error line, no log line about a source failing before it."""
    import soundfile as sf

    directory, _ = tiny_checkpoint(max_length=128)
    sf.write(tmp_path / "one_hz.wav", np.zeros(10, dtype=np.float32), 1)
    result = run_cli("detect", str(tmp_path / "one_hz.wav"), "--model", str(directory))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and "invalid header (1 Hz" in lines[0], result.stderr


def test_ffmpeg_source_on_random_bytes_fails_clearly_without_hanging(tmp_path):
    rng = np.random.default_rng(3)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    source = FfmpegSource("garbage", str(garbage), backoff=Backoff(0.1, 0.2)).start()
    try:
        assert wait_for(lambda: source.stats.restarts >= 2, 30)  # fails, is retried, fails again: no hang
        assert source.state == SourceState.RETRYING
        assert source.error and "\n" not in source.error and "retrying in" in source.error
        _, samples = source.ring.read()
        assert np.isfinite(samples).all()
    finally:
        source.stop()
    assert source.finished


def test_ffmpeg_pcm_with_nonfinite_samples_is_sanitised_and_counted(tmp_path):
    rng = np.random.default_rng(4)
    samples = rng.uniform(-1, 1, 48000).astype(np.float32)
    samples[::97] = np.nan
    samples[::101] = np.inf
    path = write_wav(tmp_path / "bad.wav", samples)
    source = FfmpegSource("pcm", str(path), restart=False, ring_seconds=10).start()
    try:
        assert wait_for(lambda: source.finished, 30)
        _, got = source.ring.read()
    finally:
        source.stop()
    assert source.state == SourceState.ENDED
    assert np.isfinite(got).all() and len(got) == len(samples)  # every sample, the first ones included
    assert source.stats.nonfinite == int((~np.isfinite(samples)).sum())
    good = np.isfinite(samples)
    np.testing.assert_array_equal(got[good], samples[good])


# -- checkpoints --------------------------------------------------------------------------

def _safetensors(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    """Write a safetensors file by hand, so that its header can lie."""
    header, offset, body = {}, 0, b""
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        body += data
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


@pytest.mark.parametrize("lie", ["shape", "dtype", "offsets", "header-length", "non-float", "nan"])
def test_safetensors_that_lie_are_refused_clearly(tmp_path, tiny_checkpoint, lie):
    from safetensors.torch import load_file

    directory, _ = tiny_checkpoint()
    state = load_file(str(directory / "model.safetensors"))
    name = next(n for n in state if n.endswith("layernorm.weight"))
    tensors = {n: ("F32", list(t.shape), t.float().numpy().tobytes()) for n, t in state.items()}
    dtype, shape, data = tensors[name]
    if lie == "shape":  # claims more elements than its bytes hold
        tensors[name] = (dtype, [shape[0] * 1000], data)
    elif lie == "dtype":  # F64 over F32 bytes: the sizes disagree
        tensors[name] = ("F64", shape, data)
    elif lie == "non-float":  # consistent, but not weights
        tensors[name] = ("I32", shape, data)
    elif lie == "nan":
        tensors[name] = (dtype, shape, np.full(shape, np.nan, dtype=np.float32).tobytes())
    path = directory / "model.safetensors"
    _safetensors(path, tensors)
    if lie == "offsets":  # data offsets past the end of the file
        raw = path.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        header[name]["data_offsets"][1] += 10**9
        body = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    elif lie == "header-length":  # a header length of a petabyte
        raw = path.read_bytes()
        path.write_bytes(struct.pack("<Q", 10**15) + raw[8:])
    with pytest.raises(StreamerError) as info:
        load_model(directory)
    message = str(info.value)
    assert "\n" not in message and str(directory) in message
    result = run_cli("detect", "--model", str(directory), str(write_wav(tmp_path / "x.wav", np.zeros(16000, np.float32))))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- secrets ------------------------------------------------------------------------------

SECRET = "pw-Zq81-never-shown"
KEY_SECRET = "kp-Xy55-never-shown"


@pytest.mark.slow  # over 15 s on 2 cores: CI runs it, the fast lane (-m 'not slow') does not
def test_secrets_never_reach_logs_errors_or_the_broker(tmp_path, tiny_checkpoint):
    directory, _ = tiny_checkpoint(max_length=128, num_labels=527, seed=4)
    audio = write_wav(tmp_path / "a.wav", np.random.default_rng(0).uniform(-0.5, 0.5, 16000 * 4).astype(np.float32))
    broker = Broker(tmp_path, password=("streamer", SECRET))
    try:
        def config(password, extra=None) -> Path:
            raw = {
                "model": {"path": str(directory)}, "hop": 0.5, "logging": {"level": "debug"}, "console": {"mode": "json"},
                "sources": [{"name": "a", "type": "file", "path": str(audio), "realtime": True, "loop": True}],
                "detect": {"include": ["LABEL_1*"], "defaults": {"on_threshold": 0.0, "off_threshold": 0.0, "hold": 0}},
                "mqtt": {"host": "127.0.0.1", "port": broker.port, "username": "streamer", "password": password, **(extra or {})},
            }
            path = tmp_path / f"c{time.monotonic_ns()}.yaml"
            path.write_text(yaml.safe_dump(raw))
            return path

        seen = []
        # a config error next to the secrets, and a secret of the wrong type
        bad = config(SECRET, {"port": "not-a-port", "tls": {"key_password": KEY_SECRET, "ca": "/nonexistent/ca.pem"}})
        seen += [run_cli("check-config", str(bad)).stderr]
        wrong_type = tmp_path / "wrong.yaml"
        wrong_type.write_text(bad.read_text().replace(f"password: {SECRET}", "password: 918273645"))
        result = run_cli("check-config", str(wrong_type))
        assert result.returncode == 2 and "mqtt.password" in result.stderr
        assert "918273645" not in result.stderr
        good = config(SECRET)
        result = run_cli("check-config", str(good))
        assert result.returncode == 0
        seen += [result.stdout, result.stderr]
        # a TLS key that cannot be read with its passphrase: an error without the passphrase
        tls = config(SECRET, {"tls": {"ca": str(tmp_path / "missing-ca.pem"), "key_password": KEY_SECRET}})
        result = run_cli("run", "--config", str(tls), timeout=60)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        seen += [result.stdout, result.stderr]
        # the daemon at debug level, refused once (wrong password) and then connected, with discovery
        sub = Subscriber(broker.port, ["#"], username="streamer", password=SECRET)
        for password in ("wrong-" + SECRET, SECRET):
            proc = subprocess.Popen([sys.executable, "-m", "streamer", "run", "--config", str(config(password, {"homeassistant": True}))],
                                    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(8)
            proc.terminate()
            out, err = proc.communicate(timeout=30)
            seen += [out, err]
        assert wait_for(lambda: any(m.topic.startswith("homeassistant/") for m in sub.messages), 5)
        seen += [m.topic + m.payload for m in sub.messages]
        sub.close()
    finally:
        broker.stop()
    everything = "\n".join(seen)
    assert "refused" in everything  # the wrong password was reported…
    assert SECRET not in everything and KEY_SECRET not in everything  # …without either secret


# -- MQTT names, hosts and URLs (issue 14): refused with their line, or they work ------------

from streamer.settings import MAX_CONFIG_BYTES, mqtt_name_problem  # noqa: E402
from streamer.sinks.mqtt import MqttPublisher  # noqa: E402

mqtt_text = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.sampled_from(list("ab/+#\0 é€\x01\x7f\ufffe\ud800")), max_size=12),
    st.sampled_from(["", "/", "a//b", "/lead", "trail/", "x" * 70_000, "é" * 33_000, "home/+/x", "#", "ok/name"]),
)
MQTT_NAME_KEYS = ("prefix", "instance", "discovery_prefix", "client_id")


def _mqtt_config(tmp_path: Path, mqtt: dict, url: str | None = None) -> Path:
    source = {"name": "a", "type": "ffmpeg", "url": url} if url is not None else {"name": "a", "type": "file", "path": "/x.wav"}
    path = tmp_path / "mqtt.yaml"
    # JSON (YAML's subset) carries any str, lone surrogates as \\ud800 escapes, which YAML reads back
    path.write_text(json.dumps({"sources": [source], "mqtt": {"host": "127.0.0.1", **mqtt}}), encoding="utf-8")
    return path


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.dictionaries(st.sampled_from(MQTT_NAME_KEYS), mqtt_text, min_size=1),
       host=st.one_of(st.none(), st.text(max_size=20), st.sampled_from(["::1", "[::1]", "a..b", "-x", "bad host", "x" * 300])),
       url=st.one_of(st.none(), st.text(max_size=40), st.sampled_from(["rtsp://u:p@cam/s", "rtsp://cam/\0", "http://x/\n", "u" * 9000])))
def test_mqtt_names_hosts_and_urls_are_a_config_or_a_config_error(tmp_path, names, host, url):
    mqtt = {**names, **({"host": host} if host is not None else {})}
    try:
        config = load_config(_mqtt_config(tmp_path, mqtt, url))
    except ConfigError as exc:
        assert exc.problems and all("\n" not in p and ":" in p for p in exc.problems)
        return
    for key in MQTT_NAME_KEYS:  # what was accepted is what MQTT can carry
        value = getattr(config.mqtt, key)
        assert value is None or mqtt_name_problem(value, levels=key.endswith("prefix")) is None


@pytest.fixture(scope="module")
def name_broker(tmp_path_factory):
    broker = Broker(tmp_path_factory.mktemp("broker"))
    yield broker
    broker.stop()


likely_ok = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=24)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.dictionaries(st.sampled_from(MQTT_NAME_KEYS), st.one_of(likely_ok, mqtt_text), min_size=1),
       protocol=st.sampled_from(["3.1.1", "5"]))
@example(names={"prefix": "home/é€/日本", "instance": "Garage Box/2", "client_id": "streamer é", "discovery_prefix": "ha"},
         protocol="5")
def test_mqtt_names_that_pass_validation_connect_and_deliver(tmp_path, name_broker, names, protocol):
    """Names the config accepts must work against a real broker: connect (the will topic is
    valid), publish an event and have it acknowledged; no silent failure in between."""
    try:
        config = load_config(_mqtt_config(tmp_path, {**names, "port": name_broker.port, "protocol": protocol}))
    except ConfigError:
        return
    from dataclasses import replace as dc_replace
    settings_ = dc_replace(config.mqtt, reconnect_min_s=1, reconnect_max_s=1)
    pub = MqttPublisher(settings_, {"Kitchen": ["Dog"]}).start()
    try:
        assert wait_for(lambda: pub.connected, 10), (pub.last_error, names)
        pub.publish_event(_hostile_event())
        assert wait_for(lambda: pub.stats.events_delivered == 1, 10), (pub.stats, names)
        assert pub.stats.refused == pub.stats.invalid_topics == pub.stats.network_restarts == 0
    finally:
        pub.stop(timeout=1)


def test_names_from_an_undecodable_environment_variable_are_refused(tmp_path):
    os.environb[b"STREAMER_TEST_BAD_PREFIX"] = b"home\xff"
    try:
        with pytest.raises(ConfigError, match="mqtt.prefix: .*not valid UTF-8"):
            load_config(_mqtt_config(tmp_path, {"prefix": "${STREAMER_TEST_BAD_PREFIX}"}))
    finally:
        del os.environb[b"STREAMER_TEST_BAD_PREFIX"]


def _hostile_event():
    from streamer.events import Event
    return Event(id="kitchen:dog:0", stream="Kitchen", target="Dog", state="ON", labels=("Dog",), start_sample=0,
                 end_sample=None, start_time=None, end_time=None, peak=0.9, mean=0.8)


@pytest.mark.parametrize("name,value,problem", ids=lambda v: str(v)[:20], argvalues=[
    ("prefix", "home/+", "wildcard"), ("prefix", "a//b", "empty topic level"), ("instance", "garage#1", "wildcard"),
    ("discovery_prefix", "homeassistant/", "empty topic level"), ("client_id", "id\u0000x", "NUL"),
    ("instance", "x" * 70_000, "bytes of UTF-8"), ("prefix", "", "must not be empty"), ("client_id", "a\u0007", "control"),
])
def test_bad_mqtt_names_are_refused_with_their_line(tmp_path, name, value, problem):
    path = tmp_path / "c.yaml"
    path.write_text("sources: [{name: a, type: file, path: /x.wav}]\nmqtt:\n  host: 127.0.0.1\n"
                    f"  {name}: {json.dumps(value)}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{path}:4: mqtt.{name}: ") and problem in info.value.problems[0]


# -- the config file itself: a small regular file, refused at once otherwise -----------------

@pytest.mark.parametrize("kind", ["fifo", "dev-zero-symlink", "50-MB", "directory", "dev-null"])
def test_a_config_that_is_no_small_regular_file_is_refused_at_once(tmp_path, kind):
    path = tmp_path / "streamer.yaml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero-symlink":
        path.symlink_to("/dev/zero")
    elif kind == "dev-null":
        path.symlink_to("/dev/null")
    elif kind == "directory":
        path.mkdir()
    else:
        with open(path, "wb") as f:
            f.write(b"# padding\n" * (5 * 2**20))
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert time.monotonic() - t0 < 1.0
    assert len(info.value.problems) == 1 and str(path) in info.value.problems[0]
    expected = {"fifo": "FIFO", "dev-zero-symlink": "character device", "dev-null": "character device",
                "directory": "directory", "50-MB": f"at most {MAX_CONFIG_BYTES} bytes"}[kind]
    assert expected in info.value.problems[0]
    result = run_cli("check-config", str(path), timeout=60)  # the command a user runs: one line, no hang
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr


def test_a_fifo_swapped_in_after_the_check_cannot_block(tmp_path, monkeypatch):
    """The race: stat sees a regular file, open gets a FIFO. O_NONBLOCK and fstat refuse it at once."""
    import streamer.settings as settings_module
    path = tmp_path / "streamer.yaml"
    os.mkfifo(path)
    real_stat = os.stat
    regular = real_stat(__file__)
    monkeypatch.setattr(settings_module.os, "stat", lambda p, *a, **k: regular if str(p) == str(path) else real_stat(p, *a, **k))
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="FIFO"):
        load_config(path)
    assert time.monotonic() - t0 < 1.0


# -- found by a hostile pass in session 11 ---------------------------------------------------------

@pytest.mark.parametrize("kind", ["bomb", "deep", "digits"])
def test_a_config_that_expands_nests_or_counts_past_reason_is_one_line(tmp_path, kind):
    """Nine lists of nine aliases nine deep (a 2 KB file) reached 5 GB before it was killed; 5000
    levels of brackets and a 5000-digit number were internal errors. Each is one line, exit 2,
    from check-config and from detect --config alike."""
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
    text = {"bomb": "detect:\n  " + "\n  ".join(lines) + "\n", "deep": "x: " + "[" * 5000 + "]" * 5000 + "\n",
            "digits": "sources: [{name: a, type: file, path: x.wav}]\nring_seconds: " + "9" * 5000 + "\n"}[kind]
    said = {"bomb": "names more than 100000 values", "deep": "nested too deeply", "digits": "a value it cannot read"}[kind]
    path = tmp_path / "streamer.yaml"
    path.write_text(text)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=said):
        load_config(path)
    assert time.monotonic() - t0 < 5.0
    audio = write_wav(tmp_path / "a.wav", np.zeros(16000, np.float32))
    for args in (["check-config", str(path)], ["detect", str(audio), "--config", str(path)]):
        result = run_cli(*args, timeout=120)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"streamer: error: {path}: " + result.stderr.split(f"{path}: ", 1)[1].strip()]
        assert said in result.stderr and "Traceback" not in result.stderr and "internal error" not in result.stderr


def test_a_model_file_nested_too_deeply_is_a_checkpoint_error(tmp_path, tiny_checkpoint):
    directory, _ = tiny_checkpoint()
    (directory / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    result = run_cli("labels", str(directory))
    assert result.returncode == 1 and "config.json: not readable JSON (nested too deeply)" in result.stderr
    assert "internal error" not in result.stderr


def test_detect_into_a_closed_pipe_stops_printing_and_writes_every_window(tmp_path, tiny_checkpoint):
    """`streamer detect … | head -1`: the printing thread's BrokenPipeError was ~16 tracebacks and
    an --scores-out with 17 of 121 windows. Now it stops printing and the files are whole."""
    directory, _ = tiny_checkpoint(max_length=128)
    audio = write_wav(tmp_path / "long.wav", np.random.default_rng(0).normal(0, 0.1, 16000 * 30).astype(np.float32))
    scores, events = tmp_path / "s.npz", tmp_path / "e.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "streamer", "detect", str(audio), "--model", str(directory), "--device", "cpu",
                             "--hop", "0.25", "--scores-out", str(scores), "--events-out", str(events)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0 and "Traceback" not in err and "Broken pipe" not in err, err
    assert len(np.load(scores)["start_sample"]) == 1 + (30 * 16000 - window_samples(128)) // 4000
    assert events.is_file()


def test_detect_onto_a_full_standard_output_keeps_every_window_and_fails(tmp_path, tiny_checkpoint):
    """`> /dev/full`: only BrokenPipeError was caught, so ENOSPC threw whole batches away — 3 of 20
    windows in --scores-out, no ON in --events-out — with tracebacks and exit 0."""
    directory, _ = tiny_checkpoint(max_length=128)
    audio = write_wav(tmp_path / "long.wav", np.random.default_rng(0).normal(0, 0.1, 16000 * 30).astype(np.float32))
    config = tmp_path / "detect.yaml"
    config.write_text(json.dumps({"detect": {"include": ["*"], "defaults": {"on_threshold": 0.0, "off_threshold": 0.0, "hold": 0}}}))
    scores, events = tmp_path / "s.npz", tmp_path / "e.jsonl"
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "streamer", "detect", str(audio), "--model", str(directory), "--device", "cpu",
                                 "--config", str(config), "--scores-out", str(scores), "--events-out", str(events)],
                                stdout=full, stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and "standard output: writing failed (No space left on device)" in lines[0], result.stderr
    assert len(np.load(scores)["start_sample"]) == 1 + (30 * 16000 - window_samples(128)) // 16000
    assert any(json.loads(line)["state"] == "ON" for line in events.read_text().splitlines())


def test_detect_outputs_that_cannot_be_written_are_refused_before_scoring(tmp_path, tiny_checkpoint):
    """The same file for both outputs (the scores replaced the events), a device (/dev/full
    became /dev/full.npz), a closed standard output with nowhere else to write."""
    directory, _ = tiny_checkpoint(max_length=128)
    audio = write_wav(tmp_path / "a.wav", np.zeros(16000, dtype=np.float32))
    cases = [(["--events-out", str(tmp_path / "x.npz"), "--scores-out", str(tmp_path / "x")], "are the same file"),
             (["--scores-out", "/dev/full"], "/dev/full: not a regular file"),
             (["--events-out", "/dev/full"], "/dev/full: not a regular file")]
    for extra, said in cases:
        result = run_cli("detect", str(audio), "--model", str(directory), *extra, timeout=120)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1 and len(lines) == 1 and said in lines[0], result.stderr
        assert result.stdout == ""  # refused before any window was scored
    assert not Path("/dev/full.npz").exists() and not (tmp_path / "x.npz").exists()
    closed = subprocess.run([sys.executable, "-m", "streamer", "detect", str(audio), "--model", str(directory)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=120,
                            preexec_fn=lambda: os.close(1))
    assert closed.returncode == 1 and "standard output is closed" in closed.stderr, closed.stderr


def test_an_output_write_that_fails_leaves_the_earlier_file_whole(tmp_path):
    """save_scores wrote in place: a full disk left a truncated archive where a good one had been."""
    from streamer.detect import replaced_atomically

    earlier = tmp_path / "s.npz"
    earlier.write_bytes(b"the earlier, good file")
    with pytest.raises(StreamerError, match="writing failed .*any earlier s.npz is unchanged"):
        with replaced_atomically(earlier, "wb") as out:
            out.write(b"half of it")
            raise OSError(28, "No space left on device")
    assert earlier.read_bytes() == b"the earlier, good file" and sorted(tmp_path.iterdir()) == [earlier]
    with replaced_atomically(earlier, "wb") as out:
        out.write(b"new")
    assert earlier.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [earlier]


def test_a_symlink_loop_and_a_bench_on_a_missing_gpu_are_one_line(tmp_path, tiny_checkpoint):
    """A symlink loop was `internal error: RuntimeError`; `bench --device cuda` without a GPU wrote a
    report of errors and exited 0."""
    directory, _ = tiny_checkpoint(max_length=128)
    (tmp_path / "a.wav").symlink_to(tmp_path / "b.wav")
    (tmp_path / "b.wav").symlink_to(tmp_path / "a.wav")
    result = run_cli("detect", str(tmp_path / "a.wav"), "--model", str(directory), timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and "symbolic links" in lines[0] and "internal error" not in lines[0], result.stderr
    if not torch.cuda.is_available():
        out = tmp_path / "bench.json"
        result = run_cli("bench", "--device", "cuda", "--model", str(directory), "--no-transformers", "--out", str(out), timeout=120)
        assert result.returncode == 1 and "no CUDA GPU" in result.stderr and not out.exists(), result.stderr


def test_a_pipe_or_device_given_as_an_audio_file_is_refused_at_once(tmp_path, tiny_checkpoint):
    """A FIFO was opened twice (info, then decoding): detect hung for ever, and a writer died of SIGPIPE."""
    fifo = tmp_path / "fifo.wav"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(StreamerError, match="not a regular file"):
            read_audio(path)
    directory, _ = tiny_checkpoint()
    result = run_cli("detect", str(fifo), "--model", str(directory), "--device", "cpu", timeout=60)
    assert result.returncode == 1 and f"{fifo}: not a regular file (a pipe or a device)" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("change, said", [
    (lambda c, p: c["id2label"].update({"1": "cough\nFAKE LINE"}), "holds control characters"),
    (lambda c, p: c["id2label"].update({"1": c["id2label"]["0"]}), "each label needs its own name"),
    (lambda c, p: c["id2label"].update({"-0": "x"}), "written plainly"),
    (lambda c, p: c["id2label"].update({"1": "   "}), "non-empty strings"),
    (lambda c, p: p.clear() or p.update({"std": 1e-320}), "are not log-mel statistics"),
    (lambda c, p: p.clear() or p.update({"mean": 1e308}), "are not log-mel statistics"),
    (lambda c, p: None, "expected a JSON object"),  # preprocessor_config.json holding []
])
def test_model_files_that_forge_output_or_silently_break_scores_are_refused(tmp_path, tiny_checkpoint, change, said):
    """A label with a newline forged `detect` lines; two labels of one name; a std of 1e-320 gave
    NaN for every score with exit 0; a preprocessor file of [] was taken as "no file"."""
    directory, _ = tiny_checkpoint(num_labels=3)
    config = json.loads((directory / "config.json").read_text())
    pre = {"mean": -4.0, "std": 4.0}
    change(config, pre)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "preprocessor_config.json").write_text(json.dumps(pre if said != "expected a JSON object" else []))
    result = run_cli("labels", str(directory))
    assert result.returncode == 1 and said in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "FAKE LINE" not in result.stdout


def test_damaged_samples_in_a_detected_file_are_a_warning_with_their_count(tmp_path, tiny_checkpoint):
    directory, _ = tiny_checkpoint(max_length=128)
    samples = np.random.default_rng(0).normal(0, 0.1, 16000 * 2).astype(np.float32)
    samples[100:200], samples[300] = np.nan, np.inf
    path = tmp_path / "nan.wav"
    import soundfile as sf
    sf.write(path, samples, 16000, subtype="FLOAT")
    result = run_cli("detect", str(path), "--model", str(directory), "--device", "cpu")
    assert result.returncode == 0 and "101 sample(s) were NaN, infinite or beyond" in result.stderr, result.stderr
    clean = run_cli("detect", str(write_wav(tmp_path / "ok.wav", np.where(np.isfinite(samples), samples, 0))), "--model", str(directory), "--device", "cpu")
    assert clean.returncode == 0 and "were NaN" not in clean.stderr


def test_a_key_given_twice_is_named_with_both_lines(tmp_path):
    """`hop: 1.0` then `hop: 2.0` (or two `model:` blocks): YAML keeps the last without a word."""
    path = tmp_path / "streamer.yaml"
    path.write_text("sources: [{name: a, type: file, path: x.wav}]\nmodel: {path: a}\nhop: 1.0\ndetect:\n  include: [x]\nmodel: {path: b}\n")
    with pytest.raises(ConfigError, match=r":6: model: given twice \(first on line 2\)"):
        load_config(path)
    path.write_text("sources: [{name: a, type: file, path: x.wav}]\ndetect:\n  defaults: {hold: 1, hold: 2}\n")
    with pytest.raises(ConfigError, match=r":3: detect.defaults.hold: given twice"):
        load_config(path)
    path.write_text("sources: [{name: a, type: file, path: x.wav}, {name: b, type: file, path: y.wav}]\n")
    assert len(load_config(path).sources) == 2  # the same keys in two mappings are no repeat
    shipped = run_cli("check-config", str(REPO / "config" / "streamer.yaml"))
    assert "given twice" not in shipped.stderr


def test_the_metrics_port_closes_silent_connections_and_caps_them(monkeypatch):
    """http.server gives every connection a thread for as long as the client likes: a client that
    opens connections and sends nothing would hold threads without end. Silent ones are closed
    after METRICS_IDLE_S, and past METRICS_MAX_CONNECTIONS new ones are closed at once, counted."""
    import socket
    import threading

    from mqtt_helpers import free_port
    from streamer.sinks import metrics as metrics_module

    monkeypatch.setattr(metrics_module, "METRICS_MAX_CONNECTIONS", 4)
    monkeypatch.setattr(metrics_module, "METRICS_IDLE_S", 1.0)
    metrics = metrics_module.Metrics()
    server = metrics_module.MetricsServer(metrics, lambda: True, "127.0.0.1", free_port()).start()
    threads_before = threading.active_count()
    try:
        held = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(4)]
        for s in held:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        assert wait_for(lambda: threading.active_count() == threads_before + 4, 10)
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        assert extra.recv(1) == b"" and server.server.refused == 1  # closed at once, counted
        extra.close()
        for s in held:  # closed by the server once silent: without the timeout they stayed for ever
            assert s.recv(1) == b""
            s.close()
        assert wait_for(lambda: threading.active_count() == threads_before, 10)
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.0 200") and b"streamer_metrics_refused_connections 1.0" in answer
    finally:
        server.stop()

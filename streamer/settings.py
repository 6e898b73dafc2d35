"""The YAML config, validated once into frozen dataclasses before anything starts.

Every problem is reported with its path in the file and its line — all of them at once —
as a :class:`ConfigError` (exit code 2). ``${NAME}`` in a string is replaced by the
environment variable NAME (for secrets); a missing variable is an error.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from streamer.errors import StreamerError, text_number_hint
from streamer.sinks.clips import ClipSettings
from streamer.events import DetectSettings
from streamer.sinks.journal import JOURNAL_FILE, JournalSettings
from streamer.sinks.mqtt import MqttSettings, TlsSettings
from streamer.sinks.web import WebSettings, is_loopback

DEFAULT_CONFIG = Path("config/streamer.yaml")
HOP_MIN_S, HOP_MAX_S = 0.1, 10.0
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16", "int8", "onnx-fp32", "onnx-int8", "onnx-int8-all")  # as inference.engine.PRECISIONS
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_CONFIG_BYTES = 1 << 20  # a config is a few KiB; anything past 1 MiB is a mistake (or /dev/zero)
MAX_CONFIG_VALUES = 100_000  # keys and items, aliases expanded: a config has hundreds (a YAML bomb, billions)
STATE_DIR_DEFAULT = "state"  # relative to $STATE_DIRECTORY (systemd) or to the config file's directory
MQTT_MAX_BYTES = 65_535  # an MQTT string (topic, client id) is at most this many bytes of UTF-8
MQTT_NAME_ROOM = 1_024  # a name is part of longer topics: leave this much room for the rest
URL_MAX_CHARS = 8_192
MIB = 1 << 20
DAY_S = 86_400.0
HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


class ConfigError(StreamerError):
    exit_code = 2

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        Exception.__init__(self, "\n".join(problems))


@dataclass(frozen=True)
class ModelConfig:
    path: str = "MIT/ast-finetuned-audioset-10-10-0.4593"
    device: str = "auto"
    precision: str = "auto"  # CPU: fastest path within 0.02 of fp32 (streamer.inference.cpu); GPU: bf16
    max_batch: int | None = None  # `auto`: 8 on a CPU, 128 on a GPU (streamer.inference.engine)
    max_wait_ms: float = 20.0
    threads: int | None = None
    added_delay_ms: float = 0.0  # rehearsal knob: slow every batch down by this much


@dataclass(frozen=True)
class SourceConfig:
    name: str
    type: str  # mic | file | ffmpeg
    device: str | int | None = None
    path: str | None = None
    url: str | None = None
    gain: float = 1.0
    channels: int | None = None
    channel: int | None = None
    realtime: bool = True
    loop: bool = False


@dataclass(frozen=True)
class ConsoleConfig:
    mode: str = "auto"  # auto | live | lines | json | off


@dataclass(frozen=True)
class MetricsConfig:
    host: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True)
class Config:
    """The whole validated config. ``state_dir`` holds what survives restarts (the event journal)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sources: tuple[SourceConfig, ...] = ()
    hop: float = 1.0  # with hop_auto, a placeholder until the engine's measured speed sets it
    hop_auto: bool = False  # `hop: auto`: the smallest hop >= 0.5 s (and >= a trained model's calibration hop) the box sustains
    ring_seconds: float = 30.0
    detect: DetectSettings = field(default_factory=DetectSettings)
    mqtt: MqttSettings | None = None
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    log_level: str = "info"
    level_interval_s: float = 10.0
    metrics: MetricsConfig | None = None
    clips: ClipSettings | None = None
    state_dir: Path = Path(STATE_DIR_DEFAULT)
    journal: JournalSettings = field(default_factory=JournalSettings)
    web: WebSettings = field(default_factory=WebSettings)


SECTIONS = {"model", "sources", "hop", "ring_seconds", "detect", "mqtt", "console", "logging", "level_interval", "metrics", "clips",
            "state_dir", "journal", "web"}
JOURNAL_KEYS = {"path", "max_events", "max_days"}
MODEL_KEYS = {"path", "device", "precision", "max_batch", "max_wait_ms", "threads", "added_delay_ms"}
SOURCE_KEYS = {"name", "type", "device", "path", "url", "gain", "channels", "channel", "realtime", "loop"}
MQTT_KEYS = {"enabled", "host", "port", "prefix", "instance", "client_id", "username", "password", "keepalive",
             "protocol", "tls", "queue_size", "homeassistant", "discovery_prefix", "event_expiry"}
TLS_KEYS = {"ca", "cert", "key", "key_password", "insecure"}
WEB_KEYS = {"enabled", "host", "port", "token", "history", "history_days"}
WEB_TOKEN_MIN_CHARS = 16  # a guessable token on a LAN is no protection
SECRET_KEYS = {"password", "key_password", "token"}  # their values never appear in a message
BOOL_WORDS = {"true", "false", "yes", "no", "on", "off"}
BOOL_TEXT_HINT = " (quoted, it is text: write true or false without quotes)"


class _Checker:
    """Collects problems with their YAML line numbers."""

    def __init__(self, source: str, lines: dict[tuple, int]) -> None:
        self.source, self.lines, self.problems = source, lines, []

    def error(self, path: tuple, message: str) -> None:
        line = self.lines.get(path)
        where = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in path).replace(".[", "[")
        self.problems.append(f"{self.source}:{line or '?'}: {where or '(top)'}: {message}")

    def keys(self, raw: Any, allowed: set[str], path: tuple) -> dict:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.error(path, f"expected a mapping, got {type(raw).__name__}")
            return {}
        for key in raw:
            if key not in allowed:
                near = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                self.error(path + (key,), "unknown key" + (f" (did you mean {near[0]!r}?)" if near else ""))
        return raw

    def typed(self, raw: dict, key: str, kind, path: tuple, default=None, low=None, high=None, choices=None):
        if key not in raw or raw[key] is None:
            return default
        value = raw[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))  # YAML's true is no number
        if not ok:
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            shown = "a value of another type (not shown: a secret)" if key in SECRET_KEYS else repr(value)
            hint = "" if key in SECRET_KEYS else text_number_hint(value) if {int, float} & set(kinds) else (
                BOOL_TEXT_HINT if bool in kinds and isinstance(value, str) and value.lower() in BOOL_WORDS else "")
            self.error(path + (key,), f"expected {names}, got {shown}{hint}")
            return default
        if isinstance(value, float) and not math.isfinite(value):
            self.error(path + (key,), f"expected a finite number, got {value}")
            return default
        if choices is not None and value not in choices:
            self.error(path + (key,), f"must be one of {', '.join(map(str, choices))}, got {value!r}")
            return default
        if (low is not None and value < low) or (high is not None and value > high):
            self.error(path + (key,), f"{value} is outside {low}..{high}")
            return default
        return value


def tls_file_problems(tls: TlsSettings) -> list[tuple[str, str]]:
    """(key, problem) for each TLS file that is missing or holds no certificate, loaded as the
    client will load them: `check-config` names them (the daemon's start says the same in one
    line). Not part of parsing: a config stays valid text whatever the files hold today."""
    import ssl

    problems = []
    for key, value in (("ca", tls.ca_certs), ("cert", tls.certfile), ("key", tls.keyfile)):
        if isinstance(value, str) and not _expand_user(Path(value)).is_file():
            problems.append((key, f"{value}: {'not a file' if _expand_user(Path(value)).exists() else 'no such file'}"))
    if problems:
        return problems
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls.ca_certs:
        try:
            context.load_verify_locations(cafile=str(_expand_user(Path(tls.ca_certs))))
        except (ssl.SSLError, OSError, ValueError) as exc:
            problems.append(("ca", f"{tls.ca_certs}: not a PEM CA certificate ({' '.join(str(exc).split())[:120]})"))
    if tls.certfile:
        try:
            context.load_cert_chain(str(_expand_user(Path(tls.certfile))), str(_expand_user(Path(tls.keyfile))) if tls.keyfile else None,
                                    tls.keyfile_password)
        except (ssl.SSLError, OSError, ValueError) as exc:
            problems.append(("cert", f"{tls.certfile}{' with ' + tls.keyfile if tls.keyfile else ''}: not a PEM certificate "
                                     f"and its key ({' '.join(str(exc).split())[:120]})"))
    return problems


def _mqtt_text_problem(value: str, limit: int) -> str | None:
    """Why ``value`` cannot be an MQTT UTF-8 string (MQTT 5, 1.5.4; what mosquitto enforces), or None."""
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8 (an undecodable byte, e.g. from an environment variable)"
    if size > limit:
        return f"is {size} bytes of UTF-8; at most {limit} fit in an MQTT topic"
    if "\0" in value:
        return "contains a NUL character"
    for char in value:
        code = ord(char)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            return f"contains the control character U+{code:04X}"
        if 0xFDD0 <= code <= 0xFDEF or (code & 0xFFFE) == 0xFFFE:
            return f"contains the non-character U+{code:04X}"
    return None


def _utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def mqtt_name_problem(value: str, *, wildcards: bool = True, levels: bool = False) -> str | None:
    """Why ``value`` cannot be a topic part (prefix, instance, discovery prefix) or client id, or None.

    These used to pass ``check-config`` and then break every CONNECT (an invalid will topic)
    or paho's thread, silently; now they are refused with their line.
    """
    if value == "":
        return "must not be empty (leave the key out for the default)"
    problem = _mqtt_text_problem(value, MQTT_MAX_BYTES - MQTT_NAME_ROOM)
    if problem:
        return problem
    if wildcards and ("+" in value or "#" in value):
        return "contains an MQTT wildcard ('+' or '#'), which no topic may hold"
    if levels and "" in value.split("/"):
        return "has an empty topic level ('//', or a '/' at the start or end)"
    return None


def host_problem(host: str) -> str | None:
    """Why ``host`` is not a host name or IP address, or None."""
    try:
        ipaddress.ip_address(host.strip("[]"))
        return None
    except ValueError:
        pass
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return "is not a valid host name"
    labels = ascii_host[:-1].split(".") if ascii_host.endswith(".") else ascii_host.split(".")
    if not host or len(ascii_host) > 253 or not all(HOST_LABEL.match(label) for label in labels):
        return "is not a valid host name or IP address"
    return None


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be handed to ffmpeg as one argument, or None."""
    if len(url) > URL_MAX_CHARS:
        return f"is {len(url)} characters long; at most {URL_MAX_CHARS}"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return "contains a control character (NUL, newline, …)"
    try:
        url.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    return None


def resolve_state_dir(value: str | None, base_dir: Path) -> Path:
    """Where state lives: an absolute ``state_dir`` as it is; a relative one (default
    ``state``) under systemd's ``$STATE_DIRECTORY`` when set, else under the config's directory."""
    unit = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if value is None and unit:
        return Path(unit)
    path = _expand_user(Path(value or STATE_DIR_DEFAULT))
    return path if path.is_absolute() else (Path(unit) if unit else base_dir) / path


def _expand_user(path: Path) -> Path:
    try:
        return path.expanduser()
    except RuntimeError:  # ~someone who does not exist: leave it as written (a relative path)
        return path


def read_config_text(path: Path) -> str:
    """The config file's text, refusing anything that is not a small regular file, at once.

    A FIFO (would block forever), a device or a symlink to ``/dev/zero`` (would read until
    memory runs out) or an oversized file (minutes of YAML parsing) is a one-line error before
    a byte is read; O_NONBLOCK and a second check on the open descriptor cover a file swapped
    for a FIFO in between. So a reload (SIGHUP) can never block the main loop.
    """
    def refuse(st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a character device" if stat.S_ISCHR(st.st_mode)
                    else "a block device" if stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                    else "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file")
            raise ConfigError([f"{path}: is {kind}, not a regular file"])
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError([f"{path}: is {st.st_size} bytes; a config may be at most {MAX_CONFIG_BYTES} bytes"])

    try:
        refuse(os.stat(path))
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from None
    try:
        refuse(os.fstat(fd))
        chunks, size = [], 0
        while size <= MAX_CONFIG_BYTES:
            chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from None
    finally:
        os.close(fd)
    if size > MAX_CONFIG_BYTES:  # it grew while we read
        raise ConfigError([f"{path}: is over {MAX_CONFIG_BYTES} bytes; a config may be at most {MAX_CONFIG_BYTES} bytes"])
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from None


class _TooManyValues(Exception):
    """A config that names more than ``MAX_CONFIG_VALUES`` values."""


class _DuplicateKey(Exception):
    """A key given twice in one mapping: (dotted key, first line, second line)."""


def _line_map(node, path=(), out=None) -> dict[tuple, int]:
    """The line of every key and item. Counts what it walks: YAML aliases can make a 2 KB file
    name billions of values (nine lists of nine aliases, nine deep), and a config that big is
    refused before anything walks it whole (``MAX_CONFIG_VALUES``)."""
    out = {} if out is None else out
    if len(out) > MAX_CONFIG_VALUES:
        raise _TooManyValues
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        first: dict[Any, int] = {}
        for key, _ in node.value:  # YAML keeps the last of two equal keys without a word: `hop: 1` … `hop: 2`
            if isinstance(key, yaml.ScalarNode) and key.value in first and key.value != "<<":
                raise _DuplicateKey(".".join(map(str, path + (key.value,))), first[key.value], key.start_mark.line + 1)
            first.setdefault(key.value, key.start_mark.line + 1)
        for key, value in node.value:
            out[path + (key.value,)] = key.start_mark.line + 1
            _line_map(value, path + (key.value,), out)
            out[path + (key.value,)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, path + (i,), out)
    return out


def _expand_env(value: Any, path: tuple, check: _Checker) -> Any:
    if isinstance(value, str):
        def sub(match):
            name = match.group(1)
            if name not in os.environ:
                check.error(path, f"environment variable {name} is not set")
                return ""
            return os.environ[name]
        return ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, path + (k,), check) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, path + (i,), check) for i, v in enumerate(value)]
    return value


def _max_batch(m: dict, check: _Checker) -> int | None:
    """``model.max_batch``: a number of windows, or ``auto`` (the device's default)."""
    if m.get("max_batch") == "auto":
        return None
    return check.typed(m, "max_batch", int, ("model",), ModelConfig.max_batch, 1, 1024)


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a config file; command-line ``overrides`` win over its keys."""
    raw, lines = read_yaml(path)
    return parse_config(raw or {}, str(path), lines, overrides, base_dir=path.resolve().parent)


def read_yaml(path: Path) -> tuple[Any, dict[tuple, int]]:
    """A config file's values and the line of each, every fault one :class:`ConfigError` line:
    at most ``MAX_CONFIG_BYTES``, UTF-8, valid YAML, at most ``MAX_CONFIG_VALUES`` values with
    its aliases expanded, and not nested past Python's recursion limit."""
    text = read_config_text(path)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)  # one parse (libyaml when present) for lines and values
    try:
        node = loader.get_single_node()
        lines = _line_map(node) if node else {}  # before constructing: it bounds what the aliases expand to
        raw = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        position = getattr(exc, "position", None)  # a ReaderError (a control character) has a position, no mark
        line = f"{mark.line + 1}" if mark else f"{text.count(chr(10), 0, position) + 1}" if isinstance(position, int) else "?"
        why = getattr(exc, "problem", None) or str(exc).splitlines()[0]  # a ReaderError: its first line names the character
        raise ConfigError([f"{path}:{line}: not valid YAML ({why})"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: nested too deeply to be a config"]) from None
    except _DuplicateKey as exc:
        key, first, second = exc.args
        raise ConfigError([f"{path}:{second}: {key}: given twice (first on line {first}); YAML would keep only this one: "
                           f"remove one"]) from None
    except _TooManyValues:
        raise ConfigError([f"{path}: names more than {MAX_CONFIG_VALUES} values (YAML aliases repeating its parts?); "
                           f"a config needs far fewer: write it out plainly"]) from None
    except ValueError as exc:  # an integer of thousands of digits: Python's limit on converting them
        raise ConfigError([f"{path}: a value it cannot read ({exc})"]) from None
    finally:
        loader.dispose()
    return raw, lines


def parse_config(raw: Any, source: str = "config", lines: dict | None = None, overrides: dict | None = None,
                 base_dir: Path | None = None) -> Config:
    check = _Checker(source, lines or {})
    raw = check.keys(raw, SECTIONS, ())
    raw = _expand_env(raw, (), check)
    overrides = overrides or {}

    m = check.keys(raw.get("model"), MODEL_KEYS, ("model",))
    model = ModelConfig(
        path=overrides.get("model") or check.typed(m, "path", str, ("model",), ModelConfig.path),
        device=check.typed(m, "device", str, ("model",), ModelConfig.device),
        precision=check.typed(m, "precision", str, ("model",), ModelConfig.precision, choices=PRECISION_CHOICES),
        max_batch=_max_batch(m, check),
        max_wait_ms=float(check.typed(m, "max_wait_ms", (int, float), ("model",), ModelConfig.max_wait_ms, 0, 10_000)),
        threads=check.typed(m, "threads", int, ("model",), ModelConfig.threads, 1, 1024),
        added_delay_ms=float(check.typed(m, "added_delay_ms", (int, float), ("model",), ModelConfig.added_delay_ms, 0, 600_000)),
    )

    sources: list[SourceConfig] = []
    raw_sources = raw.get("sources")
    if overrides.get("source"):
        from streamer.capture.sources import source_from_spec

        sources.append(source_from_spec(overrides["source"]))
    elif raw_sources is None or raw_sources == []:
        check.error(("sources",), "no sources: add at least one (type mic, file or ffmpeg)")
    elif not isinstance(raw_sources, list):
        check.error(("sources",), "expected a list of sources")
    else:
        names: set[str] = set()
        for i, s in enumerate(raw_sources):
            p = ("sources", i)
            s = check.keys(s, SOURCE_KEYS, p)
            name = check.typed(s, "name", str, p)
            kind = check.typed(s, "type", str, p, choices=("mic", "file", "ffmpeg"))
            if not name:
                check.error(p, "every source needs a name")
            elif name in names:
                check.error(p + ("name",), f"two sources are named {name!r}")
            names.add(name or "")
            if kind == "file" and not s.get("path"):
                check.error(p, "a file source needs a path")
            if kind == "ffmpeg" and not s.get("url"):
                check.error(p, "an ffmpeg source needs a url")
            if isinstance(s.get("url"), str) and url_problem(s["url"]):
                check.error(p + ("url",), f"the url {url_problem(s['url'])}")
            device = s.get("device")
            if device is not None and not isinstance(device, (str, int)):
                check.error(p + ("device",), "expected a device name or index")
            sources.append(SourceConfig(
                name=name or f"source{i}", type=kind or "file", device=device,
                path=check.typed(s, "path", str, p), url=check.typed(s, "url", str, p),
                gain=float(check.typed(s, "gain", (int, float), p, SourceConfig.gain, 0, 1000)),
                channels=check.typed(s, "channels", int, p, SourceConfig.channels, 1, 64),
                channel=check.typed(s, "channel", int, p, SourceConfig.channel, 0, 63),
                realtime=check.typed(s, "realtime", bool, p, SourceConfig.realtime),
                loop=check.typed(s, "loop", bool, p, SourceConfig.loop),
            ))

    raw_hop = overrides.get("hop") or raw.get("hop")
    hop_auto = raw_hop == "auto"
    hop = Config.hop
    if isinstance(raw_hop, str) and not hop_auto:
        check.error(("hop",), f"expected a number of seconds ({HOP_MIN_S}–{HOP_MAX_S}) or auto, got {raw_hop!r}{text_number_hint(raw_hop)}")
    elif not hop_auto:
        hop = overrides.get("hop") or check.typed(raw, "hop", (int, float), (), Config.hop, HOP_MIN_S, HOP_MAX_S)
    if not hop_auto and abs(round(hop * 100) - hop * 100) > 1e-6:
        check.error(("hop",), f"{hop} is not a whole number of 10 ms frames")

    try:
        detect = DetectSettings.from_dict(raw.get("detect"))
    except StreamerError as exc:
        detect = DetectSettings()
        message = str(exc)
        key_path = tuple(message.split(":")[0].split("."))
        check.error(key_path, message.split(": ", 1)[1] if ": " in message else message)

    mqtt = None
    q = check.keys(raw.get("mqtt"), MQTT_KEYS, ("mqtt",))
    host = overrides.get("mqtt_host") or q.get("host")
    mqtt_enabled = bool(q) and check.typed(q, "enabled", bool, ("mqtt",), True)  # a quoted "false" is not true
    if mqtt_enabled or overrides.get("mqtt_host"):
        t = q.get("tls")
        tls = None
        if t:
            t = check.keys(t, TLS_KEYS, ("mqtt", "tls"))
            tp = ("mqtt", "tls")
            tls = TlsSettings(ca_certs=check.typed(t, "ca", str, tp), certfile=check.typed(t, "cert", str, tp),
                              keyfile=check.typed(t, "key", str, tp), keyfile_password=check.typed(t, "key_password", str, tp),
                              insecure=check.typed(t, "insecure", bool, tp, TlsSettings.insecure))
            if isinstance(tls.keyfile, str) and not tls.certfile:
                check.error(tp + ("key",), "a key without its certificate: give mqtt.tls.cert too")
        mqtt = MqttSettings(
            host=host or MqttSettings.host,
            port=overrides.get("mqtt_port") or check.typed(q, "port", int, ("mqtt",), MqttSettings.port, 1, 65535),
            prefix=check.typed(q, "prefix", str, ("mqtt",), MqttSettings.prefix),
            instance=check.typed(q, "instance", str, ("mqtt",), MqttSettings.instance),
            client_id=check.typed(q, "client_id", str, ("mqtt",), MqttSettings.client_id),
            username=check.typed(q, "username", str, ("mqtt",), MqttSettings.username),
            password=check.typed(q, "password", str, ("mqtt",), MqttSettings.password),
            keepalive=check.typed(q, "keepalive", int, ("mqtt",), MqttSettings.keepalive, 5, 3600),
            protocol=str(check.typed(q, "protocol", (str, int, float), ("mqtt",), MqttSettings.protocol)),
            tls=tls,
            queue_size=check.typed(q, "queue_size", int, ("mqtt",), MqttSettings.queue_size, 1, 10_000_000),
            homeassistant=check.typed(q, "homeassistant", bool, ("mqtt",), MqttSettings.homeassistant),
            discovery_prefix=check.typed(q, "discovery_prefix", str, ("mqtt",), MqttSettings.discovery_prefix),
            event_expiry_s=check.typed(q, "event_expiry", int, ("mqtt",), MqttSettings.event_expiry_s, 0, 10**7),
        )
        if mqtt.protocol not in ("3.1.1", "5", "5.0"):
            check.error(("mqtt", "protocol"), "must be 3.1.1 or 5")
        names = {"prefix": (mqtt.prefix, True), "instance": (mqtt.instance, False),
                 "discovery_prefix": (mqtt.discovery_prefix, True), "client_id": (mqtt.client_id, False)}
        for key, (value, levels) in names.items():
            problem = mqtt_name_problem(value, levels=levels) if isinstance(value, str) else None
            if problem:
                check.error(("mqtt", key), f"{value[:40]!r}{'…' if len(value) > 40 else ''} {problem}")
        if isinstance(mqtt.username, str) and _mqtt_text_problem(mqtt.username, MQTT_MAX_BYTES):
            check.error(("mqtt", "username"), f"the user name {_mqtt_text_problem(mqtt.username, MQTT_MAX_BYTES)}")
        if isinstance(mqtt.password, str) and not _utf8(mqtt.password):
            check.error(("mqtt", "password"), "is not valid UTF-8 (not shown: a secret)")
        if isinstance(mqtt.host, str) and host_problem(mqtt.host):
            check.error(("mqtt", "host"), f"{mqtt.host[:60]!r} {host_problem(mqtt.host)}")

    c = check.keys(raw.get("console"), {"mode"}, ("console",))
    if c.get("mode") is False:  # YAML 1.1 reads an unquoted `off` as false: the user meant "off"
        c = {**c, "mode": "off"}
    console = ConsoleConfig(mode=check.typed(c, "mode", str, ("console",), ConsoleConfig.mode, choices=("auto", "live", "lines", "json", "off")))
    lg = check.keys(raw.get("logging"), {"level"}, ("logging",))
    level = check.typed(lg, "level", str, ("logging",), Config.log_level, choices=("debug", "info", "warning", "error"))

    metrics = None
    mt = check.keys(raw.get("metrics"), {"enabled", "host", "port"}, ("metrics",))
    if mt and check.typed(mt, "enabled", bool, ("metrics",), False):
        metrics = MetricsConfig(host=check.typed(mt, "host", str, ("metrics",), MetricsConfig.host),
                                port=check.typed(mt, "port", int, ("metrics",), MetricsConfig.port, 0, 65535))
    clips = None
    cl = check.keys(raw.get("clips"), {"enabled", "directory", "pre", "post", "max_mb", "max_days"}, ("clips",))
    if cl and check.typed(cl, "enabled", bool, ("clips",), False):
        clips = ClipSettings(
            directory=Path(check.typed(cl, "directory", str, ("clips",), str(ClipSettings.directory))),
            pre=float(check.typed(cl, "pre", (int, float), ("clips",), ClipSettings.pre, 0, 60)),
            post=float(check.typed(cl, "post", (int, float), ("clips",), ClipSettings.post, 0, 60)),
            max_bytes=int(check.typed(cl, "max_mb", (int, float), ("clips",), ClipSettings.max_bytes / MIB, 1, 10**7) * MIB),
            max_age_s=float(check.typed(cl, "max_days", (int, float), ("clips",), ClipSettings.max_age_s / DAY_S, 0.001, 36500)) * DAY_S,
        )
    state_value = check.typed(raw, "state_dir", str, (), None)
    if isinstance(state_value, str) and (not state_value or "\0" in state_value):
        check.error(("state_dir",), "must be a directory path")
        state_value = None
    state_dir = resolve_state_dir(state_value, base_dir or Path.cwd())
    jn = check.keys(raw.get("journal"), JOURNAL_KEYS, ("journal",))
    journal_path = check.typed(jn, "path", str, ("journal",), JOURNAL_FILE)
    if not journal_path or "\0" in journal_path:
        check.error(("journal", "path"), "must be a file path")
        journal_path = JOURNAL_FILE
    journal = JournalSettings(
        path=state_dir / _expand_user(Path(journal_path)),
        max_events=check.typed(jn, "max_events", int, ("journal",), JournalSettings.max_events, 1, 100_000_000),
        max_age_s=float(check.typed(jn, "max_days", (int, float), ("journal",), JournalSettings.max_age_s / DAY_S,
                                    0.001, 36500)) * DAY_S,
    )
    # -- web (the page, its live feed, the history; /metrics and /healthz when enabled) --
    w = check.keys(raw.get("web"), WEB_KEYS, ("web",))
    web = WebSettings(
        enabled=check.typed(w, "enabled", bool, ("web",), WebSettings.enabled),
        host=check.typed(w, "host", str, ("web",), WebSettings.host),
        port=check.typed(w, "port", int, ("web",), WebSettings.port, 0, 65535),
        token=check.typed(w, "token", str, ("web",), WebSettings.token),
        history=state_dir / _expand_user(Path(check.typed(w, "history", str, ("web",), str(WebSettings.history))
                                                       or WebSettings.history)),
        history_days=float(check.typed(w, "history_days", (int, float), ("web",), WebSettings.history_days, 0.001, 36500)),
    )
    if web.token is not None and len(web.token.strip()) < WEB_TOKEN_MIN_CHARS:
        check.error(("web", "token"), f"too short: use at least {WEB_TOKEN_MIN_CHARS} characters, not counting spaces (not shown: a secret)")
    elif web.token is not None and web.token != web.token.strip():
        check.error(("web", "token"), "starts or ends with a space or line break, which a browser's Bearer header drops: "
                                      "remove it (not shown: a secret)")
    if web.enabled and not web.token and not is_loopback(web.host):
        check.error(("web", "host"), f"{web.host} is reachable from other machines: set web.token "
                    "(e.g. ${STREAMER_WEB_TOKEN}) or bind 127.0.0.1")
    ring_seconds = float(check.typed(raw, "ring_seconds", (int, float), (), Config.ring_seconds, 12, 3600))
    level_interval = float(check.typed(raw, "level_interval", (int, float), (), Config.level_interval_s, 0.1, 86400))
    if check.problems:
        raise ConfigError(check.problems)
    return Config(model=model, sources=tuple(sources), hop=float(hop), hop_auto=hop_auto, detect=detect, mqtt=mqtt, console=console,
                  log_level=level, ring_seconds=ring_seconds,
                  level_interval_s=level_interval, metrics=metrics, clips=clips, state_dir=state_dir, journal=journal, web=web)

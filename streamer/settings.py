"""The YAML config, validated once into frozen dataclasses before anything starts.

Every problem is reported with its path in the file and its line — all of them at once —
as a :class:`ConfigError` (exit code 2). ``${NAME}`` in a string is replaced by the
environment variable NAME (for secrets); a missing variable is an error.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from streamer.errors import StreamerError
from streamer.sinks.clips import ClipSettings
from streamer.events import DetectSettings
from streamer.sinks.mqtt import MqttSettings, TlsSettings
from streamer.sinks.web import WebSettings, is_loopback

DEFAULT_CONFIG = Path("config/streamer.yaml")
HOP_MIN_S, HOP_MAX_S = 0.1, 10.0
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigError(StreamerError):
    exit_code = 2

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        Exception.__init__(self, "\n".join(problems))


@dataclass(frozen=True)
class ModelConfig:
    path: str = "MIT/ast-finetuned-audioset-10-10-0.4593"
    device: str = "auto"
    precision: str = "fp32"
    max_batch: int = 8
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
    model: ModelConfig = field(default_factory=ModelConfig)
    sources: tuple[SourceConfig, ...] = ()
    hop: float = 1.0
    ring_seconds: float = 30.0
    detect: DetectSettings = field(default_factory=DetectSettings)
    mqtt: MqttSettings | None = None
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    log_level: str = "info"
    level_interval_s: float = 10.0
    metrics: MetricsConfig | None = None
    clips: ClipSettings | None = None
    web: WebSettings = field(default_factory=WebSettings)


SECTIONS = {"model", "sources", "hop", "ring_seconds", "detect", "mqtt", "console", "logging", "level_interval", "metrics", "clips", "web"}
MODEL_KEYS = {"path", "device", "precision", "max_batch", "max_wait_ms", "threads", "added_delay_ms"}
SOURCE_KEYS = {"name", "type", "device", "path", "url", "gain", "channels", "channel", "realtime", "loop"}
MQTT_KEYS = {"enabled", "host", "port", "prefix", "instance", "client_id", "username", "password", "keepalive",
             "protocol", "tls", "queue_size", "homeassistant", "discovery_prefix", "event_expiry"}
TLS_KEYS = {"ca", "cert", "key", "key_password", "insecure"}
WEB_KEYS = {"enabled", "host", "port", "token", "history", "history_days"}
WEB_TOKEN_MIN_CHARS = 16  # a guessable token on a LAN is no protection
SECRET_KEYS = {"password", "key_password", "token"}  # their values never appear in a message


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
            self.error(path + (key,), f"expected {names}, got {shown}")
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


def _line_map(node, path=(), out=None) -> dict[tuple, int]:
    out = {} if out is None else out
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
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


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a config file; command-line ``overrides`` win over its keys."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from None
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"{mark.line + 1}" if mark else "?"
        raise ConfigError([f"{path}:{line}: not valid YAML ({getattr(exc, 'problem', None) or exc})"]) from None
    return parse_config(raw or {}, str(path), _line_map(node) if node else {}, overrides)


def parse_config(raw: Any, source: str = "config", lines: dict | None = None, overrides: dict | None = None) -> Config:
    check = _Checker(source, lines or {})
    raw = check.keys(raw, SECTIONS, ())
    raw = _expand_env(raw, (), check)
    overrides = overrides or {}

    m = check.keys(raw.get("model"), MODEL_KEYS, ("model",))
    model = ModelConfig(
        path=overrides.get("model") or check.typed(m, "path", str, ("model",), ModelConfig.path),
        device=check.typed(m, "device", str, ("model",), "auto"),
        precision=check.typed(m, "precision", str, ("model",), "fp32", choices=("fp32", "bf16", "fp16", "int8")),
        max_batch=check.typed(m, "max_batch", int, ("model",), 8, 1, 1024),
        max_wait_ms=float(check.typed(m, "max_wait_ms", (int, float), ("model",), 20.0, 0, 10_000)),
        threads=check.typed(m, "threads", int, ("model",), None, 1, 1024),
        added_delay_ms=float(check.typed(m, "added_delay_ms", (int, float), ("model",), 0.0, 0, 600_000)),
    )

    sources: list[SourceConfig] = []
    raw_sources = raw.get("sources")
    if overrides.get("source"):
        from streamer.streams import source_from_spec

        spec = overrides["source"]
        probe = source_from_spec(spec)
        kind = probe.kind
        sources.append(SourceConfig(name=probe.name, type=kind, device=getattr(probe, "device_spec", None),
                                    path=str(getattr(probe, "path", "")) or None, url=getattr(probe, "url", None)))
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
            device = s.get("device")
            if device is not None and not isinstance(device, (str, int)):
                check.error(p + ("device",), "expected a device name or index")
            sources.append(SourceConfig(
                name=name or f"source{i}", type=kind or "file", device=device,
                path=check.typed(s, "path", str, p), url=check.typed(s, "url", str, p),
                gain=float(check.typed(s, "gain", (int, float), p, 1.0, 0, 1000)),
                channels=check.typed(s, "channels", int, p, None, 1, 64), channel=check.typed(s, "channel", int, p, None, 0, 63),
                realtime=check.typed(s, "realtime", bool, p, True), loop=check.typed(s, "loop", bool, p, False),
            ))

    hop = overrides.get("hop") or check.typed(raw, "hop", (int, float), (), 1.0, HOP_MIN_S, HOP_MAX_S)
    if abs(round(hop * 100) - hop * 100) > 1e-6:
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
    if (q and q.get("enabled", True)) or overrides.get("mqtt_host"):
        t = q.get("tls")
        tls = None
        if t:
            t = check.keys(t, TLS_KEYS, ("mqtt", "tls"))
            tp = ("mqtt", "tls")
            tls = TlsSettings(ca_certs=check.typed(t, "ca", str, tp), certfile=check.typed(t, "cert", str, tp),
                              keyfile=check.typed(t, "key", str, tp), keyfile_password=check.typed(t, "key_password", str, tp),
                              insecure=check.typed(t, "insecure", bool, tp, False))
        mqtt = MqttSettings(
            host=host or "localhost",
            port=overrides.get("mqtt_port") or check.typed(q, "port", int, ("mqtt",), 1883, 1, 65535),
            prefix=check.typed(q, "prefix", str, ("mqtt",), "streamer"),
            instance=check.typed(q, "instance", str, ("mqtt",), None),
            client_id=check.typed(q, "client_id", str, ("mqtt",), None),
            username=check.typed(q, "username", str, ("mqtt",), None),
            password=check.typed(q, "password", str, ("mqtt",), None),
            keepalive=check.typed(q, "keepalive", int, ("mqtt",), 30, 5, 3600),
            protocol=str(check.typed(q, "protocol", (str, int, float), ("mqtt",), "3.1.1")),
            tls=tls,
            queue_size=check.typed(q, "queue_size", int, ("mqtt",), 10_000, 1, 10_000_000),
            homeassistant=check.typed(q, "homeassistant", bool, ("mqtt",), True),
            discovery_prefix=check.typed(q, "discovery_prefix", str, ("mqtt",), "homeassistant"),
            event_expiry_s=check.typed(q, "event_expiry", int, ("mqtt",), 3600, 0, 10**7),
        )
        if mqtt.protocol not in ("3.1.1", "5", "5.0"):
            check.error(("mqtt", "protocol"), "must be 3.1.1 or 5")

    c = check.keys(raw.get("console"), {"mode"}, ("console",))
    console = ConsoleConfig(mode=check.typed(c, "mode", str, ("console",), "auto", choices=("auto", "live", "lines", "json", "off")))
    lg = check.keys(raw.get("logging"), {"level"}, ("logging",))
    level = check.typed(lg, "level", str, ("logging",), "info", choices=("debug", "info", "warning", "error"))

    metrics = None
    mt = check.keys(raw.get("metrics"), {"enabled", "host", "port"}, ("metrics",))
    if mt and check.typed(mt, "enabled", bool, ("metrics",), False):
        metrics = MetricsConfig(host=check.typed(mt, "host", str, ("metrics",), "127.0.0.1"),
                                port=check.typed(mt, "port", int, ("metrics",), 9464, 0, 65535))
    clips = None
    cl = check.keys(raw.get("clips"), {"enabled", "directory", "pre", "post", "max_mb", "max_days"}, ("clips",))
    if cl and check.typed(cl, "enabled", bool, ("clips",), False):
        clips = ClipSettings(
            directory=Path(check.typed(cl, "directory", str, ("clips",), "clips")),
            pre=float(check.typed(cl, "pre", (int, float), ("clips",), 2.0, 0, 60)),
            post=float(check.typed(cl, "post", (int, float), ("clips",), 2.0, 0, 60)),
            max_bytes=int(check.typed(cl, "max_mb", (int, float), ("clips",), 1024, 1, 10**7) * 2**20),
            max_age_s=float(check.typed(cl, "max_days", (int, float), ("clips",), 30, 0.001, 36500)) * 86400,
        )
    # -- web (the page, its live feed, the history; /metrics and /healthz when enabled) --
    w = check.keys(raw.get("web"), WEB_KEYS, ("web",))
    web = WebSettings(
        enabled=check.typed(w, "enabled", bool, ("web",), False),
        host=check.typed(w, "host", str, ("web",), "127.0.0.1"),
        port=check.typed(w, "port", int, ("web",), 8765, 0, 65535),
        token=check.typed(w, "token", str, ("web",), None),
        history=Path(check.typed(w, "history", str, ("web",), "history.sqlite3")),
        history_days=float(check.typed(w, "history_days", (int, float), ("web",), 30, 0.001, 36500)),
    )
    if web.token is not None and len(web.token) < WEB_TOKEN_MIN_CHARS:
        check.error(("web", "token"), f"too short: use at least {WEB_TOKEN_MIN_CHARS} characters (not shown: a secret)")
    if web.enabled and not web.token and not is_loopback(web.host):
        check.error(("web", "host"), f"{web.host} is reachable from other machines: set web.token "
                    "(e.g. ${STREAMER_WEB_TOKEN}) or bind 127.0.0.1")
    ring_seconds = float(check.typed(raw, "ring_seconds", (int, float), (), 30.0, 12, 3600))
    level_interval = float(check.typed(raw, "level_interval", (int, float), (), 10.0, 0.1, 86400))
    if check.problems:
        raise ConfigError(check.problems)
    return Config(model=model, sources=tuple(sources), hop=float(hop), detect=detect, mqtt=mqtt, console=console,
                  log_level=level, ring_seconds=ring_seconds,
                  level_interval_s=level_interval, metrics=metrics, clips=clips, web=web)

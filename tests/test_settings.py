"""`config/streamer.yaml` documents the defaults: every value it sets is the default in
`streamer.settings` (its example targets aside), so the file and the code cannot drift."""

from __future__ import annotations

import dataclasses

import yaml

from conftest import REPO
from streamer.settings import parse_config

OPTIONAL = ("mqtt", "metrics", "clips", "web")  # sections off by default: compared switched on


def test_the_shipped_config_shows_every_default():
    raw = yaml.safe_load((REPO / "config" / "streamer.yaml").read_text())
    switched_on = {section: {"enabled": True} for section in OPTIONAL}
    shipped = {**raw, **{s: {**(raw.get(s) or {}), "enabled": True} for s in OPTIONAL}}
    defaults = {"sources": raw["sources"], **switched_on}
    base = REPO / "config"
    a = parse_config(shipped, base_dir=base)
    b = parse_config(defaults, base_dir=base)
    differ = [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]
    assert differ == ["detect"]  # the example targets; the knobs themselves are the defaults
    assert a.detect.defaults == b.detect.defaults and a.detect.min_level_dbfs == b.detect.min_level_dbfs
    assert a.mqtt is not None and a.web is not None  # the comparison did look at those sections


def test_a_section_that_sets_nothing_gets_the_dataclass_defaults():
    """Each default lives once, in its dataclass: the parser reads it from there."""
    from streamer.settings import Config, ConsoleConfig, MetricsConfig, ModelConfig, SourceConfig
    from streamer.sinks.clips import ClipSettings
    from streamer.sinks.mqtt import MqttSettings
    from streamer.sinks.web import WebSettings

    config = parse_config({"sources": [{"name": "a", "type": "file", "path": "x.wav"}],
                           **{s: {"enabled": True} for s in OPTIONAL}}, base_dir=REPO)
    assert config.model == ModelConfig()
    assert config.sources[0] == SourceConfig(name="a", type="file", path="x.wav")
    assert config.console == ConsoleConfig() and config.metrics == MetricsConfig()
    assert config.mqtt == MqttSettings()
    assert config.clips == ClipSettings()
    assert dataclasses.replace(config.web, history=WebSettings.history) == WebSettings(enabled=True)
    defaults = Config()
    for name in ("hop", "hop_auto", "ring_seconds", "log_level", "level_interval_s", "detect"):
        assert getattr(config, name) == getattr(defaults, name), name
    assert config.journal.max_events == defaults.journal.max_events
    assert config.journal.max_age_s == defaults.journal.max_age_s


def test_max_batch_is_a_number_or_auto_the_devices_default():
    import pytest

    from streamer.settings import ConfigError

    source = {"sources": [{"name": "a", "type": "file", "path": "x.wav"}]}
    assert parse_config({**source, "model": {"max_batch": "auto"}}, base_dir=REPO).model.max_batch is None
    assert parse_config({**source, "model": {"max_batch": 32}}, base_dir=REPO).model.max_batch == 32
    with pytest.raises(ConfigError, match="max_batch"):
        parse_config({**source, "model": {"max_batch": "lots"}}, base_dir=REPO)

"""The systemd unit: verified with systemd-analyze where it exists, and its key settings."""

from __future__ import annotations

import configparser
import shutil
import subprocess

import pytest

from conftest import REPO

UNIT = REPO / "systemd" / "streamer.service"


def unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)
    parser.optionxform = str
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_declares_notify_watchdog_reload_and_hardening():
    u = unit()
    service = u["Service"]
    assert service["Type"] == "notify"
    assert int(service["WatchdogSec"]) > 0
    assert service["Restart"] == "on-failure"
    assert "-HUP" in service["ExecReload"]
    assert "streamer run --config" in service["ExecStart"]
    assert service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] == "yes"
    assert "audio" in service["SupplementaryGroups"]
    assert service["ConfigurationDirectory"] == "streamer" and service["StateDirectory"] == "streamer"
    # relative paths of the config (clips, models) resolve in the state directory
    assert service["WorkingDirectory"] in ("%S/streamer", "/var/lib/streamer")
    assert "char-alsa" in UNIT.read_text()  # /dev/snd stays reachable


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path):
    copy = tmp_path / "streamer.service"
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/streamer", shutil.which("true") or "/bin/true"))
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "streamer.service" not in result.stderr, result.stderr  # no warnings about our unit

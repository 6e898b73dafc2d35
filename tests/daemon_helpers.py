"""Looking at a running daemon from outside: its /metrics and its /proc entry."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path


def scrape_metrics(port: int) -> dict[str, float]:
    """The daemon's /metrics as {'name{labels}': value}; empty while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def metric(values: dict[str, float], name: str, default: float = float("nan"), **labels) -> float:
    """The sum of metric ``name`` over the series carrying all of ``labels``; ``default`` if none."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    found = [v for k, v in values.items() if k.split("{")[0] == name and all(w in k for w in want)]
    return sum(found) if found else default


def process_status(pid: int) -> dict[str, int]:
    """Resident memory (KiB), threads and open file descriptors of a process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"rss_kib": int(fields["VmRSS"].split()[0]), "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}

"""How fast a journal backlog drains to a real broker, and how fast events are journaled.

1. Append: N events into the SQLite journal (WAL, synchronous=FULL: one fsync per event),
   events/s — the cost an event pays before it counts as raised.
2. Drain: a backlog of N events already in the journal (an outage, or an earlier run that
   was killed) delivered to mosquitto on loopback with QoS 1, every row marked only on its
   PUBACK. Timed from the publisher's start to the journal being empty. Goal: ≥ 2 000
   events/s for a 10 000-event backlog.

    python bench/bench_journal.py [--events 10000] [--runs 3]
"""

from __future__ import annotations

import argparse
import getpass
import json
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamer.events import Event  # noqa: E402
from streamer.sinks.journal import EventJournal  # noqa: E402
from streamer.sinks.mqtt import INFLIGHT_WINDOW, MqttPublisher, MqttSettings  # noqa: E402

GOAL_EVENTS_PER_S = 2_000


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return f"{fields.get('Model name', platform.processor()).strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"
    except OSError:
        return platform.processor() or "unknown CPU"


def event(n: int) -> Event:
    return Event(id=f"bench:dog:{n}", stream="Bench", target="Dog", state="ON" if n % 2 == 0 else "OFF", labels=("Dog",),
                 start_sample=n * 16000, end_sample=None, start_time=time.time(), end_time=None, peak=0.9, mean=0.8)


def broker(directory: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = directory / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nuser {getpass.getuser()}\nmax_inflight_messages 0\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise SystemExit("mosquitto did not start")


def run_once(directory: Path, count: int) -> dict[str, float]:
    journal = EventJournal(directory / f"journal-{time.monotonic_ns()}.db", max_events=count * 2)
    t0 = time.perf_counter()
    for n in range(count):
        journal.append(event(n))
    append_s = time.perf_counter() - t0
    proc, port = broker(directory)
    try:
        settings = MqttSettings(host="127.0.0.1", port=port, homeassistant=False, reconnect_min_s=1, reconnect_max_s=1)
        t0 = time.perf_counter()
        pub = MqttPublisher(settings, {"Bench": ["Dog"]}, journal=journal).start()
        while journal.pending_count() and time.perf_counter() - t0 < 300:
            time.sleep(0.01)
        drain_s = time.perf_counter() - t0
        delivered = pub.stats.events_delivered
        pub.stop(timeout=5)
    finally:
        proc.terminate()
        proc.wait(10)
    counts = journal.counts()
    journal.close()
    assert counts.pending == 0 and delivered == count, (counts, delivered)
    return {"append_per_s": count / append_s, "drain_per_s": count / drain_s, "drain_s": drain_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("mosquitto") is None:
        raise SystemExit("mosquitto is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_once(Path(tmp), args.events) for _ in range(args.runs)]
    result = {
        "machine": cpu_name(), "events": args.events, "runs": args.runs, "inflight_window": INFLIGHT_WINDOW,
        "append_per_s": statistics.median(r["append_per_s"] for r in runs),
        "drain_per_s": statistics.median(r["drain_per_s"] for r in runs),
        "drain_per_s_min": min(r["drain_per_s"] for r in runs),
        "drain_s": statistics.median(r["drain_s"] for r in runs),
        "goal_per_s": GOAL_EVENTS_PER_S,
    }
    print("| machine | backlog | in-flight window | append events/s (fsync each) | drain events/s median (min) | drain s | goal |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {result['machine']} | {args.events} | {INFLIGHT_WINDOW} | {result['append_per_s']:.0f} | "
          f"{result['drain_per_s']:.0f} ({result['drain_per_s_min']:.0f}) | {result['drain_s']:.2f} | ≥ {GOAL_EVENTS_PER_S} |")
    out = ROOT / "bench" / "results" / "journal_cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

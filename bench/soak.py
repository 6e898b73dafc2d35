"""Soak: the real daemon on several sources for hours of audio, the broker restarted on a
schedule; RSS, open file descriptors and threads sampled throughout, every event accounted for.

Two phases, each its own `streamer run`:
  1. fast: looping file sources read as fast as the CPU allows, until ``--stream-hours`` of
     audio (summed over the sources) have been scored;
  2. real time: the same sources paced at real time for ``--realtime-minutes``.
In both, mosquitto is stopped and started again every ``--broker-every`` seconds, and a
recorder with a persistent session counts the events that reach it. At the end the
daemon's own account (raised = delivered + dropped + unsent) is checked against the
recorder's.

    python bench/soak.py MODEL_DIR [--sources 4] [--stream-hours 6] [--realtime-minutes 30]
    python bench/soak.py MODEL_DIR --short      # a few minutes, for a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from daemon_helpers import metric, process_status, scrape_metrics  # noqa: E402
from mqtt_helpers import Broker, Subscriber, free_port  # noqa: E402
from streamer.capture.files import read_audio  # noqa: E402
from streamer.constants import SAMPLE_RATE_HZ  # noqa: E402
from streamer.scenes import build_scene  # noqa: E402

SAMPLE_EVERY_S = 10.0
BROKER_DOWN_S = 3.0
DRAIN_S = 60.0  # at most this long for queued events to reach the broker before the stop
WARM_UP_FRACTION = 0.1  # growth is measured from the first sample after this share of the run
SUMMARY = re.compile(r"events: raised (\d+); mqtt delivered (\d+), dropped (\d+) \(queue full\), unsent (\d+)")


def scene_file(data: Path, directory: Path) -> Path:
    """Every real clip once, 9 s apart over background: about five minutes, looped by the sources."""
    clips = [(read_audio(p), p.parent.name) for p in sorted(data.glob("*/*.wav")) if p.parent.name != "background"]
    background = [read_audio(p) for p in sorted((data / "background").glob("*.wav"))]
    audio, _ = build_scene(clips, background, seed=1)
    path = directory / "soak_scene.wav"
    sf.write(path, audio, SAMPLE_RATE_HZ, subtype="FLOAT")
    return path


def phase(name: str, model: Path, audio: Path, work: Path, sources: int, realtime: bool, hop: float,
          stop_after_stream_s: float | None, stop_after_wall_s: float | None, broker_every_s: float) -> dict:
    (work / name).mkdir()
    # unlimited queue for the recorder while it reconnects after each broker restart
    broker = Broker(work / name, persistence=True, extra=["max_queued_messages 0"])
    recorder = Subscriber(broker.port, ["streamer/+/events"], client_id=f"soak-{name}", persistent=True)
    port = free_port()
    config = {
        "model": {"path": str(model), "max_batch": 8, "threads": 2},
        "hop": hop,
        "sources": [{"name": f"s{i}", "type": "file", "path": str(audio), "realtime": realtime, "loop": True} for i in range(sources)],
        "detect": {"defaults": {"on_threshold": 0.5, "off_threshold": 0.35, "hold": 1.0, "smoothing": "none"}},
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "homeassistant": True, "queue_size": 100_000},
        "metrics": {"enabled": True, "port": port},
        "console": {"mode": "off"},
        "logging": {"level": "info"},
    }
    path = work / name / "streamer.yaml"
    path.write_text(json.dumps(config))
    err = open(work / name / "stderr.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamer", "run", "--config", str(path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=err, text=True)
    started = time.monotonic()
    samples, restarts, next_restart = [], 0, started + broker_every_s
    try:
        while proc.poll() is None:
            time.sleep(SAMPLE_EVERY_S)
            now = time.monotonic()
            m = scrape_metrics(port)
            stream_s = metric(m, "streamer_windows_total", 0.0) * hop
            samples.append({"t": round(now - started, 1), "stream_s": stream_s, **process_status(proc.pid),
                            "skipped": metric(m, "streamer_windows_skipped", 0.0), "mqtt_queue": metric(m, "streamer_mqtt_queue_length", 0.0)})
            print(f"{name}: {samples[-1]}", flush=True)
            if now >= next_restart:
                broker.stop()
                time.sleep(BROKER_DOWN_S)
                broker.start()
                restarts += 1
                next_restart = time.monotonic() + broker_every_s
            if (stop_after_stream_s and stream_s >= stop_after_stream_s) or (stop_after_wall_s and now - started >= stop_after_wall_s):
                break
        # the broker is up again (restarts are synchronous): let the queue drain, then stop
        drain_until = time.monotonic() + DRAIN_S
        while metric(scrape_metrics(port), "streamer_mqtt_queue_length", 0.0) > 0 and time.monotonic() < drain_until:
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        proc.wait(120)
        stop_s = time.monotonic() - t0
    finally:
        proc.kill()
        err.close()
    log = (work / name / "stderr.log").read_text()
    found = SUMMARY.search(log)
    raised, delivered, dropped, unsent = map(int, found.groups()) if found else (-1, -1, -1, -1)
    time.sleep(5)  # the recorder's last messages
    received = {(json.loads(m.payload)["stream"], json.loads(m.payload)["id"], json.loads(m.payload)["state"])
                for m in recorder.messages}
    recorder.close()
    broker.stop()
    warm = next(s for s in samples if s["t"] >= samples[-1]["t"] * WARM_UP_FRACTION)
    last = samples[-1]
    return {
        "phase": name, "realtime": realtime, "sources": sources, "hop_s": hop,
        "wall_s": last["t"], "stream_hours": round(last["stream_s"] / 3600, 2),
        "broker_restarts": restarts, "exit_code": proc.returncode, "stop_s": round(stop_s, 1),
        "events_raised": raised, "events_delivered": delivered, "events_dropped": dropped, "events_unsent": unsent,
        "events_received_by_recorder": len(received),
        "accounted": raised == delivered + dropped + unsent and len(received) == delivered,
        "rss_mib": [round(warm["rss_kib"] / 1024, 1), round(last["rss_kib"] / 1024, 1)],
        "rss_growth_mib": round((last["rss_kib"] - warm["rss_kib"]) / 1024, 1),
        "rss_max_mib": round(max(s["rss_kib"] for s in samples) / 1024, 1),
        "fds": [warm["fds"], last["fds"]], "threads": [warm["threads"], last["threads"]],
        "windows_skipped": last["skipped"], "tracebacks": log.count("Traceback"),
        "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "audio" / "real")
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument("--hop", type=float, default=1.0)
    parser.add_argument("--stream-hours", type=float, default=6.0)
    parser.add_argument("--realtime-minutes", type=float, default=30.0)
    parser.add_argument("--broker-every", type=float, default=120.0, help="seconds between broker restarts")
    parser.add_argument("--short", action="store_true", help="0.5 stream hours and 2 real-time minutes")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak_cpu.json")
    args = parser.parse_args()
    if args.short:
        args.stream_hours, args.realtime_minutes, args.broker_every = 0.5, 2.0, 30.0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        audio = scene_file(args.data, work)
        results = []
        if args.stream_hours > 0:
            results.append(phase("fast", args.model, audio, work, args.sources, False, args.hop,
                                 args.stream_hours * 3600, None, args.broker_every))
        if args.realtime_minutes > 0:
            results.append(phase("realtime", args.model, audio, work, args.sources, True, args.hop,
                                 None, args.realtime_minutes * 60, args.broker_every))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "model": str(args.model), "phases": results}, indent=1) + "\n")
    print(f"\n{machine}")
    print("| phase | sources | wall s | stream h | broker restarts | events raised / delivered / dropped / unsent / recorder | "
          "RSS MiB (after warm-up → end) | fds | threads | exit, stop s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['phase']} | {r['sources']} | {r['wall_s']:.0f} | {r['stream_hours']} | {r['broker_restarts']} | "
              f"{r['events_raised']} / {r['events_delivered']} / {r['events_dropped']} / {r['events_unsent']} / "
              f"{r['events_received_by_recorder']} | {r['rss_mib'][0]} → {r['rss_mib'][1]} ({r['rss_growth_mib']:+}) | "
              f"{r['fds'][0]} → {r['fds'][1]} | {r['threads'][0]} → {r['threads'][1]} | {r['exit_code']}, {r['stop_s']} |")
    if not all(r["accounted"] and r["exit_code"] == 0 and r["tracebacks"] == 0 for r in results):
        sys.exit("soak: events not accounted for, a traceback, or an unclean exit (see the JSON)")


if __name__ == "__main__":
    main()

"""What open pages cost the daemon: its CPU time with and without 10 live browsers.

One `streamer run` with ``--streams`` (16) real-time looping file sources of the real
recordings, a tiny model (the inference is not what is measured) and the web page on.
Phases alternate — no client, then ``--clients`` (10) Server-Sent-Event readers that read
every byte as a browser would, then none again, … — each ``--phase-seconds`` long; the
daemon's CPU time (utime + stime from /proc) over each phase gives its load in % of one
core. Alternating cancels slow drift (other work on the machine, caches warming). The
clients run in this process, so their own CPU is not counted.

    python bench/bench_web.py [--model DIR] [--streams 16] [--clients 10] [--phase-seconds 20] [--rounds 2]

Without ``--model`` a tiny random checkpoint (527 labels) is built with transformers.
Writes bench/results/web_cpu.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from mqtt_helpers import free_port, wait_for  # noqa: E402
from streamer.capture.files import read_audio  # noqa: E402

REAL_AUDIO = Path(os.environ.get("STREAMER_REAL_AUDIO", ROOT.parent / "shared" / "audio" / "real"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
BUDGET_PERCENT_OF_ONE_CORE = 5.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = info.get("Flags", "")
    simd = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags.split()) or "no AVX2"
    return f"{info.get('Model name', '?').strip()}, {os.cpu_count()} cores ({simd})"


class Reader(threading.Thread):
    """One browser's live feed: reads every byte until told to stop."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.bytes, self.frames = port, 0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", "/api/live")
        resp = conn.getresponse()
        while not self.stop.is_set():
            chunk = resp.read1(65536)
            if not chunk:
                break
            self.bytes += len(chunk)
            self.frames += chunk.count(b"\n\n")
        conn.close()


def web_cpu(port: int) -> tuple[float, float]:
    """The web sink's own CPU seconds so far: (taking items in, the server thread)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    values = {}
    for line in conn.getresponse().read().decode().splitlines():
        if line.startswith("streamer_web_") and " " in line:
            name, value = line.split(" ", 1)
            values[name] = float(value)
    conn.close()
    return values.get("streamer_web_sink_cpu_seconds", float("nan")), values.get("streamer_web_server_cpu_seconds", float("nan"))


def build_inputs(work: Path, streams: int, model: str | None) -> tuple[Path, list[Path]]:
    import soundfile as sf

    clips = sorted(p for p in REAL_AUDIO.glob("*/*.wav") if p.parent.name != "meta")
    if not clips:
        sys.exit(f"no real recordings under {REAL_AUDIO} (set STREAMER_REAL_AUDIO)")
    files = []
    for i in range(streams):
        picked = clips[i::streams][:8] or clips[:8]
        path = work / f"stream{i:02d}.wav"
        sf.write(str(path), np.concatenate([read_audio(p) for p in picked]), 16000, subtype="FLOAT")
        files.append(path)
    if model:
        return Path(model), files
    from conftest import make_hf_model, save_hf_model

    return save_hf_model(make_hf_model(seed=4, max_length=128, num_labels=527), work / "model"), files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--phase-seconds", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hop", type=float, default=0.5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "web_cpu.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, files = build_inputs(work, args.streams, args.model)
        port = free_port()
        config = {
            "model": {"path": str(model), "max_batch": 16, "threads": 1},
            "hop": args.hop,
            "sources": [{"name": f"room{i:02d}", "type": "file", "path": str(f), "realtime": True, "loop": True}
                        for i, f in enumerate(files)],
            "detect": {"include": ["LABEL_0", "LABEL_1", "LABEL_2", "LABEL_3", "LABEL_4"]},
            "console": {"mode": "off"}, "logging": {"level": "warning"},
            "web": {"enabled": True, "port": port, "history": str(work / "history.sqlite3")},
        }
        (work / "streamer.yaml").write_text(json.dumps(config))
        proc = subprocess.Popen([sys.executable, "-m", "streamer", "run", "--config", str(work / "streamer.yaml")],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return True
            except OSError:
                return False

        try:
            if not wait_for(up, 120, 0.2):
                sys.exit(f"the daemon did not start: {proc.stderr.read() if proc.poll() is not None else ''}")
            time.sleep(args.phase_seconds / 2)  # warm-up: every stream scoring
            phases = []
            for _ in range(args.rounds):
                for clients in (0, args.clients):
                    readers = [Reader(port) for _ in range(clients)]
                    for r in readers:
                        r.start()
                    if clients:
                        wait_for(lambda: all(r.frames for r in readers), 10)
                    (s0, w0), c0, t0 = web_cpu(port), cpu_seconds(proc.pid), time.monotonic()
                    time.sleep(args.phase_seconds)
                    (s1, w1), c1, t1 = web_cpu(port), cpu_seconds(proc.pid), time.monotonic()
                    got = sum(r.bytes for r in readers)
                    for r in readers:
                        r.stop.set()
                    phases.append({"clients": clients, "cpu_percent": 100 * (c1 - c0) / (t1 - t0),
                                   "web_sink_percent": 100 * (s1 - s0) / (t1 - t0),
                                   "web_server_percent": 100 * (w1 - w0) / (t1 - t0),
                                   "kib_per_s_per_client": got / 1024 / (t1 - t0) / max(1, clients)})
                    print(f"  {clients:2d} clients: daemon {phases[-1]['cpu_percent']:6.1f} % of one core; web: taking items in "
                          f"{phases[-1]['web_sink_percent']:.2f} %, server thread {phases[-1]['web_server_percent']:.2f} %"
                          + (f", {phases[-1]['kib_per_s_per_client']:.1f} KiB/s per client" if clients else ""), flush=True)
                    for r in readers:
                        r.join(5)
                    time.sleep(1)
            metrics = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            metrics.request("GET", "/metrics")
            text = metrics.getresponse().read().decode()
            dropped = next((float(line.split()[1]) for line in text.splitlines()
                            if line.startswith("streamer_web_frames_dropped ")), float("nan"))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    base = np.mean([p["cpu_percent"] for p in phases if p["clients"] == 0])
    loaded = np.mean([p["cpu_percent"] for p in phases if p["clients"]])
    added = loaded - base
    mean = lambda key, with_clients: float(np.mean([p[key] for p in phases if bool(p["clients"]) == with_clients]))
    server_added = mean("web_server_percent", True) - mean("web_server_percent", False)
    result = {"machine": cpu_name(), "streams": args.streams, "clients": args.clients, "hop_s": args.hop,
              "phase_s": args.phase_seconds, "rounds": args.rounds, "phases": phases,
              "daemon_cpu_percent_no_clients": round(float(base), 2),
              "daemon_cpu_percent_with_clients": round(float(loaded), 2),
              "added_percent_of_one_core": round(float(added), 2), "frames_dropped": dropped,
              "web_sink_percent": round(mean("web_sink_percent", False), 3),
              "web_server_percent_no_clients": round(mean("web_server_percent", False), 3),
              "web_server_percent_with_clients": round(mean("web_server_percent", True), 3),
              "web_server_added_percent": round(server_added, 3),
              "budget_percent": BUDGET_PERCENT_OF_ONE_CORE, "within_budget": bool(added <= BUDGET_PERCENT_OF_ONE_CORE)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['machine']}: {args.streams} streams, {args.clients} live pages add "
          f"{added:.2f} % of one core ({base:.1f} % → {loaded:.1f} %); budget {BUDGET_PERCENT_OF_ONE_CORE} %; "
          f"frames dropped {dropped:.0f}")
    print(f"web server thread: {mean('web_server_percent', False):.2f} % → {mean('web_server_percent', True):.2f} % "
          f"(+{server_added:.2f} %); taking items in: {mean('web_sink_percent', False):.2f} %")


if __name__ == "__main__":
    main()

"""The daemon end to end, as a user runs it: N real-time file sources, hop 1 s, /metrics read.

For each N it starts ``python -m streamer run`` on a generated config (N file sources
looping a real recording at real time, metrics on, console off), waits for it to score,
lets it warm up, then reads the counters over a measuring span: windows scored per
second, windows skipped, the latency of a window from its last sample captured to its
scores delivered (p50/p99 from the histogram), CPU cores the process used, its peak
thread count and RSS. "Sustained" = no skipped window and p99 < 1 s.

    python bench/bench_pipeline.py --model MODEL_DIR --audio clip.wav --streams 100,500,1000 \\
        --device cuda --precision bf16 --max-batch 64 --out bench/results/pipeline_h100.json

Without ``--model`` a full-size AudioSet-shaped AST with random weights is built (needs
transformers). The machine's CPU and GPU are recorded with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def full_size_model(directory: Path) -> Path:
    if (directory / "config.json").exists():
        return directory
    import torch
    from transformers import ASTConfig, ASTForAudioClassification

    torch.manual_seed(0)
    config = ASTConfig(num_labels=527, max_length=1024, frequency_stride=10, time_stride=10)
    config.id2label = {i: f"label {i}" for i in range(527)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    ASTForAudioClassification(config).eval().save_pretrained(directory)
    return directory


def first_labels(model: Path, count: int) -> list[str]:
    labels = json.loads((model / "config.json").read_text())["id2label"]
    return [labels[str(i)] for i in range(min(count, len(labels)))]


def write_config(path: Path, model: Path, audio: Path, streams: int, args, port: int) -> None:
    lines = [
        f"model: {{path: {json.dumps(str(model))}, device: {args.device}, precision: {args.precision}, "
        f"max_batch: {args.max_batch}, max_wait_ms: {args.max_wait_ms}}}",
        f"hop: {args.hop}",
        "console: {mode: \"off\"}",
        # a home's handful of targets (the default, every one of 527 labels, with random weights
        # would raise events all the time: not what a box sees)
        f"detect: {{include: {json.dumps(first_labels(model, args.targets))}}}",
        f"metrics: {{enabled: true, host: 127.0.0.1, port: {port}}}",
        "sources:",
    ]
    for i in range(streams):
        lines.append(f"  - {{name: s{i:04d}, type: file, path: {json.dumps(str(audio))}, realtime: true, loop: true}}")
    path.write_text("\n".join(lines) + "\n")


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        base = name.split("{")[0]
        if base == "streamer_windows_total":
            out["windows"] = out.get("windows", 0.0) + float(value)
        elif base == "streamer_windows_skipped":
            out["skipped"] = float(value)
        elif base.startswith("streamer_window_latency_seconds_bucket"):
            le = float(re.search(r'le="([^"]+)"', name).group(1))  # +Inf parses as inf
            out[le] = float(value)
        elif base == "streamer_window_latency_seconds_count":
            out["lat_count"] = float(value)
        elif base in ("streamer_batch_size_sum", "streamer_batch_size_count"):
            out[base] = float(value)
    return out


def proc(pid: int) -> tuple[float, int, int]:
    """CPU seconds (user + system), threads, RSS bytes of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    threads = int(fields[17])
    rss = int(fields[21]) * PAGE
    return cpu, threads, rss


def quantile(before: dict, after: dict, q: float) -> float | None:
    """The histogram bucket edge below which a fraction ``q`` of the span's windows fell."""
    edges = sorted(k for k in after if isinstance(k, float))
    total = after.get("lat_count", 0) - before.get("lat_count", 0)
    if total <= 0:
        return None
    for edge in edges:
        if after[edge] - before.get(edge, 0) >= q * total:
            return edge
    return None


@contextlib.contextmanager
def running_daemon(config: Path, log_path: Path, port: int, start_timeout: float) -> Iterator[subprocess.Popen | None]:
    """``streamer run --config CONFIG`` until the block ends (then SIGTERM): the process once
    its /metrics counts a scored window, or None if none came within ``start_timeout``."""
    with open(log_path, "w") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "streamer", "run", "--config", str(config)], cwd=REPO,
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + start_timeout
            while time.monotonic() < deadline:
                if daemon.poll() is not None:
                    raise RuntimeError(f"the daemon exited ({daemon.returncode}); see {log_path}")
                try:
                    if scrape(port).get("windows", 0) >= 1:
                        break
                except OSError:
                    pass
                time.sleep(0.5)
            else:
                yield None
                return
            yield daemon
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(60)
            except subprocess.TimeoutExpired:
                daemon.kill()


def measure(streams: int, args, model: Path, audio: Path, work: Path) -> dict:
    port = free_port()
    config = work / f"bench-{streams}.yaml"
    write_config(config, model, audio, streams, args, port)
    with running_daemon(config, work / f"bench-{streams}.log", port, args.start_timeout) as daemon:
        if daemon is None:
            return {"streams": streams, "error": f"no window scored within {args.start_timeout} s"}
        time.sleep(args.warmup)
        m0, (c0, t, _), w0 = scrape(port), proc(daemon.pid), time.monotonic()
        threads_peak = t
        end = w0 + args.seconds
        profiler = None
        if args.py_spy:  # where the daemon's time goes, per thread (not part of the figures)
            profiler = subprocess.Popen([args.py_spy, "record", "-d", str(int(args.seconds) - 2), "-r", "50", "-f", "raw",
                                         "--nonblocking", "--threads", *(["--gil"] if args.py_spy_gil else []), "-o", str(work / f"profile-{streams}.txt"), "--pid",
                                         str(daemon.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        gpu = gpu_sampler(args.seconds) if args.device.startswith("cuda") else None
        while time.monotonic() < end:
            time.sleep(1.0)
            threads_peak = max(threads_peak, proc(daemon.pid)[1])
        m1, (c1, t, rss), w1 = scrape(port), proc(daemon.pid), time.monotonic()
        gpu_busy = gpu_utilisation(gpu)
        if profiler is not None:
            profiler.wait(30)
        span = w1 - w0
        result = {
            "streams": streams,
            "windows_per_s": round((m1["windows"] - m0["windows"]) / span, 1),
            "skipped_per_s": round((m1.get("skipped", 0) - m0.get("skipped", 0)) / span, 1),
            "latency_p50_s": quantile(m0, m1, 0.50),
            "latency_p99_s": quantile(m0, m1, 0.99),
            "cpu_cores": round((c1 - c0) / span, 2),
            "threads_peak": max(threads_peak, t),
            "rss_mib": round(rss / 2**20),
        }
        batches = m1.get("streamer_batch_size_count", 0) - m0.get("streamer_batch_size_count", 0)
        if batches:
            result["mean_batch"] = round((m1["streamer_batch_size_sum"] - m0["streamer_batch_size_sum"]) / batches, 1)
        if gpu_busy is not None:
            result["gpu_busy_pct"] = gpu_busy
        result["sustained"] = (result["skipped_per_s"] == 0 and result["latency_p99_s"] is not None
                               and result["latency_p99_s"] < 1.0 and result["windows_per_s"] >= 0.95 * streams / args.hop)
        return result


def gpu_sampler(seconds: float) -> subprocess.Popen | None:
    """nvidia-smi sampling the GPU's utilisation every 500 ms over the span (None: no nvidia-smi)."""
    try:
        return subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                 "-lms", "500"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    except OSError:
        return None


def gpu_utilisation(sampler: subprocess.Popen | None) -> float | None:
    """Mean of the samples taken (the fraction of time a kernel ran, as nvidia-smi counts it)."""
    if sampler is None:
        return None
    sampler.terminate()
    out, _ = sampler.communicate(timeout=10)
    values = [float(v) for v in out.split() if v.strip().replace(".", "", 1).isdigit()]
    return round(sum(values) / len(values), 1) if values else None


def machine() -> dict:
    info = {"cpu": platform.processor(), "cores": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = re.search(r"model name\s*:\s*(.*)", text).group(1)
        flags = set(re.search(r"flags\s*:\s*(.*)", text).group(1).split())
        info["cpu_features"] = sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni"})
    except (OSError, AttributeError):
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "bench" / "results" / "full-size-ast.tmp")
    parser.add_argument("--audio", type=Path, required=True, help="a real recording (looped by every source)")
    parser.add_argument("--streams", default="1,16,64")
    parser.add_argument("--hop", type=float, default=1.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--targets", type=int, default=6, help="detect targets per stream")
    parser.add_argument("--max-wait-ms", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--start-timeout", type=float, default=240.0)
    parser.add_argument("--stop-after-fail", action="store_true", help="stop at the first N not sustained")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--py-spy", help="path of py-spy: profile each N's measuring span into the work folder")
    parser.add_argument("--py-spy-gil", action="store_true", help="sample only the thread holding the GIL")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "bench_pipeline")
    args = parser.parse_args()
    model = full_size_model(args.model)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in (int(x) for x in args.streams.split(",")):
        r = measure(n, args, model, args.audio, work)
        print(json.dumps(r), flush=True)
        results.append(r)
        if args.stop_after_fail and not r.get("sustained"):
            break
    sustained = [r["streams"] for r in results if r.get("sustained")]
    report = {"machine": machine(), "settings": {k: str(v) for k, v in vars(args).items()}, "results": results,
              "streams_sustained": max(sustained) if sustained else 0}
    print(json.dumps(report["machine"]))
    print(f"streams sustained: {report['streams_sustained']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

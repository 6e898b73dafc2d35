"""Streaming cost on this machine: the incremental frontend, and the capture path per stream.

1. CPU time to turn one new second of audio into a window (incremental frontend +
   scheduler, hop 1 s) against ``ASTFeatureExtractor`` recomputing the whole 10.24 s
   window. Goal: at least 10× less.
2. The capture path (file sources paced at real time → ring → stream reader → frontend
   → scheduler, windows dropped) for 1 and for 16 streams: CPU use and memory per stream.

    python bench/bench_frontend.py
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamer.capture.sources import FileSource  # noqa: E402
from streamer.model.config import FeatureConfig  # noqa: E402
from streamer.features.windows import StreamWindows  # noqa: E402
from streamer.streams import StreamReader  # noqa: E402

HOP = 16000
CAPTURE_SECONDS = 12.0


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def frontend_cost(audio: np.ndarray) -> dict:
    from transformers import ASTFeatureExtractor

    extractor = ASTFeatureExtractor()
    stream = StreamWindows("b", FeatureConfig(), hop_frames=100)
    stream.push(audio[: 1024 * 160])  # fill the first window
    incremental, frontend_only = [], []
    pos = 1024 * 160
    while pos + HOP <= len(audio):
        chunk = audio[pos:pos + HOP]
        t0 = time.process_time()
        frames = stream.frontend.push(chunk)
        t1 = time.process_time()
        windows = stream.scheduler.push(frames)
        incremental.append(time.process_time() - t0)
        frontend_only.append(t1 - t0)
        assert len(windows) == 1
        pos += HOP
    full = []
    for start in list(range(0, len(audio) - 164080, HOP))[: len(incremental)]:
        t0 = time.process_time()
        extractor(audio[start:start + 164080], sampling_rate=16000, return_tensors="pt")
        full.append(time.process_time() - t0)
    inc, ref, front = statistics.median(incremental), statistics.median(full), statistics.median(frontend_only)
    return {"frontend_ms_per_window": front * 1000, "incremental_ms_per_window": inc * 1000,
            "feature_extractor_ms_per_window": ref * 1000, "speedup_frontend": ref / front, "speedup": ref / inc}


def capture_cost(path: Path, streams: int) -> dict:
    before = rss_mib()
    readers = []
    for i in range(streams):
        source = FileSource(f"s{i}", path, realtime=True, loop=True)
        readers.append(StreamReader(source, FeatureConfig(), 100, lambda w: None))
    for r in readers:
        r.source.start()
        r.start()
    cpu0, wall0 = time.process_time(), time.monotonic()
    time.sleep(CAPTURE_SECONDS)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    after = rss_mib()
    windows = sum(r.emitted for r in readers)
    lost = sum(r.source.ring.lost for r in readers)
    for r in readers:
        r.source.stop()
        r.stop()
    return {"streams": streams, "cpu_percent_of_one_core": 100 * cpu / wall, "windows": windows, "lost_samples": lost,
            "rss_mib_per_stream": (after - before) / streams}


def main() -> None:
    torch.set_num_threads(1)
    real = sorted((ROOT.parent / "shared" / "audio" / "real").glob("*/*.wav"))
    from streamer.capture.files import read_audio

    audio = np.concatenate([read_audio(p) for p in real[::3]]) if real else np.random.default_rng(0).uniform(-0.3, 0.3, 16000 * 60).astype(np.float32)
    audio = np.tile(audio, 2)[: 16000 * 60]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "loop.wav"
        sf.write(path, audio, 16000, subtype="FLOAT")
        capture = [capture_cost(path, n) for n in (1, 16)]
    front = frontend_cost(audio)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "cpu")
    report = {"cpu": cpu, "frontend": front, "capture": capture}
    out = ROOT / "bench" / "results" / "frontend_cpu.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{cpu}, torch threads 1")
    print(f"per window at hop 1 s: ASTFeatureExtractor on 10.24 s {front['feature_extractor_ms_per_window']:.2f} ms; "
          f"incremental frontend {front['frontend_ms_per_window']:.2f} ms ({front['speedup_frontend']:.1f}× less); "
          f"frontend + scheduler (window copied out) {front['incremental_ms_per_window']:.2f} ms ({front['speedup']:.1f}× less)")
    print("| streams | CPU % of one core | windows in 12 s | lost samples | RSS MiB per stream |")
    print("|---|---|---|---|---|")
    for c in capture:
        print(f"| {c['streams']} | {c['cpu_percent_of_one_core']:.1f} | {c['windows']} | {c['lost_samples']} | {c['rss_mib_per_stream']:.2f} |")


if __name__ == "__main__":
    main()

"""CPU and threads of capture alone: N real-time file sources (16 kHz mono, looped), no reader.

    python bench/bench_capture.py --streams 64 --seconds 30

Runs against whatever ``streamer`` is importable: with ``streamer.capture.ingest`` the
sources are driven by one :class:`Ingest` loop, else (an older checkout on PYTHONPATH)
each source is started on its own thread, as before. Reports the cores busy (process CPU
time / wall time over the measured span, after a warm-up) and the process's threads.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

WARMUP_S = 3.0
FILE_SECONDS = 10.0
RATE_HZ = 16000


def threads() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("Threads:")).split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()

    from streamer.capture.sources import FileSource

    try:
        from streamer.capture.ingest import Ingest
    except ImportError:
        Ingest = None

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "noise.wav"
        rng = np.random.default_rng(0)
        sf.write(path, rng.uniform(-0.3, 0.3, int(RATE_HZ * FILE_SECONDS)).astype(np.float32), RATE_HZ, subtype="PCM_16")
        sources = [FileSource(f"s{i}", path, realtime=True, loop=True, ring_seconds=5) for i in range(args.streams)]
        if Ingest is not None:
            ingest = Ingest()
            for source in sources:
                ingest.add(source)
            ingest.start()
        else:
            for source in sources:
                source.start()
        time.sleep(WARMUP_S)
        written0 = sum(s.ring.written for s in sources)
        cpu0, wall0 = time.process_time(), time.monotonic()
        time.sleep(args.seconds)
        cpu1, wall1 = time.process_time(), time.monotonic()
        written1 = sum(s.ring.written for s in sources)
        n_threads = threads()
        if Ingest is not None:
            ingest.stop()
        else:
            for source in sources:
                source.stop()
    wall = wall1 - wall0
    audio_s = (written1 - written0) / RATE_HZ
    print(json.dumps({
        "impl": "ingest loop" if Ingest is not None else "thread per source",
        "streams": args.streams, "cores_busy": round((cpu1 - cpu0) / wall, 3),
        "cpu_ms_per_stream_second": round(1000 * (cpu1 - cpu0) / audio_s, 3),
        "realtime_factor": round(audio_s / wall / args.streams, 3), "threads": n_threads,
    }))


if __name__ == "__main__":
    main()

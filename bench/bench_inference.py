"""Inference throughput, latency, memory and accuracy: ours against transformers.

A thin wrapper over ``streamer bench`` (streamer/benchmark.py), so the benchmark that
users run and the one kept here are the same code:

    python bench/bench_inference.py --device cuda --compile --audio ../shared/audio/real/*/*.wav
"""

import sys

from streamer.cli import main

raise SystemExit(main(["bench", *sys.argv[1:]]))

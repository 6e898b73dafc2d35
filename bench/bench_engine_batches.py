"""The engine alone, fed as the pipeline feeds it: windows already on the device, two batches
in flight, at the batch sizes the daemon runs — the denominator of "the pipeline delivers
X % of its engine".

    python bench/bench_engine_batches.py --device cuda --precision bf16 --batches 32,64,100,128

Without ``--model`` the full-size random-weight 10-10 AST of bench_pipeline.py is used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import REPO, full_size_model, machine  # noqa: E402

from streamer.inference.engine import PIPELINE_DEPTH, InferenceEngine  # noqa: E402
from streamer.model import load_model  # noqa: E402


def throughput(engine: InferenceEngine, batch: int, seconds: float) -> float:
    """Windows per second, sustained, with PIPELINE_DEPTH batches in flight."""
    windows = torch.randn((batch, *engine._shape), device=engine.device)
    in_flight: deque = deque()
    done = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        if len(in_flight) == PIPELINE_DEPTH:
            engine.collect(in_flight.popleft())
            done += batch
        in_flight.append(engine.submit(windows))
    while in_flight:
        engine.collect(in_flight.popleft())
        done += batch
    return done / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "bench" / "results" / "full-size-ast.tmp")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--batches", default="32,64,96,128")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sizes = [int(b) for b in args.batches.split(",")]
    engine = InferenceEngine(load_model(full_size_model(args.model)), args.device, args.precision,
                             max_batch=max(sizes))
    throughput(engine, max(sizes), 1.0)  # warm
    results = [{"batch": b, "windows_per_s": round(throughput(engine, b, args.seconds), 1)} for b in sizes]
    for r in results:
        print(json.dumps(r), flush=True)
    report = {"machine": machine(), "precision": args.precision, "results": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

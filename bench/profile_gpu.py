"""Where a bf16 batch's GPU time goes, per SDPA backend, and our host cost per batch.

    python bench/profile_gpu.py [--batch 64]

Prints: batch latency with each attention backend (eager, no graphs), the top CUDA
kernels of one batch, and the host-side time of ``engine.score`` with CUDA graphs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from streamer.benchmark import _windows, random_checkpoint
from streamer.inference.engine import InferenceEngine
from streamer.model import load_model


def timed(fn, iters=10):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    b = args.batch
    with tempfile.TemporaryDirectory() as tmp:
        directory = random_checkpoint(Path(tmp) / "m")
        eager = InferenceEngine(load_model(directory), "cuda", "bf16", max_batch=b, cuda_graphs=False)
        x = torch.randn(b, 1024, 128, device="cuda")
        with torch.inference_mode():
            for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                                  ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
                try:
                    with sdpa_kernel([backend]):
                        t = timed(lambda: eager._forward(x))
                    print(f"eager bf16 bs{b} attention={name}: {t * 1000:.2f} ms, {b / t:.0f} w/s")
                except RuntimeError as exc:
                    print(f"attention={name}: unavailable ({str(exc).splitlines()[0][:100]})")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                eager._forward(x)
                torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
        plain = InferenceEngine(load_model(directory), "cuda", "bf16", max_batch=b, fused=False)
        windows = _windows(b)
        t = timed(lambda: plain.score(windows), iters=20)
        print(f"graphs bf16 plain (unfused) bs{b}: {t * 1000:.2f} ms per batch ({b / t:.0f} w/s)")
        del plain
        graphs = InferenceEngine(load_model(directory), "cuda", "bf16", max_batch=b)
        total = timed(lambda: graphs.score(windows), iters=20)
        t0 = time.perf_counter()
        staged = graphs._host_in[0][:b]
        for _ in range(20):
            torch.stack([w.features for w in windows], out=staged)
        stack = (time.perf_counter() - t0) / 20
        print(f"graphs bf16 fused bs{b}: {total * 1000:.2f} ms per batch ({b / total:.0f} w/s); "
              f"host staging (stack into pinned) {stack * 1000:.2f} ms")


if __name__ == "__main__":
    main()

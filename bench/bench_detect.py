"""Offline detection cost on this machine: `streamer detect` vs transformers on the same clip.

Each implementation runs in its own process (so peak RSS is its own) over the same audio
with the same full-size random-weight AudioSet-shaped checkpoint (10-10, 527 labels) and
the same 1 s hop. Reported: model load time, seconds per window (features + model,
steady state), and the process's peak RSS.

    python bench/bench_detect.py            # both, prints a table and writes JSON
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CLIP_SECONDS = 20.0
HOP_FRAMES = 100


def make_checkpoint(directory: Path) -> None:
    import torch
    from transformers import ASTConfig, ASTForAudioClassification

    torch.manual_seed(0)
    ASTForAudioClassification(ASTConfig(num_labels=527)).save_pretrained(directory)


def make_clip(path: Path) -> None:
    import soundfile as sf

    sys.path.insert(0, str(ROOT))
    from streamer.capture.files import read_audio

    real = ROOT.parent / "shared" / "audio" / "real"
    clips = sorted(real.glob("*/*.wav"))[::7]
    rng = np.random.default_rng(0)
    audio = np.concatenate([read_audio(p) for p in clips]) if clips else rng.uniform(-0.3, 0.3, 16000).astype(np.float32)
    need = int(CLIP_SECONDS * 16000)
    audio = np.tile(audio, need // len(audio) + 1)[:need]
    sf.write(path, audio, 16000, subtype="FLOAT")


def run_streamer(model: Path, clip: Path, batch: int) -> dict:
    from streamer.detect import score_file
    from streamer.inference.engine import InferenceEngine
    from streamer.model import load_model

    t0 = time.perf_counter()
    engine = InferenceEngine(load_model(model), device="cpu", max_batch=batch)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = score_file(clip, engine, HOP_FRAMES)
    elapsed = time.perf_counter() - t0
    return {"load_s": load, "windows": len(scores.start_sample), "seconds": elapsed}


def run_transformers(model: Path, clip: Path, batch: int) -> dict:
    import soundfile as sf
    import torch
    from transformers import ASTFeatureExtractor, ASTForAudioClassification

    t0 = time.perf_counter()
    extractor = ASTFeatureExtractor.from_pretrained(model) if (model / "preprocessor_config.json").exists() else ASTFeatureExtractor()
    net = ASTForAudioClassification.from_pretrained(model).eval()
    load = time.perf_counter() - t0
    audio, _ = sf.read(clip, dtype="float32")
    span = 1023 * 160 + 400
    starts = list(range(0, len(audio) - span + 1, HOP_FRAMES * 160))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(starts), batch):
            chunk = [audio[s:s + span] for s in starts[i:i + batch]]
            inputs = extractor(chunk, sampling_rate=16000, return_tensors="pt")
            net(**inputs).logits.sigmoid()
    elapsed = time.perf_counter() - t0
    return {"load_s": load, "windows": len(starts), "seconds": elapsed}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    runner = run_streamer if args.impl == "streamer" else run_transformers
    result = runner(Path(args.model), Path(args.clip), args.batch)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--impl", choices=["streamer", "transformers"])
    parser.add_argument("--model")
    parser.add_argument("--clip")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "detect_cpu.json"))
    args = parser.parse_args()
    if args.impl:
        return child(args)
    with tempfile.TemporaryDirectory() as tmp:
        model, clip = Path(tmp) / "model", Path(tmp) / "clip.wav"
        make_checkpoint(model)
        make_clip(clip)
        rows = {}
        for impl in ("streamer", "transformers"):
            out = subprocess.run(
                [sys.executable, __file__, "--impl", impl, "--model", str(model), "--clip", str(clip),
                 "--batch", str(args.batch), "--threads", str(args.threads)],
                check=True, capture_output=True, text=True, cwd=ROOT,
            ).stdout
            rows[impl] = json.loads(out.strip().splitlines()[-1])
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    report = {"cpu": cpu, "threads": args.threads, "batch": args.batch, "clip_seconds": CLIP_SECONDS, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{cpu}, {args.threads} threads, batch {args.batch}, {CLIP_SECONDS:.0f} s clip, hop 1 s")
    print("| impl | windows | s/window | load s | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for impl, r in rows.items():
        print(f"| {impl} | {r['windows']} | {r['seconds'] / r['windows']:.3f} | {r['load_s']:.2f} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()

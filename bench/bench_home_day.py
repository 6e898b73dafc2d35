"""A "home day": one hour of real ambience with a dozen real sounds in it, through the real pipeline.

The hour is built from the long real background recordings (``background_long``: rain,
street, appliances, a café, a library...; shuffled with a seed, joined, looped where the
folder holds less than the hour) with a dozen labelled clips from the real recordings
(``real``: one per label, held-out clips of the model's validation split when it has one)
added at known times, at their recorded level. The audio is built in the work folder
(never in the repository: the recordings are not ours to commit).

It is scored by the daemon's own :class:`~streamer.pipeline.Pipeline` over a lossless file
source (as fast as the CPU goes), with batches of one window as live (``max_batch`` 1),
twice: with the silence gate off and on (``detect.min_level_dbfs``). What is reported:

- the CPU the process used per second of audio, as % of the machine's cores — a lossless
  run does exactly the work a live one does (the same windows, one at a time), only
  without the waits, so CPU seconds / audio seconds is the live figure; ``--live`` checks
  this with the real daemon on a real-time file source of the same audio;
- windows scored and gated, and the fraction of the hour's windows the gate would skip
  at other levels (from the same block levels the gate keeps);
- each inserted sound: detected (an ON of its label whose window overlaps it) with the
  gate off, with the gate on — every one detected with the gate off must be detected with
  it on.

    PYTHONPATH=$PWD python bench/bench_home_day.py --model /tmp/home_model --min-level-dbfs -50 \\
        --live 60 --out bench/results/home_day_cpu_trained.json

``--seconds`` scores only the first part of the hour (an AudioSet-size model takes
~0.5 s a window here: the whole hour would take half an hour); the gate's fraction is
still given for the whole hour.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pipeline  # noqa: E402  (the machine's description, /proc and /metrics readers)

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
SHARED = Path("/work/shared/audio")
SAMPLE_RATE = 16000
DAY_SECONDS = 3600.0  # one hour
SOUNDS = 12  # a dozen labelled sounds
FIRST_SOUND_S = 120.0  # the first sound this far into the hour, the others spread evenly after it
SOUND_JITTER_S = 30.0  # ± this much around the even spacing (seeded)
MATCH_AFTER_S = 2.0  # an ON up to this long after a sound's end still counts as its detection
GATE_LEVELS_DBFS = (-70.0, -60.0, -50.0, -40.0, -35.0, -30.0)  # the hour's gated fraction at each
LIVE_WARMUP_S = 20.0


@dataclass
class Inserted:
    label: str
    clip: str
    start_s: float
    seconds: float
    peak_dbfs: float
    ambience: str  # the background file it lands on


def _read(path: Path) -> np.ndarray:
    from streamer.capture.files import read_audio

    return read_audio(path)


def build_day(background: Path, real: Path, model: Path | None, seconds: float, seed: int,
              sounds: int) -> tuple[np.ndarray, list[Inserted], list[dict]]:
    """The hour of ambience with ``sounds`` clips added; the clips and where the ambience came from."""
    rng = random.Random(seed)
    rows = list(csv.DictReader(open(background / "labels.csv", encoding="utf-8")))
    rng.shuffle(rows)
    need = int(seconds * SAMPLE_RATE)
    parts, spans, total, k = [], [], 0, 0
    while total < need:  # the folder holds ~45 min: the shuffled list again (a second pass) for the rest
        row = rows[k % len(rows)]
        x = _read(background / row["path"])
        parts.append(x)
        spans.append({"path": row["path"], "scene": row["scene"], "start_s": total / SAMPLE_RATE,
                      "seconds": len(x) / SAMPLE_RATE, "pass": k // len(rows) + 1})
        total += len(x)
        k += 1
    day = np.concatenate(parts)[:need].astype(np.float32)
    held_out: dict[str, list[str]] = {}
    if model is not None and (model / "split.json").is_file():
        held_out = json.loads((model / "split.json").read_text()).get("validation", {})
    labels = sorted(d.name for d in real.iterdir() if d.is_dir() and d.name != "background" and any(d.glob("*.wav")))
    picked = rng.sample(labels, min(sounds, len(labels)))
    spacing = (seconds - FIRST_SOUND_S - 60.0) / max(1, len(picked))
    inserted: list[Inserted] = []
    for i, label in enumerate(picked):
        names = held_out.get(label) or sorted(p.name for p in (real / label).glob("*.wav"))
        clip = real / label / rng.choice(sorted(names))
        x = _read(clip)
        start = FIRST_SOUND_S + i * spacing + rng.uniform(-SOUND_JITTER_S, SOUND_JITTER_S)
        a = int(start * SAMPLE_RATE)
        day[a:a + len(x)] += x[: max(0, need - a)]
        ambience = next(s["path"] for s in reversed(spans) if s["start_s"] <= start)
        inserted.append(Inserted(label, f"{label}/{clip.name}", round(start, 2), round(len(x) / SAMPLE_RATE, 2),
                                 round(20 * np.log10(max(float(np.abs(x).max()), 1e-9)), 1), ambience))
    np.clip(day, -1.0, 1.0, out=day)
    return day, inserted, spans


def gated_fraction(day: np.ndarray, levels: tuple[float, ...], hop_s: float, window_frames: int) -> dict[str, float]:
    """The fraction of the hour's windows (hop ``hop_s``) whose loudest 100 ms block is below each level.

    The same rule as :class:`streamer.features.gate.WindowGate`: the blocks overlapping a
    window's samples, their sample peaks.
    """
    from streamer.features.fbank import window_samples
    from streamer.features.gate import BLOCK_SAMPLES, dbfs

    blocks = np.abs(day[: len(day) // BLOCK_SAMPLES * BLOCK_SAMPLES]).reshape(-1, BLOCK_SAMPLES).max(axis=1)
    span = window_samples(window_frames)
    hop = int(round(hop_s * SAMPLE_RATE))
    peaks = []
    for start in range(0, max(1, len(day) - span + 1), hop):
        first, last = start // BLOCK_SAMPLES, (start + span - 1) // BLOCK_SAMPLES
        peaks.append(dbfs(float(blocks[first:last + 1].max())))
    peaks_arr = np.asarray(peaks)
    return {f"{level:g}": round(float((peaks_arr < level).mean()), 4) for level in levels}


def score(audio: Path, model: Path, precision: str, threads: int, hop_s: float, min_level: float | None,
          labels: list[str]) -> dict:
    """The pipeline over ``audio`` as a lossless file source; CPU, windows, events."""
    import torch

    from streamer.capture.sources import FileSource
    from streamer.detect import hop_to_frames
    from streamer.events import DetectSettings
    from streamer.inference.engine import InferenceEngine
    from streamer.model import load_model
    from streamer.pipeline import Pipeline
    from streamer.sinks.base import SinkHub

    engine = InferenceEngine(load_model(model), device="cpu", precision=precision, max_batch=1, threads=threads)
    engine.seconds_per_window(1)  # warm-up outside the measured span
    targets = DetectSettings(include=tuple(labels)).targets(engine.labels)
    events: list = []
    scored = [0]

    def on_event(stream: int, event):
        events.append(event)
        return event

    def on_window(ref, row, latency) -> None:
        scored[0] += 1

    source = FileSource("home", audio, realtime=False)
    pipeline = Pipeline(engine, [source], hop_to_frames(hop_s), targets, SinkHub(), max_wait_ms=0.0,
                        on_event=on_event, on_window=on_window, stop_when_done=True, min_level_dbfs=min_level)
    cpu0, wall0 = time.process_time(), time.monotonic()
    pipeline.start()
    try:
        pipeline.wait()
    finally:
        pipeline.ingest.stop()
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    pipeline.close_events("stream-end")
    audio_s = source.stats.samples / SAMPLE_RATE
    gated = pipeline.gate.gated.get("home", 0)
    return {
        "precision": engine.precision, "min_level_dbfs": min_level, "audio_s": round(audio_s, 1),
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "windows": scored[0], "gated": gated,
        "scored": scored[0] - gated,
        "cpu_per_audio_s": round(cpu / audio_s, 4),
        "cpu_pct_of_cores": round(100 * cpu / audio_s / (os.cpu_count() or 1), 2),
        "cpu_s_per_scored_window": round(cpu / max(1, scored[0] - gated), 3),  # all the process's CPU, per window
        "events": [e.as_dict() for e in events if e.state == "ON"],
        "torch_threads": torch.get_num_threads(),
    }


def detected(inserted: list[Inserted], events: list[dict], window_s: float) -> list[bool]:
    """Per inserted sound: an ON of its label whose window can hold part of it."""
    out = []
    for s in inserted:
        lo, hi = s.start_s - window_s, s.start_s + s.seconds + MATCH_AFTER_S
        out.append(any(e["target"] == s.label and lo <= e["start_s"] <= hi for e in events))
    return out


def live(audio: Path, model: Path, args, seconds: float, labels: list[str], work: Path) -> dict:
    """The real daemon on a real-time file source of the same audio: its CPU over ``seconds``."""
    port = bench_pipeline.free_port()
    config = work / "home-live.yaml"
    gate = "" if args.min_level_dbfs is None else f", min_level_dbfs: {args.min_level_dbfs}"
    config.write_text("\n".join([
        f"model: {{path: {json.dumps(str(model))}, device: cpu, precision: {args.precision}, max_batch: 1, threads: {args.threads}}}",
        f"hop: {args.hop}",
        "console: {mode: \"off\"}",
        f"detect: {{include: {json.dumps(labels)}{gate}}}",
        f"metrics: {{enabled: true, host: 127.0.0.1, port: {port}}}",
        "sources:",
        f"  - {{name: home, type: file, path: {json.dumps(str(audio))}, realtime: true}}",
    ]) + "\n")
    with bench_pipeline.running_daemon(config, work / "home-live.log", port, args.start_timeout) as daemon:
        if daemon is None:
            return {"error": f"no window scored within {args.start_timeout} s"}
        time.sleep(LIVE_WARMUP_S)
        m0, (c0, _, _), w0 = bench_pipeline.scrape(port), bench_pipeline.proc(daemon.pid), time.monotonic()
        time.sleep(seconds)
        m1, (c1, _, rss), w1 = bench_pipeline.scrape(port), bench_pipeline.proc(daemon.pid), time.monotonic()
        span = w1 - w0
        return {"seconds": round(span, 1), "windows_per_s": round((m1["windows"] - m0["windows"]) / span, 2),
                "skipped_per_s": round((m1.get("skipped", 0) - m0.get("skipped", 0)) / span, 2),
                "cpu_pct_of_cores": round(100 * (c1 - c0) / span / (os.cpu_count() or 1), 2), "rss_mib": round(rss / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--hop", type=float, default=1.0)
    parser.add_argument("--min-level-dbfs", type=float, default=-50.0, help="the gate's level for the gate-on run")
    parser.add_argument("--seconds", type=float, default=DAY_SECONDS, help="score only this much of the hour")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--background", type=Path, default=SHARED / "background_long")
    parser.add_argument("--real", type=Path, default=SHARED / "real")
    parser.add_argument("--gate-off", action=argparse.BooleanOptionalAction, default=True,
                        help="also score with the gate off (the detections to keep)")
    parser.add_argument("--live", type=float, default=0.0, help="seconds of a live check with the real daemon (0: none)")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "bench_home_day")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    from streamer.model import load_model

    loaded = load_model(args.model)
    model_labels = set(loaded.labels)
    day, inserted, spans = build_day(args.background, args.real, args.model, DAY_SECONDS, args.seed, SOUNDS)
    audio = args.work / f"home-day-seed{args.seed}.wav"
    sf.write(audio, day, SAMPLE_RATE, subtype="FLOAT")
    scored_audio = audio
    if args.seconds < DAY_SECONDS:
        scored_audio = args.work / f"home-day-seed{args.seed}-first{args.seconds:g}s.wav"
        sf.write(scored_audio, day[: int(args.seconds * SAMPLE_RATE)], SAMPLE_RATE, subtype="FLOAT")
    window_frames = loaded.features.max_length
    from streamer.features.fbank import window_samples

    window_s = window_samples(window_frames) / SAMPLE_RATE
    fractions = gated_fraction(day, GATE_LEVELS_DBFS + (args.min_level_dbfs,), args.hop, window_frames)
    targets = [s.label for s in inserted if s.label in model_labels]
    labels = targets or list(loaded.labels[:6])  # a model without these labels (random AudioSet weights): CPU only
    del loaded
    report = {
        "machine": bench_pipeline.machine(), "model": str(args.model), "hop_s": args.hop,
        "day": {"seconds": DAY_SECONDS, "scored_seconds": min(args.seconds, DAY_SECONDS), "seed": args.seed,
                "background_files": len({s["path"] for s in spans}), "background_passes": max(s["pass"] for s in spans),
                "inserted": [asdict(s) for s in inserted]},
        "gated_fraction_of_the_hour": fractions,
        "runs": {},
    }
    for name, level in (("gate_off", None), ("gate_on", args.min_level_dbfs)):
        if name == "gate_off" and not args.gate_off:
            continue
        t0 = time.monotonic()
        run = score(scored_audio, args.model, args.precision, args.threads, args.hop, level, labels)
        if targets:
            hits = detected([s for s in inserted if s.start_s + s.seconds <= args.seconds], run["events"], window_s)
            run["detected"] = hits
        run["events_on"] = len(run.pop("events"))
        report["runs"][name] = run
        print(f"{name}: {json.dumps({k: v for k, v in run.items()})} ({time.monotonic() - t0:.0f} s)", flush=True)
    off, on = report["runs"].get("gate_off"), report["runs"]["gate_on"]
    if off is not None and "detected" in off:
        kept = all(b for a, b in zip(off["detected"], on["detected"]) if a)
        report["every_gate_off_detection_kept"] = kept
        report["detected_gate_off"] = f"{sum(off['detected'])}/{len(off['detected'])}"
        report["detected_gate_on"] = f"{sum(on['detected'])}/{len(on['detected'])}"
    if args.live > 0:
        report["live"] = live(scored_audio, args.model, args, args.live, labels, args.work)
        print(f"live: {json.dumps(report['live'])}", flush=True)
    print(json.dumps({k: v for k, v in report.items() if k not in ("day",)}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

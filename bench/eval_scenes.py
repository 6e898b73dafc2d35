"""Detection proven end to end: a trained model on scenes built from held-out real clips.

Builds a scene from the validation clips of a model trained by ``streamer train`` (its
``split.json``: clips the model never saw), over held-out background (the long ambience
recordings the model never trained on, when it was trained with ``--background``), runs
it through the same frontend, scheduler, engine and smoother as the daemon — with the
model's calibrated thresholds (thresholds.json) and the shipped smoothing, as a user gets
them — and reports event-based precision / recall / F1 (onset collar: one window), false
events per minute on the scenes' background alone, and false events per 10 minutes when
the held-out ambience recordings are streamed whole.

    python bench/eval_scenes.py MODEL_DIR [--data ../shared/audio/real] [--threshold 0.5]
        [--clips DIR] [--ambience DIR]

``--clips DIR`` (label folders) and ``--ambience DIR`` (recordings) evaluate on other data
than the model's held-out split, e.g. clips and ambience kept back from training entirely.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamer.capture.files import read_audio  # noqa: E402
from streamer.constants import SAMPLE_RATE_HZ  # noqa: E402
from streamer.detect import score_files  # noqa: E402
from streamer.events import DetectSettings  # noqa: E402
from streamer.features.fbank import window_samples  # noqa: E402
from streamer.inference.engine import InferenceEngine  # noqa: E402
from streamer.model import load_model  # noqa: E402
from streamer.scenes import background_false_events, build_scene, event_metrics, sed_eval_metrics  # noqa: E402
from streamer.train import audio_files  # noqa: E402

HOP_S = 1.0  # the daemon's default hop (the thresholds were chosen at it)
SECONDS_PER_10_MIN = 600.0


def held_out(model_dir: Path, data: Path, clips_dir: Path | None, ambience_dir: Path | None
             ) -> tuple[list[tuple[np.ndarray, str]], list[np.ndarray], list[Path]]:
    """Clips (with labels), the scene's background, and the ambience recordings to stream whole."""
    split = json.loads((model_dir / "split.json").read_text())["validation"]
    if clips_dir is not None:
        clips = [(read_audio(p), folder.name) for folder in sorted(clips_dir.iterdir())
                 if folder.is_dir() and folder.name not in ("background", "meta") for p in audio_files(folder)]
    else:
        clips = [(read_audio(data / label / name), label) for label, names in sorted(split.items())
                 if label not in ("background", "background_long") for name in names]
    ambience = audio_files(ambience_dir) if ambience_dir is not None else [Path(p) for p in split.get("background_long", [])]
    background = [read_audio(p) for p in ambience] or [read_audio(data / "background" / n) for n in split.get("background", [])]
    return clips, background, ambience


def evaluate(model_dir: Path, data: Path, threshold: float | None, hop: float = HOP_S, seed: int = 0,
             clips_dir: Path | None = None, ambience_dir: Path | None = None, ambience: bool = True) -> dict:
    clips, background, ambience_files = held_out(model_dir, data, clips_dir, ambience_dir)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(clips))
    scene, truth = build_scene([clips[i] for i in order], background, seed=seed)
    engine = InferenceEngine(load_model(model_dir), device="cpu", max_batch=8)
    window = window_samples(engine.loaded.features.max_length)
    present = sorted({label for _, label in clips})
    if threshold is None:  # what a user gets: the shipped smoothing and the model's own thresholds
        targets = DetectSettings(include=tuple(present)).targets(engine.labels, engine.loaded.thresholds)
    else:
        targets = DetectSettings.from_dict({"include": present, "defaults": {
            "on_threshold": threshold, "off_threshold": threshold * 0.7}}).targets(engine.labels)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scene.wav"
        sf.write(path, scene, SAMPLE_RATE_HZ, subtype="FLOAT")
        results = score_files([path] + (list(ambience_files) if ambience else []), engine, round(hop * 100), targets)
    result = results[0]
    ons = [(e.start_sample / SAMPLE_RATE_HZ, e.target) for e in result.events if e.state == "ON"]
    collar = window / SAMPLE_RATE_HZ
    metrics = event_metrics(ons, truth, collar)
    ends = {e.id: e.end_sample for e in result.events if e.state == "OFF"}
    spans = [(e.start_sample / SAMPLE_RATE_HZ, (ends.get(e.id) or e.start_sample) / SAMPLE_RATE_HZ, e.target)
             for e in result.events if e.state == "ON"]
    try:  # the reference implementation, when installed (pip install -e '.[test]')
        metrics["sed_eval"] = sed_eval_metrics(spans, truth, collar)
    except ImportError:
        pass
    duration = len(scene) / SAMPLE_RATE_HZ
    false_quiet, quiet_s = background_false_events(ons, truth, collar, duration)
    metrics.update(scene_s=round(duration, 1), background_s=round(quiet_s, 1),
                   false_events_per_minute_on_background=len(false_quiet) / (quiet_s / 60) if quiet_s else 0.0,
                   false_event_labels=sorted({label for _, label in false_quiet}),
                   threshold=threshold if threshold is not None else "calibrated", collar_s=collar, hop_s=hop)
    if ambience and results[1:]:
        amb_s = sum(len(r.start_sample) * hop for r in results[1:])
        amb_false = [(Path(r.path).name, e.target, round(e.start_sample / SAMPLE_RATE_HZ, 1))
                     for r in results[1:] for e in r.events if e.state == "ON"]
        metrics.update(ambience_s=round(amb_s, 1), ambience_files=len(results) - 1, ambience_false_events=amb_false,
                       false_events_per_10_min_on_ambience=len(amb_false) / (amb_s / SECONDS_PER_10_MIN) if amb_s else 0.0)
    per_clip = []
    for e in truth:
        hit = [o for o, label in ons if label == e.label and abs(o - e.onset) <= collar]
        per_clip.append({"label": e.label, "onset": round(e.onset, 2), "detected_at": round(hit[0], 2) if hit else None})
    metrics["clips"] = per_clip
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "audio" / "real")
    parser.add_argument("--threshold", type=float, help="one on-threshold for every label (default: the model's calibrated ones)")
    parser.add_argument("--clips", type=Path, help="label folders of clips to use instead of the model's held-out split")
    parser.add_argument("--ambience", type=Path, help="ambience recordings to use instead of the held-out background_long")
    parser.add_argument("--hop", type=float, default=HOP_S)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scenes_cpu.json")
    parser.add_argument("--seeds", type=int, default=3, help="scenes (orderings) to average over")
    args = parser.parse_args()
    runs = [evaluate(args.model, args.data, args.threshold, args.hop, seed=s, clips_dir=args.clips,
                     ambience_dir=args.ambience, ambience=s == 0) for s in range(args.seeds)]
    keys = ("precision", "recall", "f1", "false_events_per_minute_on_background")
    summary = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    if "ambience_s" in runs[0]:
        summary.update({k: runs[0][k] for k in ("ambience_s", "ambience_files", "false_events_per_10_min_on_ambience")})
    if all("sed_eval" in r for r in runs):
        summary["sed_eval"] = {k: float(np.mean([r["sed_eval"][k] for r in runs])) for k in ("precision", "recall", "f1")}
    args.out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=2) + "\n")
    print(f"{args.seeds} scenes of {runs[0]['true']} held-out clips each ({runs[0]['scene_s']} s), threshold {runs[0]['threshold']}, "
          f"hop {args.hop:g} s, onset collar {runs[0]['collar_s']:.2f} s")
    print(f"event-based precision {summary['precision']:.3f}, recall {summary['recall']:.3f}, F1 {summary['f1']:.3f}; "
          f"false events on the scenes' background {summary['false_events_per_minute_on_background']:.2f} / min")
    if "sed_eval" in summary:
        sed = summary["sed_eval"]
        print(f"sed_eval EventBasedMetrics (onset collar, offsets ignored): precision {sed['precision']:.3f}, "
              f"recall {sed['recall']:.3f}, F1 {sed['f1']:.3f}")
    if "ambience_s" in summary:
        print(f"ambience: {summary['ambience_files']} recordings, {summary['ambience_s'] / 60:.1f} min streamed whole: "
              f"{summary['false_events_per_10_min_on_ambience']:.2f} false events / 10 min "
              f"({', '.join(f'{f} {t} @{s}s' for f, t, s in runs[0]['ambience_false_events'][:8]) or 'none'})")
    print("false events on the scenes' background by label:", ", ".join(sorted({label for r in runs for label in r["false_event_labels"]})) or "none")
    missed = [c["label"] for r in runs for c in r["clips"] if c["detected_at"] is None]
    print("missed:", ", ".join(f"{k} {missed.count(k)}" for k in sorted(set(missed))) or "none")


if __name__ == "__main__":
    main()

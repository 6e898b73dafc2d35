"""Detection proven end to end: a trained model on scenes built from held-out real clips.

Builds a scene from the validation clips of a model trained by ``streamer train`` (its
``split.json``: clips the model never saw), over background noise with silent stretches,
runs it through the same frontend, scheduler, engine and smoother as the daemon, and
reports event-based precision / recall / F1 (onset collar: one window) and false events per
minute on background alone.

    python bench/eval_scenes.py MODEL_DIR [--data ../shared/audio/real] [--threshold 0.5]
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
from streamer.detect import score_file  # noqa: E402
from streamer.events import DetectSettings, EventSmoother  # noqa: E402
from streamer.features.fbank import window_samples  # noqa: E402
from streamer.inference.engine import InferenceEngine  # noqa: E402
from streamer.model import load_model  # noqa: E402
from streamer.scenes import background_false_events, build_scene, event_metrics, sed_eval_metrics  # noqa: E402


def held_out(model_dir: Path, data: Path) -> tuple[list[tuple[np.ndarray, str]], list[np.ndarray]]:
    split = json.loads((model_dir / "split.json").read_text())["validation"]
    clips = [(read_audio(data / label / name), label) for label, names in sorted(split.items()) if label != "background" for name in names]
    background = [read_audio(data / "background" / name) for name in split.get("background", [])]
    return clips, background


def evaluate(model_dir: Path, data: Path, threshold: float, hop: float = 0.25, seed: int = 0) -> dict:
    clips, background = held_out(model_dir, data)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(clips))
    scene, truth = build_scene([clips[i] for i in order], background, seed=seed)
    engine = InferenceEngine(load_model(model_dir), device="cpu", max_batch=8)
    window = window_samples(engine.loaded.features.max_length)
    settings = DetectSettings.from_dict({"defaults": {"on_threshold": threshold, "off_threshold": threshold * 0.7,
                                                      "hold": 0.5, "smoothing": "none"}})
    smoother = EventSmoother("scene", engine.labels, settings.targets(engine.labels), window)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scene.wav"
        sf.write(path, scene, SAMPLE_RATE_HZ, subtype="FLOAT")
        result = score_file(path, engine, round(hop * 100), smoother=smoother)
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
                   threshold=threshold, collar_s=collar)
    per_clip = []
    for e in truth:
        hit = [o for o, label in ons if label == e.label and abs(o - e.onset) <= collar]
        per_clip.append({"label": e.label, "onset": round(e.onset, 2), "detected_at": round(hit[0], 2) if hit else None})
    metrics["clips"] = per_clip
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "audio" / "real")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scenes_cpu.json")
    parser.add_argument("--seeds", type=int, default=3, help="scenes (orderings) to average over")
    args = parser.parse_args()
    runs = [evaluate(args.model, args.data, args.threshold, seed=s) for s in range(args.seeds)]
    keys = ("precision", "recall", "f1", "false_events_per_minute_on_background")
    summary = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    out = args.out
    out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=2) + "\n")
    print(f"{args.seeds} scenes of {runs[0]['true']} held-out clips each ({runs[0]['scene_s']} s), threshold {args.threshold}, "
          f"onset collar {runs[0]['collar_s']:.2f} s")
    print(f"event-based precision {summary['precision']:.3f}, recall {summary['recall']:.3f}, F1 {summary['f1']:.3f}; "
          f"false events on background {summary['false_events_per_minute_on_background']:.2f} / min")
    if all("sed_eval" in r for r in runs):
        sed = {k: float(np.mean([r["sed_eval"][k] for r in runs])) for k in ("precision", "recall", "f1")}
        summary["sed_eval"] = sed
        out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=2) + "\n")
        print(f"sed_eval EventBasedMetrics (onset collar, offsets ignored): precision {sed['precision']:.3f}, "
              f"recall {sed['recall']:.3f}, F1 {sed['f1']:.3f}")
    print("false events on background by label:", ", ".join(sorted({label for r in runs for label in r["false_event_labels"]})) or "none")
    missed = [c["label"] for r in runs for c in r["clips"] if c["detected_at"] is None]
    print("missed:", ", ".join(sorted(set(missed))) or "none")


if __name__ == "__main__":
    main()

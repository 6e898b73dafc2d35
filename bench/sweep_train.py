"""Training recipes side by side: each recipe × seed trained, validated and scored on scenes.

Every run is ``streamer.train.train`` (the code of ``streamer train``) with some settings
overridden, followed by ``bench/eval_scenes.py``'s evaluation of its held-out split with
the thresholds it chose. Seeds change the split too, so a recipe's mean over seeds is
less at the mercy of which 40 clips were held out. Runs go in parallel, one process each
(``--jobs``), on the CPU or with the model on a GPU (``--device cuda``: a recipe search in
minutes; the shipped figures are then measured with ``streamer train`` on the CPU). With
several cards, the runs are dealt to them in turn (64 runs in 7 minutes on 4 H100s).

    python bench/sweep_train.py RECIPES.json --seeds 0 1 2 --jobs 8 --device cuda --out results.json

RECIPES.json: ``{"name": {"steps": 4000, "preset": "tiny", ...}, ...}`` (TrainSettings fields; a key in
capitals sets that constant of :mod:`streamer.train` for the run, e.g. ``"FILE_FRACTION": 0.5``).
``--variants VARIANTS.json`` (``{"name": {"THRESHOLD_MARGIN": 0.5}, ...}``: constants of
:mod:`streamer.validation`) validates each trained model again under each variant and scores it
on three scene orderings — a paired comparison of how thresholds are chosen, free of training noise.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def run(job: tuple[str, dict, int, str, str, str, int, dict]) -> dict:
    name, overrides, seed, data, background, device, threads, variants = job
    import torch

    from eval_scenes import evaluate
    from streamer import train as train_module
    from streamer.train import TrainSettings, train

    torch.set_num_threads(threads)
    for k, v in overrides.items():  # constants of streamer.train: one process per job, so nothing carries over
        if k.isupper():
            if not hasattr(train_module, k):
                return {"recipe": name, "seed": seed, "error": f"streamer.train has no constant {k}"}
            setattr(train_module, k, tuple(v) if isinstance(v, list) else v)
    settings = TrainSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if not k.isupper()},
                             seed=seed, threads=threads, device=device, long_background=(Path(background),))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        out = Path(tmp) / "model"
        try:
            report = train(Path(data), out, settings, progress=lambda m: None)
            scenes = evaluate(out, Path(data), None, seed=0)
            revalidated = {v: _revalidate(out, Path(data), changes, seed) for v, changes in variants.items()}
        except Exception as exc:  # one broken recipe must not lose the others' results
            return {"recipe": name, "seed": seed, "error": f"{type(exc).__name__}: {exc}"}
    return {"recipe": name, "seed": seed, "seconds": round(time.monotonic() - started, 1),
            "train_s": report["seconds"], "clip_accuracy": report["clip_accuracy"], "top_label_accuracy": report["top_label_accuracy"],
            "stream_f1": report["stream"]["event_f1"], "verdict": report["verdict"], "stream_warning": report.get("stream_warning"),
            "confusions": report["confusions"],
            "scenes_f1": scenes["f1"], "scenes_precision": scenes["precision"], "scenes_recall": scenes["recall"],
            "scenes_false_per_min": scenes["false_events_per_minute_on_background"],
            "ambience_false_per_10_min": scenes.get("false_events_per_10_min_on_ambience"),
            "ambience_false": scenes.get("ambience_false_events"),
            "missed": sorted(c["label"] for c in scenes["clips"] if c["detected_at"] is None), "variants": revalidated}


def _revalidate(model: Path, data: Path, changes: dict, seed: int) -> dict:
    """The same trained model, validated (thresholds re-chosen) with some of validation's constants changed."""
    from eval_scenes import evaluate
    from streamer import validation
    from streamer.model.thresholds import write_thresholds

    saved = {k: getattr(validation, k) for k in changes}
    try:
        for k, v in changes.items():
            setattr(validation, k, tuple(v) if isinstance(v, list) else v)
        split = json.loads((model / "split.json").read_text())["validation"]
        held = validation.HeldOut([(data / k / n, k) for k, v in split.items() if k not in ("background", "background_long") for n in v],
                                  [data / "background" / n for n in split["background"]], [Path(p) for p in split["background_long"]])
        labels = sorted(k for k in split if k not in ("background", "background_long"))
        report, chosen = validation.validate(model, held, labels, seed=seed)
        write_thresholds(model, {k: {key: v[key] for key in ("on_threshold", "off_threshold", "ema_alpha")} for k, v in chosen.items()})
        runs = [evaluate(model, data, None, seed=s, ambience=s == 0) for s in range(3)]
    finally:
        for k, v in saved.items():
            setattr(validation, k, v)
    return {"clip_accuracy": report["clip_accuracy"], "stream_f1": report["stream"]["event_f1"],
            "scenes_f1": float(np.mean([r["f1"] for r in runs])), "scenes_precision": float(np.mean([r["precision"] for r in runs])),
            "scenes_recall": float(np.mean([r["recall"] for r in runs])),
            "ambience_false_per_10_min": runs[0].get("false_events_per_10_min_on_ambience")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", type=Path)
    parser.add_argument("--only", nargs="*", help="recipes to run (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "audio" / "real"))
    parser.add_argument("--background", default=str(ROOT.parent / "shared" / "audio" / "background_long"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", type=Path, help="JSON {name: {validation constant: value}}: each model also validated so")
    args = parser.parse_args()
    recipes = json.loads(args.recipes.read_text())
    names = args.only or list(recipes)
    variants = json.loads(args.variants.read_text()) if args.variants else {}
    jobs = [(n, recipes[n], s, args.data, args.background, args.device, args.threads, variants) for s in args.seeds for n in names]
    jobs.sort(key=lambda job: -job[1].get("steps", 1200))  # the longest first: the pool's tail is short ones
    if args.device == "cuda":  # every card of the box, in turn
        import torch
        cards = max(1, torch.cuda.device_count())
        jobs = [job[:5] + (f"cuda:{i % cards}",) + job[6:] for i, job in enumerate(jobs)]
    results = []
    with mp.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
        for r in pool.imap_unordered(run, jobs):
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("confusions", "ambience_false", "missed", "variants")}), flush=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")
    summary = {}
    for n in names:
        rs = [r for r in results if r["recipe"] == n and "error" not in r]
        if rs:
            summary[n] = {k: round(sum(r[k] for r in rs) / len(rs), 3) for k in
                          ("clip_accuracy", "top_label_accuracy", "stream_f1", "scenes_f1", "scenes_precision", "scenes_recall",
                           "ambience_false_per_10_min", "train_s")}
            summary[n]["runs"] = len(rs)
    args.out.write_text(json.dumps({"summary": summary, "runs": results}, indent=1) + "\n")
    for n, s in sorted(summary.items(), key=lambda kv: -kv[1]["scenes_f1"]):
        print(f"{n:<24} " + "  ".join(f"{k} {v}" for k, v in s.items()))
    for v in variants:  # paired: the same models, validated otherwise
        rs = [r["variants"][v] for r in results if "variants" in r]
        print(f"variant {v:<20} " + "  ".join(f"{k} {np.mean([r[k] for r in rs]):.3f}" for k in rs[0]))


if __name__ == "__main__":
    main()

"""``streamer bench``: our inference engine against transformers, on this machine, in one run.

Every configuration runs in its own child process (so peak memory is its own): our
engine per precision, and transformers' ``ASTForAudioClassification`` (eager and SDPA
attention, fp32 and bf16; dynamic int8 on the CPU) with the same weights. For each batch
size it reports windows per second and the median latency of a batch, from host features
to host probabilities. An accuracy pass compares every precision with fp32 on the same
windows (real recordings when given, else random audio) and checks that batched results
equal one-at-a-time ones.

transformers is needed only for its rows; without it, ours are measured alone.
"""

from __future__ import annotations

import json
import logging
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

GPU_BATCH_SIZES = (1, 8, 32, 64)
CPU_BATCH_SIZES = (1, 2)
HOP_SECONDS = 1.0
TOP_K = 5
SUSTAINED_BATCHES = 10


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in open("/proc/cpuinfo", encoding="utf-8"):
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads ({torch.backends.cpu.get_cpu_capability()})"
    return platform.processor()


def random_checkpoint(directory: Path, seed: int = 0, stride: int = 10) -> Path:
    """A full-size AudioSet-shaped AST (10-10, or ``stride``-``stride``; 527 labels) with random weights."""
    from streamer.model.ast import AudioSpectrogramTransformer
    from streamer.model.checkpoint import LoadedModel, save_checkpoint
    from streamer.model.config import ASTConfig, FeatureConfig

    torch.manual_seed(seed)
    config = ASTConfig(labels=tuple(f"label {i}" for i in range(527)), problem_type="multi_label_classification",
                       frequency_stride=stride, time_stride=stride)
    model = AudioSpectrogramTransformer(config)
    with torch.no_grad():  # ViT-like init: small weights, unit-scale tokens and positions
        for name, p in model.named_parameters():
            if p.dim() > 1 and "pos_embed" not in name and "token" not in name:
                p.normal_(0, 0.02)
            elif "token" in name or "pos_embed" in name:
                p.normal_(0, 0.5)
    save_checkpoint(LoadedModel(model, config, FeatureConfig(), "random"), directory)
    return directory


def _timed(fn, batch: int, iters: int, device: torch.device) -> dict:
    fn()  # warm
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"batch": batch, "latency_ms": median * 1000, "windows_per_s": batch / median, "iters": iters}


def _iters(device: torch.device, batch: int) -> int:
    return max(5, 200 // batch) if device.type == "cuda" else 2


def _windows(batch: int, seed: int = 0):
    from streamer.features.windows import Window

    g = torch.Generator().manual_seed(seed)
    return [Window(f"s{i}", 0, torch.randn(1024, 128, generator=g), 1024) for i in range(batch)]


def bench_ours(model_dir: Path, device: str, precision: str, batch_sizes, compile: bool = False) -> dict:
    from streamer.inference.engine import InferenceEngine
    from streamer.model import load_model

    t0 = time.perf_counter()
    engine = InferenceEngine(load_model(model_dir), device, precision, max_batch=max(batch_sizes), compile=compile)
    ready = time.perf_counter() - t0
    rows = []
    for b in batch_sizes:
        windows = _windows(b)
        row = _timed(lambda: engine.score(windows), b, _iters(engine.device, b), engine.device)
        if engine.device.type == "cuda":  # back-to-back batches, copies overlapping compute
            stream = windows * SUSTAINED_BATCHES
            engine.score(stream)
            t0 = time.perf_counter()
            engine.score(stream)
            row["sustained_windows_per_s"] = len(stream) / (time.perf_counter() - t0)
        rows.append(row)
    return {"load_and_warmup_s": ready, "rows": rows, "device": engine.device}


def bench_transformers(model_dir: Path, device: str, mode: str, batch_sizes) -> dict:
    from transformers import ASTForAudioClassification

    precision, attn = mode.split("-")
    dev = torch.device(device)
    t0 = time.perf_counter()
    model = ASTForAudioClassification.from_pretrained(model_dir, attn_implementation=attn).eval()
    if precision == "int8":
        quantize_int8_hf(model)
    else:
        model = model.to(dev, dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision])
    dtype = next(model.parameters()).dtype if precision != "int8" else torch.float32
    ready = time.perf_counter() - t0

    def run(x):
        with torch.inference_mode():
            return model(x.to(dev, dtype)).logits.float().sigmoid().cpu()

    rows = []
    for b in batch_sizes:
        x = torch.stack([w.features for w in _windows(b)])
        rows.append(_timed(lambda x=x: run(x), b, _iters(dev, b), dev))
    return {"load_and_warmup_s": ready, "rows": rows, "device": dev}


def quantize_int8_hf(model) -> None:
    """transformers' model with dynamic int8 Linear layers, as its users would do it."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.ao.quantization import quantize_dynamic

        quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def accuracy(model_dir: Path, device: str, precisions, audio: list[Path]) -> dict:
    """Each precision against fp32 on the same windows; batched against one at a time."""
    from streamer.inference.engine import InferenceEngine
    from streamer.model import load_model
    from streamer.model.config import FeatureConfig
    from streamer.features.windows import StreamWindows

    samples, source = _bench_audio(audio)
    stream = StreamWindows("acc", FeatureConfig(), hop_frames=100)
    windows = stream.push(samples) + stream.finish()
    feats = [w.features for w in windows]
    batch = min(len(feats), 16)
    reference = InferenceEngine(load_model(model_dir), device, "fp32", max_batch=batch).predict(feats)
    out = {"windows": len(windows), "source": source, "precisions": {}}
    ref_top = np.argsort(-reference, axis=1)[:, :TOP_K]
    for precision in precisions:
        engine = InferenceEngine(load_model(model_dir), device, precision, max_batch=batch)
        got = engine.predict(feats)
        single = np.concatenate([engine.predict(feats[i:i + 1]) for i in range(min(len(feats), 8))])
        top = np.argsort(-got, axis=1)[:, :TOP_K]
        agreement = np.mean([len(set(a) & set(b)) / TOP_K for a, b in zip(top, ref_top)])
        out["precisions"][precision] = {
            "max_abs_dp": float(np.abs(got - reference).max()),
            "top5_agreement": float(agreement),
            "batched_vs_single_max_abs_dp": float(np.abs(got[: len(single)] - single).max()),
        }
        del engine
    return out


def child_main(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["kind"] == "accuracy":
        result = accuracy(Path(spec["model"]), spec["device"], spec["precisions"], [Path(p) for p in spec["audio"]])
    else:
        runner = bench_ours if spec["kind"] == "ours" else bench_transformers
        args = (Path(spec["model"]), spec["device"], spec["mode"], spec["batch_sizes"])
        result = runner(*args, compile=spec.get("compile", False)) if spec["kind"] == "ours" else runner(*args)
        device = result.pop("device")
        if device.type == "cuda":
            result["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            result["peak_mem_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["machine"] = machine_name(device)
    print("RESULT " + json.dumps(result), flush=True)


def _spawn(spec: dict, timeout: float) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "streamer.benchmark", json.dumps(spec)],
        capture_output=True, text=True, timeout=timeout,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": tail}


def plan(device: str, include_transformers: bool, compile: bool) -> list[dict]:
    on_gpu = torch.device(device).type == "cuda"
    sizes = list(GPU_BATCH_SIZES if on_gpu else CPU_BATCH_SIZES)
    precisions = ["fp32", "bf16", "fp16"] if on_gpu else ["fp32", "int8", "bf16"]
    specs = [{"kind": "ours", "mode": p, "batch_sizes": sizes if p != "bf16" or on_gpu else [1]} for p in precisions]
    if on_gpu and compile:
        specs.append({"kind": "ours", "mode": "bf16", "compile": True, "batch_sizes": sizes})
    if include_transformers:
        modes = ["fp32-eager", "fp32-sdpa", "bf16-sdpa"] if on_gpu else ["fp32-sdpa", "int8-sdpa"]
        specs += [{"kind": "transformers", "mode": m, "batch_sizes": sizes} for m in modes]
    return specs


def throughput(row: dict) -> float:
    return row.get("sustained_windows_per_s", row["windows_per_s"])


def streams_at_hop(rows: list[dict], hop_s: float = HOP_SECONDS) -> int:
    """Live streams one box sustains at this hop: the best throughput whose batch still fits in a hop."""
    fits = [throughput(r) * hop_s for r in rows if r["latency_ms"] / 1000 <= hop_s]
    return int(max(fits, default=0.0))


CPU_ROUNDS = 12  # windows of real audio each CPU path scores (the first warms up, the rest are timed)


def _bench_audio(audio: list[Path]) -> tuple[np.ndarray, str]:
    """The recordings joined (16 kHz mono), or 40 s of seeded random audio; and what they are."""
    from streamer.capture.files import read_audio

    if audio:
        samples = np.concatenate([read_audio(p) for p in audio])
        return samples, f"{len(audio)} real recordings, {len(samples) / 16000:.0f} s"
    return np.random.default_rng(0).uniform(-0.3, 0.3, 16000 * 40).astype(np.float32), "40 s of random audio"


def _real_windows(loaded, audio: list[Path], count: int, hop_frames: int) -> tuple[torch.Tensor, str]:
    from streamer.features.windows import StreamWindows

    samples, source = _bench_audio(audio)
    stream = StreamWindows("bench", loaded.features, hop_frames=hop_frames)
    windows = stream.push(samples) + stream.finish()
    step = max(1, len(windows) // count)  # spread over the whole recording
    picked = windows[::step][:count]
    if len(picked) < count:  # short audio: the same windows again (timing needs the rounds)
        source += f", {len(picked)} distinct windows repeated"
        picked = [picked[i % len(picked)] for i in range(count)]
    return torch.stack([w.features for w in picked]), source


CHEAP_PATHS = ("fp32", "onnx-int8")  # measured on the cheaper (16-16) model too


def cpu_paths(model_dir: Path, threads: int, include_transformers: bool, cheaper: Path | None = None) -> dict:
    """Every CPU path, built once in this process: name → (B, T, F) features → logits.

    With ``cheaper`` (a 16-16 checkpoint), its fp32 and onnx-int8 paths as well, named
    ``… 16-16`` (their accuracy is against the 16-16 model's own fp32).
    """
    from streamer.inference import cpu
    from streamer.model import load_model

    loaded = load_model(model_dir)
    features = cpu.cpu_features()
    paths: dict = {}
    probabilities: dict = {}
    if include_transformers:
        from transformers import ASTForAudioClassification

        hf = ASTForAudioClassification.from_pretrained(model_dir, attn_implementation="sdpa").eval()
        paths["transformers fp32"] = lambda x: hf(x).logits
    names = ["fp32", "int8"] + (["bf16"] if features.bf16_units else []) + (list(cpu.ONNX_PATHS) if cpu.onnxruntime_available() else [])
    for name in names:
        t0 = time.perf_counter()
        paths[f"ours {name}"] = cpu.build_forward(name, loaded, threads)
        log.info("built %s in %.1f s", name, time.perf_counter() - t0)
    if features.bf16_units:  # the bf16 path's weight prepacking, measured against plain torch bf16 in the same rounds
        import copy

        paths["ours bf16 unpacked"] = cpu.bf16_forward(copy.deepcopy(loaded.model), packed=False)
    if cheaper is not None:
        small = load_model(cheaper)
        grid = f"{small.config.frequency_stride}-{small.config.time_stride}"
        for name in CHEAP_PATHS:
            paths[f"ours {name} {grid}"] = cpu.build_forward(name, small, threads)
            probabilities[f"ours {name} {grid}"] = (small.model.probabilities, f"ours fp32 {grid}")
    return {"paths": paths, "loaded": loaded, "features": features, "references": probabilities}


def bench_cpu(model_dir: Path, audio: list[Path], threads: int, include_transformers: bool = True,
              rounds: int = CPU_ROUNDS, accuracy_model: Path | None = None, cheaper: Path | None = None) -> dict:
    """All CPU paths in one process, interleaved window by window, on real recordings.

    Each round scores one window with every path in turn, so that other load on the
    machine (it may be shared) hits every path alike; a path's speed is its median over
    the timed rounds, and its ratio to transformers fp32 the median of the per-round
    ratios. Accuracy: max |Δp| of every path against our fp32 over the same windows.
    """
    torch.set_num_threads(threads)
    built = cpu_paths(model_dir, threads, include_transformers, cheaper)
    paths, loaded, references = built["paths"], built["loaded"], built["references"]
    windows, source = _real_windows(loaded, audio, rounds, hop_frames=100)
    probs = loaded.model.probabilities
    times: dict[str, list[float]] = {name: [] for name in paths}
    outs: dict[str, list[torch.Tensor]] = {name: [] for name in paths}
    with torch.inference_mode():
        for i in range(len(windows)):
            for name, forward in paths.items():
                t0 = time.perf_counter()
                out = references.get(name, (probs,))[0](forward(windows[i:i + 1]))
                elapsed = time.perf_counter() - t0
                if i:
                    times[name].append(elapsed)
                outs[name].append(out[0])
            print(f"round {i + 1}/{len(windows)}: " + ", ".join(f"{n} {times[n][-1]:.2f}" for n in paths if times[n]),
                  file=sys.stderr, flush=True)
    base = "transformers fp32" if "transformers fp32" in paths else "ours fp32"
    rows = []
    for name in paths:
        got = torch.stack(outs[name])
        reference_name = references.get(name, (None, "ours fp32"))[1]
        ref = torch.stack(outs[reference_name])
        ratios = [b / t for b, t in zip(times[base], times[name])]
        top = got.topk(TOP_K, dim=1).indices
        ref_top = ref.topk(TOP_K, dim=1).indices
        rows.append({
            "path": name, "s_per_window": statistics.median(times[name]), "min_s": min(times[name]),
            "speedup_vs_" + base.replace(" ", "_"): statistics.median(ratios),
            "accuracy_reference": reference_name, "max_abs_dp": float((got - ref).abs().max()),
            "top5_agreement": float(np.mean([len(set(a.tolist()) & set(b.tolist())) / TOP_K for a, b in zip(top, ref_top)])),
        })
    report = {"windows": len(windows), "timed_rounds": len(windows) - 1, "source": source, "baseline": base,
              "cpu": built["features"].describe(), "capability": built["features"].capability, "threads": threads,
              "rows": rows}
    if accuracy_model is not None:
        report["trained_model_accuracy"] = cpu_accuracy(accuracy_model, audio, threads)
    return report


def cpu_accuracy(model_dir: Path, audio: list[Path], threads: int, count: int = 64) -> dict:
    """max |Δp| against our fp32 for every CPU path, on a model with trained weights."""
    from streamer.inference import cpu
    from streamer.model import load_model

    loaded = load_model(model_dir)
    windows, source = _real_windows(loaded, audio, count, hop_frames=50)
    probs = loaded.model.probabilities
    names = ["fp32", "int8"] + (["bf16"] if cpu.cpu_features().bf16_units else []) + list(cpu.ONNX_PATHS)
    out: dict = {"model": str(model_dir), "windows": len(windows), "source": source, "labels": len(loaded.labels), "paths": {}}
    with torch.inference_mode():
        ref = probs(loaded.model(windows))
        for name in names:
            forward = cpu.build_forward(name, loaded, threads)
            got = torch.cat([probs(forward(windows[i:i + 1])) for i in range(len(windows))])
            out["paths"][name] = float((got - ref).abs().max())
    return out


def format_cpu_table(report: dict) -> str:
    cpu = report["cpu_paths"]
    key = next(k for k in cpu["rows"][0] if k.startswith("speedup_vs_"))
    lines = [f"{report['machine']} — torch {report['torch']}; {cpu['cpu']}, {cpu['threads']} threads;"
             f" {cpu['timed_rounds']} timed rounds, paths interleaved; accuracy on {cpu['windows']} windows of {cpu['source']}",
             f"| path | s per window (median) | vs {cpu['baseline']} | max |Δp| (against) | top-5 agreement |",
             "|---|---|---|---|---|"]
    for r in cpu["rows"]:
        lines.append(f"| {r['path']} | {r['s_per_window']:.2f} | {r[key]:.2f}× | {r['max_abs_dp']:.4f} ({r['accuracy_reference']}) | {r['top5_agreement']:.3f} |")
    trained = cpu.get("trained_model_accuracy")
    if trained:
        lines.append(f"\ntrained weights ({trained['model']}, {trained['labels']} labels), {trained['windows']} windows of "
                     f"{trained['source']}: " + ", ".join(f"{p} {d:.4f}" for p, d in trained["paths"].items()))
    return "\n".join(lines)


def run(device: str, out: Path, model: Path | None, audio: list[Path], include_transformers: bool = True,
        compile: bool = False, threads: int | None = None, timeout: float = 900,
        accuracy_model: Path | None = None) -> dict:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    if dev.type == "cpu":
        return run_cpu(out, model, audio, include_transformers, threads, accuracy_model)
    if include_transformers:
        try:
            import transformers  # noqa: F401
        except ImportError:
            log.warning("transformers is not installed: measuring our engine alone")
            include_transformers = False
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model or random_checkpoint(Path(tmp) / "model")
        results = []
        for spec in plan(str(dev), include_transformers, compile):
            spec.update(model=str(model_dir), device=str(dev), threads=threads)
            label = f"{spec['kind']} {spec['mode']}{' compiled' if spec.get('compile') else ''}"
            print(f"measuring {label} …", file=sys.stderr, flush=True)
            results.append({"impl": spec["kind"], "mode": spec["mode"], "compile": spec.get("compile", False), **_spawn(spec, timeout)})
        precisions = ["bf16", "fp16"] if dev.type == "cuda" else ["int8"]
        acc_spec = {"kind": "accuracy", "model": str(model_dir), "device": str(dev), "precisions": precisions,
                    "audio": [str(p) for p in audio], "threads": threads}
        print("measuring accuracy …", file=sys.stderr, flush=True)
        acc = _spawn(acc_spec, timeout)
    report = {
        "machine": next((r["machine"] for r in results if "machine" in r), str(dev)),
        "torch": torch.__version__, "model": str(model) if model else "random full-size 10-10, 527 labels",
        "results": results, "accuracy": acc,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    return report


def run_cpu(out: Path, model: Path | None, audio: list[Path], include_transformers: bool = True,
            threads: int | None = None, accuracy_model: Path | None = None) -> dict:
    """``streamer bench --device cpu``: every CPU path against transformers fp32, in one process."""
    if include_transformers:
        try:
            import transformers  # noqa: F401
        except ImportError:
            log.warning("transformers is not installed: measuring our paths against our fp32")
            include_transformers = False
    threads = threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model or random_checkpoint(Path(tmp) / "model")
        cheaper = None if model else random_checkpoint(Path(tmp) / "model-16-16", stride=16)
        result = bench_cpu(model_dir, audio, threads, include_transformers, accuracy_model=accuracy_model, cheaper=cheaper)
    report = {"machine": machine_name(torch.device("cpu")), "torch": torch.__version__,
              "model": str(model) if model else "random full-size 10-10 (and 16-16), 527 labels",
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_paths": result}
    try:
        import onnxruntime

        report["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_cpu_table(report))
    return report


def format_table(report: dict) -> str:
    sizes = sorted({r["batch"] for res in report["results"] for r in res.get("rows", [])})
    lines = [f"{report['machine']} — torch {report['torch']}",
             "| impl | precision | " + " | ".join(f"bs {b}: w/s (ms/batch)" for b in sizes) + " | peak MiB | streams @1 s hop |",
             "|---|---|" + "---|" * len(sizes) + "---|---|"]
    for res in report["results"]:
        name = res["impl"] + (" +compile" if res.get("compile") else "")
        if "error" in res:
            lines.append(f"| {name} | {res['mode']} | error: {res['error'][:80]} |")
            continue
        by = {r["batch"]: r for r in res["rows"]}
        cells = [f"{throughput(by[b]):.1f} ({by[b]['latency_ms']:.1f})" if b in by else "–" for b in sizes]
        lines.append(f"| {name} | {res['mode']} | " + " | ".join(cells) + f" | {res['peak_mem_mib']:.0f} | {streams_at_hop(res['rows'])} |")
    acc = report.get("accuracy", {})
    if "precisions" in acc:
        lines.append(f"\naccuracy vs fp32 on {acc['windows']} windows ({acc['source']}):")
        for p, a in acc["precisions"].items():
            lines.append(f"  {p}: max |Δp| {a['max_abs_dp']:.4f}, top-5 agreement {a['top5_agreement']:.3f}, "
                         f"batched vs single max |Δp| {a['batched_vs_single_max_abs_dp']:.2e}")
    elif acc:
        lines.append(f"\naccuracy: error: {acc.get('error')}")
    lines.append("w/s: windows per second over back-to-back batches (ours pipelines copies with compute);"
                 " ms: latency of one batch, host features in to host probabilities out")
    return "\n".join(lines)


if __name__ == "__main__":
    child_main(sys.argv[1:])

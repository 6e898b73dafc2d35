"""The ``streamer`` command line: parse arguments, run a command, turn errors into one line."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from streamer import __version__
from streamer.errors import StreamerError

log = logging.getLogger("streamer")

DEFAULT_MODEL = "MIT/ast-finetuned-audioset-10-10-0.4593"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
RECORD_DEFAULT_S = 5.0
RECORD_RING_S = 30.0  # `record` writes as it reads: the ring only bridges the writer's pauses
WAV_LIMIT_BYTES = 2**32 - 2**20  # past this a plain WAV header overflows: RF64 instead
EXIT_UNUSABLE_MODEL = 3  # `streamer train` wrote the model but judged it not usable (its verdict line says why)
DEFAULT_TRAIN_STEPS = 4000  # streamer.train.DEFAULT_STEPS (kept here so --help needs no torch import)
# --max-length from scratch: at least one 16-frame patch; at most the AudioSet AST's 1024 frames
# (10.24 s): beyond it a step takes minutes, and the daemon's windows are that long
TRAIN_WINDOW_FRAMES = (16, 1024)
MAX_SEED = 2**32 - 1  # the seeds torch, numpy and random all take
MAX_TRAIN_STEPS = 1_000_000  # ~2 days of the tiny model on 2 cores: more is a typo, not a plan
MAX_DETECT_HOP_S = 60.0  # a hop is scheduling state per stream: 1e5 s asked for 46 GB
MAX_BATCH = 4096  # windows (or training examples) per pass: 1e5 asked for 52 GB
MAX_THREADS = 1024  # as model.threads in the config
MAX_MINUTES = 7 * 24 * 60.0  # --minutes of training or recording: a week
OPEN_FILES_WANTED = 1 << 20  # the soft limit on open files is raised towards this (each file scored is open at once)


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _whole(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value
    return parse


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _bounded_number(low: float, high: float, open_low: bool = False) -> Callable[[str], float]:
    """A finite number in [low, high] (or (low, high] with ``open_low``): nan, inf and 1e308
    are refused as the option they are (exit 2), not met as a traceback or a silent cap."""
    def parse(text: str) -> float:
        value = _number(text)
        if value > high or value < low or (open_low and value == low):
            raise argparse.ArgumentTypeError(f"must be {'over' if open_low else 'at least'} {low:g} and at most {high:g}, got {text}")
        return value
    return parse


def _hop(text: str) -> int:
    from streamer.detect import hop_to_frames

    value = _bounded_number(0, MAX_DETECT_HOP_S, open_low=True)(text)
    try:
        return hop_to_frames(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamer", description="Streaming audio event detection with AST.")
    parser.add_argument("--version", action="version", version=f"streamer {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model_help = f"checkpoint directory or Hugging Face hub id (default {DEFAULT_MODEL})"
    detect = sub.add_parser("detect", help="detect sounds in audio files, window by window")
    detect.add_argument("audio", nargs="+", type=Path, metavar="AUDIO", help="wav, flac or ogg files")
    detect.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    detect.add_argument("--hop", type=_hop, default=100, metavar="SECONDS", help="window hop in seconds, a multiple of 0.01 (default 1)")
    detect.add_argument("--top-k", type=_positive_int, default=3, metavar="K", help="labels printed per window (default 3)")
    detect.add_argument("--scores-out", type=Path, metavar="FILE.npz", help="write every window's scores to an .npz")
    detect.add_argument("--events-out", type=Path, metavar="FILE.jsonl", help="write ON/OFF events, one JSON object a line")
    detect.add_argument("--config", type=Path, metavar="FILE.yaml", help="take event settings from this config's detect section")
    detect.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto: a GPU if there is one)")
    detect.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "fp16", "int8", "onnx-fp32", "onnx-int8"],
                        help="inference precision (default fp32; auto: the fastest within 0.02 of fp32 here; int8, onnx-* are CPU only)")
    detect.add_argument("--batch", type=_bounded_int(1, MAX_BATCH), default=8, help="windows per forward pass (default 8)")
    detect.add_argument("--threads", type=_bounded_int(1, MAX_THREADS), help="CPU threads for inference (default: torch's choice)")

    labels = sub.add_parser("labels", help="list the labels a model can detect")
    labels.add_argument("search", nargs="?", default="", help="show only labels containing this text (or a model directory)")
    labels.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    run = sub.add_parser("run", help="run the detector daemon (sources → model → events → MQTT/console)")
    run.add_argument("--config", type=Path, default=Path("config/streamer.yaml"), help="YAML config (default config/streamer.yaml)")
    run.add_argument("--model", help="override model.path")
    run.add_argument("--source", help="use only this source: mic[:DEVICE], file:PATH or a URL")
    run.add_argument("--mqtt-host", help="override mqtt.host (and turn MQTT on)")
    run.add_argument("--mqtt-port", type=int, help="override mqtt.port")
    run.add_argument("--hop", type=_number, help="override hop (seconds, 0.1–10)")
    run.add_argument("--json", action="store_true", help="print one JSON object per event instead of the live view")
    run.add_argument("--console", choices=["auto", "live", "lines", "json", "off"], default="auto", help="console output (default: live view in a terminal, lines otherwise)")

    check = sub.add_parser("check-config", help="validate a config file and exit (2 on errors)")
    check.add_argument("config", type=Path, nargs="?", default=Path("config/streamer.yaml"))

    tr = sub.add_parser("train", help="train a model on your own sounds (one folder of clips per label)")
    tr.add_argument("data", type=Path, metavar="DATA_DIR", help="one folder per label; a 'background' folder for negatives and noise")
    tr.add_argument("--out", type=Path, required=True, metavar="MODEL_DIR", help="where to write the checkpoint")
    tr.add_argument("--base", help="pretrained AST to extend (frozen backbone, new label rows); default: train a small AST from scratch")
    tr.add_argument("--preset", choices=["tiny", "small"], default="tiny", help="model size from scratch (default tiny)")
    tr.add_argument("--max-length", type=_bounded_int(*TRAIN_WINDOW_FRAMES), default=128,
                    help=f"window in frames from scratch, {TRAIN_WINDOW_FRAMES[0]} to {TRAIN_WINDOW_FRAMES[1]} (default 128 = 1.28 s)")
    tr.add_argument("--background", type=Path, action="append", default=[], metavar="DIR",
                    help="long recordings of the room (e.g. from `streamer record mic DIR/room.wav --minutes 60`), "
                         "besides DATA_DIR/background; may be given more than once")
    tr.add_argument("--steps", type=_bounded_int(1, MAX_TRAIN_STEPS), default=DEFAULT_TRAIN_STEPS,
                    help=f"training steps (default {DEFAULT_TRAIN_STEPS}): the same data, seed and steps give the same model")
    tr.add_argument("--minutes", type=_bounded_number(0, MAX_MINUTES, open_low=True), help="also stop after this many minutes (a cap: the model then depends on the machine's speed)")
    tr.add_argument("--batch", type=_bounded_int(1, MAX_BATCH), default=32, help="examples per step (default 32)")
    tr.add_argument("--lr", type=_bounded_number(0, 1, open_low=True), default=1e-3, help="peak learning rate (default 0.001)")
    tr.add_argument("--max-false-per-hour", type=_bounded_number(0, 3600), default=1.0, metavar="N",
                    help="thresholds keep false events on held-out background at or under this (default 1)")
    tr.add_argument("--seed", type=_bounded_int(0, MAX_SEED), default=0, help=f"0 to {MAX_SEED} (default 0); it also picks the held-out split")
    tr.add_argument("--hop", type=_hop, default=100, metavar="SECONDS",
                    help="the hop the thresholds are chosen for: the one your config runs at (default 1)")
    tr.add_argument("--threads", type=_bounded_int(1, MAX_THREADS), help="CPU threads (default: every core)")
    tr.add_argument("--device", default="cpu", metavar="DEVICE",
                    help="cpu (default: the same data, seed and steps give the same weights) or cuda[:N] "
                         "(minutes faster on a GPU box, but not bit-reproducible); validation always runs on the CPU")

    sub.add_parser("devices", help="list audio input devices (microphones)")

    record = sub.add_parser("record", help="record a source to an audio file (16 kHz mono), e.g. to collect clips")
    record.add_argument("source", help="mic, mic:DEVICE, file:PATH, a URL (rtsp://, http://…) or ffmpeg:URL")
    record.add_argument("out", type=Path, help="output file (.wav or .flac)")
    record.add_argument("--seconds", type=_bounded_number(0, MAX_MINUTES * 60, open_low=True), help="how long to record (default 5)")
    record.add_argument("--minutes", type=_bounded_number(0, MAX_MINUTES, open_low=True), help="how long to record, in minutes (e.g. 60 of a room's background for `streamer train --background`)")
    record.add_argument("--channels", type=_positive_int, help="mic: channels to open (default: the device's, at most 2), mixed to mono")
    record.add_argument("--channel", type=int, help="mic: record only this channel (0-based) instead of the mix")

    bench = sub.add_parser("bench", help="measure inference speed and accuracy against transformers")
    bench.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    bench.add_argument("--model", type=Path, help="checkpoint directory (default: random full-size 10-10 weights)")
    bench.add_argument("--audio", type=Path, nargs="*", default=[], help="real recordings for the accuracy pass")
    bench.add_argument("--out", type=Path, default=Path("bench/results/inference.json"), help="JSON report path")
    bench.add_argument("--no-transformers", action="store_true", help="measure our engine alone")
    bench.add_argument("--compile", action="store_true", help="also measure bf16 with torch.compile (GPU)")
    bench.add_argument("--threads", type=_bounded_int(1, MAX_THREADS), help="CPU threads")
    bench.add_argument("--accuracy-model", type=Path, help="CPU: also measure every path's accuracy on this (trained) checkpoint")
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    return {k: v for k, v in {"model": args.model, "source": args.source, "mqtt_host": args.mqtt_host,
                              "mqtt_port": args.mqtt_port, "hop": args.hop}.items() if v is not None}


def cmd_run(args: argparse.Namespace) -> int:
    from streamer.settings import load_config
    from streamer.daemon import Daemon

    config = load_config(args.config, _overrides(args))
    logging.getLogger().setLevel(getattr(logging, config.log_level.upper()) if not args.verbose else logging.getLogger().level)
    return Daemon(config, args.config, output="json" if args.json else args.console).run()


def cmd_check_config(args: argparse.Namespace) -> int:
    from streamer.settings import ConfigError, load_config

    from streamer.model.checkpoint import _looks_like_hub_id

    config = load_config(args.config)
    if config.mqtt and config.mqtt.tls:
        from streamer.settings import tls_file_problems

        if problems := tls_file_problems(config.mqtt.tls):
            raise ConfigError([f"{args.config}: mqtt.tls.{key}: {problem}" for key, problem in problems])
    labels, why = model_labels(config.model.path)
    local = Path(config.model.path).expanduser()
    if labels is None and (local.is_dir() or not _looks_like_hub_id(config.model.path)):  # `run` would refuse it too
        raise ConfigError([f"{args.config}: model.path: {why}; give the folder `streamer train --out` wrote, a model folder "
                           f"you downloaded, or a Hugging Face hub id"])
    if labels is None:
        checked = f"targets not checked: {why}"
    else:
        try:
            thresholds = model_thresholds(config.model.path)
            targets = config.detect.targets(labels, thresholds)
        except StreamerError as exc:
            raise ConfigError([f"{args.config}: {exc}"]) from None
        checked = f"{len(targets)} target(s), targets checked against the model's {len(labels)} labels" + (
            f" and its thresholds.json ({len(thresholds)} labels)" if thresholds else "")
        for pattern in config.detect.unmatched(labels):
            print(f"streamer: warning: {args.config}: detect.include {pattern!r} matches none of the model's labels", file=sys.stderr)
    from streamer.capture.files import audio_info
    from streamer.settings import _expand_user

    for index, source in enumerate(config.sources):  # the daemon starts without it, and that source fails until it is fixed
        if source.type == "file" and source.path:
            try:
                audio_info(_expand_user(Path(source.path)))
            except StreamerError as exc:
                print(f"streamer: warning: {args.config}: sources[{index}] {source.name}: {exc} (the daemon starts, and this "
                      f"source fails until that is mended)", file=sys.stderr)
    print(f"{args.config}: OK — {len(config.sources)} source(s), hop {'auto' if config.hop_auto else f'{config.hop} s'}, "
          f"MQTT {'on' if config.mqtt else 'off'}, model {config.model.path}; {checked}")
    return 0


def model_thresholds(path_or_id: str) -> dict:
    """A local model directory loaded as the daemon loads it — weights and thresholds.json, whose
    faults would be the daemon's start-up error — and its thresholds; {} for a hub model."""
    from streamer.model import load_model

    return load_model(path_or_id).thresholds if Path(path_or_id).expanduser().is_dir() else {}


def model_labels(path_or_id: str) -> tuple[tuple[str, ...] | None, str]:
    """The labels of a model from its config.json — a local directory, or a hub id already in
    the local cache (nothing is downloaded) — or None and why they could not be read."""
    from streamer.model.checkpoint import CheckpointError, _looks_like_hub_id
    from streamer.model.config import ASTConfig, read_json

    path = Path(path_or_id).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
    elif _looks_like_hub_id(path_or_id):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path_or_id, "config.json")
        except Exception as exc:  # a cache that cannot be read: say so, do not fail the check
            return None, f"the hub cache could not be read ({type(exc).__name__})"
        if not isinstance(cached, str):
            return None, (f"model {path_or_id} is not in the local Hugging Face cache (run `streamer labels --model {path_or_id}` "
                          f"once online), nor a folder here ({path.absolute()} does not exist)")
        config_file = Path(cached)
    else:
        return None, f"model {path_or_id}: no such directory"
    try:
        config = ASTConfig.from_dict(read_json(config_file), source=str(config_file))
    except (CheckpointError, StreamerError) as exc:
        return None, f"the model's config could not be read ({exc})"
    return config.labels, ""


def cmd_train(args: argparse.Namespace) -> int:
    """Exit 0 with a usable model (a warning line for labels it never hears in a stream);
    ``EXIT_UNUSABLE_MODEL`` when it was written but judged not usable (clip accuracy under 0.6
    or a label none of whose held-out clips it recognises), with one line saying the fix."""
    from streamer.inference.engine import resolve_device
    from streamer.train import TrainSettings, train

    device = resolve_device(args.device)  # a one-line error for a device this machine lacks
    settings = TrainSettings(preset=args.preset, max_length=args.max_length, minutes=args.minutes, seed=args.seed,
                             threads=args.threads, steps=args.steps, batch=args.batch, lr=args.lr, long_background=tuple(args.background),
                             max_false_per_hour=args.max_false_per_hour, device=str(device), hop_s=args.hop / 100)
    report = train(args.data, args.out, settings, base=args.base, progress=lambda m: print(m, flush=True))
    stream = report["stream"]
    false = "not measured (no background)" if stream["false_events_per_hour"] is None else f"{stream['false_events_per_hour']:.1f}"
    print(f"held-out clips as `streamer detect` scores them: clip accuracy {report['clip_accuracy']:.3f} on {report['clips']} clips "
          f"(top label right for {report['top_label_accuracy']:.3f} of the labelled ones); "
          f"in a stream: event F1 {stream['event_f1']:.2f}, false events per hour {false} "
          f"on {stream['background_s'] / 60:.1f} min of background (held-out recordings and the gaps between held-out clips; "
          f"{report['steps']} steps, {report['seconds']:.0f} s); model in {args.out}")
    for name, r in report["per_label"].items():
        print(f"  {name:<20} precision {r['precision']:.2f}  recall {r['recall']:.2f}  in a stream {r['stream_recall']:.2f}  "
              f"threshold {r['on_threshold']:.3f}  ({r['clips']} clips)")
    for warning in ("background_warning", "false_alarm_warning"):
        if report[warning]:
            print(f"streamer: {report[warning]}", file=sys.stderr)
    if report["verdict"]:
        print(f"streamer: {report['verdict']}", file=sys.stderr)
        return EXIT_UNUSABLE_MODEL
    if report["stream_warning"]:
        print(f"streamer: {report['stream_warning']}", file=sys.stderr)
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from streamer.capture.sources import input_devices

    devices = input_devices()
    if not devices:
        print("no audio input devices found: plug in a microphone, or use a file or ffmpeg (RTSP/HTTP) source")
        return 0
    print("index\tchannels\trate\thost API\tname")
    for d in devices:
        print(f"{d.index}\t{d.channels}\t{d.default_rate:.0f}\t{d.host_api}\t{d.name}")
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    """A take: SIGTERM (`timeout`, `kill`, a service stop) closes it as Ctrl-C does, the header written (main)."""
    import time
    from dataclasses import replace

    import soundfile as sf

    from streamer.capture.sources import MicSource, SourceState, make_source, source_from_spec
    from streamer.constants import SAMPLE_RATE_HZ

    if args.seconds is not None and args.minutes is not None:
        raise StreamerError("give --seconds or --minutes, not both")
    seconds = args.minutes * 60 if args.minutes is not None else (args.seconds if args.seconds is not None else RECORD_DEFAULT_S)
    if not (math.isfinite(seconds) and seconds > 0):
        given = ("minutes", args.minutes) if args.minutes is not None else ("seconds", args.seconds)
        raise StreamerError(f"--{given[0]} must be a positive number, got {given[1]}")
    if args.out.suffix.lower() not in (".wav", ".flac"):
        raise StreamerError(f"{args.out}: give a .wav or .flac output file")
    if args.out.parent.exists() and not args.out.parent.is_dir():
        raise StreamerError(f"{args.out}: {args.out.parent} is a file, not a folder")
    spec = source_from_spec(args.source)
    if spec.type == "file" and not Path(spec.path).is_file():  # said once here, not by the source's log and again after it
        raise StreamerError(f"{spec.path}: no such file")
    if getattr(spec, "path", None) and Path(spec.path).resolve() == args.out.resolve():
        raise StreamerError(f"{args.out}: that is the file being recorded from; give another output file")
    if args.out.is_file():  # a take of clips/doorbell/01.wav recorded twice: the first is not lost without a word
        raise StreamerError(f"{args.out}: already exists; give a new file name (or remove that file first)")
    if spec.type == "mic":
        spec = replace(spec, channels=args.channels, channel=args.channel)
    # written as it comes: an hour of background needs no hour-long ring or buffer
    source = make_source(spec, ring_seconds=min(max(10.0, seconds + 5), RECORD_RING_S))
    if isinstance(source, MicSource):
        source.open_check()
    wanted = max(1, int(seconds * SAMPLE_RATE_HZ))
    have = 0
    wav = args.out.suffix.lower() == ".wav"
    try:
        made = [p for p in (args.out.parent, *args.out.parent.parents) if not p.exists()]  # taken back if nothing is recorded
        args.out.parent.mkdir(parents=True, exist_ok=True)  # clips/doorbell/01.wav: the label's folder is made
        out = sf.SoundFile(str(args.out), "w", SAMPLE_RATE_HZ, 1, subtype="FLOAT" if wav else "PCM_24",
                           format="RF64" if wav and wanted * 4 >= WAV_LIMIT_BYTES else None)
    except (sf.LibsndfileError, OSError) as exc:
        raise StreamerError(f"{args.out}: cannot write there ({exc}); give a file you can write to") from None
    if not log.isEnabledFor(logging.INFO):  # a source's failure is this command's one error line, not a log line before it too
        logging.getLogger("streamer.capture.sources").setLevel(logging.ERROR)
    with out:
        source.start()
        try:
            while have < wanted:
                _, samples = source.ring.read(wanted - have)
                if len(samples):
                    out.write(samples)
                    have += len(samples)
                elif source.finished or source.state == SourceState.RETRYING:  # drained: a take has no gaps, it ends
                    break
                else:
                    time.sleep(0.02)
            why = (source.error or "").split("; retrying in ")[0]  # before the stop, which clears it; a take is not retried
        except (sf.LibsndfileError, OSError) as exc:  # a disk that fills up: what was written so far stays readable
            raise StreamerError(f"{args.out}: writing stopped after {have / SAMPLE_RATE_HZ:.1f} s ({exc}); "
                                "the file holds what was recorded until then: free space, or record elsewhere") from None
        finally:
            source.stop()
    if not have:  # a dead URL, an empty file: no empty take (nor the folders made for it) left to block the next try
        args.out.unlink(missing_ok=True)
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise StreamerError(f"source {source.name}: {why or 'no audio came from it'}; nothing was recorded")
    if why:  # failed part way (a decoding error, a camera gone): the take is kept, and the command fails
        raise StreamerError(f"source {source.name}: {why}; {args.out} keeps the {have / SAMPLE_RATE_HZ:.2f} s "
                            f"recorded before it (of {seconds:g} s asked for)")
    lost = source.lost
    print(f"recorded {have / SAMPLE_RATE_HZ:.2f} s from {source.describe()} to {args.out} "
          f"(overflows {source.stats.overflows}, lost samples {lost})", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from streamer.benchmark import run
    from streamer.detect import check_output
    from streamer.inference.engine import resolve_device

    resolve_device(args.device)  # a device this machine lacks: one line now, not a report of errors and exit 0
    if args.out.parent != Path("") and not args.out.parent.exists():
        args.out.parent.mkdir(parents=True, exist_ok=True)  # bench/results/ in a fresh checkout
    check_output(args.out)  # a folder, /dev/full, an unwritable place: said before minutes of measuring
    run(args.device, args.out, args.model, args.audio, not args.no_transformers, args.compile, args.threads,
        accuracy_model=args.accuracy_model)
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from streamer.detect import check_output, save_events, save_scores, score_files, top_labels
    from streamer.events import DetectSettings
    from streamer.inference.engine import InferenceEngine
    from streamer.model import load_model
    from streamer.model.thresholds import hop_mismatch
    from streamer.features.fbank import window_samples
    from streamer.inference.capacity import gap_warning
    from streamer.constants import SAMPLE_RATE_HZ

    inputs = {Path(os.path.realpath(p)) for p in args.audio}  # realpath: a symlink loop is the audio's one-line error later
    if args.scores_out and args.scores_out.exists() and not args.scores_out.is_file() and not args.scores_out.is_dir():
        check_output(args.scores_out)  # /dev/full: refused as given, not turned into /dev/full.npz
    if args.scores_out and args.scores_out.suffix != ".npz":  # numpy's savez adds it: say where the scores go
        args.scores_out = args.scores_out.with_name(args.scores_out.name + ".npz")
    outputs = [out for out in (args.scores_out, args.events_out) if out]
    for out in outputs:  # every fault found now, not after the scoring
        if Path(os.path.realpath(out)) in inputs:
            raise StreamerError(f"{out}: that is one of the audio files being scored (writing there would wipe it); give another file")
        check_output(out)
    if len(outputs) == 2 and os.path.realpath(outputs[0]) == os.path.realpath(outputs[1]):
        raise StreamerError(f"{args.events_out}: --events-out and --scores-out are the same file (the scores would replace the "
                            f"events); give two files")
    if sys.stdout is None and not outputs:  # `>&-`: every window would be scored and shown nowhere
        raise StreamerError("standard output is closed and no --scores-out or --events-out is given: the results would go nowhere")
    settings = load_detect_settings(args.config) if args.config else DetectSettings()  # a broken config fails before the model loads
    engine = InferenceEngine(
        load_model(args.model), device=args.device, precision=args.precision, max_batch=args.batch, threads=args.threads
    )
    labels = engine.labels

    try:  # checked against the model whenever a config is given, not only when its events are wanted
        targets = settings.targets(labels, engine.loaded.thresholds) if args.events_out or args.config else []
    except StreamerError as exc:
        if not args.config:
            raise
        raise StreamerError(f"{args.config}: {exc}") from None
    if not args.events_out:
        targets = []
    for pattern in settings.unmatched(labels) if args.events_out else []:
        log.warning("detect.include %r matches none of the model's labels", pattern)
    if settings.calibrated_targets(targets, engine.loaded.thresholds) and (
            line := hop_mismatch(str(args.model), engine.loaded.thresholds_hop_s, args.hop / 100)):
        log.warning(line)
    if line := gap_warning(window_samples(engine.loaded.features.max_length) / SAMPLE_RATE_HZ, args.hop / 100):
        log.warning(line)

    stopped: list[OSError] = []  # why printing stopped, if it did

    def show(index: int, start_sample: int, row) -> None:
        if stopped or sys.stdout is None:
            return
        top = ", ".join(f"{name} {p:.2f}" for name, p in top_labels(row, labels, args.top_k))
        try:
            print(f"{printable(args.audio[index])}\t{start_sample / SAMPLE_RATE_HZ:8.2f}s\t{top}", flush=True)
        except OSError as exc:  # `| head`, a full disk: stop printing, keep scoring — the output files still get every window
            stopped.append(exc)
            with contextlib.suppress(OSError):  # nothing left to flush into the closed pipe or full disk at exit
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    results = score_files(args.audio, engine, args.hop, targets, on_window=show)
    failed = []
    for out, save in ((args.events_out, lambda p: save_events(p, results)), (args.scores_out, lambda p: save_scores(p, results, labels))):
        if out:
            try:  # one output failing does not cost the other
                save(out)
                log.info("wrote %s", out)
            except StreamerError as exc:
                failed.append(str(exc))
    if stopped and not isinstance(stopped[0], BrokenPipeError):  # a reader that left (`| head`) is not a failure
        failed.insert(0, f"standard output: writing failed ({stopped[0].strerror or stopped[0]}); printing stopped there"
                         + ("; the output files hold every window" if results and (args.events_out or args.scores_out) and
                            len(failed) == 0 else ""))
    if failed:
        raise StreamerError("; ".join(failed))
    return 0


def printable(path: Path) -> str:
    """A file name fit for one tab-separated line: a newline or tab in it shown escaped."""
    text = str(path)
    return text if text.isprintable() else text.encode("unicode_escape", "backslashreplace").decode("ascii")


def load_detect_settings(path: Path):
    """The ``detect`` section of a YAML config file (or a file holding only that section)."""
    from streamer.events import DetectSettings
    from streamer.settings import read_yaml

    raw, _ = read_yaml(path)
    if isinstance(raw, dict) and "detect" in raw:
        raw = raw["detect"]
    return DetectSettings.from_dict(raw, where=f"{path}: detect")


def cmd_labels(args: argparse.Namespace) -> int:
    """Index and name of each label; a model trained by ``streamer train`` adds the on/off
    thresholds chosen from its data. ``streamer labels MODEL_DIR`` works too."""
    from streamer.model import load_model
    from streamer.model.thresholds import ThresholdsError

    model, search = args.model, args.search
    if search and model == DEFAULT_MODEL and (Path(search).is_dir() or "/" in search):  # `streamer labels MODEL_DIR`
        if not Path(search).is_dir():  # a path, not label text: the default model's labels would answer another question
            raise StreamerError(f"{search}: no such model directory (give a model directory, or text to look for in the labels)")
        if not (Path(search) / "config.json").is_file():  # a clips folder, say: not "config.json: no such file"
            raise StreamerError(f"{search}: not a model directory (no config.json in it); give the folder `streamer train --out` wrote")
        model, search = search, ""
    broken = None
    try:
        loaded = load_model(model)
        labels, thresholds, hop_s = loaded.labels, loaded.thresholds, loaded.thresholds_hop_s
    except ThresholdsError as exc:  # the labels still help whoever mends the file: list them, then fail
        labels, thresholds, hop_s, broken = model_labels(model)[0] or (), {}, None, exc
    needle = search.casefold()
    found = [(index, name) for index, name in enumerate(labels) if needle in name.casefold()]
    if not found and not broken:  # an empty list and exit 0 would read as success
        raise StreamerError(f"no label of {model} contains {search!r}")
    for index, name in found:
        chosen = thresholds.get(name)
        shown = "" if chosen is None else f"\ton {chosen.on_threshold:.3f}\toff {chosen.off_threshold:.3f}" + (
            "" if chosen.ema_alpha is None else f"\tema {chosen.ema_alpha:g}") + (
            "" if hop_s is None else f"\tat hop {hop_s:g} s")
        print(f"{index}\t{name}{shown}")
    if broken:
        raise broken
    return 0


COMMANDS = {
    "detect": cmd_detect, "labels": cmd_labels, "bench": cmd_bench, "devices": cmd_devices, "record": cmd_record,
    "run": cmd_run, "check-config": cmd_check_config, "train": cmd_train,
}


def _raise_open_file_limit() -> None:
    """The soft limit on open files up to the hard one: `detect` on 1100 files (each a source,
    open at once) hit 1024 and blamed the audio. What systemd and most shells allow anyway."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, OPEN_FILES_WANTED)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, OPEN_FILES_WANTED), hard))
    except (ImportError, ValueError, OSError):
        pass


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    _raise_open_file_limit()
    if args.command != "run":  # the daemon stops on SIGTERM its own way; a command (`timeout`, `kill`) cleans up as on Ctrl-C
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return COMMANDS[args.command](args)
    except StreamerError as exc:
        lines = str(exc).splitlines() or [""]
        for line in lines:  # a config error lists every problem, one a line
            print(f"streamer: error: {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("streamer: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except Exception as exc:  # a bug: one line for the user, the traceback with --debug
        if args.debug:
            raise
        print(f"streamer: internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)", file=sys.stderr)
        return 1

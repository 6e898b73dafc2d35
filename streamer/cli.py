"""The ``streamer`` command line: parse arguments, run a command, turn errors into one line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from streamer import __version__
from streamer.errors import StreamerError

log = logging.getLogger("streamer")

DEFAULT_MODEL = "MIT/ast-finetuned-audioset-10-10-0.4593"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _hop(text: str) -> int:
    from streamer.detect import hop_to_frames

    try:
        return hop_to_frames(float(text))
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
    detect.add_argument("--device", default="cpu", help="auto, cpu or cuda[:N] (default cpu)")
    detect.add_argument("--batch", type=_positive_int, default=8, help="windows per forward pass (default 8)")
    detect.add_argument("--threads", type=_positive_int, help="CPU threads for inference (default: torch's choice)")

    labels = sub.add_parser("labels", help="list the labels a model can detect")
    labels.add_argument("search", nargs="?", default="", help="show only labels containing this text")
    labels.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    return parser


def cmd_detect(args: argparse.Namespace) -> int:
    import torch

    from streamer.detect import save_scores, score_file, top_labels
    from streamer.frontend import FRAME_SHIFT
    from streamer.inference import Classifier
    from streamer.model import load_model
    from streamer.model.config import SAMPLE_RATE_HZ

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.scores_out and not args.scores_out.parent.is_dir():
        raise StreamerError(f"{args.scores_out}: the directory {args.scores_out.parent} does not exist")
    classifier = Classifier(load_model(args.model), device=args.device, max_batch=args.batch)
    labels = classifier.labels

    results = []
    for path in args.audio:
        def show(windows, probs, path=path):
            for window, row in zip(windows, probs):
                top = ", ".join(f"{name} {p:.2f}" for name, p in top_labels(row, labels, args.top_k))
                print(f"{path}\t{window.start_sample / SAMPLE_RATE_HZ:8.2f}s\t{top}", flush=True)

        results.append(score_file(path, classifier, args.hop, on_batch=show))
    if args.scores_out:
        save_scores(args.scores_out, results, labels)
        log.info("wrote %s", args.scores_out)
    return 0


def cmd_labels(args: argparse.Namespace) -> int:
    from streamer.model import load_model

    needle = args.search.casefold()
    for index, name in enumerate(load_model(args.model).labels):
        if needle in name.casefold():
            print(f"{index}\t{name}")
    return 0


COMMANDS = {"detect": cmd_detect, "labels": cmd_labels}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except StreamerError as exc:
        print(f"streamer: error: {exc}", file=sys.stderr)
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

"""Whether this box can hold a hop, and the smallest hop it can: pure arithmetic on measured speed.

Every ``hop`` seconds each of ``streams`` streams yields one window; scoring one costs
``seconds_per_window`` of compute (measured at start: :meth:`InferenceEngine.seconds_per_window`).
The box keeps up when that work fills at most ``1 - headroom`` of each hop: the headroom
absorbs the frontend, the sinks, other programs and timing noise, so that windows are not
skipped at the first hiccup. Batching ``max_batch`` windows together is what the measured
figure already reflects (ask the engine for the per-window cost at the batch you will run).
"""

from __future__ import annotations

import math

DEFAULT_HEADROOM = 0.3  # keep 30 % of every hop free
AUTO_HOP_MIN_S = 0.5  # never score more often than twice a second
HOP_STEP_S = 0.01  # hops are whole 10 ms feature frames
HOP_MAX_S = 10.0  # as settings.HOP_MAX_S: a window is 10.24 s, a longer hop leaves gaps
CHEAPER_MODEL = "MIT/ast-finetuned-audioset-16-16-0.442"
CHEAPER_MODEL_GFLOP = 97.0  # its ASTConfig.window_gflop(): 512 patches, 12 layers of 768
CHEAPER_WORTH = 1.5  # suggest it only to a model at least this many times its work per window


def _check(seconds_per_window: float, streams: int, headroom: float) -> None:
    if not seconds_per_window > 0 or not math.isfinite(seconds_per_window):
        raise ValueError(f"seconds per window must be a positive number, got {seconds_per_window}")
    if streams < 0:
        raise ValueError(f"streams must be >= 0, got {streams}")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")


def load(seconds_per_window: float, streams: int, hop: float) -> float:
    """Fraction of the compute that ``streams`` streams at ``hop`` need (1.0 = all of it)."""
    return streams * seconds_per_window / hop


def sustainable(seconds_per_window: float, streams: int, hop: float, max_batch: int = 1,
                headroom: float = DEFAULT_HEADROOM) -> bool:
    """True when ``streams`` streams at ``hop`` leave ``headroom`` of every hop free.

    Both the total work per hop and the latency of the largest batch (``min(streams,
    max_batch)`` windows, which must be done before the next hop's windows arrive) fit.
    """
    _check(seconds_per_window, streams, headroom)
    if hop <= 0:
        raise ValueError(f"hop must be positive, got {hop}")
    budget = hop * (1 - headroom) + 1e-9
    batch = min(streams, max(1, max_batch))
    return streams * seconds_per_window <= budget and batch * seconds_per_window <= budget


def auto_hop(seconds_per_window: float, streams: int, max_batch: int = 1, headroom: float = DEFAULT_HEADROOM,
             minimum: float = AUTO_HOP_MIN_S, maximum: float = HOP_MAX_S) -> float:
    """The smallest hop ≥ ``minimum``, a whole number of 10 ms, that is :func:`sustainable`.

    When even ``maximum`` is not sustainable, ``maximum`` (the caller warns: see :func:`hop_warning`).
    """
    _check(seconds_per_window, streams, headroom)
    needed = max(streams, 1) * seconds_per_window / (1 - headroom)
    steps = math.ceil(round(max(needed, minimum) / HOP_STEP_S, 6))
    hop = round(steps * HOP_STEP_S, 2)
    while not sustainable(seconds_per_window, streams, hop, max_batch, headroom) and hop < maximum:
        hop = round(hop + HOP_STEP_S, 2)  # float rounding at the boundary: one more frame
    return min(hop, maximum)


def hop_warning(seconds_per_window: float, streams: int, hop: float, max_batch: int = 1,
                headroom: float = DEFAULT_HEADROOM, path: str = "", model_gflop: float | None = None,
                auto_precision: bool = False) -> str | None:
    """The one warning line for a hop this box cannot hold (with the numbers and the fix), else None.

    The fixes offered are the ones that would change something: the cheaper AudioSet model
    only to a model that does clearly more work per window than it (``model_gflop``, from
    ``ASTConfig.window_gflop``; unknown: offered), ``precision: auto`` only where it is
    not already what chose ``path``.
    """
    if sustainable(seconds_per_window, streams, hop, max_batch, headroom):
        return None
    need = auto_hop(seconds_per_window, streams, max_batch, headroom)
    how = f" ({path})" if path else ""
    fixes = [f"set hop: {need:g} or hop: auto" if sustainable(seconds_per_window, streams, need, max_batch, headroom)
             else f"even hop {need:g} s is too short: use fewer streams"]
    if model_gflop is None or model_gflop >= CHEAPER_WORTH * CHEAPER_MODEL_GFLOP:
        less = f"~{model_gflop / CHEAPER_MODEL_GFLOP:.1f}×" if model_gflop else "~3×"
        fixes.append(f"use a cheaper model ({CHEAPER_MODEL}, {less} less work)")
    if not auto_precision:
        fixes.append("precision: auto")
    fix = fixes[0] + (f", or {' or '.join(fixes[1:])}" if len(fixes) > 1 else "")
    return (
        f"hop {hop:g} s is more than this machine can hold: {streams} stream(s) × {_duration(seconds_per_window)} per window"
        f"{how} = {load(seconds_per_window, streams, hop):.0%} of the compute (limit {1 - headroom:.0%}), so windows"
        f" will be skipped; {fix}"
    )


def _duration(seconds: float) -> str:
    """A compute time as people read it: 1.95 s, 3.2 ms."""
    return f"{seconds:.2f} s" if seconds >= 0.1 else f"{seconds * 1000:.2g} ms"


def gap_warning(window_s: float, hop_s: float) -> str | None:
    """One line when the hop is longer than the model's window: the audio between two windows
    is never scored, so a short sound that falls there is missed whatever the thresholds (a
    model trained with 1.28 s windows run at the AudioSet model's hop of 5 s hears a quarter)."""
    if hop_s <= window_s + 1e-9:
        return None
    unheard = 1.0 - window_s / hop_s
    return (f"hop {hop_s:g} s is longer than the model's {window_s:g} s window: {unheard:.0%} of the audio is never scored, and a "
            f"short sound there is missed; fix: a hop of at most {math.floor(window_s * 100) / 100:g} s")

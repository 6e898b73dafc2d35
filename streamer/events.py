"""From window scores to discrete events: smoothing, hysteresis, minimum duration, hold.

Per stream and per *target* — one label, or a named group of labels scored as their max
or noisy-or — the smoother keeps the raw score and a causally smoothed one (EMA or a
running median of the last N windows), and turns the smoothed score into ON/OFF events:
ON once it has stayed at or above ``on_threshold`` for ``min_on`` seconds, OFF once it has
stayed below ``off_threshold`` for ``hold`` seconds, and no new ON within ``cooldown``
seconds of an OFF.

All timing is on the audio's own timeline (sample positions), never the wall clock, so a
file processed as fast as possible gives exactly the events the same audio gives live.
A window's score is placed at its end (the newest audio it holds): an event starts where
the first window above threshold began to differ from the one before (its last hop), and
ends where the first window below threshold starts (the sound has left it).

The state is arrays over targets, updated with numpy, so thousands of targets per window
cost little; only the rare ON/OFF transitions are Python objects.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from streamer.constants import SAMPLE_RATE_HZ
from streamer.errors import StreamerError, text_number_hint

log = logging.getLogger(__name__)

COMBINE = ("max", "noisy_or")
SMOOTHING = ("none", "ema", "median")
THRESHOLD_KEYS = {"on_threshold", "off_threshold"}
# where a config sets on_threshold alone and the off-threshold it would inherit (the defaults',
# or the model's calibrated one) is above it, off = this × on: the shipped defaults' ratio (0.35 / 0.5)
OFF_RATIO = 0.7
SMOOTHING_KEYS = {"smoothing", "ema_alpha", "median_windows"}  # a target's config that sets any of these keeps its smoothing
MIN_LEVEL_RANGE_DBFS = (-120.0, 0.0)  # detect.min_level_dbfs: what a float sample can express


@dataclass(frozen=True)
class TargetSettings:
    """The knobs of one target; the defaults apply where a target overrides nothing."""

    on_threshold: float = 0.5
    off_threshold: float = 0.35
    min_on: float = 0.0  # seconds of audio the smoothed score must stay ≥ on_threshold
    hold: float = 2.0  # seconds it must stay < off_threshold before OFF
    cooldown: float = 0.0  # seconds after an OFF before the same target may fire again
    smoothing: str = "ema"
    ema_alpha: float = 0.5  # weight of the newest window in the EMA
    median_windows: int = 3
    combine: str = "max"  # how a group's labels make one score

    def check(self, where: str) -> None:
        self.check_values(where)
        if self.off_threshold > self.on_threshold:
            raise StreamerError(f"{where}: off_threshold {self.off_threshold} is above on_threshold {self.on_threshold}")

    def check_values(self, where: str) -> None:
        """Each value on its own (type, range); :meth:`check` adds the order of the two thresholds."""
        for key, spec in self.__dataclass_fields__.items():
            value, default = getattr(self, key), spec.default
            if isinstance(default, str):
                if not isinstance(value, str):
                    raise StreamerError(f"{where}: {key} must be text, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise StreamerError(f"{where}: {key} must be a finite number, got {value!r}{text_number_hint(value)}")
            elif isinstance(default, int) and not isinstance(value, int):
                raise StreamerError(f"{where}: {key} must be a whole number, got {value!r}")
        for key in ("on_threshold", "off_threshold"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise StreamerError(f"{where}: {key}={value} is outside 0..1")
        for key in ("min_on", "hold", "cooldown"):
            if getattr(self, key) < 0:
                raise StreamerError(f"{where}: {key} must not be negative")
        if self.smoothing not in SMOOTHING:
            raise StreamerError(f"{where}: smoothing must be one of {', '.join(SMOOTHING)}")
        if not 0.0 < self.ema_alpha <= 1.0:
            raise StreamerError(f"{where}: ema_alpha must be in (0, 1]")
        if self.median_windows < 1:
            raise StreamerError(f"{where}: median_windows must be at least 1")
        if self.combine not in COMBINE:
            raise StreamerError(f"{where}: combine must be one of {', '.join(COMBINE)}")


@dataclass(frozen=True)
class Target:
    name: str
    labels: tuple[str, ...]
    settings: TargetSettings


@dataclass(frozen=True)
class DetectSettings:
    """The ``detect`` section: defaults, groups, which labels are targets, per-target overrides."""

    defaults: TargetSettings = field(default_factory=TargetSettings)
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    include: tuple[str, ...] = ("*",)  # label patterns (fnmatch, case-insensitive) that are targets
    exclude: tuple[str, ...] = ()
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    # silence gate (streamer.features.gate): a window whose loudest 100 ms block is below this
    # level (dBFS) is not scored and counts as silence; None = every window is scored
    min_level_dbfs: float | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, where: str = "detect") -> "DetectSettings":
        """Build from the ``detect`` section of the config (already parsed YAML)."""
        raw = raw or {}
        if not isinstance(raw, dict):
            raise StreamerError(f"{where}: expected a mapping")
        _known(raw, {"defaults", "groups", "include", "exclude", "targets", "min_level_dbfs"}, where)
        min_level = raw.get("min_level_dbfs")
        if min_level is not None and (isinstance(min_level, bool) or not isinstance(min_level, (int, float))
                                      or not MIN_LEVEL_RANGE_DBFS[0] <= min_level <= MIN_LEVEL_RANGE_DBFS[1]):
            raise StreamerError(f"{where}.min_level_dbfs: expected a level in dBFS from {MIN_LEVEL_RANGE_DBFS[0]:g}"
                                f" to {MIN_LEVEL_RANGE_DBFS[1]:g} (e.g. -50), or nothing to score every window;"
                                f" got {min_level!r}")
        knobs = set(TargetSettings.__dataclass_fields__)
        defaults_raw = raw.get("defaults") or {}
        if not isinstance(defaults_raw, dict):
            raise StreamerError(f"{where}.defaults: expected a mapping")
        _known(defaults_raw, knobs, f"{where}.defaults")
        defaults = _off_below_on(replace(TargetSettings(), **defaults_raw), defaults_raw)
        defaults.check(f"{where}.defaults")
        groups: dict[str, tuple[str, ...]] = {}
        overrides: dict[str, dict[str, Any]] = {}
        for key in ("groups", "targets"):
            if not isinstance(raw.get(key) or {}, dict):
                raise StreamerError(f"{where}.{key}: expected a mapping of names to settings")
        for name, spec in (raw.get("groups") or {}).items():
            if isinstance(spec, dict):
                _known(spec, {"labels", "combine"}, f"{where}.groups.{name}")
                members, combine = spec.get("labels"), spec.get("combine")
                if combine is not None:
                    overrides.setdefault(str(name), {})["combine"] = combine
            else:
                members = spec
            if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
                raise StreamerError(f"{where}.groups.{name}: expected a non-empty list of label names")
            groups[str(name)] = tuple(members)
        for name, spec in (raw.get("targets") or {}).items():
            if not isinstance(spec, dict):
                raise StreamerError(f"{where}.targets.{name}: expected a mapping of settings")
            _known(spec, knobs, f"{where}.targets.{name}")
            overrides.setdefault(str(name), {}).update(spec)
        patterns = {}
        for key, default in (("include", ("*",)), ("exclude", ())):
            value = raw.get(key, list(default))
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise StreamerError(f"{where}.{key}: expected a list of label patterns")
            patterns[key] = tuple(value)
        return cls(defaults=defaults, groups=groups, overrides=overrides, **patterns,
                   min_level_dbfs=None if min_level is None else float(min_level))

    def targets(self, labels: tuple[str, ...], calibrated: dict[str, tuple] | None = None) -> list[Target]:
        """Groups first, then every label matched by include and not by exclude.

        ``calibrated``: per-label ``(on, off[, ema_alpha])`` chosen from data by ``streamer
        train`` (the model's thresholds.json, :class:`streamer.model.thresholds.Calibration`).
        They replace ``defaults``' thresholds (and smoothing: an EMA of that weight) for that
        label's target. The config wins key by key: a ``targets.NAME`` section that sets
        ``off_threshold`` alone keeps the calibrated on-threshold (and one that sets
        ``on_threshold`` alone gets ``OFF_RATIO`` of it as off where the calibrated off would
        be above it); one that sets its smoothing keeps that.
        """
        calibrated = calibrated or {}
        known = set(labels)
        out: list[Target] = []
        for name, members in self.groups.items():
            unknown = [m for m in members if m not in known]
            if unknown:
                raise StreamerError(f"detect.groups.{name}: the model has no label {unknown[0]!r} (see `streamer labels`)")
            out.append(Target(name, tuple(members), self._settings(name, calibrated)))
        group_names = set(self.groups)
        for label in labels:
            if label in group_names:
                continue
            if _matches(label, self.include) and not _matches(label, self.exclude):
                out.append(Target(label, (label,), self._settings(label, calibrated)))
        for name in self.overrides:
            if name not in {t.name for t in out}:
                if name in known:
                    raise StreamerError(f"detect.targets.{name}: a label of the model, but not a target: detect.include does not "
                                        f"take it{' (or detect.exclude leaves it out)' if self.exclude else ''}; add it there, "
                                        f"or remove this section")
                raise StreamerError(f"detect.targets.{name}: no such target: neither a group nor a label of the model (see `streamer labels`)")
        if not out:  # a daemon that can never raise an event would look like a quiet room
            shown = ", ".join(repr(p) for p in self.include[:4]) + (" …" if len(self.include) > 4 else "")
            raise StreamerError(f"detect: no targets: detect.include [{shown}] matches none of the model's {len(labels)} labels"
                                + (" (or detect.exclude removes them)" if self.exclude else "")
                                + "; fix: name some of its labels under detect.include (`streamer labels MODEL` lists them)")
        return out

    def unmatched(self, labels: tuple[str, ...]) -> list[str]:
        """detect.include patterns that match none of ``labels`` — a typo, or a label of another
        model (the shipped config's AudioSet names with a model of one's own): worth a warning."""
        return [p for p in self.include if not _matches_any(p, labels)]

    def calibrated_targets(self, targets: list[Target], calibrated: dict[str, tuple] | None) -> list[str]:
        """Of ``targets`` (as :meth:`targets` built them), those whose thresholds come from
        ``calibrated`` (the config sets none for them): the ones a calibration chosen at
        another hop would mislead."""
        calibrated = calibrated or {}
        return [t.name for t in targets
                if t.name in calibrated and t.name not in self.groups and "on_threshold" not in self.overrides.get(t.name, {})]

    def _settings(self, name: str, calibrated: dict[str, tuple]) -> TargetSettings:
        override = self.overrides.get(name, {})
        base = self.defaults
        from_model = name in calibrated and name not in self.groups
        if from_model:
            on, off, *rest = calibrated[name]  # a Calibration, or a plain (on, off) pair
            alpha = rest[0] if rest else None
            base = replace(base, on_threshold=on, off_threshold=off)  # the config's own keys replace these below
            if alpha is not None and not SMOOTHING_KEYS & set(override):
                base = replace(base, smoothing="ema", ema_alpha=alpha)
        settings = _off_below_on(replace(base, **override), override)
        where = f"detect.targets.{name}" if name in self.overrides else "detect.defaults"
        settings.check_values(where)  # a value wrong in itself (1.5, "high"): the model's thresholds are not why
        try:
            settings.check(where)
        except StreamerError as exc:
            if from_model and THRESHOLD_KEYS & set(override) != THRESHOLD_KEYS:  # one of the pair came from the model
                raise StreamerError(f"{exc} (the model's thresholds.json gives {name} on {calibrated[name][0]:g} / "
                                    f"off {calibrated[name][1]:g}); fix: set both thresholds of that target, or one that fits") from None
            raise
        return settings


def _off_below_on(settings: TargetSettings, raw: dict) -> TargetSettings:
    """``settings`` with off at ``OFF_RATIO`` of on where ``raw`` (the config's keys) sets
    on_threshold alone and the inherited off-threshold would be above it: ``on_threshold: 0.3``
    means a target that fires at 0.3, not an error about the default off of 0.35."""
    on = settings.on_threshold
    if ("on_threshold" in raw and "off_threshold" not in raw and isinstance(on, (int, float)) and not isinstance(on, bool)
            and math.isfinite(on) and 0.0 <= on < settings.off_threshold):
        return replace(settings, off_threshold=round(on * OFF_RATIO, 4))
    return settings


def _known(raw: dict, allowed: set[str], where: str) -> None:
    import difflib

    for key in raw:
        if key not in allowed:
            near = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise StreamerError(f"{where}: unknown key {key!r}{hint}")


def _matches_any(pattern: str, labels: tuple[str, ...]) -> bool:
    return any(_matches(label, (pattern,)) for label in labels)


def _matches(label: str, patterns: tuple[str, ...]) -> bool:
    """Case-insensitive: the label's own name (``a[1]`` is a label, not a character class), or a pattern."""
    folded = label.casefold()
    return any(folded == p.casefold() or fnmatch.fnmatchcase(folded, p.casefold()) for p in patterns)


def slug(name: str) -> str:
    """A topic- and id-safe form of a target or stream name (injective: see streamer.names)."""
    from streamer.names import ident

    return ident(name)


@dataclass(frozen=True)
class Event:
    """An ON or OFF transition of one target on one stream."""

    id: str
    stream: str
    target: str
    state: str  # "ON" or "OFF"
    labels: tuple[str, ...]  # the labels that drove it, strongest first
    start_sample: int
    end_sample: int | None  # None while the event is open
    start_time: float | None  # wall clock, when the stream has one
    end_time: float | None
    peak: float
    mean: float
    closed_by: str | None = None  # OFF only: "audio", "shutdown", "stream-end" or "reload"
    clip: str | None = None  # OFF only, with clips on: where its audio was saved
    # which run of the daemon raised it: ``id`` counts samples from each start, so after a
    # restart a consumer deduplicates by (run, id, state) — a redelivery keeps both
    run: int | None = None

    @property
    def start_s(self) -> float:
        return self.start_sample / SAMPLE_RATE_HZ

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "stream": self.stream, "target": self.target, "state": self.state,
            "labels": list(self.labels), "start_sample": self.start_sample, "end_sample": self.end_sample,
            "start_s": round(self.start_sample / SAMPLE_RATE_HZ, 3),
            "end_s": None if self.end_sample is None else round(self.end_sample / SAMPLE_RATE_HZ, 3),
            "start_time": self.start_time, "end_time": self.end_time,
            "peak": round(self.peak, 4), "mean": round(self.mean, 4), "closed_by": self.closed_by, "clip": self.clip,
            "run": self.run,
        }


class SmootherBank:
    """Every stream's targets as (streams × targets) arrays: one numpy pass per batch.

    ``update`` takes one window of each of some streams (a *round*: no stream twice; see
    :func:`rounds`) and returns the ON/OFF transitions they cause, in window order. A
    window's update is the same arithmetic a single stream would do — the rows are just
    updated together — so a batch of 128 streams costs about what one stream did.
    """

    def __init__(self, streams: Sequence[str], labels: tuple[str, ...], targets: list[Target],
                 window_samples: int) -> None:
        self.streams = tuple(streams)
        self.labels = labels
        self.targets = targets
        self.window_samples = window_samples
        self._label_index = {label: i for i, label in enumerate(labels)}
        width = max((len(t.labels) for t in targets), default=1)
        self._members = np.full((len(targets), width), len(labels), dtype=np.int64)  # padding → a zero column
        for row, target in enumerate(targets):
            self._members[row, : len(target.labels)] = [self._label_index[label] for label in target.labels]
        s = [t.settings for t in targets]
        self._noisy_or = np.array([x.combine == "noisy_or" for x in s], dtype=bool)
        self._on = np.array([x.on_threshold for x in s])
        self._off = np.array([x.off_threshold for x in s])
        self._min_on = np.array([x.min_on * SAMPLE_RATE_HZ for x in s])
        self._hold = np.array([x.hold * SAMPLE_RATE_HZ for x in s])
        self._cooldown = np.array([x.cooldown * SAMPLE_RATE_HZ for x in s])
        self._alpha = np.array([x.ema_alpha if x.smoothing == "ema" else 1.0 for x in s])
        self._median = np.array([x.median_windows if x.smoothing == "median" else 1 for x in s], dtype=np.int64)
        self._median_sizes = [int(k) for k in np.unique(self._median[self._median > 1])]
        self._depth = int(self._median.max(initial=1))
        self._uses_median = bool(self._median_sizes)
        self.reset()

    def reset(self) -> None:
        """Forget every stream's state."""
        shape = (len(self.streams), len(self.targets))
        self.raw = np.zeros(shape)
        self.smoothed = np.zeros(shape)
        self.windows = np.zeros(len(self.streams), dtype=np.int64)
        self._history = np.zeros((len(self.streams), self._depth, len(self.targets)))
        self.active = np.zeros(shape, dtype=bool)
        self._above_since = np.full(shape, -1, dtype=np.int64)  # start of the current run ≥ on (event start)
        self._below_since = np.full(shape, -1, dtype=np.int64)  # start of the current run < off (event end)
        self._below_at = np.full(shape, -1, dtype=np.int64)  # score position where that run began
        self._above_at = np.full(shape, -1, dtype=np.int64)
        self._ready_at = np.zeros(shape, dtype=np.int64)  # cooldown: no ON before this position
        self._peak = np.zeros(shape)
        self._sum = np.zeros(shape)
        self._count = np.zeros(shape, dtype=np.int64)
        self._start = np.zeros(shape, dtype=np.int64)
        self._last_end = np.zeros(len(self.streams), dtype=np.int64)
        self._last_wall = np.full(len(self.streams), np.nan)
        self._anchor = np.full(len(self.streams), np.nan)  # wall clock of sample 0: see _wall
        self._start_wall: dict[tuple[int, int], float | None] = {}
        self._drivers: dict[tuple[int, int], tuple[str, ...]] = {}

    def target_scores(self, probs: np.ndarray) -> np.ndarray:
        """(windows × labels) probabilities → (windows × targets) scores (max or noisy-or)."""
        probs = np.atleast_2d(probs).astype(np.float64, copy=False)
        padded = np.concatenate([probs, np.zeros((probs.shape[0], 1))], axis=1)[:, self._members]
        maxed = padded.max(axis=2)
        if self._noisy_or.any():
            noisy = 1.0 - np.prod(1.0 - padded, axis=2)
            return np.where(self._noisy_or, noisy, maxed)
        return maxed

    def update(self, rows: np.ndarray, start_samples: np.ndarray, probs: np.ndarray,
               wall_times: np.ndarray | None = None) -> list[tuple[int, Event]]:
        """Feed one window each of ``rows`` (distinct streams): their first samples, their
        probabilities (windows × labels), their wall clocks (NaN: none). Returns
        ``(position in rows, event)`` for the transitions, in window order, OFFs first."""
        rows = np.asarray(rows, dtype=np.int64)
        start = np.asarray(start_samples, dtype=np.int64)
        walls = np.full(len(rows), np.nan) if wall_times is None else np.asarray(wall_times, dtype=np.float64)
        raw = self.target_scores(probs)
        windows = self.windows[rows]
        first = (windows == 0)[:, None]
        smoothed = np.where(first, raw, self._alpha * raw + (1.0 - self._alpha) * self.smoothed[rows])
        if self._uses_median:  # only median smoothing needs the recent windows
            history = np.roll(self._history[rows], 1, axis=1)
            history[:, 0] = raw
            self._history[rows] = history
            for k in self._median_sizes:  # before N windows exist, the missing ones count as silence
                cols = self._median == k
                smoothed[:, cols] = np.median(history[:, :k][:, :, cols], axis=1)
        self.raw[rows] = raw
        self.smoothed[rows] = smoothed
        self.windows[rows] = windows + 1

        end = start + self.window_samples  # the score's place: the window's end
        # the audio this window adds to the one before: where a sound it newly hears began
        new_audio = np.where(windows == 0, start, np.maximum(start, self._last_end[rows]))
        self._last_end[rows] = end
        self._last_wall[rows] = walls
        act = self.active[rows]
        timed = ~np.isnan(walls)
        if timed.any():  # the anchor moves forward only, or back while no event is open
            seen = walls - (end - 1) / SAMPLE_RATE_HZ
            anchor = self._anchor[rows]
            move = timed & (np.isnan(anchor) | (seen > anchor) | ~act.any(axis=1))
            self._anchor[rows[move]] = seen[move]

        above = smoothed >= self._on
        below = smoothed < self._off
        end_col, start_col, new_col = end[:, None], start[:, None], new_audio[:, None]
        # inactive targets: track the current run at or above on_threshold
        above_since, above_at = self._above_since[rows], self._above_at[rows]
        run = ~act & above
        starting = run & (above_since < 0)
        above_since = np.where(starting, new_col, above_since)
        above_at = np.where(starting, end_col, above_at)
        above_since[~run & ~act] = -1
        fire = run & (end_col - above_at >= self._min_on) & (end_col >= self._ready_at[rows])
        # active targets: accumulate, track the run below off_threshold
        if act.any():
            self._peak[rows] = np.where(act, np.maximum(self._peak[rows], smoothed), self._peak[rows])
            self._sum[rows] += np.where(act, smoothed, 0.0)
            self._count[rows] += act
        below_since, below_at = self._below_since[rows], self._below_at[rows]
        quiet = act & below
        beginning = quiet & (below_since < 0)
        below_since = np.where(beginning, start_col, below_since)
        below_at = np.where(beginning, end_col, below_at)
        below_since[act & ~below] = -1
        stop = quiet & (end_col - below_at >= self._hold)
        self._above_since[rows], self._above_at[rows] = above_since, above_at
        self._below_since[rows], self._below_at[rows] = below_since, below_at
        if not (stop.any() or fire.any()):
            return []
        events: list[tuple[int, Event]] = []
        for b, kind, i in sorted([(int(b), 0, int(i)) for b, i in np.argwhere(stop)]
                                 + [(int(b), 1, int(i)) for b, i in np.argwhere(fire)]):
            row, wall = int(rows[b]), (None if np.isnan(walls[b]) else float(walls[b]))
            if kind == 0:
                events.append((b, self._close(row, i, int(self._below_since[row, i]), wall, "audio")))
                self._ready_at[row, i] = end[b] + self._cooldown[i]
            else:
                events.append((b, self._open(row, i, int(self._above_since[row, i]), probs[b],
                                             float(smoothed[b, i]), wall)))
        return events

    def _wall(self, row: int, sample: int, wall_time: float | None) -> float | None:
        """Wall clock of a stream sample: the audio timeline, anchored to the wall clock.

        The anchor (wall time of sample 0) never moves back while an event is open, so a
        clock stepped back or a process stopped and resumed (SIGSTOP) cannot make an
        event end before it started; it follows forward jumps (audio lost in a stall)."""
        anchor = self._anchor[row]
        if wall_time is None or np.isnan(anchor):
            return None
        return float(anchor) + sample / SAMPLE_RATE_HZ

    def _open(self, row: int, i: int, start: int, probs: np.ndarray, score: float, wall_time: float | None) -> Event:
        target = self.targets[i]
        self.active[row, i] = True
        self._above_since[row, i] = -1
        self._below_since[row, i] = -1
        self._peak[row, i] = score
        self._sum[row, i] = score
        self._count[row, i] = 1
        self._start[row, i] = start
        start_wall = self._wall(row, start, wall_time)
        self._start_wall[row, i] = start_wall
        p = {label: float(probs[self._label_index[label]]) for label in target.labels}
        ranked = sorted(target.labels, key=lambda label: -p[label])
        strong = tuple(label for label in ranked if p[label] >= target.settings.off_threshold)
        drivers = strong or tuple(ranked[:1])
        self._drivers[row, i] = drivers
        stream = self.streams[row]
        return Event(
            id=f"{stream}:{slug(target.name)}:{start}", stream=stream, target=target.name, state="ON",
            labels=drivers, start_sample=start, end_sample=None, start_time=start_wall,
            end_time=None, peak=float(score), mean=float(score),
        )

    def _close(self, row: int, i: int, end_sample: int, wall_time: float | None, reason: str) -> Event:
        target = self.targets[i]
        self.active[row, i] = False
        self._below_since[row, i] = -1
        start = int(self._start[row, i])
        stream = self.streams[row]
        return Event(
            id=f"{stream}:{slug(target.name)}:{start}", stream=stream, target=target.name, state="OFF",
            labels=self._drivers.pop((row, i), ()), start_sample=start, end_sample=max(end_sample, start),
            start_time=self._start_wall.pop((row, i), None),
            end_time=self._wall(row, max(end_sample, start), wall_time),
            peak=float(self._peak[row, i]), mean=float(self._sum[row, i] / max(self._count[row, i], 1)),
            closed_by=reason,
        )

    def close_all(self, row: int, reason: str) -> list[Event]:
        """Close every open event of one stream (it ended, the daemon stops), at its newest audio."""
        end = int(self._last_end[row])
        wall = None if np.isnan(self._last_wall[row]) else float(self._last_wall[row])
        return [self._close(row, int(i), end, wall, reason) for i in np.flatnonzero(self.active[row])]

    def active_targets(self, row: int) -> list[str]:
        return [self.targets[i].name for i in np.flatnonzero(self.active[row])]


def rounds(streams: Sequence[int]) -> list[list[int]]:
    """Split a batch's windows (their stream indices, in order) into rounds for
    :meth:`SmootherBank.update`: round k holds each stream's k-th window, so a stream's
    windows are applied in order and a live batch (one window a stream) is one round."""
    out: list[list[int]] = []
    seen: dict[int, int] = {}
    for position, stream in enumerate(streams):
        k = seen.get(stream, 0)
        seen[stream] = k + 1
        if k == len(out):
            out.append([])
        out[k].append(position)
    return out


class EventSmoother:
    """One stream's targets: ``update`` with each window's probabilities, get ON/OFF events.

    A view of a one-stream :class:`SmootherBank` (the same arithmetic the pipeline uses
    for all its streams at once), for scoring one recording: scenes, training's validation.
    """

    def __init__(self, stream: str, labels: tuple[str, ...], targets: list[Target], window_samples: int) -> None:
        self.stream = stream
        self.labels = labels
        self.targets = targets
        self.window_samples = window_samples
        self._bank = SmootherBank((stream,), labels, targets, window_samples)
        self._row = np.zeros(1, dtype=np.int64)

    def reset(self) -> None:
        self._bank.reset()

    @property
    def raw(self) -> np.ndarray:
        return self._bank.raw[0]

    @property
    def smoothed(self) -> np.ndarray:
        return self._bank.smoothed[0]

    @property
    def active(self) -> np.ndarray:
        return self._bank.active[0]

    @property
    def windows(self) -> int:
        return int(self._bank.windows[0])

    def target_scores(self, probs: np.ndarray) -> np.ndarray:
        return self._bank.target_scores(probs)[0]

    def update(self, start_sample: int, probs: np.ndarray, wall_time: float | None = None) -> list[Event]:
        """Feed one window (its first sample, its probabilities); return the transitions it causes."""
        walls = None if wall_time is None else np.array([wall_time], dtype=np.float64)
        return [e for _, e in self._bank.update(self._row, np.array([start_sample]), np.atleast_2d(probs), walls)]

    def close_all(self, reason: str) -> list[Event]:
        """Close every open event (stream ended, daemon stopping), at the newest audio."""
        return self._bank.close_all(0, reason)

    def active_targets(self) -> list[str]:
        return self._bank.active_targets(0)

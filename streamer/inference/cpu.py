"""CPU inference paths, and ``precision: auto``: the fastest accurate one for the CPU we run on.

Which path is fastest depends on the CPU, not on the model: bf16 is ~4× faster than fp32
where the CPU has bf16 units (AMX, AVX-512-bf16) and ~10× slower where it has not (AVX2
only, where torch emulates it), and ONNX Runtime's int8 kernels beat torch's dynamic int8
on AVX2. So the daemon decides at start, on the box it runs on:

1. the candidates follow from the CPU's features (:func:`cpu_features`): torch fp32 (the
   reference), torch bf16 only with bf16 units, ONNX Runtime fp32 and int8 when
   ``onnxruntime`` is installed, else torch's dynamic int8;
2. every candidate scores the same few windows of built-in deterministic audio
   (:func:`check_windows`: tones, a chirp, noise bursts, clicks, speech-like harmonics and
   near-silence, at several levels) and is timed on them, interleaved so that other load on
   the machine hits every path alike;
3. the fastest whose largest probability difference from fp32 is at most
   :data:`ACCURACY_BOUND` wins; one log line says which, how fast, how accurate, and on
   what CPU.

A model whose window costs under :data:`SMALL_MODEL_GFLOP` keeps fp32 without trying the
others (nothing to gain; decided from the config, not a timing, so a busy box does not
make a tiny model export). The choice is cached next to the ONNX export (see :func:`cache_dir`) keyed by the CPU
model, its flags, the thread count, the checkpoint's hash and the runtime versions, so the
next start is instant. The ONNX files are exported from our own model once per checkpoint
(opset :data:`ONNX_OPSET`) and quantised with ``onnxruntime.quantization.quantize_dynamic``
(the GEMMs of :func:`int8_nodes` only: what keeps the full-size models within the bound).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from streamer.errors import StreamerError
from streamer.model.checkpoint import LoadedModel

log = logging.getLogger(__name__)

ACCURACY_BOUND = 0.02  # largest |Δp| against fp32 that auto accepts
CHECK_WINDOWS = 3  # windows of built-in audio each candidate scores at start (first one warms up)
CHECK_SEED = 12  # the built-in audio is deterministic
SMALL_MODEL_GFLOP = 1.0  # a window this cheap (~10–50 ms in fp32 on any CPU): nothing is worth exporting
ONNX_OPSET = 17
SAMPLE_RATE = 16000
CACHE_SUBDIR = ".streamer-cache"  # inside the checkpoint directory, when it is writable
USER_CACHE_ENV = "STREAMER_CACHE_DIR"
HASH_CHUNK_BYTES = 1 << 24
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPU_PATHS = ("fp32", "bf16", "int8", "onnx-fp32", "onnx-int8", "onnx-int8-all")
ONNX_PATHS = ("onnx-fp32", "onnx-int8", "onnx-int8-all")
# which MatMuls each int8 path quantises (see int8_nodes); part of the file's and the choice's key.
# `auto` tries both and keeps the faster within the bound: every GEMM (the 10-10 model: 0.015)
# or the mixed recipe where that is too coarse (the 16-16 model: 0.025 → 0.015)
INT8_RECIPES = {"onnx-int8": "qkv-fc1-late-fc2", "onnx-int8-all": "all"}
INT8_RECIPE = INT8_RECIPES["onnx-int8"]


@dataclass(frozen=True)
class CpuFeatures:
    """What this CPU offers the inference paths."""

    model: str
    flags: frozenset[str]
    capability: str  # torch's dispatch level: DEFAULT, AVX2, AVX512, ...
    cores: int

    @property
    def bf16_units(self) -> bool:
        return any(f in self.flags for f in BF16_FLAGS)

    def describe(self) -> str:
        """``AMD EPYC avx2, no bf16 units`` / ``Intel Xeon avx512 amx_bf16``."""
        vector = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8") if f in self.flags]
        units = " ".join(f for f in BF16_FLAGS if f in self.flags) or "no bf16 units"
        return f"{self.model} {' '.join(vector) or 'no avx2'}, {units}"

    def key(self) -> str:
        return hashlib.sha256(f"{self.model}|{sorted(self.flags)}".encode()).hexdigest()[:16]


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuFeatures:
    """The CPU's model name and flags (from /proc/cpuinfo where there is one)."""
    model, flags = "unknown CPU", frozenset()
    try:
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key == "flags" and not flags:
                flags = frozenset(value.split())
    except OSError:
        pass
    return CpuFeatures(model, flags, torch.backends.cpu.get_cpu_capability(), os.cpu_count() or 1)


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def candidates(features: CpuFeatures, onnx: bool | None = None) -> list[str]:
    """The paths worth timing on this CPU, fp32 (the reference) first."""
    onnx = onnxruntime_available() if onnx is None else onnx
    paths = ["fp32"]
    if features.bf16_units:
        paths.append("bf16")
    paths += list(ONNX_PATHS) if onnx else ["int8"]
    return paths


# ---------------------------------------------------------------- checkpoint hash, cache dir


def model_hash(loaded: LoadedModel) -> str:
    """SHA-256 over the model's parameters and config: the same weights give the same key."""
    h = hashlib.sha256(repr(loaded.config).encode())
    for name, tensor in loaded.model.state_dict().items():
        h.update(name.encode())
        if tensor.numel():
            h.update(memoryview(tensor.detach().cpu().contiguous().view(torch.uint8).numpy()))
    return h.hexdigest()[:20]


def user_cache_root() -> Path:
    if os.environ.get(USER_CACHE_ENV):
        return Path(os.environ[USER_CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "streamer"


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe"):
            return True
    except OSError:
        return False


def cache_dir(loaded: LoadedModel, digest: str) -> Path:
    """``<checkpoint>/.streamer-cache/<hash>/``, or the user cache dir when that is not writable.

    The checkpoint's hash is part of the path, so a retrained model never reuses an old export.
    """
    source = Path(loaded.source)
    if source.is_dir():
        near = source / CACHE_SUBDIR / digest
        if _writable(near):
            return near
    far = user_cache_root() / digest
    if not _writable(far):
        raise StreamerError(f"no writable cache directory for the ONNX export (tried {source / CACHE_SUBDIR} and {far})")
    return far


def _versions() -> str:
    import onnxruntime

    return f"opset{ONNX_OPSET}-ort{onnxruntime.__version__}-torch{torch.__version__.split('+')[0]}"


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_onnx(loaded: LoadedModel, directory: Path, int8: bool | str = False) -> Path:
    """Our model as ONNX (logits out), exported once into ``directory``; int8 is quantised from it
    (``int8``: a path of :data:`INT8_RECIPES`, or True for ``onnx-int8``)."""
    fp32 = directory / f"model-{_versions()}.onnx"
    if not fp32.is_file():
        t0 = time.perf_counter()
        example = torch.zeros((1, loaded.features.max_length, loaded.features.num_mel_bins))
        model = loaded.model

        def write(tmp: Path) -> None:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model, (example,), str(tmp), input_names=["features"], output_names=["logits"],
                    dynamic_axes={"features": {0: "batch"}, "logits": {0: "batch"}},
                    opset_version=ONNX_OPSET, dynamo=False,
                )

        _atomic_write(fp32, write)
        log.info("exported the model to ONNX in %.1f s: %s", time.perf_counter() - t0, fp32)
    if not int8:
        return fp32
    recipe = INT8_RECIPES["onnx-int8" if int8 is True else int8]
    quantised = fp32.with_name(f"{fp32.stem}-int8-{recipe}.onnx")
    if not quantised.is_file():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        t0 = time.perf_counter()
        nodes = int8_nodes(fp32) if recipe != "all" else None  # all: every MatMul, as quantize_dynamic does
        if nodes == []:
            raise StreamerError(f"{fp32.name}: no MatMul with a constant weight to quantise (an unexpected graph)")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # the quantiser logs a line per tensor (and advice) on the root logger
        try:
            _atomic_write(quantised, lambda tmp: quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8,
                                                                  nodes_to_quantize=nodes))
        finally:
            logging.disable(previous)
        log.info("quantised %s MatMuls of the ONNX model to int8 in %.1f s: %s", len(nodes) if nodes else "all",
                 time.perf_counter() - t0, quantised)
    return quantised


def int8_nodes(path: Path) -> list[str]:
    """The MatMuls that the int8 path quantises: every layer's qkv and fc1, fc2 of the later half.

    Dynamic quantisation gives each activation one 8-bit scale per tensor, and each
    quantised GEMM adds its own rounding noise, which the layers after it carry on. On
    the 16-16 AudioSet model (random weights) every group alone (qkv, proj, fc1 or fc2 of
    all layers) moved the probabilities by ~0.009, the patch embedding and classifier by
    ~0.005, and the noise adds up: quantising all of them gave max |Δp| 0.025 against fp32
    on real recordings (the bound is 0.02), all but proj (the smallest GEMM, 1/12 of a
    layer's work) and the two ends 0.019 — no margin. fc2 in the early layers is what tips
    it: qkv + fc1 alone 0.0145, plus fc2 of the later half 0.0146, of the first half 0.0166
    (40 windows; bench/bench_int8.py, bench/results/int8_recipes_cpu_40*.json). So: 1.29×
    onnx-fp32 within 0.015, where everything quantised was 1.48× beyond the bound.
    """
    import re

    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {i.name for i in graph.initializer}
    layer = {n.name: int(m.group(1)) for n in graph.node if (m := re.search(r"/blocks\.(\d+)/", n.name))}
    layers = max(layer.values(), default=-1) + 1
    return [n.name for n in graph.node
            if n.op_type == "MatMul" and n.input[1] in constants and n.name in layer
            and ("/attn/qkv/" in n.name or "/mlp/fc1/" in n.name
                 or ("/mlp/fc2/" in n.name and layer[n.name] >= layers // 2))]


class OnnxForward:
    """``(B, T, F)`` fp32 features → logits, through an ONNX Runtime session on the CPU.

    Idle worker threads do not spin (``allow_spinning`` off): between windows the daemon
    should cost nothing.
    """

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        x = features.detach().to(torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(["logits"], {"features": x})[0])


# ---------------------------------------------------------------- the built-in check audio


def check_audio(seconds: float, seed: int = CHECK_SEED) -> np.ndarray:
    """Deterministic audio with something for every part of the model to react to.

    Segments of ~1.3 s each, repeated with different levels: a tone with harmonics (voice-
    like), a rising chirp, band-limited noise bursts, a train of clicks (knocks), a
    two-tone alarm, white noise, and near-silence; levels from -40 to -6 dBFS.
    """
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    seg = int(1.28 * SAMPLE_RATE)
    t = np.arange(seg) / SAMPLE_RATE
    out = np.zeros(n, dtype=np.float64)
    kinds = 7
    for i, start in enumerate(range(0, n, seg)):
        k, level_db = i % kinds, -6.0 - 34.0 * rng.random()
        f0 = 120 + 400 * rng.random()
        if k == 0:
            x = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 8)) * (1 + 0.5 * np.sin(2 * np.pi * 4 * t))
        elif k == 1:
            x = np.sin(2 * np.pi * (f0 * t + 2000 * t**2))
        elif k == 2:
            x = np.convolve(rng.standard_normal(seg), np.hanning(24), "same") * (rng.random(seg // 800 + 1).repeat(800)[:seg] > 0.5)
        elif k == 3:
            x = np.zeros(seg)
            x[rng.integers(0, seg - 400, 6)[:, None] + np.arange(400)] = rng.standard_normal((6, 400)) * np.exp(-np.arange(400) / 60)
        elif k == 4:
            x = np.sin(2 * np.pi * np.where((t * 4).astype(int) % 2 == 0, 960.0, 770.0) * t)
        elif k == 5:
            x = rng.standard_normal(seg)
        else:
            x, level_db = rng.standard_normal(seg), -70.0
        x = x / (np.abs(x).max() + 1e-9) * 10 ** (level_db / 20)
        end = min(n, start + seg)
        out[start:end] += x[: end - start]
    return out.astype(np.float32)


def check_windows(loaded: LoadedModel, count: int = CHECK_WINDOWS) -> torch.Tensor:
    """``count`` normalised feature windows of :func:`check_audio`, ``(count, T, F)``."""
    from streamer.features.windows import StreamWindows

    frames = loaded.features.max_length
    seconds = (frames * count + 2) / 100.0 + 0.1
    stream = StreamWindows("check", loaded.features, hop_frames=frames)
    windows = stream.push(check_audio(seconds)) + stream.finish()
    return torch.stack([w.features for w in windows[:count]])


# ---------------------------------------------------------------- choosing


@dataclass
class PathResult:
    path: str
    seconds_per_window: float | None = None
    max_abs_dp: float | None = None
    error: str | None = None


@dataclass
class Choice:
    """What ``precision: auto`` chose on this CPU, and the measurements behind it."""

    path: str
    seconds_per_window: float
    fp32_seconds_per_window: float
    max_abs_dp: float
    windows: int
    cpu: str
    threads: int
    results: list[PathResult] = field(default_factory=list)
    cached: bool = False
    forward: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False, compare=False)
    reason: str = ""  # why no measurement was needed (small model)

    def log_line(self) -> str:
        if self.reason:
            return f"precision auto: {self.path}, {self.reason}; CPU {self.cpu}, {self.threads} threads"
        rejected = [r for r in self.results if r.path != self.path and (r.error or (r.max_abs_dp or 0) > ACCURACY_BOUND)]
        notes = "".join(
            f"; {r.path} {'failed: ' + r.error if r.error else f'rejected (max |Δp| {r.max_abs_dp:.3f})'}" for r in rejected
        )
        return (
            f"precision auto: {self.path}, {self.seconds_per_window:.2f} s/window (fp32 {self.fp32_seconds_per_window:.2f} s),"
            f" max |Δp| {self.max_abs_dp:.3f} on {self.windows} check windows; CPU {self.cpu}, {self.threads} threads"
            f"{notes}{' (cached choice)' if self.cached else ''}"
        )


def build_forward(path: str, loaded: LoadedModel, threads: int, directory: Path | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A logits function for one CPU path. Torch paths get their own copy of the model."""
    import copy

    if path in ONNX_PATHS:
        if not onnxruntime_available():
            raise StreamerError(f"precision {path} needs ONNX Runtime: pip install onnxruntime onnx (or use precision auto)")
        if directory is None:
            directory = cache_dir(loaded, model_hash(loaded))
        return OnnxForward(export_onnx(loaded, directory, int8=path if path in INT8_RECIPES else False), threads)
    if path == "fp32":
        return loaded.model.eval()
    model = copy.deepcopy(loaded.model).eval()
    if path == "bf16":
        return bf16_forward(model)
    if path == "int8":
        from streamer.inference.engine import quantize_int8

        return quantize_int8(model)
    raise StreamerError(f"unknown CPU path {path!r}")


def bf16_packing_supported() -> bool:
    """Whether oneDNN runs bf16 GEMMs natively here (AVX-512-BW/VL/DQ, AVX-NE-CONVERT, AMX)."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(torch.nn.Module):
    """``nn.Linear`` (optionally with the GELU after it) on oneDNN, its weight reordered once at build.

    Why: torch's CPU linear hands oneDNN a plain row-major weight at every call, and oneDNN's
    AMX / AVX-512 kernels first copy it into the blocked layout they read — for every GEMM
    of every window (4 per layer). Reordering once, as inductor's weight freezing does,
    removes that copy; fc1's GELU runs as the GEMM's post-op instead of another pass over
    an activation 4× the width. The weight is kept only in the packed form (no extra memory).
    """

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype, gelu: str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().to(dtype).contiguous()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)  # opaque oneDNN tensor: not a buffer
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype).contiguous()
        self.attr, self.algorithm = ("gelu", gelu) if gelu else ("none", "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, self.attr, [], self.algorithm)


def prepack_linears(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Swap the encoder's and the head's Linear layers for :class:`PackedLinear` (in place); how many.

    The last layer's qkv stays a plain Linear: that layer computes only the two pooled
    tokens' queries from a slice of its weight (see ``Attention.forward``). fc1 takes its
    GELU along where the activation is one (exact or tanh).
    """
    swapped = 0
    blocks = list(model.blocks)
    for i, block in enumerate(blocks):
        attn, mlp = block.attn, block.mlp
        if i < len(blocks) - 1:
            attn.qkv = PackedLinear(attn.qkv, dtype)
            swapped += 1
        attn.proj = PackedLinear(attn.proj, dtype)
        if isinstance(mlp.act, torch.nn.GELU):
            mlp.fc1, mlp.act = PackedLinear(mlp.fc1, dtype, gelu=mlp.act.approximate), torch.nn.Identity()
        else:
            mlp.fc1 = PackedLinear(mlp.fc1, dtype)
        mlp.fc2 = PackedLinear(mlp.fc2, dtype)
        swapped += 3
    if isinstance(model.head.fc, torch.nn.Linear):
        model.head.fc = PackedLinear(model.head.fc, dtype)
        swapped += 1
    return swapped


def bf16_forward(model: torch.nn.Module, packed: bool | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The torch bf16 path on ``model`` (a copy it may change): fp32 features in, fp32 logits out.

    With ``packed`` (default: where oneDNN has native bf16, see :func:`bf16_packing_supported`)
    the Linear layers are :class:`PackedLinear`; elsewhere plain torch bf16 (emulated on
    AVX2: slow, which is why ``auto`` tries bf16 only with bf16 units).
    """
    model = model.eval().to(torch.bfloat16)
    if packed is None:
        packed = bf16_packing_supported()
    if packed:
        count = prepack_linears(model, torch.bfloat16)
        log.debug("bf16: %d Linear layers prepacked for oneDNN", count)
    return lambda x: model(x.to(torch.bfloat16)).float()


def _per_window(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return forward(x.unsqueeze(0))[0]


def measure(loaded: LoadedModel, paths: list[str], threads: int, directory: Path | None,
            windows: torch.Tensor) -> tuple[list[PathResult], dict[str, Callable]]:
    """Score ``windows`` one at a time with every path, interleaved; time all but the first.

    Returns the results (in ``paths`` order) and the logits functions that worked.
    """
    probs = loaded.model.probabilities
    forwards: dict[str, Callable] = {}
    results = {p: PathResult(p) for p in paths}
    for p in paths:
        try:
            forwards[p] = build_forward(p, loaded, threads, directory)
        except Exception as exc:  # a path that cannot be built is reported, not fatal
            log.warning("precision auto: path %s unavailable: %s", p, exc)
            results[p].error = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    outs: dict[str, list[torch.Tensor]] = {p: [] for p in forwards}
    times: dict[str, list[float]] = {p: [] for p in forwards}
    with torch.inference_mode():
        for i in range(len(windows)):
            for p, fwd in list(forwards.items()):
                t0 = time.perf_counter()
                try:
                    out = probs(_per_window(fwd, windows[i]))
                except Exception as exc:
                    log.warning("precision auto: path %s failed: %s", p, exc)
                    results[p].error = str(exc).splitlines()[0][:200]
                    del forwards[p]
                    continue
                if i > 0 or len(windows) == 1:
                    times[p].append(time.perf_counter() - t0)
                outs[p].append(out)
    ref = torch.stack(outs["fp32"]) if outs.get("fp32") and len(outs["fp32"]) == len(windows) else None
    for p in forwards:
        results[p].seconds_per_window = statistics.median(times[p])
        if ref is not None:
            results[p].max_abs_dp = float((torch.stack(outs[p]) - ref).abs().max())
    return [results[p] for p in paths], forwards


def _choice_file(directory: Path, features: CpuFeatures, threads: int) -> Path:
    versions = _versions() if onnxruntime_available() else f"torch{torch.__version__}"
    key = hashlib.sha256(f"{features.key()}|{threads}|{versions}|{CHECK_WINDOWS}|{ACCURACY_BOUND}|{sorted(INT8_RECIPES.items())}".encode()
                         ).hexdigest()[:16]
    return directory / f"precision-auto-{key}.json"


def choose(loaded: LoadedModel, threads: int, features: CpuFeatures | None = None,
           paths: list[str] | None = None, use_cache: bool = True) -> Choice:
    """The fastest CPU path within :data:`ACCURACY_BOUND` of fp32 (cached per CPU + checkpoint).

    A model of at most :data:`SMALL_MODEL_GFLOP` per window keeps fp32 at once: small
    models gain nothing worth an export.
    """
    features = features or cpu_features()
    gflop = loaded.config.window_gflop()
    if gflop <= SMALL_MODEL_GFLOP:
        choice = Choice("fp32", 0.0, 0.0, 0.0, 0, features.describe(), threads, [PathResult("fp32", None, 0.0)])
        choice.reason = f"a small model ({gflop:.2f} GFLOP per window): no other path tried"
        return choice
    paths = paths or candidates(features)
    directory: Path | None = None
    try:
        directory = cache_dir(loaded, model_hash(loaded))
    except StreamerError as exc:
        log.warning("%s: ONNX paths and the cached choice are off", exc)
        paths = [p for p in paths if p not in ONNX_PATHS]
    record = _choice_file(directory, features, threads) if directory else None
    if use_cache and record is not None and record.is_file():
        try:
            raw = json.loads(record.read_text())
            raw["results"] = [PathResult(**r) for r in raw.get("results", [])]
            choice = Choice(**{**raw, "cached": True})
            if choice.path in paths:
                return choice
        except (OSError, ValueError, TypeError) as exc:
            log.warning("precision auto: ignoring an unreadable cached choice %s: %s", record, exc)
    windows = check_windows(loaded)
    t0 = time.perf_counter()
    results, forwards = measure(loaded, paths, threads, directory, windows)
    fp32 = next(r for r in results if r.path == "fp32")
    if fp32.seconds_per_window is None:
        raise StreamerError(f"precision auto: the fp32 reference failed on this CPU: {fp32.error}")
    ok = [r for r in results if r.seconds_per_window is not None and r.max_abs_dp is not None and r.max_abs_dp <= ACCURACY_BOUND]
    best = min(ok, key=lambda r: r.seconds_per_window)
    choice = Choice(best.path, best.seconds_per_window, fp32.seconds_per_window, best.max_abs_dp or 0.0,
                    CHECK_WINDOWS, features.describe(), threads, results)
    choice.forward = forwards[best.path]
    log.info("precision auto: measured %s in %.1f s", ", ".join(
        f"{r.path} {r.seconds_per_window:.2f} s" if r.seconds_per_window else f"{r.path} failed" for r in results),
        time.perf_counter() - t0)
    if record is not None:
        try:
            data = {f.name: getattr(choice, f.name) for f in fields(choice) if f.name not in ("cached", "forward")}
            data["results"] = [asdict(r) for r in choice.results]
            _atomic_write(record, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))
        except OSError as exc:
            log.warning("precision auto: could not cache the choice in %s: %s", record, exc)
    return choice

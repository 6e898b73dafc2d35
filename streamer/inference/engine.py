"""Running the AST on batches of windows: one engine per model, one worker for all streams.

:class:`InferenceEngine` owns the model on its device in its precision and turns a batch
of normalised windows into probabilities. On a GPU it keeps the weights in bf16/fp16,
uses SDPA's fused attention kernels, stages input in one pinned host buffer (one copy per
batch) and replays a CUDA graph captured for each of a fixed set of batch sizes, padding
a batch up to the nearest one, so the per-batch host cost is a handful of calls whatever
the batch holds. On the CPU it runs fp32, bf16, int8 (dynamic quantisation of the Linear layers), or our
model exported to ONNX Runtime in fp32 or int8 (:mod:`streamer.inference.cpu`);
``precision: auto`` picks the fastest of those within 0.02 of fp32 on the CPU it runs on
(and bf16 on a GPU).

:class:`~streamer.inference.worker.Worker` batches every stream's windows through one engine,
for the live daemon and for ``detect`` alike (both through :mod:`streamer.pipeline`).
"""

from __future__ import annotations

import logging
import queue
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from streamer.errors import StreamerError
from streamer.inference import cpu
from streamer.model.checkpoint import LoadedModel
from streamer.model.fused import FusedForward
from streamer.features.windows import Window

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8", "onnx-fp32", "onnx-int8", "onnx-int8-all")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32,
           "onnx-fp32": torch.float32, "onnx-int8": torch.float32,
           "onnx-int8-all": torch.float32}
GPU_AUTO_PRECISION = "bf16"
PER_WINDOW_PRECISIONS = ("int8", "onnx-int8", "onnx-int8-all")  # dynamic quantisation: scales depend on the whole batch
CPU_ONLY_PRECISIONS = ("int8", *cpu.ONNX_PATHS)
SPEED_RUNS = 2  # timed batches behind seconds_per_window (after a warm one)
DEFAULT_MAX_BATCH = 8  # windows per forward pass on a CPU, unless configured
GPU_MAX_BATCH = 128  # ... and on a GPU
DEFAULT_MAX_WAIT_MS = 20.0
GRAPH_WARMUP_RUNS = 3
GRAPH_STEP = 8  # CUDA graphs are captured for every multiple of this batch size (see graph_batch_sizes)
PIPELINE_DEPTH = 2  # batches in flight: one computing while the next is staged and copied


def resolve_device(name: str) -> torch.device:
    """``auto`` → the first CUDA GPU if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise StreamerError(f"unknown device {name!r} (use auto, cpu or cuda[:N])") from None
    if device.type not in ("cpu", "cuda"):
        raise StreamerError(f"device {name} is not supported (use auto, cpu or cuda[:N])")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise StreamerError(f"device {name} asked for, but no CUDA GPU is available here; use device cpu")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise StreamerError(f"device {name}: there are only {torch.cuda.device_count()} CUDA GPUs")
        device = torch.device("cuda", index)
    return device


def graph_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to ``GRAPH_STEP``, then every multiple of ``GRAPH_STEP``, and ``max_batch``.

    A batch runs in the smallest captured graph that holds it, padded. With powers of two
    only, a loaded daemon's batches (whatever arrived while the last one computed: 52 of 64,
    97 of 128) wasted a fifth of the GPU on padding — that was the whole gap between the
    engine's speed and the pipeline's ceiling. In steps of 8 the padding is < 1/8 of a big batch.
    """
    sizes, size = [], 1
    while size < min(max_batch, GRAPH_STEP):
        sizes.append(size)
        size *= 2
    sizes += range(GRAPH_STEP, max_batch, GRAPH_STEP)
    return (*sizes, max_batch)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantisation of the encoder's Linear layers (CPU only).

    The classifier head stays fp32: it is tiny, and its outputs are what users threshold.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.ao.quantization import quantize_dynamic

        quantize_dynamic(model.blocks, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model


@dataclass(frozen=True)
class Pending:
    """A batch in flight: which staging slot it holds, and the event that marks it done."""

    slot: int
    count: int
    done: torch.cuda.Event | None
    started: float


@dataclass
class EngineStats:
    batches: int = 0
    windows: int = 0
    padded: int = 0
    seconds: float = 0.0


class InferenceEngine:
    """A model prepared for one device and precision; ``predict`` scores batches of windows."""

    def __init__(
        self,
        loaded: LoadedModel,
        device: str = "cpu",
        precision: str = "fp32",
        max_batch: int | None = None,
        threads: int | None = None,
        cuda_graphs: bool = True,
        compile: bool = False,
        fused: bool | None = None,
    ) -> None:
        """``precision`` ``auto``: bf16 on a GPU; on the CPU the fastest path within 0.02 of fp32
        (timed and checked at start, cached; see :func:`streamer.inference.cpu.choose`), logged
        in one line and kept in :attr:`choice`."""
        if precision not in PRECISIONS:
            raise StreamerError(f"unknown precision {precision!r} (use one of {', '.join(PRECISIONS)})")
        if max_batch is not None and max_batch < 1:
            raise StreamerError(f"max_batch must be at least 1, got {max_batch}")
        self.loaded = loaded
        self.device = resolve_device(device)
        # None: a CPU gains little from big batches (and waits longer for them); a GPU needs
        # them to serve thousands of streams (bench/README.md: 1500 streams at 128)
        self.max_batch = max_batch or (GPU_MAX_BATCH if self.device.type == "cuda" else DEFAULT_MAX_BATCH)
        max_batch = self.max_batch
        self.stats = EngineStats()
        self._speed: dict[int, float] = {}
        on_gpu = self.device.type == "cuda"
        if threads:  # set once, here: torch's pool and ONNX Runtime's sessions use the same count
            torch.set_num_threads(threads)
        self.threads = threads or torch.get_num_threads()
        self.choice = None
        if precision == "auto":
            if on_gpu:
                precision = GPU_AUTO_PRECISION
                log.info("precision auto: %s on %s", precision, self.device)
            else:
                self.choice = cpu.choose(loaded, self.threads)
                precision = self.choice.path
                if self.choice.seconds_per_window > 0:  # measured (not a small model's shortcut)
                    self._speed[1] = self.choice.seconds_per_window
                log.info(self.choice.log_line())
        self.precision = precision
        if precision in CPU_ONLY_PRECISIONS and on_gpu:
            raise StreamerError(f"precision {precision} is for the CPU; on a GPU use bf16 or fp16 (or auto)")
        self.dtype = _DTYPES[precision]
        shape = (loaded.features.max_length, loaded.features.num_mel_bins)
        self._shape = shape

        model = loaded.model.eval()  # the engine owns it from here on (no second copy in memory)
        onnx_forward = None
        if precision in cpu.ONNX_PATHS:
            onnx_forward = self.choice.forward if self.choice and self.choice.forward else cpu.build_forward(precision, loaded, self.threads)
            # ONNX Runtime holds its own weights; ours would only take memory (the engine owns
            # the model, and only its config is used from here on: probabilities)
            model = model.to(device="meta")
        elif precision == "int8":
            model = quantize_int8(model)
        else:
            model = model.to(device=self.device, dtype=self.dtype)
            if precision == "bf16" and not on_gpu:
                if cpu.bf16_packing_supported():  # oneDNN's native bf16: weights reordered once, not every call
                    cpu.prepack_linears(model, torch.bfloat16)
        if self.choice is not None:
            self.choice.forward = None  # the engine holds what it runs; no second reference
        self.model = model
        if fused is None:  # the fused path pays off where passes over memory dominate: half precision on a GPU
            fused = on_gpu and precision in ("bf16", "fp16") and not compile
        self.fused = fused
        self._logits: Callable[[torch.Tensor], torch.Tensor] = onnx_forward or (FusedForward(model) if fused else model)
        self._forward: Callable[[torch.Tensor], torch.Tensor] = self._probabilities
        if compile:
            # Inductor fuses the norms, bias+GELU and residual adds into the matmuls' neighbours;
            # dynamic batch so one compilation serves every captured batch size.
            self._forward = torch.compile(self._probabilities, dynamic=True)

        self._on_gpu = on_gpu
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        # Two staging slots, so that one batch's copies overlap the other's compute.
        labels = len(loaded.labels)
        self._host_in = [torch.empty((max_batch, *shape), pin_memory=on_gpu) for _ in range(PIPELINE_DEPTH)]
        self._host_out = [torch.empty((max_batch, labels), pin_memory=on_gpu) for _ in range(PIPELINE_DEPTH)]
        self._dev_in = [torch.empty((max_batch, *shape), device=self.device) for _ in range(PIPELINE_DEPTH)] if on_gpu else []
        self._free_slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(PIPELINE_DEPTH):
            self._free_slots.put(slot)
        self._copy_stream = torch.cuda.Stream(self.device) if on_gpu else None
        self.batch_sizes = graph_batch_sizes(max_batch) if on_gpu and cuda_graphs else ()
        self.warm_up()

    @property
    def labels(self) -> tuple[str, ...]:
        return self.loaded.labels

    def _probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """fp32 features on the device → fp32 probabilities (the precision applies inside)."""
        return self.model.probabilities(self._logits(features.to(self.dtype)))

    def warm_up(self) -> None:
        """Run (and on a GPU capture) every batch size once, so that the first real window is fast."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            if not self.batch_sizes:
                self._forward(torch.zeros((1, *self._shape), device=self.device))
                if self._on_gpu:
                    torch.cuda.synchronize(self.device)
            # one memory pool for every graph, the largest captured first (it sizes the pool):
            # the graphs replay one at a time on one stream and each keeps its own input and
            # output tensors alive, so they can share the intermediates' memory
            self._pool = torch.cuda.graph_pool_handle() if self.batch_sizes else None
            for size in sorted(self.batch_sizes, reverse=True):
                self._graphs[size] = self._capture(size)
        log.info(
            "inference engine ready: %s, %s%s, batch sizes %s, warm-up %.1f s",
            self.device, self.precision, " fused" if self.fused else "",
            list(self.batch_sizes) or f"1..{self.max_batch}", time.perf_counter() - t0,
        )

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        static_in = torch.zeros((size, *self._shape), device=self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(GRAPH_WARMUP_RUNS):
                self._forward(static_in)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = self._forward(static_in)
        return graph, static_in, static_out

    def predict(self, features: torch.Tensor | Sequence[torch.Tensor]) -> np.ndarray:
        """Probabilities ``(n, labels)`` for ``n`` normalised windows, in ``max_batch`` chunks.

        Chunks are pipelined: the next one is staged and copied while the last computes.
        """
        count = len(features)
        out = np.empty((count, len(self.labels)), dtype=np.float32)
        in_flight: deque[tuple[int, Pending]] = deque()
        for start in range(0, count, self.max_batch):
            if len(in_flight) == PIPELINE_DEPTH:
                first, pending = in_flight.popleft()
                out[first:first + pending.count] = self.collect(pending)
            in_flight.append((start, self.submit(features[start:start + self.max_batch])))
        for first, pending in in_flight:
            out[first:first + pending.count] = self.collect(pending)
        return out

    @torch.inference_mode()
    def submit(self, chunk: torch.Tensor | Sequence[torch.Tensor]) -> "Pending":
        """Start scoring up to ``max_batch`` windows; :meth:`collect` returns the result.

        At most ``PIPELINE_DEPTH`` batches may be in flight: a further submit waits for a
        collect (from another thread) to free a staging slot.
        """
        n = len(chunk)
        if not 0 < n <= self.max_batch:
            raise ValueError(f"a batch holds 1..{self.max_batch} windows, got {n}")
        shapes = {tuple(chunk.shape[1:])} if isinstance(chunk, torch.Tensor) else {tuple(c.shape) for c in chunk}
        if shapes != {self._shape}:
            raise ValueError(f"windows must be {self._shape} (frames, mel bins), got {sorted(shapes)}")
        t0 = time.perf_counter()
        slot = self._free_slots.get()
        try:
            if self._on_gpu and isinstance(chunk, torch.Tensor) and chunk.device == self.device:
                done = self._launch(slot, None, chunk)  # already on the device (the pipeline's frame rings)
            else:
                staged = self._host_in[slot][:n]
                if isinstance(chunk, torch.Tensor):
                    staged.copy_(chunk)
                else:
                    torch.stack(list(chunk), out=staged)
                done = self._launch(slot, staged)
        except BaseException:
            self._free_slots.put(slot)
            raise
        self.stats.batches += 1
        self.stats.windows += n
        return Pending(slot, n, done, t0)

    def _launch(self, slot: int, staged: torch.Tensor | None, on_device: torch.Tensor | None = None) -> torch.cuda.Event | None:
        n = (staged if staged is not None else on_device).shape[0]
        host_out = self._host_out[slot][:n]
        if not self._on_gpu:
            if self.precision in PER_WINDOW_PRECISIONS:
                # Dynamic quantisation scales each Linear input by its whole tensor's range, so
                # a window's result would depend on its batch-mates: score each on its own.
                host_out.copy_(torch.cat([self._forward(staged[i:i + 1]) for i in range(n)]))
            else:
                host_out.copy_(self._forward(staged))
            return None
        compute = torch.cuda.current_stream(self.device)
        if on_device is not None:
            dev = on_device
        else:
            dev = self._dev_in[slot][:n]
            with torch.cuda.stream(self._copy_stream):
                dev.copy_(staged, non_blocking=True)
            compute.wait_stream(self._copy_stream)
        if self.batch_sizes:
            size = next(s for s in self.batch_sizes if s >= n)
            graph, static_in, static_out = self._graphs[size]
            static_in[:n].copy_(dev)
            graph.replay()
            out = static_out[:n]
            self.stats.padded += size - n
        else:
            out = self._forward(dev)
        host_out.copy_(out, non_blocking=True)
        done = torch.cuda.Event(blocking=True)  # the results thread sleeps on it (a default event spins a core)
        done.record(compute)
        return done

    def collect(self, pending: "Pending") -> np.ndarray:
        """Wait for a submitted batch; its probabilities ``(n, labels)``."""
        try:
            if pending.done is not None:
                pending.done.synchronize()
            result = self._host_out[pending.slot][: pending.count].numpy().copy()
        finally:
            self._free_slots.put(pending.slot)
        self.stats.seconds += time.perf_counter() - pending.started
        return result

    def score(self, windows: Sequence[Window]) -> np.ndarray:
        """Probabilities for a list of windows, in their order."""
        return self.predict([w.features for w in windows])

    def seconds_per_window(self, batch: int = 1) -> float:
        """Measured compute seconds per window when ``batch`` windows are scored together.

        What :mod:`streamer.inference.capacity` needs to tell whether a hop is sustainable.
        With ``precision: auto`` on the CPU the batch-1 figure is the one measured when the
        path was chosen (no extra work at start); otherwise the first call times
        ``SPEED_RUNS`` batches (after the warm-up), and the figure is kept.
        """
        batch = max(1, min(batch, self.max_batch))
        if batch not in self._speed:
            windows = torch.zeros((batch, *self._shape))
            times = []
            for _ in range(SPEED_RUNS):
                t0 = time.perf_counter()
                self.predict(windows)
                times.append(time.perf_counter() - t0)
            self._speed[batch] = min(times) / batch
        return self._speed[batch]

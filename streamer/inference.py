"""Running the AST on batches of windows and returning probabilities.

:class:`Classifier` owns the model on its device; it is what the offline ``detect``
command and the live worker call, so both score windows the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from streamer.errors import StreamerError
from streamer.model.checkpoint import LoadedModel
from streamer.scheduler import Window

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 8


def resolve_device(name: str) -> torch.device:
    """``auto`` → the first CUDA GPU if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise StreamerError(f"unknown device {name!r} (use auto, cpu or cuda[:N])") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StreamerError(f"device {name} asked for, but no CUDA GPU is available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise StreamerError(f"device {name} is not supported (use auto, cpu or cuda[:N])")
    return device


class Classifier:
    """Score windows with a loaded AST, ``max_batch`` windows per forward pass."""

    def __init__(self, loaded: LoadedModel, device: str = "cpu", max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if max_batch < 1:
            raise StreamerError(f"max_batch must be at least 1, got {max_batch}")
        self.loaded = loaded
        self.device = resolve_device(device)
        self.max_batch = max_batch
        self.model = loaded.model.to(self.device)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.loaded.labels

    @torch.inference_mode()
    def predict(self, features: torch.Tensor) -> np.ndarray:
        """Probabilities ``(batch, labels)`` for normalised windows ``(batch, frames, mel)``."""
        outputs = []
        for start in range(0, features.shape[0], self.max_batch):
            batch = features[start:start + self.max_batch].to(self.device, non_blocking=True)
            outputs.append(self.model.probabilities(self.model(batch)).cpu())
        if not outputs:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return torch.cat(outputs).numpy().astype(np.float32, copy=False)

    def score(self, windows: Sequence[Window]) -> np.ndarray:
        """Probabilities for a list of windows, in their order."""
        if not windows:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return self.predict(torch.stack([w.features for w in windows]))

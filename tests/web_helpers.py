"""Helpers for the web page's tests: a tiny model whose scores follow the audio, a browser.

A random-weight tiny AST gives nearly constant probabilities (they differ by ~0.001 from
one window to the next), so neither a chart nor an event would move. ``lively_checkpoint``
measures each label's logits over a scene (``streamer detect``) and rescales that label's
row of the classifier so the same audio spreads its scores over most of 0..1: the model is
still a plain checkpoint, deterministic, and its scores still come from the audio.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, make_hf_model, save_hf_model

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "tests" / "artifacts"
TARGET_LOGIT_STD = 2.0  # spread of each label's rescaled logits over the scene
TARGET_LOGIT_MEAN = -0.5  # below 0: most labels are quiet most of the time


def lively_checkpoint(directory: Path, scene: Path, hop: float = 0.25, seed: int = 4, num_labels: int = 527) -> Path:
    """A tiny checkpoint whose every label swings with the scene's audio (see the module doc)."""
    model = make_hf_model(seed=seed, max_length=128, num_labels=num_labels)
    raw = save_hf_model(model, directory.with_name(directory.name + "-raw"))
    scores = directory.with_name(directory.name + "-scores.npz")
    result = subprocess.run([sys.executable, "-m", "streamer", "detect", str(scene), "--model", str(raw), "--hop", str(hop),
                             "--scores-out", str(scores)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    p = np.load(scores)["scores"].astype(np.float64).clip(1e-7, 1 - 1e-7)
    logits = np.log(p / (1 - p))
    mu, sd = logits.mean(axis=0), logits.std(axis=0) + 1e-9
    scale = TARGET_LOGIT_STD / sd
    head = model.classifier.dense
    with torch.no_grad():
        head.weight.mul_(torch.tensor(scale, dtype=head.weight.dtype)[:, None])
        head.bias.copy_(torch.tensor(scale * (head.bias.double().numpy() - mu) + TARGET_LOGIT_MEAN, dtype=head.bias.dtype))
    shutil.rmtree(raw)
    return save_hf_model(model, directory)


def launch_browser(playwright):
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)

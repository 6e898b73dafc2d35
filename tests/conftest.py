"""Shared fixtures: real recordings from ../shared and tiny checkpoints built with transformers.

No test reaches a model hub: every checkpoint is made here, with random weights, by the
reference implementation itself (``transformers``), which is also the correctness oracle.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
REAL_AUDIO = Path(os.environ.get("STREAMER_REAL_AUDIO", REPO.parent / "shared" / "audio" / "real"))

# Small enough to run in a blink on 2 cores, big enough to exercise every part.
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def real_clips(per_label: int | None = None) -> list[Path]:
    """Real recordings, sorted; ``per_label`` of each label when given."""
    if not REAL_AUDIO.is_dir():
        pytest.skip(f"real recordings not found at {REAL_AUDIO}")
    clips = []
    for folder in sorted(p for p in REAL_AUDIO.iterdir() if p.is_dir() and p.name != "meta"):
        files = sorted(folder.glob("*.wav"))
        clips.extend(files if per_label is None else files[:per_label])
    return clips


def make_hf_model(seed: int = 0, num_labels: int = 5, **config):
    """A random-weight transformers ``ASTForAudioClassification``."""
    from transformers import ASTConfig, ASTForAudioClassification

    torch.manual_seed(seed)
    cfg = ASTConfig(**{**TINY, **config}, num_labels=num_labels)
    model = ASTForAudioClassification(cfg).eval()
    # transformers zero-initialises the tokens and position table; randomise them so that
    # a mix-up of cls/distillation tokens or a position offset cannot pass unnoticed.
    with torch.no_grad():
        emb = model.audio_spectrogram_transformer.embeddings
        for p in (emb.cls_token, emb.distillation_token, emb.position_embeddings):
            p.normal_(0, 0.5)
    return model


def save_hf_model(model, directory: Path, fmt: str = "safetensors", preprocessor: dict | None = None) -> Path:
    """Save as a checkpoint directory.

    ``safetensors``: ``save_pretrained`` (the MIT key layout); ``bin``: ``pytorch_model.bin``
    in the layout transformers >= 5.9 builds in memory; ``bin-mit``: ``.bin`` in the MIT layout.
    """
    from safetensors.torch import load_file

    model.save_pretrained(directory)
    if fmt != "safetensors":
        weights = directory / "model.safetensors"
        state = load_file(weights) if fmt == "bin-mit" else model.state_dict()
        torch.save({k: v.contiguous() for k, v in state.items()}, directory / "pytorch_model.bin")
        weights.unlink()
    if preprocessor is not None:
        from transformers import ASTFeatureExtractor

        ASTFeatureExtractor(**preprocessor).save_pretrained(directory)
    return directory


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: ``tiny_checkpoint(fmt=..., **config) -> (directory, hf_model)``."""
    counter = iter(range(1000))

    def build(fmt: str = "safetensors", preprocessor: dict | None = None, seed: int = 0, **config):
        model = make_hf_model(seed=seed, **config)
        directory = tmp_path / f"ckpt{next(counter)}"
        return save_hf_model(model, directory, fmt, preprocessor), model

    return build


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m streamer`` as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "streamer", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    import soundfile as sf

    sf.write(str(path), samples, rate, subtype="FLOAT" if path.suffix == ".wav" else None)
    return path

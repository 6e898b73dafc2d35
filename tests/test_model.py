"""Our AST against transformers' on the same checkpoints: logits within 1e-4 (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from streamer.errors import CheckpointError
from streamer.model import load_model
from streamer.model.checkpoint import checkpoint_filter_fn

TOLERANCE = 1e-4


def assert_parity(directory, hf_model, batch: int = 2, seed: int = 1) -> None:
    loaded = load_model(directory)
    cfg = hf_model.config
    torch.manual_seed(seed)
    x = torch.randn(batch, cfg.max_length, cfg.num_mel_bins)
    with torch.no_grad():
        expected = hf_model(x).logits
        got = loaded.model(x)
    assert got.shape == expected.shape
    err = (got - expected).abs().max().item()
    assert err <= TOLERANCE, f"max |Δlogit| = {err}"


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "bin-mit"])
@pytest.mark.parametrize(
    "config",
    [
        dict(max_length=128),
        dict(max_length=100, frequency_stride=16, time_stride=16),
        dict(max_length=160, frequency_stride=12, time_stride=12),
        dict(max_length=160, frequency_stride=14, time_stride=14),
        dict(max_length=160, frequency_stride=12, time_stride=14, qkv_bias=False),
        dict(max_length=150, frequency_stride=16, time_stride=10),
        dict(max_length=120, frequency_stride=13, time_stride=7),
        dict(max_length=64, frequency_stride=6, time_stride=8),
        dict(max_length=96, num_mel_bins=64, hidden_act="gelu_new", num_labels=1),
        dict(max_length=128, num_labels=35),
    ],
    ids=["10-10", "16-16", "12-12", "14-14", "12-14-nobias", "16-10", "13-7", "6-8-overlap", "64mel-gelu_new",
         "35-labels"],
)
def test_tiny_models_match_transformers(tiny_checkpoint, fmt, config):
    directory, hf_model = tiny_checkpoint(fmt=fmt, **config)
    assert_parity(directory, hf_model)


@pytest.mark.parametrize(
    "config",
    [
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, num_labels=527),
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
             num_labels=527, frequency_stride=16, time_stride=16),
    ],
    ids=["audioset-10-10-full-size", "audioset-16-16-full-size"],
)
@pytest.mark.slow  # over 8 s on 2 cores: CI runs it, the fast lane does not
def test_full_size_models_match_transformers(tiny_checkpoint, config):
    directory, hf_model = tiny_checkpoint(**config)
    assert_parity(directory, hf_model, batch=1)


def test_sdpa_and_math_attention_agree(tiny_checkpoint):
    directory, _ = tiny_checkpoint(max_length=128)
    model = load_model(directory).model
    x = torch.randn(2, 128, 128)
    with torch.no_grad():
        fused = model(x)
        model.set_fused_attn(False)
        plain = model(x)
    assert (fused - plain).abs().max().item() < 1e-5


def test_labels_and_activation_follow_config(tiny_checkpoint):
    directory, hf = tiny_checkpoint(max_length=128, num_labels=527)
    loaded = load_model(directory)
    assert loaded.labels == tuple(hf.config.id2label[i] for i in range(527))
    assert loaded.config.multi_label  # a wide head without problem_type: sigmoid
    probs = loaded.model.probabilities(torch.tensor([[0.0, 2.0]]))
    assert torch.allclose(probs, torch.tensor([[0.5, 0.8808]]), atol=1e-4)

    directory, _ = tiny_checkpoint(max_length=128, num_labels=35)
    loaded = load_model(directory)
    assert not loaded.config.multi_label  # speech-commands-like: softmax
    probs = loaded.model.probabilities(torch.randn(3, 35))
    assert torch.allclose(probs.sum(-1), torch.ones(3))

    directory, _ = tiny_checkpoint(max_length=128, num_labels=35, problem_type="multi_label_classification")
    assert load_model(directory).config.multi_label


def test_feature_config_comes_from_preprocessor(tiny_checkpoint):
    directory, _ = tiny_checkpoint(max_length=128, preprocessor=dict(mean=-3.0, std=2.5, max_length=128))
    features = load_model(directory).features
    assert (features.mean, features.std, features.max_length) == (-3.0, 2.5, 128)
    directory, _ = tiny_checkpoint(max_length=128)
    features = load_model(directory).features
    assert (features.mean, features.std) == (-4.2677393, 4.5689974)


def test_filter_is_pure_and_concatenates_qkv(tiny_checkpoint):
    _, hf = tiny_checkpoint(max_length=128)
    state = hf.state_dict()
    before = dict(state)
    out = checkpoint_filter_fn(state)
    assert state.keys() == before.keys()
    q = state["audio_spectrogram_transformer.layers.0.attention.q_proj.weight"]
    assert out["blocks.0.attn.qkv.weight"].shape == (3 * q.shape[0], q.shape[1])
    assert torch.equal(out["blocks.0.attn.qkv.weight"][: q.shape[0]], q)
    assert not any(".q." in k or "q_proj" in k for k in out)


def test_mis_shaped_and_missing_tensors_are_named(tiny_checkpoint):
    from safetensors.torch import load_file, save_file

    directory, _ = tiny_checkpoint(max_length=128)
    weights = directory / "model.safetensors"
    state = load_file(weights)
    state["classifier.dense.weight"] = torch.zeros(7, 32)
    del state["audio_spectrogram_transformer.layernorm.bias"]
    state["extra.tensor"] = torch.zeros(1)
    save_file(state, weights)
    with pytest.raises(CheckpointError) as info:
        load_model(directory)
    message = str(info.value)
    assert "head.fc.weight (7, 32) where config.json implies (5, 32)" in message
    assert "missing tensors: norm.bias" in message
    assert "unexpected tensors: extra.tensor" in message
    assert "\n" not in message


def test_saved_checkpoint_loads_in_transformers_with_same_outputs(tiny_checkpoint, tmp_path):
    from transformers import ASTForAudioClassification

    from streamer.model.checkpoint import save_checkpoint

    directory, _ = tiny_checkpoint(max_length=128, num_labels=7, preprocessor=dict(mean=-2.0, std=3.0))
    loaded = load_model(directory)
    out = tmp_path / "resaved"
    save_checkpoint(loaded, out)
    again = load_model(out)
    assert again.features == loaded.features and again.labels == loaded.labels
    reference = ASTForAudioClassification.from_pretrained(out).eval()
    x = torch.randn(2, 128, 128)
    with torch.no_grad():
        assert (reference(x).logits - loaded.model(x)).abs().max().item() <= TOLERANCE


def test_pooled_forward_equals_the_full_forward(tiny_checkpoint):
    """The last layer computes only the two pooled tokens: same numbers as computing all."""
    directory, _ = tiny_checkpoint(max_length=128, num_labels=7)
    model = load_model(directory).model
    x = torch.randn(3, 128, 128)
    with torch.no_grad():
        full = model.forward_head(model.forward_features(x))
        assert (model(x) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("act", ["gelu", "relu", "silu"])
def test_fused_forward_equals_the_plain_forward(tiny_checkpoint, act):
    from streamer.model.fused import FusedForward

    directory, _ = tiny_checkpoint(max_length=128, num_labels=7, hidden_act=act, qkv_bias=act != "relu")
    model = load_model(directory).model
    x = torch.randn(3, 128, 128)
    with torch.no_grad():
        fused = FusedForward(model)(x)
        # fc1's GELU runs as the tanh approximation there: close, not identical
        assert (fused - model(x)).abs().max().item() <= 1e-3


def test_triton_shifted_layer_norm_kernel_in_the_interpreter():
    """The GPU kernel itself, run by Triton's interpreter on the CPU, against F.layer_norm."""
    import subprocess
    import sys

    code = """
import torch, torch.nn.functional as F
from streamer.model.kernels import shifted_layer_norm, triton_usable
torch.manual_seed(0)
for rows, cols in [(9, 768), (5, 100)]:
    s, shift, w, b = torch.randn(rows, cols), torch.randn(cols), torch.randn(cols), torch.randn(cols)
    assert triton_usable(s)
    out = shifted_layer_norm(s, shift, w, b, 1e-12)
    ref = F.layer_norm(s + shift, (cols,), w, b, 1e-12)
    assert (out - ref).abs().max().item() < 1e-5, (out - ref).abs().max()
print("ok")
"""
    env = {**__import__("os").environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if "No module named 'triton'" in result.stderr:
        pytest.skip("triton is not installed")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]

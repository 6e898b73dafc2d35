"""Loading Hugging Face AST checkpoints into :class:`AudioSpectrogramTransformer`.

A checkpoint is a directory with ``config.json``, optionally ``preprocessor_config.json``,
and weights in ``model.safetensors`` (or shards with an index) or ``pytorch_model.bin``;
or a hub id, fetched through ``huggingface_hub`` (its cache and ``HF_HUB_OFFLINE`` apply).
Foreign tensor names are adapted by the pure :func:`checkpoint_filter_fn`, then loaded
strictly: anything missing, unexpected or mis-shaped is an error that names it.
"""

from __future__ import annotations

import json
import logging
import pickle
import warnings
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from streamer.errors import CheckpointError
from streamer.model.ast import AudioSpectrogramTransformer
from streamer.model.config import ASTConfig, FeatureConfig, read_json

if TYPE_CHECKING:
    from streamer.model.thresholds import Calibration

log = logging.getLogger(__name__)

HF_PREFIX = "audio_spectrogram_transformer."
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
JSON_FILES = ("config.json", "preprocessor_config.json")
MAX_NAMES_IN_ERROR = 6

# Hugging Face names (both the layout MIT's checkpoints were saved in and the one
# transformers >= 5.9 builds in memory) → ours. Applied after the prefix is stripped.
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.distillation_token$", "dist_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.query\.", r"blocks.\1.attn.q."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.key\.", r"blocks.\1.attn.k."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.value\.", r"blocks.\1.attn.v."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^layers\.(\d+)\.attention\.([qkv])_proj\.", r"blocks.\1.attn.\2."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^layers\.(\d+)\.mlp\.(fc[12])\.", r"blocks.\1.mlp.\2."),
    (r"^layers\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^layers\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.layernorm\.", "head.norm."),
    (r"^classifier\.dense\.", "head.fc."),
)
_COMPILED = tuple((re.compile(pattern), repl) for pattern, repl in _RENAMES)
_SPLIT_QKV = re.compile(r"^(blocks\.\d+\.attn)\.([qkv])\.(weight|bias)$")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a Hugging Face AST state dict onto our names; concatenate q, k, v into ``qkv``.

    Pure: the input is not modified. Names it does not know pass through unchanged, so
    the strict load that follows reports them as unexpected.
    """
    renamed: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        key = name[len(HF_PREFIX):] if name.startswith(HF_PREFIX) else name
        for pattern, repl in _COMPILED:
            key, count = pattern.subn(repl, key)
            if count:
                break
        renamed[key] = tensor

    out: dict[str, torch.Tensor] = {}
    split: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in renamed.items():
        match = _SPLIT_QKV.match(key)
        if match:
            split.setdefault((match[1], match[3]), {})[match[2]] = tensor
        else:
            out[key] = tensor
    for (attn, kind), parts in split.items():
        if set(parts) == {"q", "k", "v"}:
            out[f"{attn}.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        else:  # incomplete: leave the pieces for the strict load to name
            out.update({f"{attn}.{p}.{kind}": t for p, t in parts.items()})
    return out


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference, with everything needed to feed and read it."""

    model: AudioSpectrogramTransformer
    config: ASTConfig
    features: FeatureConfig
    source: str
    # per-label thresholds (and EMA weight) chosen by `streamer train` (thresholds.json), if any
    thresholds: dict[str, Calibration] = field(default_factory=dict)
    thresholds_hop_s: float | None = None  # the hop they were chosen at (None: not recorded)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.config.labels


def resolve_checkpoint(path_or_id: str) -> Path:
    """A local checkpoint directory for ``path_or_id``, downloading a hub id if need be."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a checkpoint directory (config.json and weights), got a file")
        return path
    if _looks_like_hub_id(path_or_id):
        return _download(path_or_id)
    raise CheckpointError(f"{path_or_id}: no such directory (give a checkpoint directory or a hub id like MIT/ast-finetuned-audioset-10-10-0.4593)")


def _looks_like_hub_id(text: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) is not None and not text.startswith((".", "/"))


def _download(repo_id: str) -> Path:
    try:
        import huggingface_hub
    except ImportError:  # pragma: no cover - a declared dependency
        raise CheckpointError(f"{repo_id}: huggingface_hub is not installed; pip install huggingface_hub, or pass a local directory") from None
    fix = (f"To fix it, fetch the model on a machine with network access (hf download {repo_id} --local-dir DIR), "
           "copy DIR here and set model.path to it.")
    patterns = [*JSON_FILES, SAFETENSORS_FILE, SAFETENSORS_INDEX, "model-*.safetensors"]
    try:
        local = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns))
        if not _weight_files(local):
            local = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=[*JSON_FILES, PICKLE_FILE, PICKLE_INDEX, "pytorch_model-*.bin"]))
    except Exception as exc:  # hub errors come in many classes; all mean "not available"
        raise CheckpointError(f"Cannot get model {repo_id}: {_hub_reason(exc)} ({type(exc).__name__}). {fix}") from None
    return local


def _hub_reason(exc: Exception) -> str:
    """Why the hub gave nothing, as a clause of our own (hub messages are long and end mid-way when cut)."""
    name = type(exc).__name__
    if name in ("RepositoryNotFoundError", "RevisionNotFoundError"):
        return "there is no such model on the Hugging Face hub, or it is private"
    if name == "GatedRepoError":
        return "the model is gated on the Hugging Face hub: accept its terms and log in (hf auth login)"
    if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or isinstance(exc, (OSError, ConnectionError)):
        return "the Hugging Face hub cannot be reached (offline, or HF_HUB_OFFLINE is set) and the model is not in the local cache"
    return "the Hugging Face hub did not provide it and it is not in the local cache"


def _weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, safetensors preferred."""
    for single, index in ((SAFETENSORS_FILE, SAFETENSORS_INDEX), (PICKLE_FILE, PICKLE_INDEX)):
        if (directory / single).is_file():
            return [directory / single]
        if (directory / index).is_file():
            data = read_json(directory / index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{directory / index}: has no weight_map")
            names = sorted(set(weight_map.values()))
            for name in names:
                if not isinstance(name, str) or "/" in name or name.startswith("."):
                    raise CheckpointError(f"{directory / index}: bad shard name {name!r}")
            return [directory / name for name in names]
    return []


def read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    """Read weight files without ever executing code from them."""
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: weight file missing")
        state.update(_read_safetensors(file) if file.suffix == ".safetensors" else _read_pickle(file))
    return state


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{file}: not a valid safetensors file ({' '.join(str(exc).split())[:200]})") from None


def _read_pickle(file: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():  # torch's two-line note on protocols other than 2: the refusal below says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            data = torch.load(file, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{file}: refused: {_unpickler_refusal(str(exc))}; convert it to safetensors from a trusted copy") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a readable PyTorch weight file ({' '.join(str(exc).split())[:200]})") from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise CheckpointError(f"{file}: expected a mapping of tensor names to tensors")
    return data


def _unpickler_refusal(message: str) -> str:
    """Why torch's weights-only unpickler refused a file, in a few words.

    Its message opens and closes with paragraphs on its own defaults (worded differently by
    torch version and by fault); the reason is what is left. An "unsupported global" is code or an object the file would build; an "unsupported
    operand" is a pickle opcode it cannot read (protocol 4 and 5 framing), which plain weights
    saved with a newer protocol also hit — so that one is not called hostile."""
    boilerplate = ("Weights only load failed", "(1)", "(2)", "Check the documentation")
    reason = " ".join(line.strip() for line in message.splitlines() if line.strip() and not line.strip().startswith(boilerplate))
    reason = reason.split("WeightsUnpickler error:", 1)[-1].split(". Please use", 1)[0]
    reason = " ".join(reason.split())[:160].rstrip(".") or "unpickling failed"
    if reason.startswith("Unsupported operand"):
        return f"this pickle uses opcodes the safe loader does not read, e.g. pickle protocol 4 or 5 ({reason})"
    return f"this pickle is not plain weights and would run code or build objects ({reason})"


def _describe(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMES_IN_ERROR])
    return shown + (f" and {len(names) - MAX_NAMES_IN_ERROR} more" if len(names) > MAX_NAMES_IN_ERROR else "")


def load_state_into(model: AudioSpectrogramTransformer, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load ``state`` (already in our names) into a model built on the meta device."""
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(n for n in set(expected) & set(state) if tuple(state[n].shape) != expected[n])
    problems = []
    if missing:
        problems.append(f"missing tensors: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_describe(unexpected)}")
    if wrong:
        problems.append(
            "mis-shaped tensors: "
            + _describe([f"{n} {tuple(state[n].shape)} where config.json implies {expected[n]}" for n in wrong])
        )
    not_float = sorted(n for n, t in state.items() if n in expected and not t.is_floating_point())
    if not_float:
        problems.append(f"non-float tensors: {_describe(not_float)}")
    if problems:
        raise CheckpointError(f"{source}: weights do not fit the architecture in config.json: " + "; ".join(problems))
    not_finite = sorted(n for n in expected if not torch.isfinite(state[n]).all())
    if not_finite:  # NaN/inf weights would make every score NaN: nothing would ever be detected
        raise CheckpointError(f"{source}: weights with NaN or inf values: {_describe(not_finite)}")
    params = {n: state[n].to(torch.float32).contiguous() for n in expected}
    model.load_state_dict(params, strict=True, assign=True)


def load_model(path_or_id: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load an AST checkpoint (directory or hub id) for inference, in fp32, in eval mode."""
    directory = resolve_checkpoint(str(path_or_id))
    config = ASTConfig.from_dict(read_json(directory / "config.json"), source=str(directory / "config.json"))
    pre_path = directory / "preprocessor_config.json"
    pre = read_json(pre_path) if pre_path.is_file() else None
    features = FeatureConfig.for_model(config, pre, source=str(pre_path))
    files = _weight_files(directory)
    if not files:
        raise CheckpointError(f"{directory}: no weights found (expected {SAFETENSORS_FILE} or {PICKLE_FILE})")
    state = checkpoint_filter_fn(read_state_dict(files))
    with torch.device("meta"):
        model = AudioSpectrogramTransformer(config)
    load_state_into(model, state, str(directory))
    model.eval().requires_grad_(False).to(device)
    log.info(
        "loaded %s: %d layers, hidden %d, %d frames, %d labels (%s)",
        directory, config.num_hidden_layers, config.hidden_size, config.max_length, config.num_labels,
        "multi-label" if config.multi_label else "single-label",
    )
    from streamer.model.thresholds import read_thresholds

    thresholds, thresholds_hop_s = read_thresholds(directory, config.labels)
    return LoadedModel(model=model, config=config, features=features, source=str(directory),
                       thresholds=thresholds, thresholds_hop_s=thresholds_hop_s)


def save_checkpoint(loaded: LoadedModel, directory: Path) -> None:
    """Write ``loaded`` as a standard Hugging Face AST checkpoint (the MIT key layout)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    try:
        save_file(to_hf_state_dict(loaded.model.state_dict()), str(directory / SAFETENSORS_FILE), metadata={"format": "pt"})
    except SafetensorError as exc:  # a full disk comes back as safetensors' own error: callers handle OSError
        raise OSError(f"{directory / SAFETENSORS_FILE}: {exc}") from None
    c = loaded.config
    config = {
        "architectures": ["ASTForAudioClassification"],
        "model_type": "audio-spectrogram-transformer",
        "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "intermediate_size": c.intermediate_size,
        "hidden_act": c.hidden_act, "layer_norm_eps": c.layer_norm_eps, "patch_size": c.patch_size,
        "qkv_bias": c.qkv_bias, "frequency_stride": c.frequency_stride, "time_stride": c.time_stride,
        "max_length": c.max_length, "num_mel_bins": c.num_mel_bins,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "id2label": {str(i): label for i, label in enumerate(c.labels)},
        "label2id": {label: i for i, label in enumerate(c.labels)},
    }
    if c.problem_type:
        config["problem_type"] = c.problem_type
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    f = loaded.features
    pre = {
        "feature_extractor_type": "ASTFeatureExtractor", "feature_size": 1, "sampling_rate": f.sample_rate,
        "num_mel_bins": f.num_mel_bins, "max_length": f.max_length, "mean": f.mean, "std": f.std,
        "do_normalize": f.do_normalize, "padding_value": 0.0, "return_attention_mask": False,
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n", encoding="utf-8")


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names → the MIT layout that every transformers version loads (inverse of the filter)."""
    out: dict[str, torch.Tensor] = {}
    fixed = {
        "cls_token": "embeddings.cls_token", "dist_token": "embeddings.distillation_token",
        "pos_embed": "embeddings.position_embeddings",
    }
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        if name in fixed:
            out[HF_PREFIX + fixed[name]] = tensor
        elif name.startswith("patch_embed."):
            out[HF_PREFIX + "embeddings.patch_embeddings.projection." + name.split(".", 1)[1]] = tensor
        elif name.startswith("norm."):
            out[HF_PREFIX + "layernorm." + name.split(".", 1)[1]] = tensor
        elif name.startswith("head.norm."):
            out["classifier.layernorm." + name.rsplit(".", 1)[1]] = tensor
        elif name.startswith("head.fc."):
            out["classifier.dense." + name.rsplit(".", 1)[1]] = tensor
        else:
            _, index, module, rest = name.split(".", 3)
            layer = f"{HF_PREFIX}encoder.layer.{index}."
            if module == "attn" and rest.startswith("qkv."):
                for part, piece in zip(("query", "key", "value"), tensor.chunk(3, dim=0)):
                    out[f"{layer}attention.attention.{part}.{rest[4:]}"] = piece.contiguous()
            else:
                target = {
                    ("attn", "proj"): "attention.output.dense", ("mlp", "fc1"): "intermediate.dense",
                    ("mlp", "fc2"): "output.dense", ("norm1", ""): "layernorm_before", ("norm2", ""): "layernorm_after",
                }
                sub, _, leaf = rest.rpartition(".")
                out[layer + target[(module, sub)] + "." + leaf] = tensor
    return out

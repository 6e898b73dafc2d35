"""Our Audio Spectrogram Transformer and the loading of Hugging Face AST checkpoints."""

from streamer.model.ast import AudioSpectrogramTransformer
from streamer.model.checkpoint import LoadedModel, checkpoint_filter_fn, load_model
from streamer.model.config import ASTConfig, FeatureConfig

__all__ = ["ASTConfig", "AudioSpectrogramTransformer", "FeatureConfig", "LoadedModel", "checkpoint_filter_fn", "load_model"]

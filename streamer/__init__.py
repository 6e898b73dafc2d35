"""streamer: streaming, real-time audio event detection with the Audio Spectrogram Transformer."""

__version__ = "0.1.0"

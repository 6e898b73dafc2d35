"""Audio in: decoding files, resampling to 16 kHz mono, and (live) capture sources."""

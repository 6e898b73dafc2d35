"""Constants every stage shares."""

# Everything inside the pipeline is 16 kHz mono float32: the rate AST models are trained at.
SAMPLE_RATE_HZ = 16_000

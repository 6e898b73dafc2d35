"""Inference: the engine (precisions, CUDA graphs, CPU runtimes) and the multi-stream worker."""

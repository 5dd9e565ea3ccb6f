"""Benchmarking: the step timer and the PyTorch baseline."""

"""Benchmarking: the step timer, the PyTorch baseline, the demo sweep against its PyTorch twin."""

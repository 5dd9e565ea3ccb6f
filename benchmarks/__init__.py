"""Benchmarks of the library, one entry point per measurement (`python -m benchmarks.<name>`).

Entry points: step_time (the training step, optionally against PyTorch eager), demo_vs_torch
(`make demo`'s sweep against its PyTorch twin), conv (each convolution pass), torch_sweep (the
twin's own process). Their parts: common (a leaf: usage errors, result files, provenance),
step_timer, torch_baseline, twin, breakdown, demo_report. No entry point imports another.
"""

"""Benchmarks: scripts that print cost ratios (``python bench/train_step.py --quick``); see docs/performance.md."""

"""Benchmark scripts (``python bench/NAME.py``); see BENCHMARKS.md. Not part of the package."""

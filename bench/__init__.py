"""Benchmark suite for vidq: `python -m bench.run` (see bench/README.md)."""

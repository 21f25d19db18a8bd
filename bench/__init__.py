"""Benchmarks that report each path as a ratio to its limit, side by side in one run."""

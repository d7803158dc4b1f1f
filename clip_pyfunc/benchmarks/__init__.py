"""Benchmarks: each prints ratios measured in one run on the same weights, plus the machine."""

"""Benchmarks of the fused EMA update against the naive loop and common alternatives.

Run ``python -m benchmarks.bench_ema --help`` (or ``make bench``).
"""

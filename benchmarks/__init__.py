"""Speed benchmarks: input pipeline, decoded cache, training steps, extraction, and GPU figures.

Run ``python -m benchmarks.bench --quick`` (a few CPU minutes) or without ``--quick`` for more runs; see
BENCHMARKS.md for the recorded figures.
"""

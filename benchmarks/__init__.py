"""Speed benchmarks: input pipeline, decoded cache, training steps, extraction, and GPU figures.

Run ``python -m benchmarks.bench --quick`` (a few CPU minutes) or without ``--quick`` for more runs; see
BENCHMARKS.md for the recorded figures.
"""

import sys
from pathlib import Path

# `python -m benchmarks.NAME` from a checkout, installed or not: the package is src/stage2 (src-layout).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

"""Test-wide settings: never touch the network, keep CPU thread counts predictable."""
import os

# A stray hub call must fail fast instead of hanging on a closed network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

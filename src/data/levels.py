"""The augmentation levels' names (`--aug`) and the check of `--self-blend`, torch-free so the command lines can
offer and check them without torch.

What each level does is in ``src.data.transforms``; self-blending in ``src.data.self_blend``.
"""

import argparse

AUG_LEVELS = ("none", "light", "standard", "strong")


def chance(text: str) -> float:
    """argparse type of a per-image chance (``--self-blend P``): a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a chance in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a chance in [0, 1], got {text}")
    return value

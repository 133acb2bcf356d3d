"""Embeddings and P(fake) of the stage-two experts, for stage three: feature files, predictions, exports.

    from feature_extractor import FeatureExtractor
    fx = FeatureExtractor(checkpoint_path="output/stage2_effnet/best.pt")
    embeddings, labels = fx.extract(fx.make_loader("val_manifest.csv"))
    p_fake = fx.predict("crops/")                            # a frame: path, p_fake (calibrated)

    python feature_extractor.py --help                       # the command: feature files, --export, --example

The command is src/stage2/commands/extract_features.py (installed as stage2-extract); FeatureExtractor is
src/stage2/embeddings/extract.py, and `example()`, what --example runs, is in src/stage2/embeddings/stacking_preview.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

# A checkout runs without `pip install -e .`: the package is src/stage2 (src-layout).
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from stage2.commands.extract_features import build_parser, cli, main  # noqa: E402

if TYPE_CHECKING:
    from stage2.embeddings import FeatureExtractor, join_features, load_features
    from stage2.embeddings.stacking_preview import example

__all__ = ["FeatureExtractor", "join_features", "load_features", "example", "build_parser", "cli", "main"]
_LAZY = {"FeatureExtractor": "stage2.embeddings", "join_features": "stage2.embeddings",
         "load_features": "stage2.embeddings", "example": "stage2.embeddings.stacking_preview"}


def __getattr__(name: str) -> Any:
    """`from feature_extractor import FeatureExtractor` loads torch then, not at import: --help answers at once."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    cli()

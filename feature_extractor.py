"""Export stage-two embeddings and P(fake) for stage three's stacking model.

    python feature_extractor.py --checkpoint output/stage2_effnet/best.pt --manifest val_manifest.csv \\
        --out features/effnet_val.npz
    python feature_extractor.py --checkpoint genconvit_ed_inference.pth --manifest val_manifest.csv \\
        --out features/genconvit_ed_val.npz                  # official GenConViT files load directly
    python feature_extractor.py --example                    # after the trainers' --demo runs (see README)

--example extracts the validation features of both experts from the checkpoints under output/ and prints
the cross-validated AUC of a logistic regression on each expert's embeddings and on both together.

From Python:
    from feature_extractor import FeatureExtractor
    fx = FeatureExtractor(checkpoint_path="output/stage2_effnet/best.pt")
    embeddings, labels = fx.extract(fx.make_loader("val_manifest.csv"))
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from src.engine.cli import exit_on_error

if TYPE_CHECKING:
    from src.embeddings import FeatureExtractor, join_features, load_features

__all__ = ["FeatureExtractor", "join_features", "load_features", "main"]
_LAZY = ("FeatureExtractor", "join_features", "load_features")


def __getattr__(name: str) -> Any:
    """`from feature_extractor import FeatureExtractor` loads torch then, not at import: --help answers at once."""
    if name in _LAZY:
        import src.embeddings

        return getattr(src.embeddings, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="trainer best.pt/last.pt or an official GenConViT .pth")
    parser.add_argument("--manifest", help="CSV with path,label[,video_id,method]")
    parser.add_argument("--out", help="feature file to write (.npz)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--model-name", help="optional check against the name the checkpoint records")
    parser.add_argument("--data-root", help="base folder for relative image paths (default: the manifest's folder)")
    parser.add_argument("--skip-bad-images", action="store_true", help="leave out undecodable images with a warning")
    parser.add_argument("--cache-dir", help="read images through the decoded-image cache in this folder")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, help="DataLoader worker processes (default: min(4, CPUs))")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 autocast on the GPU")
    parser.add_argument(
        "--example",
        action="store_true",
        help="extract val features of both experts from --output-root, then a stacking preview",
    )
    parser.add_argument("--output-root", default="output", help="where --example looks for the trainers' runs")
    parser.add_argument("--features-dir", default="features", help="where --example writes its feature files")
    args = parser.parse_args(argv)
    if not args.example:
        missing = [f"--{name}" for name in ("checkpoint", "manifest", "out") if getattr(args, name) is None]
        if missing:
            parser.error(f"{', '.join(missing)} required (or --example)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    logging.getLogger("src").setLevel(logging.INFO)
    from src.embeddings import FeatureExtractor
    from src.embeddings.stacking_preview import run_example

    if args.example:
        run_example(
            Path(args.output_root),
            Path(args.features_dir),
            device=args.device,
            batch_size=args.batch_size,
            workers=args.workers,
            amp=args.amp,
        )
        return
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out}: a folder; give the feature file's name (e.g. {out / 'features.npz'})")
    if out.exists() and not args.overwrite:
        raise ValueError(f"--out {out}: exists; pass --overwrite to replace it")
    extractor = FeatureExtractor(
        args.model_name, args.checkpoint, args.device, batch_size=args.batch_size, amp=args.amp, workers=args.workers
    )
    extractor.extract_to_file(args.manifest, args.out, args.data_root, skip_bad_images=args.skip_bad_images,
                              cache_dir=args.cache_dir)


def cli() -> None:
    """The `stage2-extract` command."""
    exit_on_error(main)


if __name__ == "__main__":
    cli()

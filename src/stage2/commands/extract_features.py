"""Embeddings and P(fake) of the stage-two experts, for stage three: feature files, predictions, exports.

    python feature_extractor.py --checkpoint output/stage2_effnet/best.pt --manifest val_manifest.csv \\
        --out features/effnet_val.npz                        # labelled or not: a manifest needs only `path`
    python feature_extractor.py --checkpoint genconvit_ed_inference.pth --images crops/ \\
        --out features/genconvit_ed_crops.npz                # every image below a folder; official files load
    python feature_extractor.py --checkpoint output/stage2_effnet/best.pt --images crops/ \\
        --out scores.csv                                     # .csv: a table of path, p_fake (no embeddings)
    python feature_extractor.py --checkpoint output/stage2_effnet/best.pt --export exported/effnet
    python feature_extractor.py --example                    # after the trainers' --demo runs (see README)

--out's suffix picks what is written. A feature file (.npz) holds, row for row: embeddings, calibrated P(fake),
paths, the manifest row, labels (-1 where unlabeled) and video_id/method where known. A scores table (.csv) holds
path and p_fake, then label (a labelled manifest) and video_id with video_p_fake (the video's mean) where known.
--export writes ONNX (every expert) and safetensors + config.json that timm loads (timm experts); see
src/stage2/embeddings/export.py. From Python, as --example does
(stage2.embeddings.stacking_preview.example):

    from feature_extractor import FeatureExtractor
    fx = FeatureExtractor(checkpoint_path="output/stage2_effnet/best.pt")
    embeddings, labels = fx.extract(fx.make_loader("val_manifest.csv"))
    p_fake = fx.predict("crops/")                            # a frame: path, p_fake (calibrated)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from stage2.commands.cli import HelpFormatter, command_help, exit_on_error
from stage2.commands.flags import FlagParser, Int, check_args
from stage2.errors import ConfigError, ManifestError, check_checkpoint_exists

COMMAND = "stage2-extract"  # the installed command (pyproject.toml)


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(description=command_help(__doc__, "feature_extractor.py", COMMAND),
                        formatter_class=HelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--checkpoint", help="trainer best.pt/last.pt or an official GenConViT .pth")
    model.add_argument("--model-name", help="optional check against the name the checkpoint records")
    data = parser.add_argument_group("data")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--manifest", help="CSV with a path column (label, video_id, method: used when present)")
    source.add_argument("--images", metavar="DIR",
                        help="every image below this folder (PNG, JPEG, WebP, BMP, TIFF, GIF), sorted by path")
    data.add_argument("--data-root", help="base folder for relative image paths (default: the manifest's folder)")
    data.add_argument("--skip-bad-images", action="store_true", help="leave out undecodable images with a warning")
    data.add_argument("--cache-dir", help="read images through the decoded-image cache in this folder (default: "
                                          "decode from the files)")
    out = parser.add_argument_group("outputs")
    out.add_argument("--out", help="file to write: a feature file (.npz) or a scores table (.csv: path, p_fake)")
    out.add_argument("--export", metavar="DIR", help="write the checkpoint as ONNX (+ safetensors and config.json "
                                                     "for timm experts) into DIR, checked against PyTorch")
    out.add_argument("--overwrite", action="store_true",
                     help="replace --out (or --export's, or --example's files) if they exist and the extractor "
                          "wrote them")
    ex = parser.add_argument_group("execution")
    ex.add_argument("--batch-size", type=Int(min=1), default=64, help="images per forward pass")
    ex.add_argument("--workers", type=Int(min=0), help="DataLoader worker processes (default: min(4, CPUs))")
    ex.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    ex.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 autocast on the GPU")
    example = parser.add_argument_group("example (stage three's input from the trainers' runs)")
    example.add_argument("--example", action="store_true",
                         help="extract val features of both experts from --output-root, then a stacking preview")
    example.add_argument("--output-root", default="output", help="where --example looks for the trainers' runs")
    example.add_argument("--features-dir", default="features", help="where --example writes its feature files")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, checked together: --out (the features of --manifest or --images) and --export (the checkpoint as
    ONNX and timm files) each need --checkpoint and may be given together; --example takes none of them."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    source = "--manifest" if args.manifest else "--images" if args.images else None
    given = [flag for flag in ("--checkpoint", "--manifest", "--images", "--out", "--export")
             if getattr(args, flag[2:])]
    if args.example and given:
        raise ConfigError(f"--example extracts the trainers' runs under --output-root: it takes no {given[0]}")
    if args.example:
        return args
    if bool(source) != bool(args.out):
        raise ConfigError(f"{source} needs --out FILE.npz (features) or FILE.csv (scores)" if source
                          else "--out needs --manifest CSV or --images DIR")
    if not (args.out or args.export):
        raise ConfigError("nothing to write: give --out FILE.npz or FILE.csv (with --manifest or --images), "
                          "--export DIR, or --example")
    if not args.checkpoint:
        raise ConfigError(f"{'--out' if args.out else '--export'} needs --checkpoint")
    return args


def _check_outputs_are_not_inputs(args: argparse.Namespace) -> None:
    """An output never replaces one of the command's inputs, --overwrite or not: --out or --export onto the
    checkpoint or the manifest, or an --export folder holding one of them (an export replaces its folder whole)."""
    inputs = {"--checkpoint": args.checkpoint, "--manifest": args.manifest}
    for flag, output in (("--out", args.out), ("--export", args.export)):
        if not output:
            continue
        target = Path(output).resolve()
        for source_flag, source in inputs.items():
            if not source:
                continue
            where = Path(source).resolve()
            if where == target or (flag == "--export" and where.is_relative_to(target)):
                what = "is" if where == target else "holds"
                raise ConfigError(f"{flag} {output}: {what} the {source_flag} {source}; an output never replaces an "
                                  f"input: choose another {flag}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _check_outputs_are_not_inputs(args)
    # force: a trainer run earlier in this process (a notebook, a test) must not get these messages in its train.log
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout, force=True)
    logging.getLogger("stage2").setLevel(logging.INFO)
    if args.checkpoint:
        check_checkpoint_exists(args.checkpoint)  # before torch loads
    if args.example:
        from stage2.embeddings.stacking_preview import example

        example(args.output_root, args.features_dir, overwrite=args.overwrite, device=args.device,
                batch_size=args.batch_size, workers=args.workers, amp=args.amp)
        return
    # Both targets are checked before either output is written.
    if args.out:
        _check_out(args)
    if args.export:
        from stage2.embeddings.export import check_export_target, export_checkpoint

        check_export_target(Path(args.export), args.overwrite)
    if args.out:
        from stage2.embeddings import FeatureExtractor
        from stage2.embeddings.outputs import SCORES

        extractor = FeatureExtractor(args.model_name, args.checkpoint, args.device, batch_size=args.batch_size,
                                     amp=args.amp, workers=args.workers)
        write = extractor.scores_to_file if Path(args.out).suffix.lower() == SCORES else extractor.extract_to_file
        write(args.manifest or args.images, args.out, args.data_root, skip_bad_images=args.skip_bad_images,
              cache_dir=args.cache_dir)
    if args.export:
        export_checkpoint(args.checkpoint, args.export, overwrite=args.overwrite)


def _check_out(args: argparse.Namespace) -> None:
    """--images is a folder, and --out a file the extractor may write (see stage2.embeddings.outputs), before torch
    loads."""
    if args.images and not Path(args.images).is_dir():
        what = "no such folder" if not Path(args.images).exists() else "a file, not a folder of images"
        raise ManifestError(f"--images {args.images}: {what}")
    from stage2.embeddings.outputs import check_target  # numpy: after parsing

    check_target(Path(args.out), f"--out {args.out}", args.overwrite)


def cli() -> None:
    """The `stage2-extract` command."""
    exit_on_error(main)


if __name__ == "__main__":
    cli()

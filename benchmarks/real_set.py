"""Build a labelled real/fake set for ``python -m benchmarks.learn --train-manifest ...`` from two class folders,
re-encoding both classes identically so that no file property tells them apart.

    python -m benchmarks.real_set data/real_set --real R/ --fake F/ --reencode png            # train.csv, val.csv
    python -m benchmarks.real_set data/real_set --real R2/ --fake F2/ --cross rfff --reencode png   # cross_rfff.csv
    python -m benchmarks.real_set /tmp/as_is --real R/ --fake F/                               # the files as they are

Public real/fake sets are usually two folders collected or encoded differently (LFW FaceSwap on GitHub: reals JPEG
quality 90, fakes 95), and a detector learns that difference before any forgery trace. ``--reencode png`` (or
``jpeg:Q``) decodes every image, resizes it to ``--size`` and saves it the same way whatever its class, under
OUT/images/; without it the manifests list the original files. Each manifest is audited (``stage2.data.audit``) as
it is written. The images are the data's owners': keep them out of any repository.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from stage2.data.audit import format_audit, shortcut_audit
from stage2.data.manifest import IMAGE_SUFFIXES


def class_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise SystemExit(f"error: {folder}: no {'/'.join(IMAGE_SUFFIXES)} images in it or below")
    return files


def reencode(source: Path, target: Path, size: int, encoding: str) -> None:
    """Decode, convert to RGB, resize to size x size (bilinear, antialiased) and save as `encoding` (png, jpeg:Q)."""
    image = Image.open(source).convert("RGB").resize((size, size), Image.BILINEAR)
    if encoding == "png":
        image.save(target, compress_level=6)
    else:
        image.save(target, quality=int(encoding.split(":")[1]), subsampling=2)


def _encoding(text: str) -> str:
    if text == "png" or (text.startswith("jpeg:") and text[5:].isdigit() and 1 <= int(text[5:]) <= 100):
        return text
    raise argparse.ArgumentTypeError(f"expected png or jpeg:Q with Q in 1-100, got {text!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for the manifests (and re-encoded images)")
    parser.add_argument("--real", type=Path, required=True, help="folder of real images (searched recursively)")
    parser.add_argument("--fake", type=Path, required=True, help="folder of fake images")
    parser.add_argument("--reencode", type=_encoding, help="png or jpeg:Q: save every image this way")
    parser.add_argument("--size", type=int, default=256, help="with --reencode: square side in pixels")
    parser.add_argument("--cross", metavar="NAME", help="write one manifest cross_NAME.csv instead of train/val")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of each class in val.csv")
    parser.add_argument("--limit", type=int, help="at most this many images per class (a random subset)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    rows = []
    for label, folder in ((0, args.real), (1, args.fake)):
        files = class_files(folder)
        if args.limit:
            files = [files[i] for i in sorted(rng.permutation(len(files))[:args.limit])]
        val = set(rng.permutation(len(files))[:round(len(files) * args.val_fraction)].tolist())
        rows += [(f, label, "val" if i in val else "train") for i, f in enumerate(files)]
    frame = pd.DataFrame(rows, columns=["source", "label", "split"])
    if args.reencode:
        folder = args.out / "images" / (args.cross or "set")
        folder.mkdir(parents=True, exist_ok=True)
        suffix = ".png" if args.reencode == "png" else ".jpg"
        frame["path"] = [str(folder / f"{'fake' if lab else 'real'}_{i:06d}{suffix}")
                         for i, lab in enumerate(frame["label"])]
        for source, target in zip(frame["source"], frame["path"]):
            reencode(source, Path(target), args.size, args.reencode)
    else:
        frame["path"] = frame["source"].map(lambda p: str(p.resolve()))
    args.out.mkdir(parents=True, exist_ok=True)
    splits = {f"cross_{args.cross}": frame} if args.cross else {s: frame[frame["split"] == s] for s in ("train", "val")}
    for name, part in splits.items():
        part[["path", "label"]].to_csv(args.out / f"{name}.csv", index=False)
        print(f"wrote {args.out / f'{name}.csv'}: {int((part['label'] == 0).sum())} real, "
              f"{int(part['label'].sum())} fake")
    print(format_audit(shortcut_audit({name: part for name, part in splits.items()}, workers=1)))


if __name__ == "__main__":
    main()

"""Build a labelled real/fake set for ``python -m benchmarks.learn --train-manifest ...`` from two class folders,
re-encoding both classes identically so that no file property tells them apart.

    python -m benchmarks.real_set data/real/composites --preset composites --repo faces-fake-vs-real
    python -m benchmarks.real_set data/real/lfw_faceswap --preset lfw_faceswap --repo faces-fake-vs-real
    python -m benchmarks.real_set data/real_set --real R/ --fake F/ --reencode png            # train.csv, val.csv
    python -m benchmarks.real_set data/real_set --real R2/ --fake F2/ --cross rfff --reencode png   # cross_rfff.csv
    python -m benchmarks.real_set /tmp/as_is --real R/ --fake F/                               # the files as they are

Public real/fake sets are usually two folders collected or encoded differently (LFW FaceSwap on GitHub: reals JPEG
quality 90, fakes 95), and a detector learns that difference before any forgery trace. ``--reencode png`` (or
``jpeg:Q``) decodes every image, resizes it to ``--size`` (Lanczos) and saves it the same way whatever its class
(JPEG: baseline, 4:2:0), under OUT/images/; without it the manifests list the original files. Every drawn image is
decoded first (a file training could not read ends the run, naming it, before anything is written), OUT is left
out of the folders' scan (it may lie inside one), and manifests already in OUT are replaced only with
``--overwrite``. Each manifest is audited (``stage2.data.audit``) as the trainer reads it, once written.

``--preset`` builds one of the two sets of the real-face protocol (BENCHMARKS.md, "Real faces") from a checkout of
github.com/Rees451/faces-fake-vs-real (``--repo``), the same way every time: its folders, its split, a fixed draw
(``--seed``), JPEG quality 90 at 256px. The images are the data's owners': keep them out of any repository
(``data/`` is git-ignored).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from benchmarks.arguments import fraction, positive_int
from stage2.commands.cli import HelpFormatter
from stage2.data.audit import format_audit, shortcut_audit
from stage2.data.decode import decode_image
from stage2.data.manifest import IMAGE_SUFFIXES, read_manifest
from stage2.errors import ImageDecodeError


@dataclass(frozen=True)
class Preset:
    """A set of the real-face protocol: per split, the (real, fake) folders of the repository and how many images
    per class to draw from them (None: all); a split named "all" is divided by ``val_fraction``."""

    folders: dict[str, tuple[str, str]]
    per_class: dict[str, int | None]
    val_fraction: float = 0.0


PRESETS = {
    # "Real and Fake Face Detection" (Kaggle, CIPLAB): 1,081 real photos, 960 with photoshopped eyes, nose or mouth,
    # 600x600; no split and no source ids, so a stratified 70/30 draw: 1,429 train / 612 val.
    "composites": Preset({"all": ("data/raw/real_and_fake_face/real", "data/raw/real_and_fake_face/fake")},
                         {"all": None}, val_fraction=0.3),
    # LFW faces and FaceSwap swaps of them, 250x250, from the repository's own train/val split: 1,000 per class from
    # its train part and 500 per class from its val part.
    "lfw_faceswap": Preset({split: (f"data/processed/LFW_faceswap_split/{split}/real",
                                    f"data/processed/LFW_faceswap_split/{split}/fake") for split in ("train", "val")},
                           {"train": 1000, "val": 500}),
}
PRESET_ENCODING, PRESET_SIZE = "jpeg:90", 256
VAL_FRACTION = 0.2


def class_files(folder: Path, out: Path) -> list[Path]:
    """The images in `folder` or below, but none under `out`: a set written inside its own input folder would
    otherwise list its re-encoded images as that folder's class on the next run."""
    if not folder.is_dir():
        raise SystemExit(f"error: {folder}: no such folder")
    own = out.resolve()
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not p.resolve().is_relative_to(own))
    if not files:
        raise SystemExit(f"error: {folder}: no {'/'.join(IMAGE_SUFFIXES)} images in it or below")
    return files


def check_decodes(files: list[Path]) -> None:
    """Decode every file as training will (``stage2.data.decode``); refuse in one line, naming the first, if any
    fails: listed, it would stop a training run mid-epoch; re-encoded, this one midway through the set."""
    broken = []
    for path in files:
        try:
            decode_image(str(path))
        except ImageDecodeError as err:
            broken.append(err)
    if broken:
        raise SystemExit(f"error: {len(broken)} of {len(files)} images cannot be decoded (first: {broken[0]}): "
                         "remove them from the folders")


def reencode(source: Path, target: Path, size: int, encoding: str) -> None:
    """Decode, convert to RGB, resize to size x size (Lanczos), save as `encoding` (png, or jpeg:Q baseline 4:2:0)."""
    with Image.open(source) as image:
        image = image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    if encoding == "png":
        image.save(target, compress_level=6)
    else:
        image.save(target, quality=int(encoding.split(":")[1]), subsampling=2, progressive=False)


def draw(files: list[Path], n: int | None, rng: np.random.Generator) -> list[Path]:
    """`n` of `files` at random (all of them when n is None), in file order."""
    if n is None or n >= len(files):
        return files
    return [files[i] for i in sorted(rng.permutation(len(files))[:n])]


def split_rows(real: Path, fake: Path, val_fraction: float, limit: int | None, rng: np.random.Generator, out: Path
               ) -> list[tuple[Path, int, str]]:
    """(file, label, split) of both class folders (less anything under `out`), each class drawn down to `limit`
    and split stratified."""
    real_files, fake_files = class_files(real, out), class_files(fake, out)
    overlap = {p.resolve() for p in real_files} & {p.resolve() for p in fake_files}
    if overlap:
        raise SystemExit(f"error: --real {real} and --fake {fake} share {len(overlap)} images (e.g. "
                         f"{sorted(overlap)[0]}): one folder inside the other would label them both ways")
    rows = []
    for label, files in ((0, real_files), (1, fake_files)):
        files = draw(files, limit, rng)
        val = set(rng.permutation(len(files))[:round(len(files) * val_fraction)].tolist())
        rows += [(f, label, "val" if i in val else "train") for i, f in enumerate(files)]
    return rows


def preset_rows(name: str, repo: Path, rng: np.random.Generator, out: Path) -> list[tuple[Path, int, str]]:
    preset = PRESETS[name]
    rows = []
    for split, (real, fake) in preset.folders.items():
        if split == "all":
            rows += split_rows(repo / real, repo / fake, preset.val_fraction, preset.per_class[split], rng, out)
            continue
        for label, folder in ((0, real), (1, fake)):
            rows += [(f, label, split) for f in draw(class_files(repo / folder, out), preset.per_class[split], rng)]
    return rows


def write_set(rows: list[tuple[Path, int, str]], out: Path, encoding: str | None, size: int, cross: str | None,
              overwrite: bool = False) -> dict[str, Path]:
    """Re-encode (or list) the rows' images and write the manifests; returns their paths by name. Nothing is
    written when a manifest exists (without `overwrite`), a split lacks a class or an image does not decode."""
    frame = pd.DataFrame(rows, columns=["source", "label", "split"])
    names = [f"cross_{cross}"] if cross else ["train", "val"]
    existing = [out / f"{name}.csv" for name in names if (out / f"{name}.csv").exists()]
    if existing and not overwrite:
        raise SystemExit(f"error: {existing[0]} exists: give --overwrite to replace it")
    folder = Path("images") / (cross or "set")  # relative to the manifests: the set can move as a whole
    if encoding:
        suffix = ".png" if encoding == "png" else ".jpg"
        frame["path"] = [str(folder / f"{'fake' if lab else 'real'}_{i:06d}{suffix}")
                         for i, lab in enumerate(frame["label"])]
    else:
        frame["path"] = frame["source"].map(lambda p: str(p.resolve()))
    splits = {names[0]: frame} if cross else {s: frame[frame["split"] == s] for s in names}
    for name, part in splits.items():
        if part.empty or part["label"].nunique() < 2:
            raise SystemExit(f"error: {name}.csv would hold {len(part)} images of {part['label'].nunique()} "
                             "class(es): check --val-fraction and the folders")
    check_decodes(list(frame["source"]))
    if encoding:
        (out / folder).mkdir(parents=True, exist_ok=True)
        for source, target in zip(frame["source"], frame["path"]):
            reencode(source, out / target, size, encoding)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in splits.items():
        part[["path", "label"]].to_csv(out / f"{name}.csv", index=False)
        print(f"wrote {out / f'{name}.csv'}: {int((part['label'] == 0).sum())} real, {int(part['label'].sum())} fake")
    return {name: out / f"{name}.csv" for name in names}


def _encoding(text: str) -> str:
    if text == "png" or (text.startswith("jpeg:") and text[5:].isdigit() and 1 <= int(text[5:]) <= 100):
        return text
    raise argparse.ArgumentTypeError(f"expected png or jpeg:Q with Q in 1-100, got {text!r}")


def _cross_name(text: str) -> str:
    if not text or not all(c.isalnum() or c in "_-" for c in text):
        raise argparse.ArgumentTypeError(f"expected a name of letters, digits, _ and -, got {text!r}")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("out", type=Path, help="folder for the manifests (and re-encoded images)")
    parser.add_argument("--preset", choices=PRESETS,
                        help="one of the real-face protocol's sets, from --repo, saved as JPEG quality 90 at --size")
    parser.add_argument("--repo", type=Path, help="with --preset: a checkout of Rees451/faces-fake-vs-real")
    parser.add_argument("--real", type=Path, help="folder of real images (searched recursively)")
    parser.add_argument("--fake", type=Path, help="folder of fake images")
    parser.add_argument("--reencode", type=_encoding,
                        help="png or jpeg:Q: save every image this way (default: list the files as they are)")
    parser.add_argument("--size", type=positive_int, default=PRESET_SIZE,
                        help="with --reencode: square side in pixels")
    parser.add_argument("--cross", type=_cross_name, metavar="NAME",
                        help="write one manifest cross_NAME.csv instead of train/val")
    parser.add_argument("--val-fraction", type=fraction,
                        help=f"share of each class in val.csv (default {VAL_FRACTION})")
    parser.add_argument("--limit", type=positive_int, help="at most this many images per class (a random subset)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws and the split")
    parser.add_argument("--overwrite", action="store_true", help="replace the manifests OUT already holds")
    args = parser.parse_args(argv)
    if args.preset:
        if args.repo is None:
            parser.error("--preset needs --repo (a checkout of Rees451/faces-fake-vs-real)")
        given = [flag for flag, value in (("--real", args.real), ("--fake", args.fake), ("--cross", args.cross),
                                          ("--limit", args.limit), ("--reencode", args.reencode),
                                          ("--val-fraction", args.val_fraction)) if value]
        if given:
            parser.error(f"--preset sets its own folders, split and encoding: drop {', '.join(given)}")
    elif args.real is None or args.fake is None:
        parser.error("give --real and --fake, or --preset and --repo")
    elif args.repo is not None:
        parser.error("--repo: only with --preset")
    elif args.cross and args.val_fraction:
        parser.error("--val-fraction: not with --cross (a cross set is one manifest, not split)")
    args.val_fraction = args.val_fraction or VAL_FRACTION
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    if args.preset:
        rows = preset_rows(args.preset, args.repo, rng, args.out)
        written = write_set(rows, args.out, PRESET_ENCODING, args.size, None, args.overwrite)
    else:
        rows = split_rows(args.real, args.fake, 0.0 if args.cross else args.val_fraction, args.limit, rng, args.out)
        written = write_set(rows, args.out, args.reencode, args.size, args.cross, args.overwrite)
    # read back as training reads them: relative paths resolve against the manifest's folder, not this one
    print(format_audit(shortcut_audit({name: read_manifest(path) for name, path in written.items()}, workers=1)))


if __name__ == "__main__":
    main()

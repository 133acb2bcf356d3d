"""Calibrated P(fake) of every image below a folder (symlinked folders followed), from a
`feature_extractor.py --export` folder, with onnxruntime, numpy and PIL only (no torch, no repository):

    python examples/onnx_predict.py exported/effnet crops/ > scores.csv

Each image is prepared as the export's input contract says (README, "ONNX input contract"), as `predict` reads it.
"""

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image, ImageOps

# What --images reads (stage2.data.manifest.IMAGE_SUFFIXES; this file runs without the package)
SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
USAGE = "usage: python examples/onnx_predict.py EXPORT_DIR IMAGE_FOLDER > scores.csv"


def image_files(folder: Path) -> list[str]:
    """The image files (SUFFIXES) below `folder`, sorted, through symlinked folders; a folder reached twice (a link
    loop) is read once."""
    seen, found = set(), []
    for root, subfolders, files in os.walk(folder, followlinks=True):
        stat = os.stat(root)
        if (stat.st_dev, stat.st_ino) in seen:
            subfolders.clear()
            continue
        seen.add((stat.st_dev, stat.st_ino))
        subfolders.sort()  # the first path to a shared folder is the first in sorted order, as predict reads it
        found += [os.path.join(root, name) for name in files if name.lower().endswith(SUFFIXES)]
    return sorted(found)


def pixels(path: str, size: int) -> np.ndarray:
    """The input contract: upright by EXIF, RGB (16-bit samples scaled to 8 bits), the whole image squashed to S x S
    (no crop) with antialiased bilinear (PIL's bilinear antialiases when it shrinks), float32 [1, 3, S, S] in
    [0, 1]; mean/std normalisation is inside the graph."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I"):  # 16-bit grey: convert("RGB") clips it at 255; its top 8 bits, as predict
            image = Image.fromarray((np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8))
        image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1)[None] / 255


def main(argv: list[str]) -> int:
    """Write `path,p_fake` rows (CSV, quoted where a path needs it) to stdout; exit 2 on bad arguments."""
    if len(argv) != 2:
        print(USAGE, file=sys.stderr)
        return 2
    export, folder = Path(argv[0]), Path(argv[1])
    if not (export / "export.json").is_file():
        print(f"error: {export}: not an export folder (no export.json)", file=sys.stderr)
        return 2
    if not folder.is_dir():
        print(f"error: {folder}: {'a file, not a folder' if folder.exists() else 'no such folder'}", file=sys.stderr)
        return 2
    meta = json.loads((export / "export.json").read_text())  # input_size, temperature, ...
    session = onnxruntime.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
    rows = csv.writer(sys.stdout, lineterminator="\n")
    rows.writerow(["path", "p_fake"])
    for path in image_files(folder):
        _, fake_logit = session.run(["embedding", "fake_logit"], {"pixels": pixels(path, meta["input_size"][-1])})
        rows.writerow([path, f"{1 / (1 + np.exp(-fake_logit[0] / meta['temperature'])):.6f}"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Benchmark inputs: 256x256 PNG face crops compressed like real ones, and manifests over them."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
from PIL import Image

from stage2.data.demo import make_demo_dataset

SIZE = 256


def crop_pngs(work: Path, n: int) -> pd.DataFrame:
    """`n` synthetic 256x256 crops (path, label), saved with PIL's default PNG compression.

    The demo generator writes uncompressed PNGs (fast to write), which decode several times faster than
    the zlib-compressed crops a face detector saves; re-encoding them keeps the decode cost realistic.
    """
    train, val = make_demo_dataset(work / "demo", n_videos=max(4, math.ceil(n / 3)), size=SIZE)
    source = pd.concat([pd.read_csv(train), pd.read_csv(val)]).iloc[:n]
    if len(source) < n:
        raise RuntimeError(f"demo dataset has {len(source)} images, {n} needed")
    folder = work / f"png_{n}"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (rel, label) in enumerate(zip(source["path"], source["label"])):
        target = folder / f"{i:05d}.png"
        if not target.is_file():
            with Image.open(work / "demo" / rel) as image:
                image.save(target.with_suffix(".tmp.png"))
            os.replace(target.with_suffix(".tmp.png"), target)
        rows.append((str(target), int(label)))
    return pd.DataFrame(rows, columns=["path", "label"])


def write_manifests(frame: pd.DataFrame, folder: Path, n_train: int) -> tuple[Path, Path]:
    """train.csv with `n_train` rows (cycling through `frame` via hard links: the cache and the manifest
    checks key by path, the disk holds each file once) and a 4-image val.csv with both classes."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_train):
        source = frame["path"].iloc[i % len(frame)]
        if i < len(frame):
            paths.append(source)
            continue
        link = folder / "links" / f"{i:06d}.png"
        if not link.exists():
            link.parent.mkdir(exist_ok=True)
            os.link(source, link)
        paths.append(str(link))
    labels = [int(frame["label"].iloc[i % len(frame)]) for i in range(n_train)]
    train = folder / "train.csv"
    pd.DataFrame({"path": paths, "label": labels}).to_csv(train, index=False)
    val_rows = pd.concat([frame[frame["label"] == c].head(2) for c in (0, 1)])
    val = folder / "val.csv"
    val_rows.to_csv(val, index=False)
    return train, val

"""Shortcut audit: can a file's header alone tell real from fake?

Public real/fake face sets often let a detector cheat: in the LFW FaceSwap copy on GitHub the reals are JPEG
quality 90 and the fakes quality 95 (the quality alone separates them, AUC 1.00); other sets have PNG reals and
JPEG fakes. A model learns such a cue before any forgery trace, and scores well on a val set built the same way.
This module reads, per image, only what its header says (PIL's ``Image.open`` parses the header and decodes no
pixel) and scores each feature alone as a real-vs-fake classifier:

| feature | value |
| --- | --- |
| ``format`` | the container (JPEG, PNG, WEBP, ...); ``unreadable`` when the header is not an image's |
| ``jpeg_quality`` | JPEG only: the IJG quality (1-100) whose scaled luminance table is nearest the file's |
| ``chroma_subsampling`` | JPEG only: 4:4:4, 4:2:2, 4:2:0 or other |
| ``progressive`` | JPEG only: 1 for a progressive file |
| ``width``, ``height`` | pixels |
| ``bytes_per_pixel`` | file size / (width x height): how hard the file was compressed |

The AUC of a numeric feature is that of its raw value (0.5: no information; near 0 or 1: a shortcut, either
way round); a categorical one scores each category by its share of fakes, so its AUC is at least 0.5. A feature
only some files have (the JPEG ones) is scored on those, when both classes have it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, JpegImagePlugin
from sklearn.metrics import roc_auc_score

from stage2.atomic import atomic_write
from stage2.data.checks import SAMPLE, content_key, recall, remember

log = logging.getLogger(__name__)

AUDIT_FILE = "shortcut_audit.csv"
FEATURES = ("format", "jpeg_quality", "chroma_subsampling", "progressive", "width", "height", "bytes_per_pixel")
CATEGORICAL = ("format", "chroma_subsampling")
WARN_AUC = 0.65  # a feature at AUC >= this (or <= 1 - this) is named in a warning
AUDIT_COLUMNS = ["set", "feature", "auc", "n_real", "n_fake", "real", "fake", "shortcut"]
_SUBSAMPLING = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}  # PIL's get_sampling codes; -1: anything else
_PARALLEL_FROM = 5000  # fewer files than this are read in-process: a pool costs more than it saves

# The IJG (libjpeg) base luminance table, ITU T.81 Annex K, in natural (row-major) order, as PIL reports tables.
_IJG_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=np.int64)


def _ijg_tables() -> np.ndarray:
    """[100, 64]: the luminance table libjpeg writes at quality 1..100 (its jpeg_quality_scaling, baseline)."""
    quality = np.arange(1, 101)
    scale = np.where(quality < 50, 5000 // quality, 200 - 2 * quality)
    return np.clip((_IJG_LUMA[None, :] * scale[:, None] + 50) // 100, 1, 255)


_TABLES = _ijg_tables()


def jpeg_quality(quantization: Mapping[int, Sequence[int]]) -> float:
    """The IJG quality whose luminance table is nearest (least absolute difference) the file's first table.

    Exact for files written by libjpeg and what wraps it (PIL, OpenCV, ImageMagick, most cameras' software);
    for other encoders' tables it is the IJG quality of similar strength. NaN without tables.
    """
    if not quantization:
        return math.nan
    table = np.asarray(quantization[min(quantization)], dtype=np.int64)
    if table.size != 64:
        return math.nan
    return float(np.abs(_TABLES - table[None, :]).sum(axis=1).argmin() + 1)


def header_features(path: str) -> dict[str, object]:
    """The audit's features of one file, from its header; every value NaN (format ``unreadable``) when PIL
    cannot identify it (a broken file is the decoder's business, not the audit's)."""
    features: dict[str, object] = dict.fromkeys(FEATURES, math.nan)
    try:
        size = os.path.getsize(path)
        with Image.open(path) as image:  # parses the header; no pixel is decoded
            width, height = image.size
            features.update(format=image.format or "unknown", width=float(width), height=float(height),
                            bytes_per_pixel=size / max(width * height, 1))
            if image.format == "JPEG":
                features.update(
                    jpeg_quality=jpeg_quality(getattr(image, "quantization", None) or {}),
                    chroma_subsampling=_SUBSAMPLING.get(JpegImagePlugin.get_sampling(image), "other"),
                    progressive=float(bool(image.info.get("progressive") or image.info.get("progression"))))
    except Exception:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...) on bad headers
        features["format"] = "unreadable"
    return features


def read_headers(paths: Sequence[str], workers: int = 1) -> pd.DataFrame:
    """:func:`header_features` of every path, one row each, in order (``workers`` processes for large lists)."""
    if workers > 1 and len(paths) >= _PARALLEL_FROM:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            rows = list(pool.map(header_features, paths, chunksize=512))
    else:
        rows = [header_features(p) for p in paths]
    return pd.DataFrame(rows, columns=list(FEATURES), index=pd.Index(paths, name="path"))


def feature_auc(values: pd.Series, labels: np.ndarray, categorical: bool) -> float:
    """AUC of one feature alone (rows where it is defined); NaN unless both classes have it."""
    defined = values.notna().to_numpy()
    y = labels[defined]
    if len(np.unique(y)) < 2:
        return math.nan
    x = values[defined]
    if categorical:  # score a category by its share of fakes: the best a classifier of it alone can do
        x = x.map(pd.Series(y, index=x.index).groupby(x).mean())
    return float(roc_auc_score(y, x.astype(float).to_numpy()))


def _typical(values: pd.Series, categorical: bool) -> str:
    values = values.dropna()
    if values.empty:
        return ""
    if categorical:
        top = values.value_counts(normalize=True)
        return f"{top.index[0]} {top.iloc[0]:.0%}"
    return f"{values.median():.4g}"


def audit_table(features: pd.DataFrame, labels: np.ndarray, name: str) -> pd.DataFrame:
    """One row per feature: its AUC alone, the class sizes, each class's typical value, and the shortcut flag."""
    rows = []
    for feature in FEATURES:
        categorical = feature in CATEGORICAL
        values = features[feature].reset_index(drop=True)
        auc = feature_auc(values, labels, categorical)
        rows.append({"set": name, "feature": feature, "auc": auc,
                     "n_real": int((values.notna() & (labels == 0)).sum()),
                     "n_fake": int((values.notna() & (labels == 1)).sum()),
                     "real": _typical(values[labels == 0], categorical),
                     "fake": _typical(values[labels == 1], categorical),
                     "shortcut": bool(auc >= WARN_AUC or auc <= 1 - WARN_AUC)})
    return pd.DataFrame(rows, columns=AUDIT_COLUMNS)


def shortcut_audit(frames: Mapping[str, pd.DataFrame], workers: int = 1) -> pd.DataFrame:
    """Audit each named manifest frame (``path``, ``label``); every file's header is read once, and none of a frame
    whose table a run of the same rows made already (stage2.data.checks: trusted on a sample of its files; their
    names are in the table's ``attrs["remembered"]``)."""
    rows = {name: (frame["path"].tolist(), frame["label"].to_numpy()) for name, frame in frames.items()}
    keys = {name: content_key(paths, labels) for name, (paths, labels) in rows.items()}
    tables = {name: _recalled(keys[name], rows[name][0], name) for name in frames}
    remembered = [name for name, table in tables.items() if table is not None]
    todo = [name for name in frames if name not in remembered]
    if todo:
        features = read_headers(list(dict.fromkeys(p for name in todo for p in rows[name][0])), workers)
        for name in todo:
            paths, labels = rows[name]
            tables[name] = audit_table(features.loc[paths], labels, name)
            remember("audit", keys[name], paths, tables[name].drop(columns="set").to_dict("records"))
    table = pd.concat(tables.values(), ignore_index=True)
    table.attrs["remembered"] = remembered
    return table


def _recalled(key: str, paths: list[str], name: str) -> pd.DataFrame | None:
    """The audit table a run of the same rows made, as set `name`; None if there is none to trust."""
    records = recall("audit", key, paths)
    if not isinstance(records, list):
        return None
    table = pd.DataFrame(records).assign(set=name, auc=lambda t: t["auc"].astype(float))
    return table[AUDIT_COLUMNS]


def warn_shortcuts(table: pd.DataFrame) -> list[str]:
    """Log one warning line per shortcut feature of ``table``; returns the lines."""
    lines = [f"shortcut audit: {r.feature} alone separates real from fake in {r.set} (AUC {r.auc:.3f}; real "
             f"{r.real}, fake {r.fake}): a model can learn this instead of the forgery; re-encode both classes "
             "identically (README: Shortcut audit)" for r in table.itertuples() if r.shortcut]
    for line in lines:
        log.warning(line)
    return lines


def format_audit(table: pd.DataFrame) -> str:
    """The audit as a plain-text table, one block per set."""
    shown = table.assign(auc=table["auc"].map(lambda a: "n/a" if math.isnan(a) else f"{a:.3f}"),
                         shortcut=table["shortcut"].map({True: "<- SHORTCUT", False: ""}))
    return shown.to_string(index=False)


def run_audit(frames: Mapping[str, pd.DataFrame], out_dir: Path, workers: int = 1, *, show: bool = True
              ) -> pd.DataFrame:
    """Audit the named frames: log the table and a warning line per shortcut (unless `show` is False: a second run
    of one command on the same sets, GenConViT's VAE after its ED, says it once), write
    ``out_dir/shortcut_audit.csv``."""
    table = shortcut_audit(frames, workers)
    for name in table.attrs["remembered"]:
        log.info("shortcut audit of %s: the table a run of the same %d rows made (a sample of %d files checked now)",
                 name, len(frames[name]), min(len(frames[name]), SAMPLE))
    if show:
        log.info("shortcut audit (file headers only; AUC of each feature alone, real vs fake):\n%s",
                 format_audit(table))
        warn_shortcuts(table)
    else:
        log.info("shortcut audit of the same sets as the run before: %s", Path(out_dir) / AUDIT_FILE)
    atomic_write(Path(out_dir) / AUDIT_FILE, lambda f: f.write(table.to_csv(index=False)), binary=False)
    return table

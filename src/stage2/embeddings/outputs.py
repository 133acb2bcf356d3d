"""What the extractor writes, chosen by the file's suffix, and what it may replace.

``.npz``: a feature file (:mod:`stage2.embeddings.store`). ``.csv``: a scores table, one row per image: ``path``,
``p_fake`` (calibrated), then ``label`` when the source is labelled, and ``video_id`` with ``video_p_fake`` (the mean
P(fake) of the video's images) when it names videos. Any other suffix is refused, and an existing file is replaced
(with --overwrite) only when it is one of these two that the extractor wrote: never a checkpoint, a manifest or
anything else given the same name by mistake. Torch- and pandas-free at import: the command checks its targets
before loading either.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

from stage2.atomic import atomic_write
from stage2.embeddings.store import is_feature_file
from stage2.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

FEATURES, SCORES = ".npz", ".csv"
KINDS = {FEATURES: "feature file", SCORES: "scores table"}
# Every header a scores table can have: path and p_fake, then what the source gives.
SCORES_HEADERS = tuple(("path", "p_fake", *label, *video) for label in ((), ("label",))
                       for video in ((), ("video_id", "video_p_fake")))


def scores_table(predicted: pd.DataFrame) -> pd.DataFrame:
    """:meth:`~stage2.embeddings.FeatureExtractor.predict`'s frame as a scores table (see the module's docstring);
    rows without a video_id get no video_p_fake."""
    columns = ["path", "p_fake"]
    if (predicted["label"] >= 0).any():
        columns.append("label")
    table = predicted[columns].copy()
    if "video_id" in predicted and (predicted["video_id"] != "").any():
        videos = predicted["video_id"].where(predicted["video_id"] != "")
        table["video_id"] = predicted["video_id"]
        table["video_p_fake"] = predicted["p_fake"].groupby(videos).transform("mean")
    return table


def write_scores(table: pd.DataFrame, path: str | Path) -> None:
    """Write a scores table atomically (the previous file, if any, stays whole until the new one is complete)."""
    atomic_write(path, lambda f: table.to_csv(f, index=False), binary=False)


def is_scores_table(path: Path) -> bool:
    """Whether `path` is a CSV whose header is a scores table's."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader([f.readline(1 << 16)]), [])
    except (OSError, UnicodeDecodeError):
        return False
    return tuple(header) in SCORES_HEADERS


def check_target(path: Path, name: str, overwrite: bool) -> None:
    """Refuse to write `path` (what `name` says in a message, e.g. ``--out x.csv``) unless its suffix is one the
    extractor writes and, if it exists, --overwrite is given and it is a file of that kind the extractor wrote."""
    if path.is_dir():
        raise ConfigError(f"{name}: a folder; give the file's name (e.g. {path / ('features' + FEATURES)})")
    kind = KINDS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"{name}: the extractor writes a feature file (.npz) or a scores table (.csv), not "
                          f"{path.suffix or 'a file without a suffix'}")
    if not path.exists():
        return
    if not overwrite:
        raise ConfigError(f"{name}: exists; pass --overwrite to replace it")
    if not (is_feature_file(path) if kind == KINDS[FEATURES] else is_scores_table(path)):
        raise ConfigError(f"{name}: exists and is not a {kind} the extractor wrote; --overwrite replaces only those "
                          "(remove it yourself, or choose another name)")

"""CSV manifests: one row per face crop with its image path and real/fake label.

Required columns: an image path column (``path``, or ``filepath``/``image_path``/``image``/``file``) and, for
training and evaluation, ``label`` (0/1 or real/fake; 1 = fake). Inference reads manifests without it: every
row's label is then ``UNLABELED`` (-1). Optional: ``video_id`` (enables video-level metrics), ``method``
(manipulation method) and ``source_id`` (the identity or original video a fake was made from, a real's own; a
train/val split that puts one source on both sides is refused: :func:`check_source_leak`). Headers match
case-insensitively; other columns (an empty trailing one, as Excel's ``x.png,1,`` rows give, included) are ignored.
Path cells are taken exactly as written (a file name may begin with a space); other cells are stripped. Every
problem is reported as a one-line :class:`ManifestError` naming the manifest and, where it applies, the CSV line.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stage2.data.checks import content_key, recall, remember
from stage2.errors import ManifestError, first_line

PATH_COLUMNS = ("path", "filepath", "image_path", "image", "file")  # in order of preference
OPTIONAL_COLUMNS = ("video_id", "method", "source_id")
LABEL_NAMES = {0: "real", 1: "fake"}
UNLABELED = -1  # the label of every row of a manifest without a label column (inference), and of --images files
# The files --images (and benchmarks.real_set) collect from a folder: every format the loaders decode for training
# (stage2.data.decode: torchvision, PIL for the rest), so a folder is read as a manifest naming it would be.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
_LABEL_WORDS = {"0": 0, "1": 1, "real": 0, "fake": 1}
_MAX_LISTED = 5
_MAX_SHOWN = 200  # characters of a cell or header quoted in an error message
_ASCII_SPACE = [c for c in range(128) if chr(c).isspace()]  # what str.strip() removes, in ASCII


def _shown(text: str) -> str:
    """`text` for an error message: cut when long (a 20 MB cell must not become a 20 MB line)."""
    return text if len(text) <= _MAX_SHOWN else f"{text[:_MAX_SHOWN]}... ({len(text):,} characters)"


def _parse_label(cell: str) -> int | None:
    """0/1 as int, float or word (real/fake, any case); None for anything else."""
    value = cell.strip().lower()
    if value == str(UNLABELED):
        return UNLABELED
    if value in _LABEL_WORDS:
        return _LABEL_WORDS[value]
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if number in (0.0, 1.0) else None


def _csv_line(row: int) -> int:
    # Header is line 1 and blank lines are kept as rows while parsing, so the row index maps to the line.
    return row + 2


def _load_csv(manifest: Path) -> tuple[pd.DataFrame, list[str]]:
    """The manifest's header (stripped, lower case) and a frame of the columns this module reads, as strings.

    Blank lines are kept as empty rows while parsing, so that row i is CSV line i + 2, then dropped. Only the
    columns read here are parsed: a header of millions of columns costs seconds, not hours.
    """
    if not manifest.is_file():
        raise ManifestError(f"{manifest}: manifest file not found")
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as file:
            header = next(csv.reader(file), [])
        if not header:
            raise ManifestError(f"{manifest}: empty file (no CSV header)")
        names = [c.strip().lower() for c in header]
        repeated = sorted(name for name, n in Counter(names).items() if n > 1 and name)
        if repeated:
            raise ManifestError(f"{manifest}: repeated column(s) {_shown(', '.join(repeated))} (headers ignore case)")
        read = {i: name for i, name in enumerate(names) if name in (*PATH_COLUMNS, "label", *OPTIONAL_COLUMNS)}
        # Positions, not names: pandas would rename repeated or empty names; index_col=False keeps a trailing comma
        # on every row from turning the first column into the index.
        frame = pd.read_csv(manifest, header=0, names=range(len(names)), usecols=list(read), index_col=False,
                            dtype=str, keep_default_na=False, skip_blank_lines=False, encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError, csv.Error, pd.errors.ParserError) as err:
        raise ManifestError(f"{manifest}: not a readable CSV file ({_shown(first_line(err))})") from None
    cells = {read[i]: frame[i].to_numpy(dtype=object) for i in frame.columns}
    stripped = {name: _stripped(values) for name, values in cells.items()}
    kept = np.zeros(len(frame), dtype=bool)
    for values in stripped.values():
        kept |= values != ""
    return pd.DataFrame({name: (cells if name in PATH_COLUMNS else stripped)[name] for name in cells})[kept], names


def _stripped(cells: np.ndarray) -> np.ndarray:
    """The cells without surrounding whitespace: `cells` itself when no cell has any, as the first and last
    characters of the cells joined show at C speed (a million cells are stripped in Python in a second; pandas' str
    methods take longer still)."""
    text = "\0" + "\0".join(cells) + "\0"
    if text.isascii():
        chars = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
        ends = np.flatnonzero(chars == 0)
        if not np.isin(np.concatenate([chars[ends[1:] - 1], chars[ends[:-1] + 1]]), _ASCII_SPACE).any():
            return cells
    return np.array([cell.strip() for cell in cells], dtype=object)


def _pick_columns(header: list[str], manifest: Path, require_labels: bool) -> str:
    path_col = next((c for c in PATH_COLUMNS if c in header), None)
    needed = (("path", path_col), ("label", "label" in header or not require_labels))
    missing = [name for name, ok in needed if not ok]
    if missing:
        raise ManifestError(
            f"{manifest}: missing column(s) {', '.join(missing)} (found: {_shown(', '.join(header))}; "
            f"path column may be named {'/'.join(PATH_COLUMNS)})"
        )
    return path_col


# What os.path.normpath or expanduser may change in a path, as seen in the "\0"-joined column: a doubled slash, a
# part that begins with "." ("." or ".."; a hidden name is caught too, and resolved the slow way), a leading "~", a
# trailing slash.
_NOT_PLAIN = ("//", "/.", "\0.", "\0~", "/\0")


def _resolve(paths: list[str], base: str) -> list[str]:
    """Each path made absolute against `base` (an absolute, normal folder) and normal, "~" expanded."""
    text = "\0" + "\0".join(paths) + "\0"
    if not any(part in text for part in _NOT_PLAIN) and "\0/" not in text:
        # Relative and plain already: joined at C speed (a million rows in 0.1 s, where normpath per row takes 3 s).
        prefix = base.rstrip("/") + "/"
        resolved = (prefix + f"\0{prefix}".join(paths)).split("\0")
        if len(resolved) == len(paths):  # else a path holds a NUL
            return resolved
    # abspath+normpath instead of Path.resolve(): keep symlinked dataset folders as the user wrote them.
    return [os.path.normpath(os.path.join(base, os.path.expanduser(p))) for p in paths]


def _check_files(paths: list[str], manifest: Path, base: str) -> None:
    """Refuse a manifest whose image files are not all there; a run of the same rows that found them all is
    trusted, on a sample of them (stage2.data.checks)."""
    key = content_key(paths)
    if recall("files", key, paths):
        return
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ManifestError(
            f"{manifest}: {len(missing)} of {len(paths)} image files not found (relative paths "
            f"resolve against {_shown(base)}; first: {', '.join(_shown(p) for p in missing[:_MAX_LISTED])})"
        )
    remember("files", key, paths, True)


def read_manifest(
    manifest: str | Path,
    data_root: str | Path | None = None,
    *,
    check_files: bool = True,
    require_both_classes: bool = False,
    require_labels: bool = True,
) -> pd.DataFrame:
    """Read and validate a manifest CSV.

    Relative image paths resolve against the manifest's folder, or ``data_root`` when given. Returns a frame
    indexed 0..N-1 with ``path`` (absolute), ``label`` (int64, 1 = fake) and ``video_id``/``method`` when the
    manifest has them (blank cells become ""); ``attrs["manifest"]`` holds the manifest path.
    """
    manifest_path = Path(manifest).expanduser()
    frame, header = _load_csv(manifest_path)
    path_col = _pick_columns(header, manifest_path, require_labels)
    if frame.empty:
        raise ManifestError(f"{manifest_path}: manifest has no data rows")

    cells = frame[path_col].to_numpy(dtype=object)
    empty = frame.index[_stripped(cells) == ""]
    if len(empty):
        raise ManifestError(f"{manifest_path} line {_csv_line(empty[0])}: empty image path ('{path_col}')")

    if "label" not in frame.columns:  # unlabeled (inference): every label is UNLABELED
        frame = frame.assign(label=str(UNLABELED))
    codes, distinct = pd.factorize(frame["label"])  # a label column holds a few distinct cells: parse each once
    labels = pd.Series(np.array([_parse_label(c) for c in distinct], dtype=float)[codes], index=frame.index)
    unknown = frame.index[labels.isna()]
    if len(unknown):
        row = unknown[0]
        raise ManifestError(
            f"{manifest_path} line {_csv_line(row)}: unknown label '{_shown(frame.at[row, 'label'])}' "
            "(expected 0/1 or real/fake)"
        )
    labels = labels.astype("int64")

    base = os.path.abspath(Path(data_root).expanduser() if data_root is not None else manifest_path.parent)
    paths = pd.Series(_resolve(cells.tolist(), base), index=frame.index, dtype=object)
    duplicated = paths[paths.duplicated(keep=False)]
    if len(duplicated):
        first = duplicated.iloc[0]
        rows = duplicated.index[duplicated == first]
        raise ManifestError(
            f"{manifest_path} lines {_csv_line(rows[0])} and {_csv_line(rows[1])}: duplicate image path {_shown(first)}"
        )

    if "video_id" in frame.columns:
        # Video-level metrics average a video's frames under one label: a video with both is a manifest error.
        named = (frame["video_id"] != "").to_numpy()
        videos, names = pd.factorize(frame["video_id"][named], sort=True)
        with_label = [np.bincount(videos[labels.to_numpy()[named] == c], minlength=len(names)) > 0 for c in (0, 1)]
        mixed = np.flatnonzero(with_label[0] & with_label[1])
        if len(mixed):
            video = names[mixed[0]]  # the first in sorted order
            rows = frame.index[frame["video_id"] == video]
            real, fake = (rows[labels[rows] == c][0] for c in (0, 1))
            first, second = sorted((real, fake))
            raise ManifestError(f"{manifest_path} lines {_csv_line(first)} and {_csv_line(second)}: video "
                                f"{_shown(repr(video))} has both real and fake frames (give each label its own "
                                "video_id; the identity or original video a fake was made from belongs in a "
                                "source_id column)")

    if require_labels and (labels == UNLABELED).any():
        row = labels.index[labels == UNLABELED][0]
        raise ManifestError(f"{manifest_path} line {_csv_line(row)}: no label (-1), but this needs labelled rows")

    if require_both_classes and labels.nunique() < 2:
        only = LABEL_NAMES[int(labels.iloc[0])]
        raise ManifestError(f"{manifest_path}: manifest has only '{only}' rows: training and AUC need real and fake "
                            "images")

    if check_files:
        _check_files(paths.tolist(), manifest_path, base)

    out = pd.DataFrame({"path": paths.to_numpy(dtype=str), "label": labels.to_numpy(dtype="int64")})
    for col in OPTIONAL_COLUMNS:
        if col in frame.columns:
            out[col] = frame[col].to_numpy(dtype=str)
    out.attrs["manifest"] = str(manifest)
    return out


def manifest_fingerprint(frame: pd.DataFrame) -> dict[str, Any]:
    """What a manifest held as read (rows, resolved paths, labels, optional columns): its row count and the
    SHA-256 of its rows (as ``frame.to_csv(index=False)`` writes them). A resume compares them: the same file name
    may hold other rows by then."""
    return {"rows": len(frame), "sha256": hashlib.sha256(_as_csv(frame).encode()).hexdigest()}


def _as_csv(frame: pd.DataFrame) -> str:
    """``frame.to_csv(index=False)``; joined at C speed (a million rows in a fraction of the second to_csv takes)
    where there are two columns or more, each of strings or integers, and no cell or name needs quoting."""
    types = pd.api.types
    if len(frame.columns) < 2 or not all(types.is_string_dtype(t) or types.is_integer_dtype(t) for t in frame.dtypes):
        return frame.to_csv(index=False)
    names = [str(c) for c in frame.columns]
    cells = [frame[c].astype(str).tolist() for c in frame.columns]
    if any(char in text for text in map("\0".join, (names, *cells)) for char in ',"\n\r'):
        return frame.to_csv(index=False)
    return "\n".join([",".join(names), *map(",".join, zip(*cells))]) + "\n"


def frame_from_images(folder: str | Path) -> pd.DataFrame:
    """Every image (IMAGE_SUFFIXES) under `folder` (recursively, through symlinked folders, sorted by path) as an
    unlabeled manifest frame."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ManifestError(f"--images {root}: not a folder")
    paths = sorted(_image_files(root))
    if not paths:
        raise ManifestError(f"--images {root}: no {'/'.join(IMAGE_SUFFIXES)} files in it or below")
    frame = pd.DataFrame({"path": paths, "label": UNLABELED})
    frame.attrs["manifest"] = str(root)
    return frame


def _image_files(root: Path) -> list[str]:
    """Image files below `root`, following symlinked folders; a folder reached twice (a link loop, or two links to
    one folder) is read once, under the first path met."""
    seen, found = set(), []
    for folder, subfolders, files in os.walk(os.path.abspath(root), followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen:
            subfolders.clear()
            continue
        seen.add((stat.st_dev, stat.st_ino))
        subfolders.sort()  # the first path to a shared folder is the first in sorted order
        found += [os.path.join(folder, name) for name in files if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
                  and os.path.isfile(os.path.join(folder, name))]
    return found


def check_source_leak(train: pd.DataFrame, val: pd.DataFrame) -> None:
    """Refuse a split that puts one ``source_id`` (an identity, or the original video fakes were made from) in both
    the train and the val manifest: val would then score faces the model has already seen. Checked when both
    frames have the column; blank cells are not a source."""
    if "source_id" not in train or "source_id" not in val:
        return
    shared = sorted(set(train["source_id"]) & set(val["source_id"]) - {""})
    if shared:
        listed = ", ".join(_shown(repr(s)) for s in shared[:_MAX_LISTED])
        listed += " ..." if len(shared) > _MAX_LISTED else ""
        raise ManifestError(f"{train.attrs.get('manifest', 'train')} and {val.attrs.get('manifest', 'val')}: "
                            f"{len(shared)} source_id(s) on both sides of the split ({listed}): frames of one "
                            "identity or original video in train and val leak it into validation; split by source_id")

"""Feature files: one uncompressed ``.npz`` per expert, written in bounded memory, and a checked join.

A feature file loads with plain ``np.load(path)`` (no pickles) and holds, row for row:
``embeddings`` float32 [N, D], ``labels`` int64 [N] (1 = fake), ``p_fake`` float32 [N], ``paths`` str [N],
``index`` int64 [N] (the manifest row), ``video_id`` / ``method`` / ``source_id`` str [N] when the manifest has
them, ``recon_error`` float32 [N] for a generative expert (GenConViT: the MSE of its reconstruction in [0, 1]
pixels, a stacking feature of its own), and 0-d ``model_name``, ``family``, ``checkpoint``, ``manifest`` and
``temperature``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stage2.atomic import naming, staging_dir
from stage2.errors import FeatureFileError

ROW_KEYS = ("embeddings", "labels", "p_fake", "paths", "index")
OPTIONAL_ROW_KEYS = ("video_id", "method", "source_id", "recon_error")
META_KEYS = ("model_name", "family", "checkpoint", "manifest", "temperature")
_COPY_BLOCK = 16 << 20  # bytes held in memory at a time while a member is copied into the zip


class NpzStreamWriter:
    """Build an uncompressed ``.npz`` from arrays appended a block of rows at a time.

    ``np.savez`` needs every array in memory at once. Here each appended array grows in its own raw
    temporary file (C-order bytes, nothing else); :meth:`close` then writes each ``.npy`` member as its header
    followed by those bytes copied in fixed-size blocks, so memory stays flat however many rows there are.
    The file appears atomically at ``path`` on :meth:`close`; leaving ``with`` without it leaves nothing behind,
    and what a killed writer left (a hidden folder beside ``path``) is removed by the next writer of ``path``. An
    OSError (full disk, read-only folder) names ``path``, not the temporary files.

    A column's dtype is fixed by ``dtypes`` or by its first block; later blocks are cast to it and must cast
    safely (a longer string than the declared width is an error, not a silent truncation).
    """

    def __init__(self, path: str | os.PathLike, dtypes: Mapping[str, np.dtype | str] | None = None) -> None:
        self.path = Path(path)
        self._columns: dict[str, _Column] = {}
        with naming(self.path):
            self._tmp = staging_dir(self.path)
        self._dtypes = {name: np.dtype(dtype) for name, dtype in (dtypes or {}).items()}

    @property
    def rows(self) -> int:
        return max((column.rows for column in self._columns.values()), default=0)

    def append(self, **blocks: np.ndarray) -> None:
        with naming(self.path):
            self._append(blocks)

    def _append(self, blocks: Mapping[str, np.ndarray]) -> None:
        for name, block in blocks.items():
            block = np.asarray(block)
            column = self._columns.get(name)
            if column is None:
                dtype = self._dtypes.get(name, block.dtype)
                column = self._columns[name] = _Column(self._tmp / f"{name}.bin", dtype, block.shape[1:])
            column.write(block)

    def close(self, scalars: Mapping[str, Any] | None = None) -> Path:
        """Write the ``.npz`` (appended columns, then ``scalars`` as 0-d arrays) and remove the temporary files."""
        try:
            self._write(scalars)
        finally:
            self.discard()
        return self.path

    def _write(self, scalars: Mapping[str, Any] | None) -> None:
        with naming(self.path):
            lengths = {name: column.rows for name, column in self._columns.items()}
            if len(set(lengths.values())) > 1:
                raise ValueError(f"{self.path}: appended columns differ in length: {lengths}")
            partial = self._tmp / self.path.name
            with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                for name, column in self._columns.items():
                    column.close()
                    with archive.open(f"{name}.npy", "w", force_zip64=True) as member, open(column.file, "rb") as raw:
                        _write_npy_header(member, column.dtype, (column.rows, *column.row_shape))
                        shutil.copyfileobj(raw, member, _COPY_BLOCK)
                for name, value in (scalars or {}).items():
                    with archive.open(f"{name}.npy", "w") as member:
                        np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)
            os.replace(partial, self.path)

    def discard(self) -> None:
        for column in self._columns.values():
            # Closing flushes what is buffered: on a full disk that fails again, and must not replace the first
            # error (which names the file) while the files are being thrown away anyway.
            with contextlib.suppress(OSError):
                column.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> NpzStreamWriter:
        return self

    def __exit__(self, *_: object) -> None:
        self.discard()


class _Column:
    def __init__(self, file: Path, dtype: np.dtype, row_shape: tuple[int, ...]) -> None:
        self.file, self.dtype, self.row_shape = file, dtype, row_shape
        self.rows = 0
        self._handle = open(file, "wb")  # noqa: SIM115 (closed in close(), after the last append)

    def write(self, block: np.ndarray) -> None:
        if block.shape[1:] != self.row_shape:
            raise ValueError(f"column {self.file.stem}: block of shape {block.shape} after rows of {self.row_shape}")
        self._handle.write(np.ascontiguousarray(block.astype(self.dtype, casting="safe", copy=False)).tobytes())
        self.rows += len(block)

    def close(self) -> None:
        self._handle.close()


def _write_npy_header(file: Any, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(file, header)


@dataclass
class FeatureSet:
    """The contents of one feature file; ``video_id`` / ``method`` / ``source_id`` are None when the manifest lacked
    them, ``recon_error`` when the expert does not reconstruct its input."""

    embeddings: np.ndarray
    labels: np.ndarray
    p_fake: np.ndarray
    paths: np.ndarray
    index: np.ndarray
    model_name: str
    family: str
    checkpoint: str
    manifest: str
    temperature: float
    video_id: np.ndarray | None = None
    method: np.ndarray | None = None
    source_id: np.ndarray | None = None
    recon_error: np.ndarray | None = None
    source: str = ""


def load_features(path: str | os.PathLike) -> FeatureSet:
    """Read a feature file written by :meth:`stage2.embeddings.FeatureExtractor.extract_to_file`."""
    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(f"feature file {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise FeatureFileError(f"feature file {path}: cannot be read ({type(err).__name__}: {err})") from None
    missing = [key for key in (*ROW_KEYS, *META_KEYS) if key not in arrays]
    if missing:
        raise FeatureFileError(f"feature file {path}: not a feature file (missing {', '.join(missing)})")
    meta = {key: arrays[key].item() for key in META_KEYS}
    rows = {key: arrays[key] for key in (*ROW_KEYS, *OPTIONAL_ROW_KEYS) if key in arrays}
    return FeatureSet(**rows, **meta, source=str(path))


def is_feature_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a feature file (an .npz holding every key :func:`load_features` needs), from its zip
    directory alone."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = set(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    return {f"{key}.npy" for key in (*ROW_KEYS, *META_KEYS)} <= members


@dataclass
class JoinedFeatures:
    """Several experts' features of the same images: embeddings side by side, one P(fake) column each."""

    embeddings: np.ndarray  # [N, sum of D]
    p_fake: np.ndarray  # [N, experts]
    labels: np.ndarray
    paths: np.ndarray
    model_names: list[str]
    blocks: list[slice]  # each expert's columns in ``embeddings``
    video_id: np.ndarray | None = None
    method: np.ndarray | None = None
    source_id: np.ndarray | None = None


def join_features(sources: Sequence[str | os.PathLike | FeatureSet]) -> JoinedFeatures:
    """Put feature files of the same images side by side, after checking row i is the same image in each.

    Rows must already be in the same order (extract every expert from the same manifest); any difference in
    paths or labels is a :class:`FeatureFileError` naming the first row that differs.
    """
    sets = [s if isinstance(s, FeatureSet) else load_features(s) for s in sources]
    if len(sets) < 2:
        raise FeatureFileError(f"join_features needs at least two feature sets, got {len(sets)}")
    first = sets[0]
    for other in sets[1:]:
        _check_same_rows(first, other)
    widths = np.cumsum([0] + [s.embeddings.shape[1] for s in sets])
    return JoinedFeatures(
        embeddings=np.concatenate([s.embeddings for s in sets], axis=1),
        p_fake=np.stack([s.p_fake for s in sets], axis=1),
        labels=first.labels,
        paths=first.paths,
        model_names=[s.model_name for s in sets],
        blocks=[slice(int(a), int(b)) for a, b in zip(widths[:-1], widths[1:])],
        video_id=first.video_id,
        method=first.method,
        source_id=first.source_id,
    )


def _check_same_rows(a: FeatureSet, b: FeatureSet) -> None:
    names = f"{a.source or a.model_name} and {b.source or b.model_name}"
    if len(a.paths) != len(b.paths):
        raise FeatureFileError(f"cannot join {names}: {len(a.paths)} rows vs {len(b.paths)}")
    differ = np.flatnonzero(a.paths != b.paths)
    if len(differ):
        row = int(differ[0])
        how = "the same images in a different order" if set(a.paths) == set(b.paths) else "different images"
        raise FeatureFileError(
            f"cannot join {names}: {how} ({len(differ)} rows differ; first row {row}: {a.paths[row]} vs "
            f"{b.paths[row]}); extract both from the same manifest"
        )
    differ = np.flatnonzero(a.labels != b.labels)
    if len(differ):
        row = int(differ[0])
        raise FeatureFileError(
            f"cannot join {names}: same paths but labels differ ({len(differ)} rows; first row {row}: "
            f"{a.paths[row]} is {a.labels[row]} vs {b.labels[row]})"
        )

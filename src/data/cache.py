"""A decoded-image cache: every manifest image decoded once into a uint8 memory-mapped array.

PNG decoding costs ~1 ms per 256x256 crop per core; reading the same pixels from a memory-mapped
array costs microseconds. Training for many epochs on hundreds of thousands of crops therefore
decodes each file once (`--cache-dir`) and reads slots of `images.u8` afterwards.

Layout of `CACHE_DIR/<size>px/`: `images.u8` (raw uint8, slot-major [slots, 3, size, size]) and
`index.csv` (path, slot, bytes, mtime_ns, ok). A file whose size or mtime changed since it was
cached is decoded again into its old slot. The index is rewritten (atomically) after every chunk,
so an interrupted build resumes where it stopped. One build at a time per folder (a lock file).
"""

from __future__ import annotations

import fcntl
import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from src.data.decode import decode_image, resize_uint8
from src.errors import ImageDecodeError

log = logging.getLogger(__name__)

INDEX_COLUMNS = ["path", "slot", "bytes", "mtime_ns", "ok"]
CHUNK = 256


class DecodedCache:
    """Decoded images of one input size; `prepare(paths)` fills it, `view(slots)` reads it."""

    def __init__(self, cache_dir: str | Path, img_size: int):
        self.dir = Path(cache_dir) / f"{img_size}px"
        self.img_size = img_size
        self.item_bytes = 3 * img_size * img_size
        self.data_path = self.dir / "images.u8"
        self.index_path = self.dir / "index.csv"

    def prepare(self, paths: Sequence[str], *, workers: int = 1, skip_bad_images: bool = False) -> np.ndarray:
        """Decode whatever is missing or stale and return each path's slot (-1: undecodable, skipped)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with _locked(self.dir / ".lock"):
            index = self._load_index()
            stats = [os.stat(p) for p in paths]
            current = pd.DataFrame({"path": list(paths), "bytes": [s.st_size for s in stats],
                                    "mtime_ns": [s.st_mtime_ns for s in stats]})
            merged = current.merge(index, on="path", how="left", suffixes=("", "_cached"))
            fresh = ((merged["bytes"] == merged["bytes_cached"]) & (merged["mtime_ns"] == merged["mtime_ns_cached"])
                     & merged["ok"].notna())
            todo = merged.loc[~fresh, ["path", "slot"]].copy()
            next_slot = int(index["slot"].max()) + 1 if len(index) else 0
            new = todo["slot"].isna()
            todo.loc[new, "slot"] = np.arange(next_slot, next_slot + int(new.sum()))
            todo["slot"] = todo["slot"].astype(np.int64)
            capacity = max(next_slot + int(new.sum()), 1)
            if len(todo):
                self._grow(capacity)
                log.info("cache %s: decoding %d of %d images (%.2f GiB on disk in all)", self.dir, len(todo),
                         len(paths), capacity * self.item_bytes / 2**30)
                index = self._decode(todo, index, current, workers, skip_bad_images)
            rows = index.set_index("path").loc[list(paths)]
            ok = rows["ok"].to_numpy(dtype=bool)
            reported = set(todo["path"])  # failures of this build were just raised or warned about
            for path in rows.index[~ok]:
                if not skip_bad_images:
                    raise ImageDecodeError(path, "undecodable when the cache was built")
                if path not in reported:
                    warnings.warn(f"skipping cannot decode image {path}: undecodable when the cache was built",
                                  stacklevel=2)
            return np.where(ok, rows["slot"].to_numpy(dtype=np.int64), -1)

    def view(self, slots: np.ndarray) -> CacheView:
        return CacheView(self.data_path, self.img_size, slots)

    def _load_index(self) -> pd.DataFrame:
        if not self.index_path.is_file():
            return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(
                INDEX_COLUMNS, (str, np.int64, np.int64, np.int64, bool))})
        return pd.read_csv(self.index_path, dtype={"path": str})

    def _grow(self, slots: int) -> None:
        size = slots * self.item_bytes
        with open(self.data_path, "ab") as f:
            if f.tell() < size:
                f.truncate(size)  # sparse: no disk is used until a slot is written

    def _decode(self, todo: pd.DataFrame, index: pd.DataFrame, current: pd.DataFrame, workers: int,
                skip_bad_images: bool) -> pd.DataFrame:
        meta = current.set_index("path")
        index = index.set_index("path")
        jobs = [todo.iloc[i:i + CHUNK] for i in range(0, len(todo), CHUNK)]
        bad: list[str] = []
        with ProcessPoolExecutor(max_workers=max(workers, 1)) as pool, tqdm(
                total=len(todo), desc="caching", unit="img", disable=None) as bar:
            futures = [pool.submit(_decode_chunk, str(self.data_path), self.img_size, list(job["path"]),
                                   list(job["slot"])) for job in jobs]
            for job, future in zip(jobs, futures):
                errors = future.result()
                # Plain arrays: assign() would align a Series on its (positional) index and give NaN.
                failed = job["path"].isin(errors).to_numpy()
                rows = meta.loc[job["path"]].assign(slot=job["slot"].to_numpy(), ok=~failed)
                if errors and not skip_bad_images:
                    # Keep what this build did decode, so the rebuild after the fix starts from there.
                    index = pd.concat([index.drop(index.index.intersection(rows.index)), rows[~failed]])
                    self._save_index(index)
                    for pending in futures:
                        pending.cancel()
                    path, error = next(iter(errors.items()))
                    raise ImageDecodeError(path, error)
                for path, error in errors.items():
                    warnings.warn(f"skipping cannot decode image {path}: {error}", stacklevel=2)
                    bad.append(path)
                index = pd.concat([index.drop(index.index.intersection(rows.index)), rows])
                self._save_index(index)
                bar.update(len(job))
        if bad:
            log.warning("cache: skipped %d undecodable images", len(bad))
        return index.reset_index()

    def _save_index(self, index: pd.DataFrame) -> None:
        tmp = self.index_path.with_suffix(".tmp")
        index.reset_index()[INDEX_COLUMNS].to_csv(tmp, index=False)
        os.replace(tmp, self.index_path)


def open_cache(cache_dir: str | Path, img_size: int, paths: Sequence[str], *, workers: int = 1,
               skip_bad_images: bool = False) -> CacheView:
    """Bring the cache up to date for `paths` (decoding only what is missing) and map it for reading."""
    cache = DecodedCache(cache_dir, img_size)
    return cache.view(cache.prepare(paths, workers=workers, skip_bad_images=skip_bad_images))


class CacheView:
    """Read-only access to cached images by dataset row; opened lazily so each worker maps it itself."""

    def __init__(self, data_path: Path, img_size: int, slots: np.ndarray):
        self.data_path, self.img_size, self.slots = data_path, img_size, slots
        self._array: np.memmap | None = None

    def __getitem__(self, row: int) -> torch.Tensor | None:
        """uint8 [3, S, S], or None when the image was undecodable and skipped at build time."""
        slot = int(self.slots[row])
        if slot < 0:
            return None
        if self._array is None:
            self._array = np.memmap(self.data_path, dtype=np.uint8, mode="r").reshape(-1, 3, self.img_size,
                                                                                      self.img_size)
        return torch.from_numpy(np.array(self._array[slot]))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}


def _decode_chunk(data_path: str, img_size: int, paths: list[str], slots: list[int]) -> dict[str, str]:
    """Worker: decode, resize and write one chunk of images; returns {path: reason} for the bad ones."""
    errors = {}
    array = np.memmap(data_path, dtype=np.uint8, mode="r+").reshape(-1, 3, img_size, img_size)
    for path, slot in zip(paths, slots):
        try:
            array[slot] = resize_uint8(decode_image(path), img_size).numpy()
        except ImageDecodeError as err:
            errors[path] = str(err).split(": ", 1)[-1]
    array.flush()
    return errors


@contextmanager
def _locked(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

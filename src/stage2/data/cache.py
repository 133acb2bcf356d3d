"""A decoded-image cache: every manifest image decoded once into a uint8 memory-mapped array.

PNG decoding costs ~1 ms per 256x256 crop per core; reading the same pixels from a memory-mapped
array costs microseconds. Training for many epochs on hundreds of thousands of crops therefore
decodes each file once (`--cache-dir`) and reads slots of `images.u8` afterwards.

Layout of `CACHE_DIR/<size>px/`: `images.u8` (raw uint8, slot-major [slots, 3, size, size]) and
`index.csv` (path, slot, bytes, mtime_ns, file_crc32, width, height, max_pixels, ok, crc32). A file whose
size, mtime or content (the CRC-32 of its bytes: a file replaced by one of the same size and mtime) changed
since it was cached is decoded again into its old slot; so is a slot whose bytes no longer have the CRC-32 the
index recorded, or that lies beyond the end of `images.u8` (a deleted, truncated or overwritten data file).
`--max-image-pixels` holds for cached images as for files: one cached from a larger original than the limit
now allows is undecodable, and one refused under a lower limit than now is decoded again.
The index is rewritten (atomically) after every chunk, so an interrupted build resumes where it stopped;
SIGTERM or Ctrl-C stop a build after the chunks in progress. One build at a time per folder (a lock file
that ends with its holder; the decoding workers die with their parent).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from stage2.atomic import naming
from stage2.data.decode import MAX_IMAGE_PIXELS, decode_image, resize_uint8
from stage2.errors import ImageDecodeError, StopRequested
from stage2.processes import StopRequest, exclusive_lock, init_worker, stop_requests

log = logging.getLogger(__name__)

INDEX_COLUMNS = ["path", "slot", "bytes", "mtime_ns", "file_crc32", "width", "height", "max_pixels", "ok", "crc32"]
CHUNK = 256


class DecodedCache:
    """Decoded images of one input size; `prepare(paths)` fills it, `view(slots)` reads it."""

    def __init__(self, cache_dir: str | Path, img_size: int):
        self.dir = Path(cache_dir) / f"{img_size}px"
        self.img_size = img_size
        self.item_bytes = 3 * img_size * img_size
        self.data_path = self.dir / "images.u8"
        self.index_path = self.dir / "index.csv"

    def prepare(self, paths: Sequence[str], *, workers: int = 1, skip_bad_images: bool = False,
                max_pixels: int = MAX_IMAGE_PIXELS, verify: bool = True) -> np.ndarray:
        """Decode whatever is missing, stale or damaged and return each path's slot (-1: undecodable, skipped).

        `verify` checks every file's bytes and every cached image against their CRC-32s first (a pass over both, in
        `workers` threads); a reader that another process has just prepared skips it.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.dir / ".lock", wait=True, on_wait=lambda pid: log.info(
                "cache %s: waiting for process %s, which is building it", self.dir, pid)):
            index = self._load_index()
            stats = [os.stat(p) for p in paths]
            current = pd.DataFrame({"path": list(paths), "bytes": [s.st_size for s in stats],
                                    "mtime_ns": [s.st_mtime_ns for s in stats]})
            merged = current.merge(index, on="path", how="left", suffixes=("", "_cached"))
            # A file refused under a lower --max-image-pixels than this one's is tried again.
            refused_lower = ~merged["ok"].eq(True) & (merged["max_pixels"] < max_pixels)
            fresh = ((merged["bytes"] == merged["bytes_cached"]) & (merged["mtime_ns"] == merged["mtime_ns_cached"])
                     & merged["ok"].notna() & ~refused_lower).to_numpy(copy=True)
            started = time.perf_counter()
            # The files' own CRC-32s: all of them to verify, else (the index just verified) those decoded below.
            current["file_crc32"] = merged["file_crc32"].fillna(-1).to_numpy(dtype=np.int64)
            read = np.ones(len(paths), dtype=bool) if verify else ~fresh
            current.loc[read, "file_crc32"] = _file_crcs(current["path"][read].tolist(), workers)
            if verify:
                fresh &= (current["file_crc32"] == merged["file_crc32"]).to_numpy()
                stored = fresh & merged["ok"].eq(True).to_numpy()
                intact = self._intact(merged.loc[stored, ["slot", "crc32"]], workers)
                if not intact.all():
                    log.warning("cache %s: %d cached images no longer match their checksums (or lie beyond the end "
                                "of %s): decoding them again", self.dir, int((~intact).sum()), self.data_path.name)
                fresh[np.flatnonzero(stored)[~intact]] = False
                log.info("cache %s: %d files and %d cached images checked against their checksums in %.1f s",
                         self.dir, len(paths), len(intact), time.perf_counter() - started)
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
                index = self._decode(todo, index, current, workers, skip_bad_images, max_pixels)
            return self._served(index.set_index("path").loc[list(paths)], set(todo["path"]), skip_bad_images,
                                max_pixels)

    @staticmethod
    def _served(rows: pd.DataFrame, reported: set[str], skip_bad_images: bool, max_pixels: int) -> np.ndarray:
        """The slot of each of these index rows, or -1 for an image undecodable when it was cached or larger than
        `max_pixels` now: an ImageDecodeError without `skip_bad_images`, else a warning (for the failures of this
        build, `reported`, one was given already; none of its images is over the limit)."""
        too_large = rows["width"].to_numpy(dtype=np.int64) * rows["height"].to_numpy(dtype=np.int64) > max_pixels
        ok = rows["ok"].to_numpy(dtype=bool) & ~too_large
        for i in np.flatnonzero(~ok):
            path, width, height = rows.index[i], rows["width"].iloc[i], rows["height"].iloc[i]
            if path in reported:
                continue
            reason = (f"{width}x{height} pixels, over the limit of {max_pixels} (--max-image-pixels)" if too_large[i]
                      else "undecodable when the cache was built")
            if not skip_bad_images:
                raise ImageDecodeError(path, reason)
            warnings.warn(f"skipping cannot decode image {path}: {reason}", stacklevel=3)
        return np.where(ok, rows["slot"].to_numpy(dtype=np.int64), -1)

    def view(self, slots: np.ndarray) -> CacheView:
        return CacheView(self.data_path, self.img_size, slots)

    def _load_index(self) -> pd.DataFrame:
        if self.index_path.is_file():
            index = pd.read_csv(self.index_path, dtype={"path": str})
            if list(index.columns) == INDEX_COLUMNS:
                return index
            log.warning("cache %s: index of an older version: decoding everything again", self.dir)
        return pd.DataFrame({c: pd.Series(dtype=bool if c == "ok" else str if c == "path" else np.int64)
                             for c in INDEX_COLUMNS})

    def _intact(self, rows: pd.DataFrame, workers: int) -> np.ndarray:
        """Which of these cached rows (slot, crc32) still hold what the index recorded: the slot lies inside the
        data file and its bytes have the recorded CRC-32."""
        size = self.data_path.stat().st_size if self.data_path.is_file() else 0
        slots = rows["slot"].to_numpy(dtype=np.int64)
        intact = (slots + 1) * self.item_bytes <= size
        inside = np.flatnonzero(intact)
        if not len(inside):
            return intact
        array = np.memmap(self.data_path, dtype=np.uint8, mode="r", shape=(size // self.item_bytes, self.item_bytes))
        order = inside[np.argsort(slots[inside])]  # in file order: sequential reads
        blocks = [order[i:i + CHUNK] for i in range(0, len(order), CHUNK)]
        recorded = rows["crc32"].to_numpy(dtype=np.int64)

        def crcs(block: np.ndarray) -> list[int]:
            return [zlib.crc32(array[slot]) for slot in slots[block]]

        # zlib.crc32 releases the GIL on large buffers: threads check blocks in parallel.
        with ThreadPoolExecutor(max(workers, 1)) as pool:
            for block, found in zip(blocks, pool.map(crcs, blocks)):
                intact[block] = np.asarray(found, dtype=np.int64) == recorded[block]
        return intact

    def _grow(self, slots: int) -> None:
        """Make images.u8 `slots` slots long, with its disk space reserved: a worker writing a slot through its
        memory map cannot report a full disk (the kernel kills it with SIGBUS), so a full disk fails here, as an
        OSError naming the file, with the index of what was decoded before intact."""
        size = slots * self.item_bytes
        with naming(self.data_path), open(self.data_path, "ab") as f:
            end = f.tell()
            if end < size and hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), end, size - end)
            elif end < size:
                f.truncate(size)

    def _decode(self, todo: pd.DataFrame, index: pd.DataFrame, current: pd.DataFrame, workers: int,
                skip_bad_images: bool, max_pixels: int) -> pd.DataFrame:
        meta = current.set_index("path")
        index = index.set_index("path")
        jobs = [todo.iloc[i:i + CHUNK] for i in range(0, len(todo), CHUNK)]
        bad: list[str] = []
        stop, done = StopRequest(), 0
        with stop_requests(stop), ProcessPoolExecutor(max_workers=max(workers, 1), initializer=init_worker) as pool, \
                tqdm(total=len(todo), desc="caching", unit="img", disable=None) as bar:
            futures = [pool.submit(_decode_chunk, str(self.data_path), self.img_size, list(job["path"]),
                                   list(job["slot"]), max_pixels) for job in jobs]
            for job, future in zip(jobs, futures):
                try:
                    errors, crcs, sizes = future.result()
                except BrokenProcessPool:
                    if stop.signum is None:
                        raise
                    errors = None  # a worker got the signal before it could leave it to us; the stop follows
                if errors is not None:
                    # Plain arrays: assign() would align a Series on its (positional) index and give NaN.
                    failed = job["path"].isin(errors).to_numpy()
                    width, height = np.asarray(sizes, dtype=np.int64).reshape(-1, 2).T
                    rows = meta.loc[job["path"]].assign(slot=job["slot"].to_numpy(), ok=~failed, crc32=crcs,
                                                        width=width, height=height, max_pixels=max_pixels)
                    if errors and not skip_bad_images:
                        # Keep what this build did decode, so the rebuild after the fix starts from there.
                        self._save_index(pd.concat([index.drop(index.index.intersection(rows.index)), rows[~failed]]))
                        pool.shutdown(wait=True, cancel_futures=True)
                        path, error = next(iter(errors.items()))
                        raise ImageDecodeError(path, error)
                    for path, error in errors.items():
                        warnings.warn(f"skipping cannot decode image {path}: {error}", stacklevel=2)
                        bad.append(path)
                    index = pd.concat([index.drop(index.index.intersection(rows.index)), rows])
                    self._save_index(index)
                    done += len(job)
                    bar.update(len(job))
                if stop.signum is not None:  # after the chunks in progress: everything decoded so far is kept
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise StopRequested(stop.signum, f"stopped by {stop.name} while caching images in {self.dir} "
                                        f"({done} of {len(todo)} decoded and kept): run the same command again to "
                                        "continue from there")
        if bad:
            log.warning("cache: skipped %d undecodable images", len(bad))
        return index.reset_index()

    def _save_index(self, index: pd.DataFrame) -> None:
        tmp = self.index_path.with_suffix(".tmp")
        with naming(self.index_path):
            index.reset_index()[INDEX_COLUMNS].to_csv(tmp, index=False)
            os.replace(tmp, self.index_path)


def open_cache(cache_dir: str | Path, img_size: int, paths: Sequence[str], *, workers: int = 1,
               skip_bad_images: bool = False, max_pixels: int = MAX_IMAGE_PIXELS, verify: bool = True) -> CacheView:
    """Bring the cache up to date for `paths` (decoding only what is missing or damaged) and map it for reading."""
    cache = DecodedCache(cache_dir, img_size)
    return cache.view(cache.prepare(paths, workers=workers, skip_bad_images=skip_bad_images, max_pixels=max_pixels,
                                    verify=verify))


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


def _decode_chunk(data_path: str, img_size: int, paths: list[str], slots: list[int], max_pixels: int
                  ) -> tuple[dict[str, str], list[int], list[tuple[int, int]]]:
    """Worker: decode, resize and write one chunk of images; returns ({path: reason} for the bad ones, the CRC-32
    of each slot as written, and each original's (width, height); 0 for the bad ones)."""
    errors, crcs, sizes = {}, [], []
    array = np.memmap(data_path, dtype=np.uint8, mode="r+").reshape(-1, 3, img_size, img_size)
    for path, slot in zip(paths, slots):
        try:
            image = decode_image(path, max_pixels)
        except ImageDecodeError as err:
            errors[path] = str(err).split(": ", 1)[-1]
            crcs.append(0)
            sizes.append((0, 0))
            continue
        pixels = resize_uint8(image, img_size).numpy()
        array[slot] = pixels
        crcs.append(zlib.crc32(np.ascontiguousarray(pixels)))
        sizes.append((image.shape[-1], image.shape[-2]))
    array.flush()
    return errors, crcs, sizes


def _file_crcs(paths: list[str], workers: int) -> list[int]:
    """The CRC-32 of each file's bytes, read in `workers` threads (zlib and file reads release the GIL)."""

    def crc(path: str) -> int:
        with open(path, "rb") as file:
            return zlib.crc32(file.read())

    with ThreadPoolExecutor(max(workers, 1)) as pool:
        return list(pool.map(crc, paths))

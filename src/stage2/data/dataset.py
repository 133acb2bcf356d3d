"""The manifest-backed dataset, its batches, and the one loader builder for training and extraction alike.

Workers only decode, self-blend (--self-blend, at the crop's own size), resize and run an optional uint8
transform; images stay uint8 so batches are small to move, and float conversion/normalisation happens on the
device.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Sampler

from stage2.data.cache import CacheView
from stage2.data.decode import MAX_IMAGE_PIXELS, decode_image, resize_uint8
from stage2.data.self_blend import SelfBlend
from stage2.errors import ImageDecodeError
from stage2.processes import init_worker

ImageItem = tuple[torch.Tensor | None, int, int]  # (image, label, index); image None: undecodable, skipped


class ManifestDataset(torch.utils.data.Dataset):
    """Images of a manifest frame (see :func:`stage2.data.manifest.read_manifest`) as uint8 ``[3, S, S]``.

    Items are ``(image, label, index)``; with ``skip_bad_images`` an undecodable file warns and yields image None,
    which :func:`collate` drops and lists. ``seed`` and :meth:`set_epoch` make each sample's CPU transform a
    function of (seed, epoch, index); ``cache`` (a :class:`~stage2.data.cache.CacheView`) serves images decoded
    and resized beforehand instead of reading the files. A file of more than ``max_pixels`` pixels is undecodable.
    ``self_blend`` (``--self-blend``) turns some reals into self-blended fakes, label 1, or with ``paired`` makes
    a real's item two (the real and its fake, one ``transform`` draw for both), blending each crop at its own
    resolution before the resize; seeded the same way. With the cache, a crop to blend is read from its file.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        img_size: int,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        skip_bad_images: bool = False,
        seed: int = 0,
        cache: CacheView | None = None,
        max_pixels: int = MAX_IMAGE_PIXELS,
        self_blend: SelfBlend | None = None,
    ) -> None:
        # numpy arrays rather than lists of Python objects: forked workers then don't touch (and copy) pages
        # of per-item refcounts.
        self.paths = frame["path"].to_numpy(dtype=str)
        self.labels = frame["label"].to_numpy(dtype=np.int64)
        self.img_size = img_size
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.seed = seed
        self.epoch = 0
        self.cache = cache
        self.max_pixels = max_pixels
        self.self_blend = self_blend

    def set_epoch(self, epoch: int) -> None:
        """Reseed the augmentation (and tell a transform with a schedule which epoch it is): workers fork after
        this, so the new epoch reaches them."""
        self.epoch = epoch
        if hasattr(self.transform, "set_epoch"):
            self.transform.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> ImageItem | list[ImageItem]:
        """The item of row `index`; with --self-blend paired a real's item is two: the real and its fake."""
        label = int(self.labels[index])
        if self.transform is None and self.self_blend is None:
            return self._resized(index), label, int(index)
        # Each sample's augmentation is a function of (seed, epoch, index) alone: identical for any number of
        # workers or ranks, and after a resume from any step. Only the CPU generator is reseeded (the transforms
        # draw from it): torch.manual_seed also visits every accelerator backend, ~0.4 ms a call. The modulo keeps
        # every --seed in torch's 64-bit range (it changes nothing below seed 1.8 million).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % 2**64)
            if self.self_blend is None or not self.self_blend.blends(label):
                image = self._resized(index)
                return (None if image is None else self._transformed(image)), label, int(index)
            # Blended at the crop's own resolution (from the file even with the cache, which holds resized images)
            crop = self._decoded(index)
            if crop is None:
                return None, label, int(index)
            real, fake = (resize_uint8(image, self.img_size) for image in self.self_blend(crop, index))
            if not self.self_blend.paired:
                return self._transformed(fake), 1, int(index)
            # One augmentation draw for both: the pair differs inside the blend's mask only.
            state = torch.get_rng_state()
            real = self._transformed(real)
            torch.set_rng_state(state)
            return [(real, 0, int(index)), (self._transformed(fake), 1, int(index))]

    def _transformed(self, image: torch.Tensor) -> torch.Tensor:
        return image if self.transform is None else self.transform(image)

    def _resized(self, index: int) -> torch.Tensor | None:
        """Row `index`'s image at the input size, from the cache or its file; None: undecodable, skipped."""
        if self.cache is not None:
            return self.cache[index]  # None: skipped (and reported) when the cache was built
        image = self._decoded(index)
        return None if image is None else resize_uint8(image, self.img_size)

    def _decoded(self, index: int) -> torch.Tensor | None:
        """Row `index`'s file decoded at its own size; None when undecodable and --skip-bad-images skips it."""
        try:
            return decode_image(str(self.paths[index]), self.max_pixels)
        except ImageDecodeError as err:
            if not self.skip_bad_images:
                raise
            warnings.warn(f"skipping {err}", stacklevel=3)
            return None


class Batch(NamedTuple):
    images: torch.Tensor  # uint8 [B, 3, S, S]
    labels: torch.Tensor  # int64 [B]
    indices: torch.Tensor  # int64 [B], rows of the manifest frame
    skipped: torch.Tensor  # int64 [k], rows dropped as undecodable
    # int64 [B]: the image whose device augmentation draw each one takes (a fake of --self-blend paired, its
    # real's); None: each its own
    draws: torch.Tensor | None = None


def collate(items: Sequence[ImageItem | list[ImageItem]]) -> Batch:
    """Stack dataset items into a :class:`Batch`, dropping (and listing) the undecodable ones; a list of items
    (a real and its fake) shares one augmentation draw.

    A batch where every item was skipped has zero-length tensors and ``images`` of shape ``[0, 3, 0, 0]``
    (the image size is unknown here). Scoring and extraction skip such a batch; the training loop skips, and
    counts, any batch left with fewer than two images (stage2.engine.loop).
    """
    kept: list[ImageItem] = []
    draws: list[int] = []
    skipped: list[int] = []
    for item in items:
        first = len(kept)
        for image, label, index in item if isinstance(item, list) else [item]:
            if image is None:
                skipped.append(index)
            else:
                kept.append((image, label, index))
                draws.append(first)
    skipped_rows = torch.tensor(skipped, dtype=torch.int64)
    if not kept:
        empty = torch.empty(0, dtype=torch.int64)
        return Batch(torch.empty(0, 3, 0, 0, dtype=torch.uint8), empty, empty.clone(), skipped_rows, empty.clone())
    images, labels, indices = zip(*kept)
    return Batch(
        torch.stack(images),
        torch.tensor(labels, dtype=torch.int64),
        torch.tensor(indices, dtype=torch.int64),
        skipped_rows,
        torch.tensor(draws, dtype=torch.int64),
    )


def manifest_loader(
    frame: pd.DataFrame,
    img_size: int,
    *,
    batch_size: int,
    workers: int,
    sampler: Sampler[int] | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
    skip_bad_images: bool = False,
    cache: CacheView | None = None,
    pin_memory: bool = False,
    drop_last: bool = False,
    max_pixels: int = MAX_IMAGE_PIXELS,
    self_blend: SelfBlend | None = None,
) -> DataLoader:
    """Batches (:class:`~stage2.data.dataset.Batch`) of `frame`'s images as uint8 at `img_size`, in `sampler`'s
    order (the frame's order without one); `cache` serves them from the decoded cache instead of the files; a file
    of more than `max_pixels` pixels is undecodable; `self_blend` makes some reals self-blended fakes (training
    only)."""
    dataset = ManifestDataset(frame, img_size, transform=transform, skip_bad_images=skip_bad_images, seed=seed,
                              cache=cache, max_pixels=max_pixels, self_blend=self_blend)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      collate_fn=collate, pin_memory=pin_memory, drop_last=drop_last,
                      prefetch_factor=4 if workers > 0 else None, worker_init_fn=_init_worker if workers else None)


def _init_worker(_worker_id: int) -> None:
    """Workers leave Ctrl-C and an outside SIGTERM (which reach every process of the group) to the main process,
    which stops the run cleanly and then ends them, and die with it (see init_worker)."""
    init_worker()

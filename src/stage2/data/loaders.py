"""One way to turn a manifest frame into batches, for the trainer and the feature extractor alike."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch
from torch.utils.data import DataLoader, Sampler

from stage2.data.cache import CacheView
from stage2.data.dataset import ManifestDataset, collate
from stage2.data.decode import MAX_IMAGE_PIXELS
from stage2.data.self_blend import SelfBlend
from stage2.processes import init_worker


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

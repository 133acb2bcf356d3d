"""One way to turn a manifest frame into batches, for the trainer and the feature extractor alike."""

from __future__ import annotations

import signal
from collections.abc import Callable

import pandas as pd
import torch
from torch.utils.data import DataLoader, Sampler

from src.data.cache import CacheView
from src.data.dataset import ManifestDataset, collate
from src.data.self_blend import SelfBlend


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
    self_blend: SelfBlend | None = None,
) -> DataLoader:
    """Batches (:class:`~src.data.dataset.Batch`) of `frame`'s images as uint8 at `img_size`, in `sampler`'s
    order (the frame's order without one); `cache` serves them from the decoded cache instead of the files;
    `self_blend` makes some reals self-blended fakes (training only)."""
    dataset = ManifestDataset(frame, img_size, transform=transform, skip_bad_images=skip_bad_images, seed=seed,
                              cache=cache, self_blend=self_blend)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      collate_fn=collate, pin_memory=pin_memory, drop_last=drop_last,
                      prefetch_factor=4 if workers > 0 else None, worker_init_fn=ignore_ctrl_c if workers else None)


def ignore_ctrl_c(_worker_id: int) -> None:
    """Workers leave Ctrl-C (which reaches every process of the terminal's group) to the main process, which
    stops the run cleanly and then shuts them down. SIGTERM stays theirs: the loader stops its workers with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

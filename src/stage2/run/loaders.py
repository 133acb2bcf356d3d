"""A run's data: its manifests' loaders, sharded over the ranks, read from the files or the decoded cache."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from stage2.data.cache import CacheView, open_cache
from stage2.data.dataset import manifest_loader
from stage2.data.self_blend import SelfBlend
from stage2.data.transforms import Degradations
from stage2.run.config import TrainConfig
from stage2.run.distributed import DistInfo, ShardedSampler, barrier


def shared_cache(cfg: TrainConfig, frame: pd.DataFrame, img_size: int, dist: DistInfo, workers: int
                 ) -> CacheView | None:
    """With --cache-dir: rank 0 decodes what is missing, then every rank maps the same file."""
    if not cfg.cache_dir:
        return None
    paths = frame["path"].tolist()
    if dist.is_main:
        view = open_cache(cfg.cache_dir, img_size, paths, workers=max(workers, 1), skip_bad_images=cfg.skip_bad_images,
                          max_pixels=cfg.max_image_pixels)
    barrier()
    if not dist.is_main:  # rank 0 has decoded and checked everything: this only reads the index
        view = open_cache(cfg.cache_dir, img_size, paths, skip_bad_images=cfg.skip_bad_images,
                          max_pixels=cfg.max_image_pixels, verify=False)
    return view


def val_loader(cfg: TrainConfig, frame: pd.DataFrame, img_size: int, dist: DistInfo, workers: int,
               transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> DataLoader:
    """The val set in order, each rank its shard (padded to equal length; evaluation drops the duplicates);
    `transform` (a perturbation) is seeded per image, so a perturbed set is the same every time."""
    sampler = ShardedSampler(len(frame), shuffle=False, rank=dist.rank, world_size=dist.world_size)
    return manifest_loader(frame, img_size, batch_size=cfg.batch_size, workers=workers, sampler=sampler,
                           transform=transform,
                           skip_bad_images=cfg.skip_bad_images, cache=shared_cache(cfg, frame, img_size, dist, workers),
                           pin_memory=dist.device.type == "cuda", max_pixels=cfg.max_image_pixels)


def class_weights(cfg: TrainConfig, labels: np.ndarray) -> np.ndarray:
    """--balanced-sampler's weight of a real and of a fake image: an epoch then *trains* as many reals as fakes,
    after --self-blend P has turned some of the sampled reals into fakes (reals drawn 1 / (1 - 2P) times as
    often; config_from_args refuses P >= 0.5, which no sampling balances). Without the flag, uniform."""
    if not cfg.balanced_sampler:
        return np.ones(2)
    n_real, n_fake = np.bincount(labels, minlength=2)
    return np.array([1 / ((1 - 2 * cfg.self_blend) * n_real), 1 / n_fake])


def trained_label_mix(cfg: TrainConfig, labels: np.ndarray) -> tuple[float, float]:
    """The expected (real, fake) images an epoch trains on, after the sampler and --self-blend: what --pos-weight
    auto balances, not the manifest's labels (--self-blend 0.5 turns 18 real / 18 fake into 9 / 27)."""
    drawn = class_weights(cfg, labels) * np.bincount(labels, minlength=2)
    real, fake = drawn * len(labels) / drawn.sum()
    return float(real * (1 - cfg.self_blend)), float(fake + real * cfg.self_blend)


def train_loader(cfg: TrainConfig, frame: pd.DataFrame, img_size: int, dist: DistInfo, workers: int,
                 degradations: Degradations | None = None) -> tuple[DataLoader, ShardedSampler, int]:
    """The shuffled (or class-balanced) training batches of this rank, its sampler, and the steps per epoch;
    `degradations` is the workers' part of the run's --aug (Augmentation.in_workers)."""
    labels = frame["label"].to_numpy()
    weights = torch.from_numpy(class_weights(cfg, labels)[labels]) if cfg.balanced_sampler else None
    sampler = ShardedSampler(len(frame), shuffle=True, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                             weights=weights)
    drop_last = sampler.per_rank >= cfg.batch_size
    loader = manifest_loader(frame, img_size, batch_size=cfg.batch_size, workers=workers, sampler=sampler,
                             transform=degradations, seed=cfg.seed,
                             skip_bad_images=cfg.skip_bad_images,
                             cache=shared_cache(cfg, frame, img_size, dist, workers),
                             pin_memory=dist.device.type == "cuda", drop_last=drop_last,
                             max_pixels=cfg.max_image_pixels,
                             self_blend=SelfBlend(cfg.self_blend) if cfg.self_blend else None)
    return loader, sampler, sampler.per_rank // cfg.batch_size if drop_last else 1

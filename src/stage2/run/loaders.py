"""A run's data: its manifests' loaders, sharded over the ranks, read from the files or the decoded cache."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from stage2.data.cache import CacheView, open_cache
from stage2.data.dataset import manifest_loader
from stage2.data.landmarks import N_POINTS, default_dir, image_landmarks, missing_extra
from stage2.data.levels import PAIRED
from stage2.data.self_blend import SelfBlend
from stage2.data.transforms import Degradations
from stage2.run.config import TrainConfig
from stage2.run.distributed import DistInfo, ShardedSampler, barrier

log = logging.getLogger(__name__)


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
    often; config_from_args refuses P >= 0.5 and paired, and the trainer a manifest without fakes, which no
    sampling balances). Without the flag, uniform."""
    if not cfg.balanced_sampler:
        return np.ones(2)
    n_real, n_fake = np.bincount(labels, minlength=2)
    return np.array([1 / ((1 - 2 * cfg.self_blend) * n_real), 1 / n_fake])


def trained_label_mix(cfg: TrainConfig, labels: np.ndarray) -> tuple[float, float]:
    """The expected (real, fake) images an epoch trains on, after the sampler and --self-blend: what --pos-weight
    auto balances, not the manifest's labels (--self-blend 0.5 turns 18 real / 18 fake into 9 / 27; paired, into
    18 / 36)."""
    if cfg.self_blend == PAIRED:
        n_real, n_fake = np.bincount(labels, minlength=2)
        return float(n_real), float(n_real + n_fake)
    drawn = class_weights(cfg, labels) * np.bincount(labels, minlength=2)
    real, fake = drawn * len(labels) / drawn.sum()
    return float(real * (1 - cfg.self_blend)), float(fake + real * cfg.self_blend)


def self_blender(cfg: TrainConfig, frame: pd.DataFrame, img_size: int, dist: DistInfo,
                 workers: int) -> SelfBlend | None:
    """--self-blend with its masks (--blend-mask): the landmarks of every real, computed on rank 0 where the
    cache lacks them, or the ellipse throughout; the log says which, and why. --blend-without's parts left out."""
    if not cfg.self_blend:
        return None
    without = tuple(filter(None, cfg.blend_without.split(",")))
    reason = missing_extra()
    if cfg.blend_mask == "ellipse" or reason:  # --blend-mask landmarks without the extra was refused before
        log.info("self-blend masks: the ellipse (%s)", "--blend-mask ellipse" if cfg.blend_mask == "ellipse"
                 else f"--blend-mask auto: {reason}")
        return SelfBlend(cfg.self_blend, without=without, size=img_size)
    reals = np.flatnonzero(frame["label"].to_numpy() == 0)
    paths = frame["path"].to_numpy(dtype=str)[reals].tolist()
    folder = default_dir(cfg.cache_dir)
    if dist.is_main:
        found = image_landmarks(paths, folder, workers=max(workers, 1))
    barrier()
    if not dist.is_main:  # rank 0 has cached every one: this reads them
        found = image_landmarks(paths, folder)
    points = np.full((len(frame), N_POINTS, 2), np.nan, dtype=np.float32)
    points[reals] = found.points
    log.info("self-blend masks: landmarks (--blend-mask %s): %s; cached in %s", cfg.blend_mask, found.summary(),
             folder)
    if not found.found.any():
        log.warning("self-blend: no face found in any of the %d real training images: every mask is the ellipse",
                    len(reals))
    return SelfBlend(cfg.self_blend, points, without=without, size=img_size)


def train_loader(cfg: TrainConfig, frame: pd.DataFrame, img_size: int, dist: DistInfo, workers: int,
                 degradations: Degradations | None = None) -> tuple[DataLoader, ShardedSampler, int]:
    """The shuffled (or class-balanced) training batches of this rank, its sampler, and the steps per epoch;
    `degradations` is the workers' part of the run's --aug (Augmentation.in_workers). With --self-blend paired a
    batch samples --batch-size / 2 rows: a real's row is two images (it and its fake), so --batch-size still counts
    the images of a step (less one for each fake row of the manifest)."""
    labels = frame["label"].to_numpy()
    weights = torch.from_numpy(class_weights(cfg, labels)[labels]) if cfg.balanced_sampler else None
    sampler = ShardedSampler(len(frame), shuffle=True, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                             weights=weights)
    rows = cfg.batch_size // 2 if cfg.self_blend == PAIRED else cfg.batch_size
    drop_last = sampler.per_rank >= rows
    loader = manifest_loader(frame, img_size, batch_size=rows, workers=workers, sampler=sampler,
                             transform=degradations, seed=cfg.seed,
                             skip_bad_images=cfg.skip_bad_images,
                             cache=shared_cache(cfg, frame, img_size, dist, workers),
                             pin_memory=dist.device.type == "cuda", drop_last=drop_last,
                             max_pixels=cfg.max_image_pixels,
                             self_blend=self_blender(cfg, frame, img_size, dist, workers))
    return loader, sampler, sampler.per_rank // rows if drop_last else 1

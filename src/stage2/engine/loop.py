"""The loop alone: one epoch of training steps as a plain function, `train_one_epoch` (as DeiT's engine.py).

A step is the forward and backward of one micro-batch under autocast, its random draws seeded from (seed, epoch,
step, rank), so that a run resumed from any step continues as if it had never stopped; an update (every
--grad-accum steps, and at the epoch's end) clips, steps the optimizer, the EMA and the schedule; every --log-every
updates it also checks for divergence and reports progress, and it writes last.pt mid-epoch when it is due or a
stop was requested. What the steps use is set up once by the Trainer (stage2.engine.trainer) and handed over as a
`Loop`; each stage's optimizer, schedule and wrapped model as a `StageState`.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from timm.utils import ModelEmaV3
from torch import nn
from tqdm import tqdm

from stage2.data.dataset import Batch
from stage2.data.transforms import DeviceTransform
from stage2.errors import ConfigError, StopRequested, TrainingDiverged
from stage2.experts.base import Expert, Stage
from stage2.processes import StopRequest
from stage2.run.config import TrainConfig
from stage2.run.device import autocast, memory_format
from stage2.run.distributed import DistInfo, all_reduce_sum, broadcast_flag, broadcast_flags
from stage2.run.files import LAST
from stage2.run.folder import BadImages
from stage2.run.saver import CheckpointSaver
from stage2.run.tracking import Tracker

log = logging.getLogger("stage2")

Sums = dict[str, torch.Tensor]  # running sums of an epoch's loss terms, images ("n") and skipped images


@dataclass
class StageState:
    """What one stage trains with: its optimizer, schedule, the (DDP/compiled) model it steps, the parameters
    --clip-grad bounds (a norm per group), updates so far."""

    index: int
    stage: Stage
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_model: nn.Module
    clip_groups: list[list[nn.Parameter]]
    updates: int = 0

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


@dataclass
class Loop:
    """What every step of a run uses, set up once by the Trainer. `model` holds the weights (a stage's
    `train_model` wraps it for DDP and --compile); `augment` is --aug's device part, then the normalisation, its
    draws from `generator`; `checkpoints` writes last.pt mid-epoch (on every rank)."""

    cfg: TrainConfig
    dist: DistInfo
    expert: Expert
    model: nn.Module
    augment: DeviceTransform
    generator: torch.Generator
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    ema: ModelEmaV3 | None
    train_frame: pd.DataFrame
    bad_images: BadImages
    checkpoints: CheckpointSaver
    tracker: Tracker
    stop: StopRequest

    @property
    def device(self) -> torch.device:
        return self.dist.device


@dataclass
class Progress:
    """An epoch's progress bar and counters: images this rank has seen, its start and the last mid-epoch save."""

    bar: tqdm
    images: int = 0
    loss: torch.Tensor | None = None  # the latest micro-batch's mean loss, for the tracker
    t0: float = field(default_factory=time.perf_counter)
    last_save: float = field(default_factory=time.monotonic)


def train_one_epoch(loop: Loop, stage: StageState, epoch: int, batches: Iterable[Batch], n_steps: int, *,
                    start_step: int = 0, sums: Sums | None = None) -> dict[str, float]:
    """Epoch `epoch` (0-based) from step `start_step` of its `n_steps` (with `sums`, the train statistics a
    mid-epoch last.pt saved); returns its train statistics.

    A step whose batch --skip-bad-images left with fewer than two images is skipped (on every rank), and counted
    (`train_skipped_steps`): an empty batch has nothing to train, and BatchNorm cannot train on one image. Its
    update still moves the schedule, so the run stands where a resume from any step puts it.
    """
    cfg, dist = loop.cfg, loop.dist
    loop.expert.train_mode(loop.model)
    loop.augment.train()
    one = torch.ones((), device=loop.device)
    sums = {k: v.to(loop.device) for k, v in (sums or {"n": 0 * one, "skipped": 0 * one}).items()}
    bar = tqdm(total=n_steps, initial=start_step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=not (dist.is_main and sys.stderr.isatty()), dynamic_ncols=True, leave=False)
    progress = Progress(bar)
    bad_rows: list[int] = []
    pending = False  # micro-batches backpropagated since the last update
    for step, batch in enumerate(batches, start=start_step):
        # The last micro-batches of an epoch make an update of their own even when fewer than grad_accum.
        update = (step + 1) % cfg.grad_accum == 0 or step + 1 == n_steps
        bad_rows += batch.skipped.tolist()
        if _too_few_images(loop, batch):
            batch_sums = {"skipped": batch.skipped.numel() * one, "skipped_steps": one}
            if update and pending and dist.enabled:
                _sync_gradients(loop)  # the skipped micro-batch's backward would have synced them
        else:
            batch_sums, progress.loss = _step(loop, stage, batch, step_seed(cfg.seed, epoch, step, dist.rank), update)
            progress.images += batch.labels.numel()
            pending = True
        sums = {**sums, **{k: sums[k] + v if k in sums else v for k, v in batch_sums.items()}}
        if update:
            _optimizer_step(loop, stage, apply=pending)
            pending = False
            _after_update(loop, stage, epoch, step + 1, n_steps, sums, progress)
        bar.update(1)
    bar.close()
    loop.bad_images.note("train", loop.train_frame, bad_rows)  # --max-bad-images first: it names the cause
    if not sums["n"]:  # the same on every rank: they skip steps together
        raise ConfigError(f"{cfg.train_manifest}: no training batch in epoch {epoch + 1} (each lost its images "
                          "to --skip-bad-images)")
    check_finite(loop, sums, epoch)
    return _epoch_stats(loop, stage, sums, progress)


def _step(loop: Loop, stage: StageState, batch: Batch, seed: int, update: bool) -> tuple[Sums, torch.Tensor]:
    """Forward and backward of one micro-batch, every random draw seeded from `seed`; returns the sums of its
    loss terms, its image count ("n") and skipped images, and its mean loss. Gradients sync across ranks only
    on `update`."""
    cfg, device = loop.cfg, loop.device
    labels = batch.labels.to(device, non_blocking=True)
    images = batch.images.to(device, non_blocking=True)
    torch.manual_seed(seed)
    loop.generator.manual_seed(seed)
    draws = None if batch.draws is None else batch.draws.to(device, non_blocking=True)
    x = memory_format(loop.augment(images, generator=loop.generator, draws=draws), cfg.channels_last)
    sync = nullcontext() if update or not loop.dist.enabled else stage.train_model.no_sync()
    with sync:
        with autocast(device, loop.amp_dtype):
            outputs = stage.train_model(x)
            terms = loop.expert.loss(outputs, x, labels)
        loss = terms["loss"].mean()
        loop.scaler.scale(loss / cfg.grad_accum).backward()
    sums = {k: v.detach().float().sum() for k, v in terms.items()}
    sums["n"] = torch.tensor(float(labels.numel()), device=device)
    sums["skipped"] = torch.tensor(float(batch.skipped.numel()), device=device)
    return sums, loss.detach()


def _optimizer_step(loop: Loop, stage: StageState, *, apply: bool) -> None:
    """An update: the weights (and EMA) step when `apply` (some micro-batch was backpropagated); the schedule
    always does."""
    if apply:
        if loop.cfg.clip_grad:
            loop.scaler.unscale_(stage.optimizer)
            for group in stage.clip_groups:
                nn.utils.clip_grad_norm_(group, loop.cfg.clip_grad)
        loop.scaler.step(stage.optimizer)
        loop.scaler.update()
        stage.optimizer.zero_grad(set_to_none=True)
        if loop.ema is not None:
            loop.ema.update(loop.model)
    stage.updates += 1
    stage.scheduler.step_update(num_updates=stage.updates)


def _after_update(loop: Loop, stage: StageState, epoch: int, done: int, n_steps: int, sums: Sums,
                  progress: Progress) -> None:
    """After the update at step `done` of `n_steps`: every --log-every updates (of the epoch, counted as the
    optimizer steps, not the micro-batches of --grad-accum), check for divergence and report progress; write last.pt
    mid-epoch when it is due or a stop was requested (then stop)."""
    cfg, dist = loop.cfg, loop.dist
    due_to_log = math.ceil(done / cfg.grad_accum) % cfg.log_every == 0
    if due_to_log or done == n_steps:
        check_finite(loop, sums, epoch, done)
    if dist.is_main and due_to_log and progress.loss is not None:
        msg = (f"loss {float(sums['loss'] / sums['n']):.4f} lr {stage.lr:.3g} "
               f"{progress.images * dist.world_size / (time.perf_counter() - progress.t0):.0f} img/s")
        progress.bar.set_postfix_str(msg, refresh=False)
        if progress.bar.disable:
            log.info("epoch %d/%d step %d/%d %s", epoch + 1, cfg.epochs, done, n_steps, msg)
        loop.tracker.scalars(epoch * n_steps + done, train_loss=float(progress.loss), lr=stage.lr)
    if done == n_steps:
        return  # the epoch's end writes last.pt and checks for a stop (Trainer._end_epoch)
    # Every rank takes the same decision: the save below runs collectives.
    stop, due = broadcast_flags(
        loop.stop.signum is not None,
        cfg.save_every_minutes > 0 and time.monotonic() - progress.last_save > cfg.save_every_minutes * 60,
        device=loop.device)
    if stop or due:
        check_finite(loop, sums, epoch, done, before_saving=True)
        loop.checkpoints.save_last(stage.optimizer, stage.index, epoch, done, sums)
        progress.last_save = time.monotonic()
    if stop:
        raise stopped(loop, epoch, done)


def _epoch_stats(loop: Loop, stage: StageState, sums: Sums, progress: Progress) -> dict[str, float]:
    """The epoch's mean loss terms over all ranks, images skipped, last lr, time and throughput."""
    elapsed = time.perf_counter() - progress.t0
    keys = list(sums)
    totals = dict(zip(keys, all_reduce_sum(torch.stack([sums[k] for k in keys])).tolist(), strict=True))
    n, skipped, skipped_steps = totals.pop("n"), totals.pop("skipped"), totals.pop("skipped_steps", 0.0)
    if skipped_steps and loop.dist.is_main:
        log.warning("%d training steps skipped: --skip-bad-images left their batches fewer than two images",
                    skipped_steps)
    stats = {f"train_{k}": v / n for k, v in totals.items()}
    images = all_reduce_sum(torch.tensor(float(progress.images), device=loop.device)).item()
    return {**stats, "train_skipped": skipped, "train_skipped_steps": skipped_steps, "lr_last_step": stage.lr,
            "epoch_time": elapsed, "images_per_s": images / elapsed}


def _too_few_images(loop: Loop, batch: Batch) -> bool:
    """Whether --skip-bad-images left this batch, or another rank's, with fewer than two images."""
    if not loop.cfg.skip_bad_images:
        return False
    return broadcast_flag(batch.skipped.numel() > 0 and batch.labels.numel() < 2, loop.device)


def _sync_gradients(loop: Loop) -> None:
    """Average the accumulated gradients over the ranks, as DDP does in an update's backward."""
    for p in loop.model.parameters():
        if p.grad is not None:
            all_reduce_sum(p.grad).div_(loop.dist.world_size)


def diverged(loop: Loop, sums: Sums) -> bool:
    """Whether the loss summed so far is not finite (False before any step trained); on every rank."""
    return broadcast_flag("loss" in sums and not bool(torch.isfinite(sums["loss"])), loop.device)


def check_finite(loop: Loop, sums: Sums, epoch: int, step: int = 0, *, before_saving: bool = False) -> None:
    """Stop the run (TrainingDiverged, naming the last good checkpoint) when the loss summed so far in epoch
    `epoch` (0-based; by `step`, when given) is not finite; on every rank."""
    if diverged(loop, sums):
        at = f"epoch {epoch + 1}" + (f" by step {step}" if step else "")
        raise TrainingDiverged(f"non-finite loss in {at}: stopped{' before saving' if before_saving else ''}; "
                               f"{loop.checkpoints.last_good_note}")


def stop_requested(loop: Loop) -> bool:
    """Whether SIGTERM or Ctrl-C reached any rank; on every rank."""
    return broadcast_flag(loop.stop.signum is not None, loop.device)


def stopped(loop: Loop, next_epoch: int, step: int) -> StopRequested:
    """The error a run stopped by a signal ends with, once last.pt holds where it stands: epoch `next_epoch`
    (0-based), `step` steps into it (0: at its start)."""
    where = f"epoch {next_epoch + 1} step {step}" if step else f"the end of epoch {next_epoch}"
    log.warning("%s: stopped at %s, %s written", loop.stop.name, where, LAST)
    return StopRequested(loop.stop.signum or signal.SIGTERM,
                         f"stopped by {loop.stop.name} at {where}; {loop.checkpoints.last} holds the run: resume it "
                         "by running the same command with --resume")


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """The seed of every random draw of step `step` of epoch `epoch` on `rank`."""
    return (((seed * 1_000_003 + epoch) * 1_000_003 + step) * 1_009 + rank) % (2**63)

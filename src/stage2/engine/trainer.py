"""The training loop both experts share: stages of epochs with AMP, accumulation, clipping, EMA, DDP and resume.

One pass reads top to bottom in `Trainer.fit`: for each stage, `start_stage` builds its optimizer and schedule,
then epochs of (`train_epoch`, validate, checkpoint) run; finally the best weights are reloaded, a temperature is
calibrated and the summary written. The run folder (`run_dir`), the data (`data`), scoring (`evaluation`) and the
model (an `Expert`) live in their own modules; `start_stage` and `train_epoch` are also what the benchmarks time.

Reproducibility: every random draw of a training step (dropout, device-side augmentation) is seeded from
(seed, epoch, step, rank), and every CPU augmentation from (seed, epoch, sample index), so a run resumed from any
checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from stage2.atomic import write_json_atomic
from stage2.data.audit import run_audit
from stage2.data.dataset import Batch
from stage2.data.manifest import check_source_leak, manifest_fingerprint, read_manifest
from stage2.data.transforms import DeviceTransform
from stage2.errors import ConfigError, StopRequested, TrainingDiverged, first_line
from stage2.experts.base import Expert, Stage
from stage2.processes import StopRequest, stop_requests, usable_cores
from stage2.run.checkpoint import BestCheckpoint, LastCheckpoint, ensure_finite, rng_state
from stage2.run.config import TrainConfig
from stage2.run.device import autocast, autocast_dtype, memory_format
from stage2.run.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_flag,
    broadcast_flags,
)
from stage2.run.files import ARGS, CURVES, LAST, METRICS, PREDICTIONS, ROC, SUMMARY, TRAIN_LOG
from stage2.run.folder import BadImages, prepare_run_dir
from stage2.run.loaders import train_loader, trained_label_mix
from stage2.run.logs import log_settings, setup_logging
from stage2.run.metrics_log import MetricsLog
from stage2.run.resume import check_manifests, read_resume_state, restore
from stage2.run.saver import CheckpointSaver
from stage2.run.tracking import make_tracker
from stage2.scoring.calibration import calibration_report, fit_temperature
from stage2.scoring.evaluator import Evaluator, final_report, sigmoid, video_level
from stage2.scoring.metrics import is_better, metric_direction
from stage2.scoring.plots import plot_roc, plot_training_curves

log = logging.getLogger("stage2")


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
class Progress:
    """An epoch's progress bar and counters: images this rank has seen, its start and the last mid-epoch save."""

    bar: tqdm
    images: int = 0
    loss: torch.Tensor | None = None  # the latest micro-batch's mean loss, for the tracker
    t0: float = field(default_factory=time.perf_counter)
    last_save: float = field(default_factory=time.monotonic)


class Trainer:
    def __init__(self, cfg: TrainConfig, expert: Expert, dist: DistInfo, *, threads: str = ""):
        """`threads`: what `cpu_threads` chose, for the settings line."""
        self.cfg, self.expert, self.dist, self.threads = cfg, expert, dist, threads
        try:  # a name no run gives; whether this val set gives it is checked once it is read, below
            metric_direction(cfg.select_metric)
        except ValueError as err:
            raise ConfigError(f"--select-metric {cfg.select_metric}: {err}") from None
        self.device = dist.device
        self.out = Path(cfg.output_dir)
        # Every input is read and checked before anything is built or replaced: offline, building the model first
        # spent a minute on hub retries before a missing manifest was named; --overwrite removed the previous run.
        self.train_frame = read_manifest(cfg.train_manifest, cfg.data_root, require_both_classes=True)
        val_frame = read_manifest(cfg.val_manifest, cfg.data_root, require_both_classes=True)
        check_source_leak(self.train_frame, val_frame)
        self.manifests = {"train": manifest_fingerprint(self.train_frame), "val": manifest_fingerprint(val_frame)}
        self.resume_path = prepare_run_dir(cfg, dist.is_main)
        setup_logging(self.out / TRAIN_LOG if dist.is_main else None, dist.is_main)
        if cfg.resume and self.resume_path is None:
            log.warning("--resume: %s holds no %s yet: starting a new run", self.out, LAST)
        self.resume = read_resume_state(self.resume_path, cfg, expert) if self.resume_path else None
        if self.resume:
            check_manifests(self.resume, self.manifests, cfg)
        _set_determinism(cfg.deterministic)
        torch.manual_seed(cfg.seed)
        self.workers = min(cfg.workers, usable_cores())
        self.bad_images = BadImages(self.out, dist.is_main, cfg.max_bad_images)
        self.stop = StopRequest()  # set by SIGTERM or Ctrl-C during fit(): the loop stops at the next step
        self.tracker = make_tracker(cfg.log_to, self.out, dist.is_main)
        self.checkpoints = CheckpointSaver(self.out, functools.partial(is_better, cfg.select_metric))

        self.model = expert.build_model()
        self.data_config = expert.data_config(self.model)
        # Parameters a model builds frozen (layers upstream never uses) stay frozen in every stage.
        self.learnable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.amp_dtype = autocast_dtype(cfg.amp, self.device)
        self.evaluator = Evaluator(cfg, expert, dist, self.data_config, bad_images=self.bad_images,
                                   frame=val_frame, last=self.checkpoints.last)
        self.evaluator.check_select_metric(cfg.select_metric)
        # What the file headers alone give away about the labels: warned about before any GPU time is spent.
        self.audit = run_audit({"train": self.train_frame, "val": self.evaluator.frame}, self.out,
                               self.workers) if dist.is_main else None
        self.label_mix = trained_label_mix(cfg, self.train_frame["label"].to_numpy())
        expert.prepare(*self.label_mix)
        self.train_tf = DeviceTransform(self.data_config.mean, self.data_config.std, cfg.aug).to(self.device)
        self.train_loader, self.train_sampler, self.steps_per_epoch = train_loader(
            cfg, self.train_frame, self.data_config.size, dist, self.workers)
        self.updates_per_epoch = math.ceil(self.steps_per_epoch / cfg.grad_accum)
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay) if cfg.ema else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.aug_gen = torch.Generator(device=self.device)
        self.history = MetricsLog(self.out / METRICS)

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any] | None:
        cfg, resume = self.cfg, self.resume
        stages = self.expert.stages(cfg.epochs, cfg.lr)
        if resume:
            restore(resume, self.model, None if self.ema is None else self.ema.module,
                    self.history if self.dist.is_main else None)
            self.checkpoints.resume(resume)
            where = f"epoch {resume.next_epoch + 1}" + (f" step {resume.step}" if resume.step else "")
            log.info("resuming from %s at %s (best %s so far: %s)", self.resume_path, where, cfg.select_metric,
                     self.checkpoints.best_value)
        # Epochs are counted over the whole run (0-based), stages one after another; a last.pt says where the run
        # stands: epoch `next_epoch`, `step` steps into it (0: at its start).
        start_epoch, start_step = (resume.next_epoch, resume.step) if resume else (0, 0)
        degrade = self.train_loader.dataset.transform
        log_settings(cfg, stages, dist=self.dist, amp_dtype=self.amp_dtype, threads=self.threads,
                     train_frame=self.train_frame, label_mix=self.label_mix, n_val=len(self.evaluator.frame),
                     data_config=self.data_config,
                     degrade_start=degrade.start if degrade else None, workers=self.workers,
                     n_params=sum(p.numel() for p in self.model.parameters()), model=self.expert.describe())
        if self.dist.is_main:
            # What this run uses, replayable with --config; on a resume the flags that may change are the new ones.
            write_json_atomic(self.out / ARGS, {**cfg.cli_args, "expert": self.expert.describe()})

        with stop_requests(self.stop):
            first_epoch = 0  # the run's epoch at which this stage begins
            for index, stage in enumerate(stages):
                end = first_epoch + stage.epochs
                if start_epoch < end:  # stages the run has finished are skipped whole
                    # The optimizer state in last.pt belongs to the stage it was saved in; a stage after it starts
                    # fresh, as it would have without the stop.
                    state = resume if resume and resume.stage == index else None
                    begin = max(start_epoch, first_epoch)
                    step = start_step if state and begin == start_epoch else 0
                    # The schedule stands where the uninterrupted run would: the updates of this stage's finished
                    # epochs, plus those of the steps already taken in this one (an update per grad_accum steps).
                    updates = (begin - first_epoch) * self.updates_per_epoch + step // cfg.grad_accum
                    ctx = self.start_stage(index, stage, updates, state)
                    log.info("stage %d '%s': epochs %d-%d, lr %.3g", index + 1, stage.name, first_epoch + 1, end,
                             stage.lr)
                    for epoch in range(begin, end):
                        # Only a mid-epoch resume continues an epoch, with the train statistics summed so far.
                        sums = state.train_sums if state and step else None
                        train_stats = self.train_epoch(epoch, ctx, start_step=step, sums=sums)
                        step = 0
                        self._end_epoch(epoch, train_stats, ctx)
                        if self._stop_requested():
                            raise self._stopped(epoch + 1, 0)
                first_epoch = end
        return self._finish()

    def start_stage(self, index: int, stage: Stage, updates: int = 0, state: LastCheckpoint | None = None
                    ) -> StageState:
        """Freeze what the stage freezes, build its optimizer and warmup-cosine schedule, wrap the model for DDP
        and --compile, and put the schedule at `updates` (where a resumed stage stands)."""
        cfg = self.cfg
        for name, p in self.model.named_parameters():
            p.requires_grad_(name in self.learnable and (stage.trainable is None or stage.trainable(name)))
        groups = self.expert.param_groups(self.model, cfg.weight_decay, stage.lr)
        optimizer = create_optimizer_v2(groups, opt=cfg.opt, lr=stage.lr, weight_decay=cfg.weight_decay)
        scheduler = warmup_cosine(optimizer, stage.lr, cfg.min_lr, cfg.warmup_epochs, stage.epochs,
                                  self.updates_per_epoch)
        if state:
            # The schedule is not restored: it follows from the flags and the position below, so a resume with a
            # new --epochs or --lr re-plans it (the optimizer's own lr is overwritten by the first step_update).
            try:
                optimizer.load_state_dict(state.optimizer)
            except ValueError as err:  # e.g. a last.pt from before GenConViT's autoencoder got its own group
                raise ConfigError(f"--resume {self.resume_path}: its optimizer state does not fit this version's "
                                  f"parameter groups ({first_line(err)}); start a new run") from None
            self.scaler.load_state_dict(state.scaler)
        train_model: nn.Module = self.model
        if self.dist.enabled:
            train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.expert.find_unused_parameters)
        if cfg.compile:
            train_model = torch.compile(train_model)
        scheduler.step_update(num_updates=updates)
        # What the stage trains is fixed for the stage: the groups are taken once, not at every step.
        clip_groups = [[p for p in group if p.requires_grad] for group in self.expert.clip_groups(self.model)]
        return StageState(index, stage, optimizer, scheduler, train_model, clip_groups, updates)

    # ------------------------------------------------------------------ training
    def train_epoch(self, epoch: int, ctx: StageState, *, start_step: int = 0,
                    sums: dict[str, torch.Tensor] | None = None, batches: Iterable[Batch] | None = None,
                    steps: int | None = None) -> dict[str, float]:
        """One epoch of steps from `start_step`; returns its train statistics. `batches`/`steps` replace the
        train loader (the benchmarks feed a resident batch this way).

        A step whose batch --skip-bad-images left with fewer than two images is skipped (on every rank), and counted
        (`train_skipped_steps`): an empty batch has nothing to train, and BatchNorm cannot train on one image. Its
        update still moves the schedule, so the run stands where a resume from any step puts it.
        """
        cfg, dist = self.cfg, self.dist
        self.model.train()
        self.train_tf.train()
        self.train_sampler.set_epoch(epoch, start=start_step * cfg.batch_size)
        self.train_loader.dataset.set_epoch(epoch)
        one = torch.ones((), device=self.device)
        sums = {k: v.to(self.device) for k, v in (sums or {"n": 0 * one, "skipped": 0 * one}).items()}
        n_steps = steps or self.steps_per_epoch
        bar = tqdm(total=n_steps, initial=start_step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (dist.is_main and sys.stderr.isatty()), dynamic_ncols=True, leave=False)
        progress = Progress(bar)
        bad_rows: list[int] = []
        pending = False  # micro-batches backpropagated since the last update
        for step, batch in enumerate(self.train_loader if batches is None else batches, start=start_step):
            # The last micro-batches of an epoch make an update of their own even when fewer than grad_accum.
            update = (step + 1) % cfg.grad_accum == 0 or step + 1 == n_steps
            bad_rows += batch.skipped.tolist()
            if self._too_few_images(batch):
                batch_sums = {"skipped": batch.skipped.numel() * one, "skipped_steps": one}
                if update and pending and dist.enabled:
                    self._sync_gradients()  # the skipped micro-batch's backward would have synced them
            else:
                batch_sums, progress.loss = self._step(ctx, batch, _step_seed(cfg.seed, epoch, step, dist.rank),
                                                       update)
                progress.images += batch.labels.numel()
                pending = True
            sums = {**sums, **{k: sums[k] + v if k in sums else v for k, v in batch_sums.items()}}
            if update:
                self._optimizer_step(ctx, apply=pending)
                pending = False
                self._after_update(ctx, epoch, step + 1, n_steps, sums, progress)
            bar.update(1)
        bar.close()
        self.bad_images.note("train", self.train_frame, bad_rows)  # --max-bad-images first: it names the cause
        if not sums["n"]:  # the same on every rank: they skip steps together
            raise ConfigError(f"{cfg.train_manifest}: no training batch in epoch {epoch + 1} (each lost its images "
                              "to --skip-bad-images)")
        if self._diverged(sums):
            raise TrainingDiverged(f"non-finite loss in epoch {epoch + 1}: stopped; {self._last_good()}")
        return self._epoch_stats(ctx, sums, progress)

    def _too_few_images(self, batch: Batch) -> bool:
        """Whether --skip-bad-images left this batch, or another rank's, with fewer than two images."""
        if not self.cfg.skip_bad_images:
            return False
        return broadcast_flag(batch.skipped.numel() > 0 and batch.labels.numel() < 2, self.device)

    def _sync_gradients(self) -> None:
        """Average the accumulated gradients over the ranks, as DDP does in an update's backward."""
        for p in self.model.parameters():
            if p.grad is not None:
                all_reduce_sum(p.grad).div_(self.dist.world_size)

    def _step(self, ctx: StageState, batch: Batch, seed: int, update: bool
              ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Forward and backward of one micro-batch, every random draw seeded from `seed`; returns the sums of its
        loss terms, its image count ("n") and skipped images, and its mean loss. Gradients sync across ranks only
        on `update`."""
        labels = batch.labels.to(self.device, non_blocking=True)
        images = batch.images.to(self.device, non_blocking=True)
        torch.manual_seed(seed)
        self.aug_gen.manual_seed(seed)
        x = memory_format(self.train_tf(images, generator=self.aug_gen), self.cfg.channels_last)
        sync = nullcontext() if update or not self.dist.enabled else ctx.train_model.no_sync()
        with sync:
            with autocast(self.device, self.amp_dtype):
                outputs = ctx.train_model(x)
                terms = self.expert.loss(outputs, x, labels)
            loss = terms["loss"].mean()
            self.scaler.scale(loss / self.cfg.grad_accum).backward()
        sums = {k: v.detach().float().sum() for k, v in terms.items()}
        sums["n"] = torch.tensor(float(labels.numel()), device=self.device)
        sums["skipped"] = torch.tensor(float(batch.skipped.numel()), device=self.device)
        return sums, loss.detach()

    def _after_update(self, ctx: StageState, epoch: int, done: int, n_steps: int, sums: dict[str, torch.Tensor],
                      progress: Progress) -> None:
        """After the update at step `done` of `n_steps`: check for divergence, report progress, and write last.pt
        mid-epoch when it is due or a stop was requested (then stop)."""
        cfg, dist = self.cfg, self.dist
        if (done % cfg.log_every == 0 or done == n_steps) and self._diverged(sums):
            raise TrainingDiverged(f"non-finite loss in epoch {epoch + 1} by step {done}: stopped; "
                                   f"{self._last_good()}")
        if dist.is_main and done % cfg.log_every == 0 and progress.loss is not None:
            msg = (f"loss {float(sums['loss'] / sums['n']):.4f} lr {ctx.lr:.3g} "
                   f"{progress.images * dist.world_size / (time.perf_counter() - progress.t0):.0f} img/s")
            progress.bar.set_postfix_str(msg, refresh=False)
            if progress.bar.disable:
                log.info("epoch %d/%d step %d/%d %s", epoch + 1, cfg.epochs, done, n_steps, msg)
            self.tracker.scalars(epoch * n_steps + done, train_loss=float(progress.loss), lr=ctx.lr)
        if done == n_steps:
            return  # the epoch's end writes last.pt and checks for a stop (fit)
        # Every rank takes the same decision: the save below runs collectives.
        stop, due = broadcast_flags(
            self.stop.signum is not None,
            cfg.save_every_minutes > 0 and time.monotonic() - progress.last_save > cfg.save_every_minutes * 60,
            device=self.device)
        if stop or due:
            if self._diverged(sums):
                raise TrainingDiverged(f"non-finite loss in epoch {epoch + 1} by step {done}: stopped "
                                       f"before saving; {self._last_good()}")
            self._save_last(ctx, epoch, done, sums)
            progress.last_save = time.monotonic()
        if stop:
            raise self._stopped(epoch, done)

    def _epoch_stats(self, ctx: StageState, sums: dict[str, torch.Tensor], progress: Progress) -> dict[str, float]:
        """The epoch's mean loss terms over all ranks, images skipped, last lr, time and throughput."""
        elapsed = time.perf_counter() - progress.t0
        keys = list(sums)
        totals = dict(zip(keys, all_reduce_sum(torch.stack([sums[k] for k in keys])).tolist(), strict=True))
        n, skipped, skipped_steps = totals.pop("n"), totals.pop("skipped"), totals.pop("skipped_steps", 0.0)
        if skipped_steps and self.dist.is_main:
            log.warning("%d training steps skipped: --skip-bad-images left their batches fewer than two images",
                        skipped_steps)
        stats = {f"train_{k}": v / n for k, v in totals.items()}
        images = all_reduce_sum(torch.tensor(float(progress.images), device=self.device)).item()
        return {**stats, "train_skipped": skipped, "train_skipped_steps": skipped_steps, "lr_last_step": ctx.lr,
                "epoch_time": elapsed,
                "images_per_s": images / elapsed}

    def _optimizer_step(self, ctx: StageState, *, apply: bool) -> None:
        """An update: the weights (and EMA) step when `apply` (some micro-batch was backpropagated); the schedule
        always does."""
        if apply:
            if self.cfg.clip_grad:
                self.scaler.unscale_(ctx.optimizer)
                for group in ctx.clip_groups:
                    nn.utils.clip_grad_norm_(group, self.cfg.clip_grad)
            self.scaler.step(ctx.optimizer)
            self.scaler.update()
            ctx.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.model)
        ctx.updates += 1
        ctx.scheduler.step_update(num_updates=ctx.updates)

    def _diverged(self, sums: dict[str, torch.Tensor]) -> bool:
        """Whether the loss summed so far is not finite (False before any step trained); on every rank."""
        return broadcast_flag("loss" in sums and not bool(torch.isfinite(sums["loss"])), self.device)

    def _last_good(self) -> str:
        return self.checkpoints.last_good()

    def _stop_requested(self) -> bool:
        return broadcast_flag(self.stop.signum is not None, self.device)

    def _stopped(self, next_epoch: int, step: int) -> StopRequested:
        where = f"epoch {next_epoch + 1} step {step}" if step else f"the end of epoch {next_epoch}"
        log.warning("%s: stopped at %s, %s written", self.stop.name, where, LAST)
        return StopRequested(self.stop.signum or signal.SIGTERM,
                             f"stopped by {self.stop.name} at {where}; {self.checkpoints.last} holds the run: resume "
                             "it by running the same command with --resume")

    # ------------------------------------------------------------------ validation
    def _end_epoch(self, epoch: int, train_stats: dict[str, float], ctx: StageState) -> None:
        cfg = self.cfg
        eval_model = self.ema.module if self.ema is not None else self.model
        when = f"after epoch {epoch + 1}"
        ensure_finite(eval_model, self.device, when, self.checkpoints.last)
        result = self.evaluator.evaluate(eval_model, when=when)
        self.bad_images.note("val", self.evaluator.frame, np.flatnonzero(~result.seen).tolist())
        metrics = self.evaluator.metrics(result)
        value = metrics[cfg.select_metric]  # one the val set gives (Evaluator.check_select_metric)
        improved = self.checkpoints.select(value, epoch + 1)
        if self.dist.is_main:
            self.history.append({"epoch": epoch + 1, "stage": ctx.stage.name, **train_stats, **metrics})
            if improved:
                self.checkpoints.save_best(self._best_checkpoint(eval_model, epoch + 1, metrics))
            plot_training_curves(self.history.frame(), self.out / CURVES, best_epoch=self.checkpoints.best_epoch,
                                 select_metric=cfg.select_metric)
            images, labels = self.evaluator.fixed_batch
            for tag, path in self.expert.epoch_artifacts(eval_model, images, labels, epoch + 1, self.out).items():
                self.tracker.image(tag, path, epoch + 1)
            self.tracker.epoch(epoch + 1, {**train_stats, **metrics})
            log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  %s %.4f%s  (%.0fs, %.0f img/s)",
                     epoch + 1, cfg.epochs, train_stats["train_loss"], metrics["val_loss"], cfg.select_metric,
                     value, "  *best*" if improved else "", train_stats["epoch_time"], train_stats["images_per_s"])
        self._save_last(ctx, epoch + 1, 0, None)

    # ------------------------------------------------------------------ checkpoints
    def _best_checkpoint(self, model: nn.Module, epoch: int, metrics: dict[str, float]) -> BestCheckpoint:
        return BestCheckpoint(model={k: v.detach().cpu() for k, v in model.state_dict().items()},
                              meta=self.expert.checkpoint_meta(), data_config=self.data_config.to_dict(),
                              args=self.cfg.to_dict(), epoch=epoch, metrics=metrics)

    def _save_last(self, ctx: StageState, next_epoch: int, step: int, sums: dict[str, torch.Tensor] | None) -> None:
        """Everything a resume needs; `step` > 0 marks a checkpoint taken mid-epoch. Called on every rank."""
        where = f"at epoch {next_epoch + 1} step {step}" if step else f"after epoch {next_epoch}"
        ensure_finite(self.model, self.device, where, self.checkpoints.last)
        if self.ema is not None:
            ensure_finite(self.ema.module, self.device, where, self.checkpoints.last)
        if not self.dist.is_main:
            return
        last = LastCheckpoint(
            **vars(self._best_checkpoint(self.model, next_epoch, {})),
            ema=None if self.ema is None else {k: v.cpu() for k, v in self.ema.module.state_dict().items()},
            optimizer=ctx.optimizer.state_dict(),
            scaler=self.scaler.state_dict(),
            recipe=self.expert.recipe(),
            stage=ctx.index,
            next_epoch=next_epoch,
            step=step,
            train_sums={k: v.cpu() for k, v in sums.items()} if sums else None,
            best_value=self.checkpoints.best_value,
            best_epoch=self.checkpoints.best_epoch,
            manifests=self.manifests,
            rng=rng_state(),
        )
        self.checkpoints.save_last(last)

    # ------------------------------------------------------------------ the end
    def _finish(self) -> dict[str, Any] | None:
        """Reload the best weights, calibrate, and write predictions, ROC, summary and the final table."""
        barrier()
        best = self.checkpoints.read_best()
        eval_model = self.ema.module if self.ema is not None else self.model
        eval_model.load_state_dict(best.model)
        result = self.evaluator.evaluate(eval_model)
        if not self.dist.is_main:
            return None
        metrics = self.evaluator.metrics(result)
        s = result.seen
        summary: dict[str, Any] = {"best_epoch": best.epoch, "select_metric": self.cfg.select_metric,
                                   "metrics": metrics, "model": self.expert.describe(),
                                   "shortcut_audit": self.audit.to_dict("records")}
        temperature = 1.0
        if self.cfg.calibrate:
            temperature = fit_temperature(result.logits[s], result.labels[s])
            summary["calibration"] = calibration_report(result.logits[s], result.labels[s], temperature)
            best.temperature = temperature
            self.checkpoints.save_best(best)
        summary["operating_points"] = final_report(self.evaluator.frame, result, metrics, temperature,
                                                   self.out / PREDICTIONS,
                                                   title=f"best epoch {best.epoch} (validation)")
        labels, p_fake, frame = result.labels[s], sigmoid(result.logits[s] / temperature), self.evaluator.frame[s]
        video_labels, video_probs = video_level(labels, p_fake, frame) or (None, None)
        plot_roc(labels, p_fake, self.out / ROC, video_labels=video_labels, video_probs=video_probs,
                 title=f"{self.expert.describe().get('model', '')}: best epoch {best.epoch} on validation")
        self.tracker.image("roc", self.out / ROC, best.epoch)
        self.tracker.close()
        write_json_atomic(self.out / SUMMARY, summary)
        if "calibration" in summary:
            cal = summary["calibration"]
            log.info("temperature %.3f: val NLL %.4f -> %.4f, ECE %.4f -> %.4f", temperature, cal["nll_before"],
                     cal["nll_after"], cal["ece_before"], cal["ece_after"])
        log.info("outputs in %s", self.out)
        return summary


def warmup_cosine(optimizer: torch.optim.Optimizer, lr: float, min_lr: float, warmup_epochs: float, epochs: int,
                  updates_per_epoch: int) -> Any:
    """Per-update schedule: linear warmup that reaches `lr` exactly, then a cosine from `lr` to `min_lr`.

    Counted in updates, and with the warmup as a prefix: timm's default starts the cosine at update 0, so a
    warmup of one epoch in three peaked at 75% of --lr.
    """
    total = epochs * updates_per_epoch
    warmup = min(round(warmup_epochs * updates_per_epoch), total - 1)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=total - warmup, warmup_epochs=warmup,
                                       warmup_prefix=True, min_lr=min_lr, warmup_lr=lr * 1e-3, step_on_epochs=False,
                                       updates_per_epoch=1)
    return scheduler


def _step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    return (((seed * 1_000_003 + epoch) * 1_000_003 + step) * 1_009 + rank) % (2**63)


def _set_determinism(deterministic: bool) -> None:
    if deterministic:
        # cuBLAS needs a fixed workspace for deterministic matmuls; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic

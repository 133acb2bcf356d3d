"""A training run, the first of a command's three modes (stage2.engine.modes): set-up, stages of epochs, the end.

`Trainer.__init__` sets the run up in named steps, one job each: the inputs read and checked, the run folder
(fresh, resumed or replaced), the model and its data config, validation (the val set decoded once, the shortcut
audit), the training data (labels, augmentation, loader), and what the loop steps with. `Trainer.fit` then runs each
stage (`start_stage`: its optimizer and warmup-cosine schedule) as epochs of `train_one_epoch` (stage2.engine.loop:
the loop alone), validation and checkpoints, and ends by reloading the best weights, calibrating a temperature and
writing the summary. What a run writes is named in stage2.run.files and its checkpoints kept by
stage2.run.saver; scoring is stage2.scoring; the model is an `Expert`'s. `start_stage` and `train_epoch` are also
what the benchmarks time.

Reproducibility: every random draw of a training step (dropout, device-side augmentation) is seeded from
(seed, epoch, step, rank), and every CPU augmentation from (seed, epoch, sample index), so a run resumed from any
checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stage2.atomic import write_json_atomic
from stage2.data.audit import run_audit
from stage2.data.dataset import Batch
from stage2.data.manifest import check_source_leak, manifest_fingerprint, read_manifest
from stage2.data.transforms import build_augmentation
from stage2.engine.loop import Loop, StageState, Sums, stop_requested, stopped, train_one_epoch
from stage2.errors import ConfigError, ManifestError, first_line
from stage2.experts.base import Expert, Stage
from stage2.processes import StopRequest, stop_requests, usable_cores
from stage2.run.checkpoint import LastCheckpoint
from stage2.run.config import TrainConfig
from stage2.run.device import autocast_dtype
from stage2.run.distributed import DistInfo, barrier
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


class Trainer:
    """One training run of an `Expert` with a `TrainConfig`, on this rank (`dist`)."""

    def __init__(self, cfg: TrainConfig, expert: Expert, dist: DistInfo, *, threads: str = "",
                 show_audit: bool = True):
        """`threads`: what `cpu_threads` chose, for the settings line; `show_audit` False: the shortcut audit of
        these sets was shown already (by the run before, in this command), it is only written. The steps run in
        this order: every input is read and checked before anything is built (offline, building the model first
        spent a minute on hub retries before a missing manifest was named), and the seed is set right before the
        model is built."""
        self.cfg, self.expert, self.dist, self.threads, self.show_audit = cfg, expert, dist, threads, show_audit
        self.device, self.out = dist.device, Path(cfg.output_dir)
        val_frame = self._setup_inputs()
        self._setup_run_dir()
        if self.finished is not None:
            return
        self._setup_model()
        self._setup_validation(val_frame)
        self._setup_data()
        self._setup_loop()

    # ------------------------------------------------------------------ set-up
    def _setup_inputs(self) -> pd.DataFrame:
        """--select-metric as a name, both manifests read and checked (no source on both sides), their
        fingerprints; returns the val manifest's frame."""
        cfg = self.cfg
        try:  # a name no run gives; whether this val set gives it is checked once it is decoded
            metric_direction(cfg.select_metric)
        except ValueError as err:
            raise ConfigError(f"--select-metric {cfg.select_metric}: {err}") from None
        # Self-blending makes the fakes: a train manifest of reals only will do (val still needs both classes).
        self.train_frame = read_manifest(cfg.train_manifest, cfg.data_root, require_both_classes=not cfg.self_blend)
        labels = self.train_frame["label"]
        if cfg.self_blend and not labels.eq(0).any():
            raise ManifestError(f"{cfg.train_manifest}: manifest has only 'fake' rows: --self-blend makes its fakes "
                                "from real images")
        if cfg.balanced_sampler and not labels.eq(1).any():
            raise ConfigError(f"--balanced-sampler: {cfg.train_manifest} has no fake rows to balance (--self-blend "
                              "makes every fake); leave --balanced-sampler out")
        val_frame = read_manifest(cfg.val_manifest, cfg.data_root, require_both_classes=True)
        check_source_leak(self.train_frame, val_frame)
        self.manifests = {"train": manifest_fingerprint(self.train_frame), "val": manifest_fingerprint(val_frame)}
        return val_frame

    def _setup_run_dir(self) -> None:
        """The folder as a fresh, resumed or replaced run (a resume checked against this command), train.log, and
        what the run writes there: metrics.csv, bad_images.txt, the tracker (checkpoints: `_setup_loop`); none of
        those for a finished run (`finished`: its summary), which has nothing to write and would never close them."""
        cfg, dist = self.cfg, self.dist
        self.resume_path = prepare_run_dir(cfg, dist.is_main)
        setup_logging(self.out / TRAIN_LOG if dist.is_main else None, dist.is_main)
        if cfg.resume and self.resume_path is None:
            log.warning("--resume: %s holds no %s yet: starting a new run", self.out, LAST)
        self.resume = read_resume_state(self.resume_path, cfg, self.expert) if self.resume_path else None
        if self.resume:
            check_manifests(self.resume, self.manifests, cfg)
        self.finished = self._finished_summary()
        if self.finished is not None:
            return
        self.workers = min(cfg.workers, usable_cores())
        self.history = MetricsLog(self.out / METRICS)
        self.bad_images = BadImages(self.out, dist.is_main, cfg.max_bad_images)
        self.tracker = make_tracker(cfg.log_to, self.out, dist.is_main)
        self.stop = StopRequest()  # set by SIGTERM or Ctrl-C during fit(): the loop stops at the next step

    def _finished_summary(self) -> dict[str, Any] | None:
        """On a --resume of a run that is finished (every epoch trained, its summary written), its summary: there is
        nothing to do, and the run says so rather than building the model and scoring the best epoch again."""
        resume, summary = self.resume, self.out / SUMMARY
        if not resume or resume.step or resume.next_epoch < self.cfg.epochs or not summary.is_file():
            return None
        best = "none" if resume.best_value is None else f"{resume.best_value:.4f} at epoch {resume.best_epoch}"
        log.info("--resume: the run in %s is finished (%d of %d epochs; best %s %s): nothing to do; a larger "
                 "--epochs trains it on", self.out, resume.next_epoch, self.cfg.epochs, self.cfg.select_metric, best)
        return json.loads(summary.read_text())

    def _setup_model(self) -> None:
        """Seeded, built, on the device; its data config (made once, by the expert) and the precision it trains in."""
        cfg = self.cfg
        _set_determinism(cfg.deterministic)
        torch.manual_seed(cfg.seed)
        self.model = self.expert.build_model()
        self.data_config = self.expert.data_config(self.model)
        # Parameters a model builds frozen (layers upstream never uses) stay frozen in every stage.
        self.learnable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.amp_dtype = autocast_dtype(cfg.amp, self.device)

    def _setup_validation(self, val_frame: pd.DataFrame) -> None:
        """The val set, every image decoded once now; --select-metric checked against it; and what the file
        headers alone give away about the labels, warned about before any GPU time is spent."""
        self.evaluator = Evaluator(self.cfg, self.expert, self.dist, self.data_config, bad_images=self.bad_images,
                                   frame=val_frame, last=self.out / LAST)
        self.evaluator.check_select_metric(self.cfg.select_metric)
        self.audit = run_audit({"train": self.train_frame, "val": self.evaluator.frame}, self.out, self.workers,
                               show=self.show_audit) if self.dist.is_main else None

    def _setup_data(self) -> None:
        """The labels an epoch trains on (the expert balances its loss on them), --aug, and this rank's loader."""
        cfg = self.cfg
        self.label_mix = trained_label_mix(cfg, self.train_frame["label"].to_numpy())
        if cfg.self_blend and min(self.label_mix) < 1:
            log.warning("--self-blend %s: an epoch is expected to train %.3g real and %.3g fake images: about one "
                        "class only", cfg.self_blend, *self.label_mix)
        self.expert.prepare(*self.label_mix)
        self.augmentation = build_augmentation(cfg.aug, cfg.epochs, self.data_config.mean, self.data_config.std)
        self.augmentation.on_device.to(self.device)
        self.train_loader, self.train_sampler, self.steps_per_epoch = train_loader(
            cfg, self.train_frame, self.data_config.size, self.dist, self.workers, self.augmentation.in_workers)
        self.updates_per_epoch = math.ceil(self.steps_per_epoch / cfg.grad_accum)

    def _setup_loop(self) -> None:
        """EMA, the grad scaler, the checkpoints kept of them, and what every step uses (stage2.engine.loop.Loop)."""
        cfg = self.cfg
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay) if cfg.ema else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.checkpoints = CheckpointSaver(self.out, functools.partial(is_better, cfg.select_metric), model=self.model,
                                           ema=self.ema, scaler=self.scaler, expert=self.expert,
                                           data_config=self.data_config, cfg=cfg, manifests=self.manifests,
                                           device=self.device, is_main=self.dist.is_main)
        self.loop = Loop(cfg=cfg, dist=self.dist, expert=self.expert, model=self.model,
                         augment=self.augmentation.on_device, generator=torch.Generator(device=self.device),
                         amp_dtype=self.amp_dtype, scaler=self.scaler, ema=self.ema, train_frame=self.train_frame,
                         bad_images=self.bad_images, checkpoints=self.checkpoints, tracker=self.tracker,
                         stop=self.stop)

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any] | None:
        """Every stage's epochs from where the run stands, then the end (`_finish`); the summary on rank 0."""
        if self.finished is not None:
            return self.finished if self.dist.is_main else None
        stages = self.expert.stages(self.cfg.epochs, self.cfg.lr)
        start_epoch, start_step = self._restore()
        self._announce(stages)
        with stop_requests(self.stop):
            first_epoch = 0  # the run's epoch at which this stage begins
            for index, stage in enumerate(stages):
                if start_epoch < first_epoch + stage.epochs:  # stages the run has finished are skipped whole
                    self._train_stage(index, stage, first_epoch, start_epoch, start_step)
                first_epoch += stage.epochs
        return self._finish()

    def _restore(self) -> tuple[int, int]:
        """On a resume, weights, EMA, metrics log, RNG and the best so far as last.pt holds them. Returns where the
        run stands: epoch (0-based, counted over the whole run, stages one after another) and steps into it."""
        resume = self.resume
        if not resume:
            return 0, 0
        restore(resume, self.model, None if self.ema is None else self.ema.module,
                self.history if self.dist.is_main else None)
        self.checkpoints.resume(resume)
        where = f"epoch {resume.next_epoch + 1}" + (f" step {resume.step}" if resume.step else "")
        if resume.next_epoch >= self.cfg.epochs:  # trained whole, stopped before its reports were written
            where = f"the end of its {self.cfg.epochs} epochs, to write its reports"
        best = self.checkpoints.best_value
        log.info("resuming from %s at %s (best %s so far: %s)", self.resume_path, where, self.cfg.select_metric,
                 "none yet" if best is None else f"{best:.4f}")
        return resume.next_epoch, resume.step

    def _announce(self, stages: list[Stage]) -> None:
        """The settings line, and args.json: what this run uses, replayable with --config (on a resume, the flags
        that may change are the new ones)."""
        log_settings(self.cfg, stages, dist=self.dist, amp_dtype=self.amp_dtype, threads=self.threads,
                     train_frame=self.train_frame, label_mix=self.label_mix, n_val=len(self.evaluator.frame),
                     data_config=self.data_config, degrade_start=self.augmentation.degrade_start,
                     workers=self.workers, n_params=sum(p.numel() for p in self.model.parameters()),
                     model=self.expert.describe())
        if self.dist.is_main:
            write_json_atomic(self.out / ARGS, {**self.cfg.cli_args, "expert": self.expert.describe()})

    def _train_stage(self, index: int, stage: Stage, first_epoch: int, start_epoch: int, start_step: int) -> None:
        """Stage `index`, which begins at the run's epoch `first_epoch`, from where the run stands."""
        resume = self.resume
        end = first_epoch + stage.epochs
        # The optimizer state in last.pt belongs to the stage it was saved in; a stage after it starts fresh, as it
        # would have without the stop.
        state = resume if resume and resume.stage == index else None
        begin = max(start_epoch, first_epoch)
        step = start_step if state and begin == start_epoch else 0
        # The schedule stands where the uninterrupted run would: the updates of this stage's finished epochs, plus
        # those of the steps already taken in this one (an update per grad_accum steps).
        updates = (begin - first_epoch) * self.updates_per_epoch + step // self.cfg.grad_accum
        ctx = self.start_stage(index, stage, updates, state)
        log.info("stage %d '%s': epochs %d-%d, lr %.3g", index + 1, stage.name, first_epoch + 1, end, stage.lr)
        for epoch in range(begin, end):
            # Only a mid-epoch resume continues an epoch, with the train statistics summed so far.
            sums = state.train_sums if state and step else None
            train_stats = self.train_epoch(epoch, ctx, start_step=step, sums=sums)
            step = 0
            self._end_epoch(epoch, train_stats, ctx)
            if stop_requested(self.loop):
                raise stopped(self.loop, epoch + 1, 0)

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

    def train_epoch(self, epoch: int, ctx: StageState, *, start_step: int = 0, sums: Sums | None = None,
                    batches: Iterable[Batch] | None = None, steps: int | None = None) -> dict[str, float]:
        """`train_one_epoch` on this rank's loader, from `start_step`; returns the epoch's train statistics.
        `batches`/`steps` replace the loader (the benchmarks feed a resident batch this way)."""
        self.train_sampler.set_epoch(epoch, start=start_step * self.train_loader.batch_size)
        self.train_loader.dataset.set_epoch(epoch)
        return train_one_epoch(self.loop, ctx, epoch, self.train_loader if batches is None else batches,
                               steps or self.steps_per_epoch, start_step=start_step, sums=sums)

    # ------------------------------------------------------------------ validation
    @property
    def eval_model(self) -> nn.Module:
        """The weights validated and kept as best.pt: the EMA's with --ema, else the model's."""
        return self.ema.module if self.ema is not None else self.model

    def _end_epoch(self, epoch: int, train_stats: dict[str, float], ctx: StageState) -> None:
        cfg = self.cfg
        eval_model = self.eval_model
        when = f"after epoch {epoch + 1}"
        self.checkpoints.ensure_finite(when, eval_model)
        result = self.evaluator.evaluate(eval_model, when=when)
        self.bad_images.note("val", self.evaluator.frame, np.flatnonzero(~result.seen).tolist())
        metrics = self.evaluator.metrics(result)
        value = metrics[cfg.select_metric]  # one the val set gives (Evaluator.check_select_metric)
        improved = self.checkpoints.select(value, epoch + 1)
        if self.dist.is_main:
            self.history.append({"epoch": epoch + 1, "stage": ctx.stage.name, **train_stats, **metrics})
            if improved:
                self.checkpoints.save_best(eval_model, epoch + 1, metrics)
            plot_training_curves(self.history.frame(), self.out / CURVES, best_epoch=self.checkpoints.best_epoch,
                                 select_metric=cfg.select_metric)
            images, labels = self.evaluator.fixed_batch
            for tag, path in self.expert.epoch_artifacts(eval_model, images, labels, epoch + 1, self.out).items():
                self.tracker.image(tag, path, epoch + 1)
            self.tracker.epoch(epoch + 1, {**train_stats, **metrics})
            log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  %s %.4f%s  (%.0fs, %.0f img/s)",
                     epoch + 1, cfg.epochs, train_stats["train_loss"], metrics["val_loss"], cfg.select_metric,
                     value, "  *best*" if improved else "", train_stats["epoch_time"], train_stats["images_per_s"])
        self.checkpoints.save_last(ctx.optimizer, ctx.index, epoch + 1, 0, None)

    # ------------------------------------------------------------------ the end
    def _finish(self) -> dict[str, Any] | None:
        """Reload the best weights, calibrate, and write predictions, ROC, summary and the final table."""
        barrier()
        best = self.checkpoints.read_best()
        eval_model = self.eval_model
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
            self.checkpoints.save_calibrated(best, temperature)
        summary["operating_points"] = final_report(self.evaluator.frame, result, metrics, temperature,
                                                   self.out / PREDICTIONS,
                                                   title=f"best epoch {best.epoch} (validation)",
                                                   calibrated=self.cfg.calibrate)
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


def _set_determinism(deterministic: bool) -> None:
    if deterministic:
        # cuBLAS needs a fixed workspace for deterministic matmuls; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic

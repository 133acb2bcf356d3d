"""The training loop both experts share: data, AMP, accumulation, clipping, EMA, DDP, resume.

One pass reads top to bottom in `Trainer.fit`: set up the run folder, data, model and devices;
then for each stage, build its optimizer and schedule and run epochs of (train, validate,
checkpoint); finally reload the best weights, calibrate a temperature and write the summary.

Reproducibility: every random draw of a training step (dropout, device-side augmentation) is
seeded from (seed, epoch, step, rank), and every CPU augmentation from (seed, epoch, sample
index), so a run resumed from any checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
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
from torch.utils.data import DataLoader
from tqdm import tqdm

from src.data.cache import CacheView, open_cache
from src.data.dataset import Batch, ManifestDataset, collate
from src.data.manifest import read_manifest
from src.data.transforms import DeviceTransform, build_cpu_transform
from src.engine.calibration import calibration_report, fit_temperature
from src.engine.checkpoint import RUN_FILES, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from src.engine.config import TrainConfig
from src.engine.distributed import (
    DistInfo,
    ShardedSampler,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    broadcast_flag,
    broadcast_flags,
    gather_by_index,
    gather_objects,
    setup_distributed,
)
from src.engine.metrics import binary_metrics, is_better, metric_direction
from src.engine.report import (
    MetricsLog,
    format_metrics_table,
    plot_roc,
    plot_training_curves,
    write_json_atomic,
    write_text_atomic,
)
from src.experts.base import Expert, Stage
from src.models.factory import model_from_checkpoint

log = logging.getLogger("src")

# Everything a run writes into its folder; --overwrite removes exactly these.
RUN_OUTPUTS = (*RUN_FILES, "train.log", "roc.png", "curves.png", "val_predictions.csv", "eval.json",
               "bad_images.txt", "recon_samples")

# What a resumed run may change (README, "Resuming"). The schedule is a function of these and of where the run
# stands, so a change re-plans it from there: a longer --epochs continues on the cosine of the new length, a new
# --lr scales the rest of it. Everything else in TrainConfig, the model and its loss settings, must stay as the
# run started: a different batch size, seed, image size or data would silently mix two runs.
RESUME_REPLANS = ("epochs", "lr", "min_lr", "warmup_epochs")
RESUME_FREE = ("workers", "cache_dir", "skip_bad_images", "amp", "channels_last", "compile", "device", "deterministic",
               "clip_grad", "ema_decay", "output_dir", "resume", "overwrite", "save_every_minutes", "evaluate",
               "log_every", "calibrate")


class ConfigError(ValueError):
    """A flag or the run folder is not usable as given."""


class TrainingDiverged(RuntimeError):
    """The loss, a weight or a statistic became NaN or infinite; the last good checkpoint is left as it was."""


class StopRequested(RuntimeError):
    """SIGTERM or Ctrl-C: the run stopped at a step boundary after writing last.pt."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


@dataclass
class EvalResult:
    """Validation outputs in dataset order; `seen` is False for images skipped as undecodable."""

    seen: np.ndarray
    labels: np.ndarray
    logits: np.ndarray
    terms: dict[str, np.ndarray]


def run(cfg: TrainConfig, expert: Expert) -> dict[str, Any] | None:
    """Train (or with `cfg.evaluate`, only evaluate) and return the summary on rank 0."""
    trainer = Trainer(cfg, expert, setup_distributed(cfg.device))
    return trainer.evaluate_checkpoint(Path(cfg.evaluate)) if cfg.evaluate else trainer.fit()


class Trainer:
    def __init__(self, cfg: TrainConfig, expert: Expert, dist: DistInfo):
        self.cfg, self.expert, self.dist = cfg, expert, dist
        self.device = dist.device
        self.out = Path(cfg.output_dir)
        self.resume_path = None if cfg.evaluate else self._prepare_output_dir()
        _setup_logging(self.out / "train.log" if dist.is_main and not cfg.evaluate else None, dist.is_main)
        self.resume = self._read_resume_state() if self.resume_path else None
        _set_determinism(cfg.deterministic)
        torch.manual_seed(cfg.seed)
        self.workers = min(cfg.workers, _usable_cores())
        self.bad_images: dict[str, set[str]] = {"train": set(), "val": set()}
        self.stop_signal: int | None = None

        self.val_frame = read_manifest(cfg.val_manifest, cfg.data_root, require_both_classes=True)
        try:
            metric_direction(cfg.select_metric)
        except ValueError as err:
            raise ConfigError(f"--select-metric {cfg.select_metric}: {err}") from None
        if cfg.select_metric.startswith("video_") and "video_id" not in self.val_frame:
            raise ConfigError(f"--select-metric {cfg.select_metric}: {cfg.val_manifest} has no video_id column")
        if cfg.evaluate:
            checkpoint = load_checkpoint(cfg.evaluate)
            meta = expert.checkpoint_meta()
            for key in ("family", "variant"):
                if checkpoint.get(key) != meta.get(key):
                    raise ConfigError(f"--evaluate {cfg.evaluate}: holds {checkpoint.get('model_name', 'no model')} "
                                      f"({key} {checkpoint.get(key)!r}); this run evaluates {key} {meta.get(key)!r}")
            self.model = model_from_checkpoint(checkpoint)
            self.data_config = checkpoint["data_config"]
        else:
            self.model = expert.build_model()
            self.data_config = expert.data_config(self.model)
        img_size = self.data_config["input_size"][-1]
        mean, std = tuple(self.data_config["mean"]), tuple(self.data_config["std"])
        # Parameters a model builds frozen (layers upstream never uses) stay frozen in every stage.
        self.learnable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.eval_tf = DeviceTransform(mean, std, "none").to(self.device).eval()
        self.val_set = ManifestDataset(self.val_frame, img_size, skip_bad_images=cfg.skip_bad_images,
                                       cache=self._cache_view(self.val_frame, img_size))
        self.val_loader = self._loader(self.val_set, ShardedSampler(
            len(self.val_set), shuffle=False, rank=dist.rank, world_size=dist.world_size), drop_last=False)
        self.amp_dtype = _autocast_dtype(cfg.amp, self.device)
        self._check_val_images()
        if cfg.evaluate:
            return

        self.train_frame = read_manifest(cfg.train_manifest, cfg.data_root)
        expert.prepare(self.train_frame["label"].to_numpy())
        self.train_tf = DeviceTransform(mean, std, cfg.aug).to(self.device)
        self.train_set = ManifestDataset(self.train_frame, img_size, transform=build_cpu_transform(cfg.aug),
                                         skip_bad_images=cfg.skip_bad_images, seed=cfg.seed,
                                         cache=self._cache_view(self.train_frame, img_size))
        weights = _balanced_weights(self.train_frame["label"].to_numpy()) if cfg.balanced_sampler else None
        self.train_sampler = ShardedSampler(len(self.train_set), shuffle=True, seed=cfg.seed, rank=dist.rank,
                                            world_size=dist.world_size, weights=weights)
        drop_last = self.train_sampler.per_rank >= cfg.batch_size
        self.train_loader = self._loader(self.train_set, self.train_sampler, drop_last=drop_last)
        self.steps_per_epoch = (self.train_sampler.per_rank // cfg.batch_size if drop_last else 1)
        self.updates_per_epoch = math.ceil(self.steps_per_epoch / cfg.grad_accum)
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay) if cfg.ema else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.aug_gen = torch.Generator(device=self.device)
        self.history = MetricsLog(self.out / "metrics.csv")
        self.best_value: float | None = None
        self.best_epoch = 0

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any] | None:
        cfg = self.cfg
        stages = self.expert.stages(cfg.epochs, cfg.lr)
        resume = self.resume
        if resume:
            self._restore(resume)
        start_epoch, start_step = (resume["next_epoch"], resume["step"]) if resume else (0, 0)
        self._log_settings(stages)
        if self.dist.is_main:
            # What this run uses; on a resume, the flags that may change are the new ones (see RESUME_FREE).
            write_json_atomic(self.out / "args.json", {**cfg.to_dict(), **self.expert.describe()})

        with _stop_signals(self):
            stage_start = 0
            for stage_index, stage in enumerate(stages):
                stage_end = stage_start + stage.epochs
                if start_epoch < stage_end:
                    state = resume if resume and resume["stage"] == stage_index else None
                    self._run_stage(stage_index, stage, stage_start, max(start_epoch, stage_start),
                                    start_step if state else 0, state)
                stage_start = stage_end
        return self._finish()

    def _run_stage(self, index: int, stage: Stage, first_epoch: int, start_epoch: int, start_step: int,
                   state: dict[str, Any] | None) -> None:
        cfg = self.cfg
        for name, p in self.model.named_parameters():
            p.requires_grad_(name in self.learnable and (stage.trainable is None or stage.trainable(name)))
        optimizer = create_optimizer_v2(self.model, opt=cfg.opt, lr=stage.lr, weight_decay=cfg.weight_decay)
        scheduler = _warmup_cosine(optimizer, stage.lr, cfg.min_lr, cfg.warmup_epochs, stage.epochs,
                                   self.updates_per_epoch)
        if state:
            # The schedule is not restored: it follows from the flags and the position below, so a resume with a
            # new --epochs or --lr re-plans it (the optimizer's own lr is overwritten by the first step_update).
            optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
        train_model: nn.Module = self.model
        if self.dist.enabled:
            train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.expert.find_unused_parameters)
        if cfg.compile:
            train_model = torch.compile(train_model)
        n_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("stage %d '%s': epochs %d-%d, lr %.3g, %.1fM trainable parameters", index + 1, stage.name,
                 first_epoch + 1, first_epoch + stage.epochs, stage.lr, n_trainable / 1e6)
        # The schedule position follows from where the stage resumes; nothing else to restore.
        updates = (start_epoch - first_epoch) * self.updates_per_epoch + start_step // cfg.grad_accum
        ctx = _StageContext(index, stage, optimizer, scheduler, train_model, updates)
        scheduler.step_update(num_updates=updates)
        for epoch in range(start_epoch, first_epoch + stage.epochs):
            resumed_mid_epoch = state is not None and epoch == start_epoch and start_step > 0
            sums = state["train_sums"] if resumed_mid_epoch else None
            train_stats = self._train_epoch(epoch, start_step if resumed_mid_epoch else 0, sums, ctx)
            self._end_epoch(epoch, train_stats, ctx)
            if self._stop_requested():
                raise self._stopped(epoch + 1, 0)

    # ------------------------------------------------------------------ training
    def _train_epoch(self, epoch: int, start_step: int, sums: dict[str, torch.Tensor] | None,
                     ctx: _StageContext) -> dict[str, float]:
        cfg, dist = self.cfg, self.dist
        self.model.train()
        self.train_tf.train()
        self.train_sampler.set_epoch(epoch, start=start_step * cfg.batch_size)
        self.train_set.set_epoch(epoch)
        sums = {k: v.to(self.device) for k, v in sums.items()} if sums else None
        n_steps = self.steps_per_epoch
        interactive = dist.is_main and sys.stderr.isatty()
        bar = tqdm(total=n_steps, initial=start_step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not interactive, dynamic_ncols=True, leave=False)
        t0, images_seen, last_save = time.perf_counter(), 0, time.monotonic()
        step, done, bad_rows = start_step, start_step, []
        for step, batch in enumerate(self._batches(), start=start_step):
            labels = batch.labels.to(self.device, non_blocking=True)
            images = batch.images.to(self.device, non_blocking=True)
            seed = _step_seed(cfg.seed, epoch, step, dist.rank)
            torch.manual_seed(seed)
            self.aug_gen.manual_seed(seed)
            x = self.train_tf(images, generator=self.aug_gen)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            update = (step + 1) % cfg.grad_accum == 0 or step + 1 == n_steps
            sync = nullcontext() if update or not dist.enabled else ctx.train_model.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    outputs = ctx.train_model(x)
                    terms = self.expert.loss(outputs, x, labels)
                loss = terms["loss"].mean()
                self.scaler.scale(loss / cfg.grad_accum).backward()
            batch_sums = {k: v.detach().float().sum() for k, v in terms.items()}
            batch_sums["n"] = torch.tensor(float(labels.numel()), device=self.device)
            batch_sums["skipped"] = torch.tensor(float(batch.skipped.numel()), device=self.device)
            bad_rows += batch.skipped.tolist()
            sums = batch_sums if sums is None else {k: sums[k] + batch_sums[k] for k in sums}
            images_seen += labels.numel()
            if update:
                self._optimizer_step(ctx)
                done = step + 1
                if (done % cfg.log_every == 0 or done == n_steps) and self._diverged(sums):
                    raise TrainingDiverged(f"non-finite loss in epoch {epoch + 1} by step {done}: stopped; "
                                           f"{self._last_good()}")
                if dist.is_main and done % cfg.log_every == 0:
                    msg = (f"loss {float(sums['loss'] / sums['n']):.4f} lr {ctx.lr:.3g} "
                           f"{images_seen * dist.world_size / (time.perf_counter() - t0):.0f} img/s")
                    bar.set_postfix_str(msg, refresh=False)
                    if not interactive:
                        log.info("epoch %d/%d step %d/%d %s", epoch + 1, cfg.epochs, done, n_steps, msg)
                if done < n_steps:
                    # Every rank takes the same decision: the save below runs collectives.
                    stop, due = broadcast_flags(
                        self.stop_signal is not None,
                        cfg.save_every_minutes > 0 and time.monotonic() - last_save > cfg.save_every_minutes * 60,
                        device=self.device)
                    if stop or due:
                        if self._diverged(sums):
                            raise TrainingDiverged(f"non-finite loss in epoch {epoch + 1} by step {done}: stopped "
                                                   f"before saving; {self._last_good()}")
                        self._save_last(ctx, epoch, done, sums)
                        last_save = time.monotonic()
                    if stop:
                        raise self._stopped(epoch, done)
            bar.update(1)
        bar.close()
        if self.stop_signal is not None and done < n_steps:  # the signal also ended the loader's workers
            self._save_last(ctx, epoch, done, sums)
            raise self._stopped(epoch, done)
        if sums is None:
            raise ConfigError(f"{cfg.train_manifest}: no training batch in epoch {epoch + 1}")
        if self._diverged(sums):
            raise TrainingDiverged(f"non-finite loss in epoch {epoch + 1}: stopped; {self._last_good()}")
        self._note_bad_images("train", self.train_frame, bad_rows)
        elapsed = time.perf_counter() - t0
        keys = list(sums)
        totals = dict(zip(keys, all_reduce_sum(torch.stack([sums[k] for k in keys])).tolist(), strict=True))
        n, skipped = totals.pop("n"), totals.pop("skipped")
        stats = {f"train_{k}": v / n for k, v in totals.items()}
        images = all_reduce_sum(torch.tensor(float(images_seen), device=self.device)).item()
        return {**stats, "train_skipped": skipped, "lr_last_step": ctx.lr, "epoch_time": elapsed,
                "images_per_s": images / elapsed}

    def _batches(self) -> Iterator[Batch]:
        """The train loader's batches. A SIGTERM sent to the whole process group (as some schedulers do) also
        ends the loader's workers; the epoch then ends quietly after the last complete step and the loop
        stops there."""
        batches = iter(self.train_loader)
        while True:
            try:
                yield next(batches)
            except StopIteration:
                return
            except RuntimeError:
                if self.stop_signal is None:
                    raise
                return

    def _optimizer_step(self, ctx: _StageContext) -> None:
        if self.cfg.clip_grad:
            self.scaler.unscale_(ctx.optimizer)
            nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.cfg.clip_grad)
        self.scaler.step(ctx.optimizer)
        self.scaler.update()
        ctx.optimizer.zero_grad(set_to_none=True)
        ctx.updates += 1
        ctx.scheduler.step_update(num_updates=ctx.updates)
        if self.ema is not None:
            self.ema.update(self.model)

    def _diverged(self, sums: dict[str, torch.Tensor]) -> bool:
        return broadcast_flag(not bool(torch.isfinite(sums["loss"])), self.device)

    def _check_finite(self, model: nn.Module, when: str) -> None:
        """Stop (on every rank) before a non-finite weight or statistic can reach a checkpoint or a metric.

        The loss can stay finite while, say, a BatchNorm running_var overflows to inf; that model must not
        replace the last good last.pt.
        """
        bad = next((name for name, t in (*model.named_parameters(), *model.named_buffers())
                    if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
        if broadcast_flag(bad is not None, self.device):
            raise TrainingDiverged(f"non-finite values in {bad or 'a tensor on another rank'} {when}: stopped; "
                                   f"{self._last_good()}")

    def _last_good(self) -> str:
        last = self.out / "last.pt"
        return f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"

    def _stop_requested(self) -> bool:
        return broadcast_flag(self.stop_signal is not None, self.device)

    def _stopped(self, next_epoch: int, step: int) -> StopRequested:
        name = signal.Signals(self.stop_signal).name if self.stop_signal else "a signal"
        where = f"epoch {next_epoch + 1} step {step}" if step else f"the end of epoch {next_epoch}"
        log.warning("%s: stopped at %s, last.pt written", name, where)
        return StopRequested(self.stop_signal or signal.SIGTERM,
                             f"stopped by {name} at {where}; {self.out / 'last.pt'} holds the run: resume it by "
                             "running the same command with --resume")

    def _note_bad_images(self, split: str, frame: pd.DataFrame, rows: list[int]) -> None:
        """Collect undecodable images (every rank's) and list them all in OUTPUT_DIR/bad_images.txt."""
        found = {str(frame["path"].iloc[i]) for i in gather_objects(rows)}
        if found - self.bad_images[split]:
            self.bad_images[split] |= found
            if self.dist.is_main:
                lines = [f"{kind}\t{path}" for kind in self.bad_images for path in sorted(self.bad_images[kind])]
                write_text_atomic(self.out / "bad_images.txt", "\n".join(lines) + "\n")
                log.warning("%d undecodable %s images skipped so far, listed in %s", len(self.bad_images[split]),
                            split, self.out / "bad_images.txt")

    # ------------------------------------------------------------------ validation
    def _end_epoch(self, epoch: int, train_stats: dict[str, float], ctx: _StageContext) -> None:
        cfg = self.cfg
        eval_model = self.ema.module if self.ema is not None else self.model
        result = self.evaluate(eval_model, when=f"after epoch {epoch + 1}")
        self._note_bad_images("val", self.val_frame, np.flatnonzero(~result.seen).tolist())
        metrics = self._metrics(result)
        if cfg.select_metric not in metrics:
            raise ConfigError(f"--select-metric {cfg.select_metric}: not among the validation metrics "
                              f"({', '.join(sorted(metrics))})")
        value = metrics[cfg.select_metric]
        improved = self.best_value is None or is_better(cfg.select_metric, value, self.best_value)
        if improved:
            self.best_value, self.best_epoch = value, epoch + 1
        if self.dist.is_main:
            self.history.append({"epoch": epoch + 1, "stage": ctx.stage.name, **train_stats, **metrics})
            if improved:
                save_checkpoint(self._weights_state(eval_model, epoch + 1, metrics), self.out / "best.pt")
            plot_training_curves(self.history.frame(), self.out / "curves.png")
            self.expert.epoch_artifacts(eval_model, *self._fixed_val_batch, epoch + 1, self.out)
            log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  %s %.4f%s  (%.0fs, %.0f img/s)",
                     epoch + 1, cfg.epochs, train_stats["train_loss"], metrics["val_loss"], cfg.select_metric,
                     value, "  *best*" if improved else "", train_stats["epoch_time"], train_stats["images_per_s"])
        self._save_last(ctx, epoch + 1, 0, None)

    def evaluate(self, model: nn.Module, when: str = "") -> EvalResult:
        """Run the whole val set (sharded over ranks) and gather it in dataset order on every rank.

        Every rank scores rank 0's weights *and* buffers (BatchNorm statistics drift apart between DDP ranks
        during an epoch), so the metrics describe exactly the model rank 0 saves. `when` names the moment in
        a divergence message.
        """
        broadcast_buffers(model)
        self._check_finite(model, when)
        model.eval()
        names: list[str] = []
        indices, rows = [], []
        with torch.inference_mode(), self._autocast():
            for batch in self.val_loader:
                if batch.labels.numel() == 0:
                    continue
                labels = batch.labels.to(self.device, non_blocking=True)
                x = self._prepare(self.eval_tf(batch.images.to(self.device, non_blocking=True)))
                outputs = model(x)
                terms = self.expert.loss(outputs, x, labels)
                names = list(terms)
                columns = [labels.float(), self.expert.fake_logit(outputs).float(), *(terms[k].float() for k in names)]
                indices.append(batch.indices.to(self.device))
                rows.append(torch.stack(columns, dim=1))
        if not rows:
            raise ConfigError(f"{self.cfg.val_manifest}: no validation image could be decoded")
        seen, gathered = gather_by_index(torch.cat(indices), torch.cat(rows), len(self.val_set))
        seen_np, values = seen.cpu().numpy(), gathered.cpu().numpy()
        if not np.isfinite(values[seen_np, 1]).all():
            raise TrainingDiverged(f"non-finite validation scores {when}: stopped; {self._last_good()}")
        return EvalResult(seen=seen_np, labels=values[:, 0].astype(np.int64), logits=values[:, 1],
                          terms={k: values[:, 2 + i] for i, k in enumerate(names)})

    def _metrics(self, result: EvalResult) -> dict[str, float]:
        s = result.seen
        frame = self.val_frame[s]
        labels, probs = result.labels[s], _sigmoid(result.logits[s])
        metrics = binary_metrics(
            labels, probs,
            video_ids=frame["video_id"].tolist() if "video_id" in frame else None,
            methods=frame["method"].tolist() if "method" in frame else None)
        for name, values in result.terms.items():
            metrics[f"val_{name}"] = float(values[s].mean())
        for name in self.expert.per_class_terms:
            values = result.terms[name][s]
            metrics[f"val_{name}_real"] = float(values[labels == 0].mean())
            metrics[f"val_{name}_fake"] = float(values[labels == 1].mean())
        metrics["val_skipped"] = float((~s).sum())
        return metrics

    @functools.cached_property
    def _fixed_val_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same four val images of each class every epoch, normalised, for visual artefacts."""
        labels = self.val_frame["label"].to_numpy()
        picks = [int(i) for c in (0, 1) for i in np.flatnonzero(labels == c)[:4]]
        items = [item for item in (self.val_set[i] for i in picks) if item is not None]
        batch = collate(items)
        return self._prepare(self.eval_tf(batch.images.to(self.device))), batch.labels

    # ------------------------------------------------------------------ checkpoints
    def _weights_state(self, model: nn.Module, epoch: int, metrics: dict[str, float]) -> dict[str, Any]:
        return {
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            **self.expert.checkpoint_meta(),
            "data_config": self.data_config,
            "args": self.cfg.to_dict(),
            "epoch": epoch,
            "metrics": metrics,
            "temperature": 1.0,
        }

    def _save_last(self, ctx: _StageContext, next_epoch: int, step: int,
                   sums: dict[str, torch.Tensor] | None) -> None:
        """Everything a resume needs; `step` > 0 marks a checkpoint taken mid-epoch. Called on every rank."""
        where = f"at epoch {next_epoch + 1} step {step}" if step else f"after epoch {next_epoch}"
        self._check_finite(self.model, where)
        if self.ema is not None:
            self._check_finite(self.ema.module, where)
        if not self.dist.is_main:
            return
        state = self._weights_state(self.model, next_epoch, {})
        state.update({
            "ema": None if self.ema is None else {k: v.cpu() for k, v in self.ema.module.state_dict().items()},
            "optimizer": ctx.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "recipe": self.expert.recipe(),
            "stage": ctx.index,
            "next_epoch": next_epoch,
            "step": step,
            "train_sums": {k: v.cpu() for k, v in sums.items()} if sums else None,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "rng": rng_state(),
        })
        save_checkpoint(state, self.out / "last.pt")

    def _read_resume_state(self) -> dict[str, Any]:
        """Load last.pt and check, before anything is built, that this command may continue that run."""
        state = load_checkpoint(self.resume_path)
        what = f"--resume {self.resume_path}"
        if "optimizer" not in state:
            raise ConfigError(f"{what}: not a last.pt (it holds no optimizer state)")
        _check_same_model(state, self.expert.checkpoint_meta(), what)
        recipe = self.expert.recipe()
        for key, value in (state.get("recipe") or {}).items():
            if recipe.get(key) != value:
                raise ConfigError(f"{what}: the run was trained with {key}={value!r}, this command says "
                                  f"{recipe.get(key)!r}; it cannot change on resume (start a new run)")
        before, now = state.get("args") or {}, self.cfg.to_dict()
        for key in now:
            if key in before and before[key] != now[key]:
                flag = "--" + key.replace("_", "-")
                if key not in RESUME_REPLANS + RESUME_FREE:
                    raise ConfigError(f"{what}: the run was trained with {flag} {before[key]}, this command says "
                                      f"{now[key]}; it cannot change on resume (start a new run)")
                if key not in ("resume", "overwrite", "output_dir"):
                    how = "the schedule is re-planned from here" if key in RESUME_REPLANS else "applies from here"
                    log.info("resume: %s %s -> %s (%s)", flag, before[key], now[key], how)
        trained = state["next_epoch"] + (1 if state["step"] else 0)
        if self.cfg.epochs < trained:
            raise ConfigError(f"{what}: --epochs {self.cfg.epochs}, but the run has already reached epoch {trained}")
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
        if self.dist.is_main:
            self.history.truncate(state["next_epoch"])
        set_rng_state(state["rng"])
        where = f"epoch {state['next_epoch'] + 1}" + (f" step {state['step']}" if state["step"] else "")
        log.info("resuming from %s at %s (best %s so far: %s)", self.resume_path, where, self.cfg.select_metric,
                 self.best_value)
        return state

    # ------------------------------------------------------------------ the end
    def _finish(self) -> dict[str, Any] | None:
        """Reload the best weights, calibrate, and write predictions, ROC, summary and the final table."""
        barrier()
        best = load_checkpoint(self.out / "best.pt")
        eval_model = self.ema.module if self.ema is not None else self.model
        eval_model.load_state_dict(best["model"])
        result = self.evaluate(eval_model)
        if not self.dist.is_main:
            return None
        metrics = self._metrics(result)
        s = result.seen
        summary: dict[str, Any] = {"best_epoch": best["epoch"], "select_metric": self.cfg.select_metric,
                                   "metrics": metrics, "model": self.expert.describe()}
        temperature = 1.0
        if self.cfg.calibrate:
            temperature = fit_temperature(result.logits[s], result.labels[s])
            summary["calibration"] = calibration_report(result.logits[s], result.labels[s], temperature)
            best["temperature"] = temperature
            save_checkpoint(best, self.out / "best.pt")
        frame = self.val_frame.assign(p_fake=_sigmoid(result.logits),
                                      p_fake_calibrated=_sigmoid(result.logits / temperature))[s]
        write_text_atomic(self.out / "val_predictions.csv", frame.to_csv(index=False))
        plot_roc(result.labels[s], _sigmoid(result.logits[s]), self.out / "roc.png",
                 title=f"{self.expert.describe().get('model', '')} - best epoch {best['epoch']}")
        write_json_atomic(self.out / "summary.json", summary)
        log.info("\n%s", format_metrics_table(metrics, title=f"best epoch {best['epoch']} (validation)"))
        if "calibration" in summary:
            cal = summary["calibration"]
            log.info("temperature %.3f: val NLL %.4f -> %.4f, ECE %.4f -> %.4f", temperature, cal["nll_before"],
                     cal["nll_after"], cal["ece_before"], cal["ece_after"])
        log.info("outputs in %s", self.out)
        return summary

    def evaluate_checkpoint(self, path: Path) -> dict[str, Any] | None:
        """--evaluate: metrics of a checkpoint on the val manifest, identical for any number of ranks."""
        metrics = self._metrics(self.evaluate(self.model))
        if not self.dist.is_main:
            return None
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / "eval.json", {"checkpoint": str(path), "metrics": metrics})
        log.info("\n%s", format_metrics_table(metrics, title=f"{path} on {self.cfg.val_manifest}"))
        return {"metrics": metrics}

    # ------------------------------------------------------------------ plumbing
    def _prepare_output_dir(self) -> Path | None:
        """Decide between a fresh run, a resume and an overwrite; never lose a previous best.pt silently."""
        cfg = self.cfg
        existing = [name for name in RUN_FILES if (self.out / name).exists()]
        if cfg.resume:
            path = self.out / "last.pt" if cfg.resume == "auto" else Path(cfg.resume)
            if path.is_file():
                return path
            if cfg.resume == "auto" and not existing:
                return None
            raise ConfigError(f"--resume {cfg.resume}: no checkpoint at {path}")
        if existing and not cfg.overwrite:
            raise ConfigError(
                f"--output-dir {self.out} already holds a run ({', '.join(existing)}): pass --resume to continue "
                "it, --overwrite to replace it, or choose another --output-dir")
        barrier()
        if existing and self.dist.is_main:
            for name in RUN_OUTPUTS:
                target = self.out / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        barrier()
        return None

    def _cache_view(self, frame: pd.DataFrame, img_size: int) -> CacheView | None:
        """With --cache-dir: rank 0 decodes what is missing, then every rank maps the same file."""
        if not self.cfg.cache_dir:
            return None
        paths = frame["path"].tolist()
        if self.dist.is_main:
            view = open_cache(self.cfg.cache_dir, img_size, paths, workers=self.cfg.workers,
                              skip_bad_images=self.cfg.skip_bad_images)
        barrier()
        if not self.dist.is_main:  # rank 0 has decoded everything: this only reads the index
            view = open_cache(self.cfg.cache_dir, img_size, paths, skip_bad_images=self.cfg.skip_bad_images)
        return view

    def _loader(self, dataset: ManifestDataset, sampler: ShardedSampler, drop_last: bool) -> DataLoader:
        workers = self.workers
        return DataLoader(dataset, batch_size=self.cfg.batch_size, sampler=sampler, num_workers=workers,
                          collate_fn=collate, pin_memory=self.device.type == "cuda", drop_last=drop_last,
                          prefetch_factor=4 if workers > 0 else None, worker_init_fn=_ignore_ctrl_c)

    def _check_val_images(self) -> None:
        """Decode every val image once before training, so that a corrupt one stops the run now (naming it)
        rather than after a whole training epoch; with --skip-bad-images they are listed instead."""
        if self.cfg.cache_dir:
            return  # building the cache decoded, and checked, every image
        rows = [i for batch in self.val_loader for i in batch.skipped.tolist()]
        if rows:
            self._note_bad_images("val", self.val_frame, rows)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _log_settings(self, stages: list[Stage]) -> None:
        cfg, dc = self.cfg, self.data_config
        n_params = sum(p.numel() for p in self.model.parameters())
        lines = [
            f"device {self.device} x {self.dist.world_size} rank(s)"
            f"{f' (process group {self.dist.backend})' if self.dist.backend else ''}, amp {self.amp_dtype or 'off'}, "
            f"channels_last {cfg.channels_last}, compile {cfg.compile}, deterministic {cfg.deterministic}",
            f"train {len(self.train_set)} images ({int(self.train_frame['label'].sum())} fake) from "
            f"{cfg.train_manifest}; val {len(self.val_set)} from {cfg.val_manifest}",
            f"input {dc['input_size'][-1]}px, mean {dc['mean']}, std {dc['std']}, aug {cfg.aug}, "
            f"workers {self.workers}"
            + (f" (--workers {cfg.workers} capped to the {self.workers} cores this process may use)"
               if self.workers < cfg.workers else ""),
            f"epochs {cfg.epochs}, batch {cfg.batch_size}/rank x accum {cfg.grad_accum}, {cfg.opt} lr {cfg.lr:g} "
            f"(warmup {cfg.warmup_epochs:g} ep, cosine to {cfg.min_lr:g}), wd {cfg.weight_decay:g}, "
            f"clip {cfg.clip_grad}, ema {cfg.ema_decay if cfg.ema else 'off'}",
            f"stages: {', '.join(f'{s.name} ({s.epochs} ep, lr {s.lr:g})' for s in stages)}",
            f"{n_params / 1e6:.1f}M parameters; " + ", ".join(f"{k} {v}" for k, v in self.expert.describe().items()),
            f"best checkpoint by val {cfg.select_metric}; outputs in {self.out}",
        ]
        log.info("settings:\n  %s", "\n  ".join(lines))


@dataclass
class _StageContext:
    index: int
    stage: Stage
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_model: nn.Module
    updates: int = 0

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def _check_same_model(state: dict[str, Any], meta: dict[str, Any], what: str) -> None:
    for key, value in meta.items():
        if state.get(key) != value:
            raise ConfigError(f"{what}: checkpoint has {key}={state.get(key)!r} but this run uses {value!r}")


def _warmup_cosine(optimizer: torch.optim.Optimizer, lr: float, min_lr: float, warmup_epochs: float, epochs: int,
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


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def _step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    return (((seed * 1_000_003 + epoch) * 1_000_003 + step) * 1_009 + rank) % (2**63)


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _ignore_ctrl_c(_worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C (which reaches every process of the terminal's group) to the main process,
    which stops the run cleanly and then shuts them down. SIGTERM stays theirs: the loader stops its workers
    with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def _stop_signals(trainer: Trainer) -> Iterator[None]:
    """While training, SIGTERM and the first Ctrl-C only ask the loop to stop at the next step boundary (it
    then writes last.pt); a second Ctrl-C interrupts at once."""

    def request(signum: int, _frame: object) -> None:
        # No logging here: a handler that runs while the log stream is mid-write would re-enter it.
        if signum == signal.SIGINT and trainer.stop_signal is not None:
            raise KeyboardInterrupt
        trainer.stop_signal = signum

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _balanced_weights(labels: np.ndarray) -> torch.Tensor:
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    return torch.from_numpy(1.0 / counts[labels])


def _autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off":
        return None
    if amp == "auto":
        native_bf16 = device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return torch.bfloat16 if native_bf16 else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _set_determinism(deterministic: bool) -> None:
    if deterministic:
        # cuBLAS needs a fixed workspace for deterministic matmuls; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


def _setup_logging(log_file: Path | None, is_main: bool) -> None:
    """Project messages to stdout (rank 0 only) and to OUTPUT_DIR/train.log; warnings from every rank."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.WARNING)
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(log_file, mode="a")
        file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        root.addHandler(file)
    logging.captureWarnings(True)

"""A run's checkpoints, as timm's CheckpointSaver keeps them: best.pt and last.pt in the run folder, which epoch is
best, building them from the run's state, and writing them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from timm.utils import ModelEmaV3
from torch import nn

from stage2.data.preprocessing import DataConfig
from stage2.experts.base import Expert
from stage2.run.checkpoint import (
    BestCheckpoint,
    LastCheckpoint,
    ensure_finite,
    last_good_note,
    read_best,
    rng_state,
    save_checkpoint,
)
from stage2.run.config import TrainConfig
from stage2.run.files import BEST, LAST
from stage2.run.folder import discard_replaced


class CheckpointSaver:
    """OUTPUT_DIR/best.pt (the best epoch so far by --select-metric; `improves(new, old)` compares two values of
    it) and OUTPUT_DIR/last.pt (where a resume continues), built from the run's `model`, `ema`, grad `scaler`,
    `expert` (model meta and loss recipe), `data_config`, settings (`cfg`) and `manifests`
    (their fingerprints). Every rank keeps the same best so far and checks finiteness (`ensure_finite`: it runs
    collectives); rank 0 (`is_main`) writes."""

    def __init__(self, out: Path, improves: Callable[[float, float], bool], *, model: nn.Module,
                 ema: ModelEmaV3 | None, scaler: torch.amp.GradScaler, expert: Expert, data_config: DataConfig,
                 cfg: TrainConfig, manifests: dict[str, dict[str, Any]], device: torch.device,
                 is_main: bool) -> None:
        self.best, self.last = out / BEST, out / LAST
        self.improves = improves
        self.model, self.ema, self.scaler, self.expert = model, ema, scaler, expert
        self.data_config, self.cfg, self.manifests = data_config, cfg, manifests
        self.device, self.is_main = device, is_main
        self.best_value: float | None = None
        self.best_epoch = 0  # 1-based; 0: no epoch yet

    @property
    def last_good_note(self) -> str:
        """What a message about a failed run says of last.pt: the checkpoint to go back to, if one was written."""
        return last_good_note(self.last)

    def resume(self, state: LastCheckpoint) -> None:
        """The best so far, as a resumed run's last.pt recorded it."""
        self.best_value, self.best_epoch = state.best_value, state.best_epoch

    def select(self, value: float, epoch: int) -> bool:
        """Whether epoch `epoch` (1-based), whose metric is `value`, is the best so far (the first epoch is); it
        then becomes the best."""
        improved = self.best_value is None or self.improves(value, self.best_value)
        if improved:
            self.best_value, self.best_epoch = value, epoch
        return improved

    def ensure_finite(self, when: str, *models: nn.Module) -> None:
        """Stop the run (TrainingDiverged, on every rank, naming the last good checkpoint) before a non-finite
        weight or statistic of `models` reaches a checkpoint or a metric."""
        ensure_finite(models, self.device, when, self.last)

    def save_best(self, model: nn.Module, epoch: int, metrics: Mapping[str, float]) -> None:
        """Write best.pt: `model`'s weights (the EMA's with --ema, as validated) after epoch `epoch`, with its
        `metrics`. On rank 0, after `ensure_finite` of that model."""
        self._write(self._best(model, epoch, metrics), self.best)

    def save_calibrated(self, best: BestCheckpoint, temperature: float) -> None:
        """Write best.pt again, with the temperature fitted on its validation logits."""
        best.temperature, best.temperature_fitted = temperature, True
        self._write(best, self.best)

    def save_last(self, optimizer: torch.optim.Optimizer, stage: int, next_epoch: int, step: int,
                  train_sums: Mapping[str, torch.Tensor] | None) -> None:
        """Write last.pt: everything a resume needs to continue at epoch `next_epoch` (0-based) of stage `stage`;
        `step` > 0 marks a checkpoint taken mid-epoch, with the epoch's running `train_sums`. Called on every rank:
        the model and EMA are checked finite first, and rank 0 writes."""
        where = f"at epoch {next_epoch + 1} step {step}" if step else f"after epoch {next_epoch}"
        self.ensure_finite(where, self.model, *([self.ema.module] if self.ema is not None else []))
        if not self.is_main:
            return
        last = LastCheckpoint(
            **vars(self._best(self.model, next_epoch, {})),
            ema=None if self.ema is None else {k: v.cpu() for k, v in self.ema.module.state_dict().items()},
            optimizer=optimizer.state_dict(),
            scaler=self.scaler.state_dict(),
            recipe=self.expert.recipe(),
            stage=stage,
            next_epoch=next_epoch,
            step=step,
            train_sums={k: v.cpu() for k, v in train_sums.items()} if train_sums else None,
            best_value=self.best_value,
            best_epoch=self.best_epoch,
            manifests=self.manifests,
            rng=rng_state(),
        )
        self._write(last, self.last)
        discard_replaced(self.last.parent)  # this run's last.pt is what a resume continues now

    def read_best(self) -> BestCheckpoint:
        """best.pt as written, checked (its checksums, finite weights, a usable data config)."""
        return read_best(self.best)

    def _best(self, model: nn.Module, epoch: int, metrics: Mapping[str, float]) -> BestCheckpoint:
        return BestCheckpoint(model={k: v.detach().cpu() for k, v in model.state_dict().items()},
                              meta=self.expert.checkpoint_meta(), data_config=self.data_config, args=self.cfg.to_dict(),
                              epoch=epoch, metrics=dict(metrics))

    @staticmethod
    def _write(checkpoint: BestCheckpoint, path: Path) -> None:
        """Through a temporary file: a crash keeps the previous one."""
        save_checkpoint(checkpoint.to_dict(), path)

"""Resuming a run: whether this command may continue a last.pt, and putting the run back where it stopped.

What may change on a resume is the `resume` metadata of each TrainConfig field (stage2.run.config: refuse,
replan, free, invocation); the model family's meta and the expert's recipe (loss settings) never may.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

from torch import nn

from stage2.errors import ConfigError
from stage2.experts.base import Expert
from stage2.run.checkpoint import LastCheckpoint, read_last, set_rng_state
from stage2.run.config import TrainConfig
from stage2.run.metrics_log import MetricsLog

log = logging.getLogger("stage2")

POLICIES = ("refuse", "replan", "free", "invocation")


def resume_policy(name: str) -> str:
    """What a resume may do with the TrainConfig field `name` (its `resume` metadata)."""
    return {f.name: f.metadata["resume"] for f in fields(TrainConfig)}[name]


def read_resume_state(path: Path, cfg: TrainConfig, expert: Expert) -> LastCheckpoint:
    """Load last.pt and check, before anything is built, that this command may continue that run."""
    state = read_last(path)
    what = f"--resume {path}"
    for key, value in expert.checkpoint_meta().items():
        if state.meta.get(key) != value:
            raise ConfigError(f"{what}: checkpoint has {key}={state.meta.get(key)!r} but this run uses {value!r}")
    recipe = expert.recipe()
    for key, value in state.recipe.items():
        if recipe.get(key) != value:
            raise ConfigError(f"{what}: the run was trained with {key}={value!r}, this command says "
                              f"{recipe.get(key)!r}; it cannot change on resume (start a new run)")
    before, now = state.args, cfg.to_dict()
    for key in now:
        if key not in before or before[key] == now[key]:
            continue
        flag = "--" + key.replace("_", "-")
        policy = resume_policy(key)
        if policy == "refuse":
            raise ConfigError(f"{what}: the run was trained with {flag} {before[key]}, this command says "
                              f"{now[key]}; it cannot change on resume (start a new run)")
        if policy != "invocation":
            how = "the schedule is re-planned from here" if policy == "replan" else "applies from here"
            log.info("resume: %s %s -> %s (%s)", flag, before[key], now[key], how)
    trained = state.next_epoch + (1 if state.step else 0)
    if cfg.epochs < trained:
        raise ConfigError(f"{what}: --epochs {cfg.epochs}, but the run has already reached epoch {trained}")
    return state


def check_manifests(state: LastCheckpoint, now: dict[str, dict[str, Any]], cfg: TrainConfig) -> None:
    """Compare what the manifests hold now (manifest_fingerprint of "train" and "val") with what the run recorded.

    Other val rows are refused: the best epoch so far was chosen on the old ones, and the metric of the next epoch
    would be compared with it. Other train rows (data added or removed under the same file name) re-plan: the
    schedule follows the new epoch length from where the run stands, and a run stopped mid-epoch restarts that
    epoch (its position was one in the old rows' order); one line says so.
    """
    if not state.manifests:
        log.info("resume: its last.pt predates manifest fingerprints; the manifests' rows are not compared")
        return
    before, after = state.manifests["val"], now["val"]
    if before != after:
        raise ConfigError(f"--resume: the val manifest {cfg.val_manifest} changed since the run started "
                          f"({_rows(before, after)}): the best epoch so far was chosen on its old rows; start a new "
                          "run")
    before, after = state.manifests["train"], now["train"]
    if before != after:
        restart = f"; epoch {state.next_epoch + 1} restarts from its first step" if state.step else ""
        log.warning("resume: the train manifest %s changed since the run started (%s): the schedule is re-planned "
                    "from here on the new rows%s", cfg.train_manifest, _rows(before, after), restart)
        state.step, state.train_sums = 0, None


def _rows(before: dict[str, Any], after: dict[str, Any]) -> str:
    if before["rows"] != after["rows"]:
        return f"{before['rows']} rows, now {after['rows']}"
    return f"{after['rows']} rows, other contents"


def restore(state: LastCheckpoint, model: nn.Module, ema: nn.Module | None, history: MetricsLog | None) -> None:
    """Weights, EMA, the metrics log (rows past the checkpoint dropped) and every RNG, as they were at `state`.
    The optimizer and scaler are restored by the stage that resumes (Trainer.start_stage)."""
    model.load_state_dict(state.model)
    if ema is not None and state.ema is not None:
        ema.load_state_dict(state.ema)
    if history is not None:
        history.truncate(state.next_epoch)
    set_rng_state(state.rng)

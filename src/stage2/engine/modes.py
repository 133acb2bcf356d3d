"""What a training command runs: one of its three modes (train, --evaluate, --audit-only), in its locked folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stage2.engine.audit_only import audit_only
from stage2.engine.evaluate import evaluate_checkpoint
from stage2.engine.trainer import Trainer
from stage2.experts.base import Expert
from stage2.run.config import TrainConfig
from stage2.run.device import cpu_threads
from stage2.run.distributed import setup_distributed
from stage2.run.folder import restore_replaced, run_dir_lock
from stage2.run.logs import close_run_log


def run(cfg: TrainConfig, expert: Expert, *, show_audit: bool = True) -> dict[str, Any] | None:
    """Train (or with `cfg.evaluate_checkpoint`, only evaluate; with `cfg.audit_only`, only audit) and return the
    summary on rank 0. `show_audit` False: a training run's shortcut audit is written, not shown again (the run
    before it in this command, on the same sets, showed it)."""
    dist = setup_distributed(cfg.device)
    threads = cpu_threads(dist.device.type)
    with run_dir_lock(Path(cfg.output_dir), dist):
        try:
            if cfg.audit_only:
                return audit_only(cfg, dist)
            if cfg.evaluate_checkpoint:
                return evaluate_checkpoint(cfg, expert, dist, threads=threads)
            try:
                return Trainer(cfg, expert, dist, threads=threads, show_audit=show_audit).fit()
            except BaseException:
                if dist.is_main:  # failed before its first last.pt: the folder's previous run comes back
                    close_run_log()  # its train.log included, as it was
                    restore_replaced(Path(cfg.output_dir))
                raise
        finally:
            close_run_log()

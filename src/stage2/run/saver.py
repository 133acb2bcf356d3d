"""A run's checkpoints, as timm's CheckpointSaver keeps them: best.pt and last.pt in the run folder, which epoch is
best, and writing them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from stage2.run.checkpoint import BestCheckpoint, LastCheckpoint, last_good_note, read_best, save_checkpoint
from stage2.run.files import BEST, LAST


class CheckpointSaver:
    """OUTPUT_DIR/best.pt (the best epoch so far by --select-metric; `improves(new, old)` compares two values of
    it) and OUTPUT_DIR/last.pt (where a resume continues). Every rank keeps the same best so far; rank 0 writes
    (`save_best`, `save_last`)."""

    def __init__(self, out: Path, improves: Callable[[float, float], bool]) -> None:
        self.best, self.last = out / BEST, out / LAST
        self.improves = improves
        self.best_value: float | None = None
        self.best_epoch = 0  # 1-based; 0: no epoch yet

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

    def save_best(self, checkpoint: BestCheckpoint) -> None:
        """Write best.pt (through a temporary file: a crash keeps the previous one)."""
        save_checkpoint(checkpoint.to_dict(), self.best)

    def save_last(self, checkpoint: LastCheckpoint) -> None:
        """Write last.pt (through a temporary file: a crash keeps the previous one)."""
        save_checkpoint(checkpoint.to_dict(), self.last)

    def read_best(self) -> BestCheckpoint:
        """best.pt as written, checked (its checksums, finite weights, a usable data config)."""
        return read_best(self.best)

    def last_good(self) -> str:
        """What a message about a failed run says of last.pt: the checkpoint to go back to, if one was written."""
        return last_good_note(self.last)

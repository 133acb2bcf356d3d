"""metrics.csv: one row per epoch, rewritten atomically on every append, read back on resume."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stage2.atomic import write_text_atomic
from stage2.errors import ConfigError, first_line


class MetricsLog:
    """One row per epoch in a CSV, rewritten atomically on every append so a crash never truncates it.

    A new log starts empty: a fresh run replaces any metrics.csv already in its folder on the first append.
    To resume, `truncate` reads the file back.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._rows = pd.DataFrame()

    def truncate(self, up_to_epoch: int | None) -> None:
        """Reload the rows on disk, dropping those with epoch > up_to_epoch (from the file too, at once).

        For resuming from a checkpoint taken after epoch `up_to_epoch`: rows logged after it would be
        repeated by the resumed run.
        """
        if not self.path.exists():
            self._rows = pd.DataFrame()
            return
        try:
            rows = pd.read_csv(self.path)
        except (OSError, ValueError) as err:  # pandas' parser errors are ValueErrors
            raise ConfigError(f"{self.path}: not a readable metrics log ({first_line(err)})") from None
        if "epoch" not in rows.columns:
            raise ConfigError(f"{self.path}: metrics log has no 'epoch' column")
        stale = rows["epoch"] > up_to_epoch if up_to_epoch is not None else np.zeros(len(rows), dtype=bool)
        self._rows = rows[~stale].reset_index(drop=True)
        if stale.any():
            self._write()

    def frame(self) -> pd.DataFrame:
        """A copy of the rows logged so far, one per epoch."""
        return self._rows.copy()

    def append(self, row: Mapping[str, Any]) -> None:
        """Add one epoch's row (must hold 'epoch', later than the last one) and rewrite the CSV."""
        if "epoch" not in row:
            raise ValueError(f"{self.path}: metrics row has no 'epoch' key: {sorted(row)}")
        if len(self._rows) and row["epoch"] <= self._rows["epoch"].iloc[-1]:
            last = self._rows["epoch"].iloc[-1]
            raise ValueError(f"{self.path}: epoch {row['epoch']} appended after epoch {last}; must increase")
        new = pd.DataFrame([dict(row)])
        self._rows = new if self._rows.empty else pd.concat([self._rows, new], ignore_index=True)
        self._write()

    def _write(self) -> None:
        write_text_atomic(self.path, self._rows.to_csv(index=False))

"""Run reports: ROC and training-curve PNGs, a terminal metrics table, crash-safe metrics.csv and JSON files.

Figures are built on matplotlib.figure.Figure directly rather than pyplot: savefig then renders with Agg,
with no global backend switch and no figure registry to leak memory across epochs or threads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import RocCurveDisplay

from src.atomic import atomic_write

# Panels of the training-curve figure: (title, columns drawn if present, log y-axis).
_CURVE_PANELS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("loss", ("train_loss", "val_loss"), False),
    ("validation", ("auc", "ap", "video_auc"), False),
    ("learning rate", ("lr_last_step",), True),
)


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def _jsonable(obj: Any) -> Any:
    """Plain JSON types; NaN and +-inf become None (JSON has no literal for them)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically; NaN/inf are written as null."""
    write_text_atomic(path, json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")


def plot_roc(
    labels: np.ndarray,
    probs: np.ndarray,
    path: Path,
    title: str,
    *,
    video_labels: np.ndarray | None = None,
    video_probs: np.ndarray | None = None,
) -> None:
    """Save a ROC curve PNG (AUC in the legend), with a video-level curve when video arrays are given."""
    curves = [("frame", labels, probs)]
    if (video_labels is None) != (video_probs is None):
        raise ValueError("plot_roc: pass both video_labels and video_probs, or neither")
    if video_labels is not None:
        curves.append(("video", video_labels, video_probs))
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    for i, (name, y, p) in enumerate(curves):
        if len(np.unique(y)) < 2:
            raise ValueError(f"plot_roc: {name}-level labels hold one class only; a ROC curve needs both")
        RocCurveDisplay.from_predictions(y, p, name=name, ax=ax, plot_chance_level=i == 0)
    ax.set_title(title)
    ax.legend(loc="lower right")
    atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))


def plot_robustness(table: pd.DataFrame, path: Path, title: str) -> None:
    """AUC and TPR at 1% FPR per perturbation (rows of `table`, "none" first), as grouped bars."""
    fig = Figure(figsize=(1.2 * len(table) + 2.5, 3.5), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(table))
    for offset, column, label in ((-0.2, "auc", "AUC"), (0.2, "tpr_at_fpr_1pct", "TPR at 1% FPR")):
        ax.bar(x + offset, table[column], width=0.4, label=label)
    ax.set_xticks(x, table["perturbation"], rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3, axis="y")
    atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))


def plot_training_curves(history: pd.DataFrame, path: Path) -> None:
    """Save loss / validation-metric / learning-rate panels per epoch, skipping absent or all-NaN columns."""
    if "epoch" not in history.columns:
        raise ValueError("plot_training_curves: history has no 'epoch' column")
    panels = [
        (title, [c for c in cols if c in history.columns and history[c].notna().any()], log_y)
        for title, cols, log_y in _CURVE_PANELS
    ]
    panels = [p for p in panels if p[1]]
    if not panels:
        wanted = [c for _, cols, _ in _CURVE_PANELS for c in cols]
        raise ValueError(f"plot_training_curves: history has none of the columns {wanted}")
    fig = Figure(figsize=(4.5 * len(panels), 3.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (title, cols, log_y) in zip(axes, panels, strict=True):
        for col in cols:
            # Markers keep a single-epoch history visible (a one-point line draws nothing).
            ax.plot(history["epoch"], history[col], marker="o", markersize=3, label=col)
        if log_y and (history[cols].dropna() > 0).all().all():
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))


def _format_value(value: float) -> str:
    if isinstance(value, (int, np.integer)):
        return str(value)
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def format_metrics_table(metrics: Mapping[str, float], title: str) -> str:
    """A two-column, aligned text table (name, value to 4 decimals; NaN as n/a; integers as they are)."""
    rows = [(name, _format_value(value)) for name, value in metrics.items()]
    name_w = max([len("metric"), *(len(n) for n, _ in rows)])
    value_w = max([len("value"), *(len(v) for _, v in rows)])
    rule = "-" * (name_w + 3 + value_w)
    lines = [title, rule, f"{'metric':<{name_w}} | {'value':>{value_w}}", rule]
    lines += [f"{name:<{name_w}} | {value:>{value_w}}" for name, value in rows]
    return "\n".join(lines)


class MetricsLog:
    """One row per epoch in a CSV, rewritten atomically on every append so a crash never truncates it.

    A new log starts empty: a fresh run replaces any metrics.csv already in its folder on the first append.
    To resume, `load` (or `truncate` on a new log) reads the file back.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._rows = pd.DataFrame()

    @classmethod
    def load(cls, path: Path, *, up_to_epoch: int | None = None) -> MetricsLog:
        """The log at `path`, keeping rows with epoch <= up_to_epoch (all if None); no file gives an empty log."""
        log = cls(path)
        log.truncate(up_to_epoch)
        return log

    def truncate(self, up_to_epoch: int | None) -> None:
        """Reload the rows on disk, dropping those with epoch > up_to_epoch (from the file too, at once).

        For resuming from a checkpoint taken after epoch `up_to_epoch`: rows logged after it would be
        repeated by the resumed run.
        """
        if not self.path.exists():
            self._rows = pd.DataFrame()
            return
        rows = pd.read_csv(self.path)
        if "epoch" not in rows.columns:
            raise ValueError(f"{self.path}: metrics log has no 'epoch' column")
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

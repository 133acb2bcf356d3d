"""The scoring plots: ROC (with the low-FPR view), robustness bars and training curves, as PNGs.

Figures are built on matplotlib.figure.Figure directly rather than pyplot: savefig then renders with Agg,
with no global backend switch and no figure registry to leak memory across epochs or threads.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.figure import Figure
from sklearn.metrics import RocCurveDisplay

from stage2.atomic import atomic_write
from stage2.scoring.metrics import FPR_TARGETS, operating_points, unresolved_targets

# The loss terms an expert may log besides the total (GenConViT: classification, reconstruction, KL).
_TERMS = ("cls", "recon", "kl")
# Panels of the training-curve figure: (title, columns drawn if present, log y-axis).
_CURVE_PANELS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("loss", ("train_loss", "val_loss"), True),
    ("loss terms", tuple(f"{split}_{term}" for term in _TERMS for split in ("train", "val")), True),
    ("validation", ("auc", "ap", "video_auc"), False),
    ("learning rate", ("lr_last_step",), True),
)


def plot_roc(
    labels: np.ndarray,
    probs: np.ndarray,
    path: Path,
    title: str,
    *,
    video_labels: np.ndarray | None = None,
    video_probs: np.ndarray | None = None,
) -> Figure:
    """Save (and return) a ROC figure: the whole curve, and the low-FPR region a cascade threshold is picked in.

    Left, the ROC on linear axes (AUC in the legend); right, the same curves on a log FPR axis from 0.05%, with
    the target FPRs of the operating points (FPR_TARGETS) and each curve's point at them. A target finer than
    one real in the set (FPR < 1/n_real) cannot be resolved: its point is drawn hollow, and a dotted line marks
    1/n_real. A video-level curve (mean P(fake) per video) is added when video arrays are given.
    """
    curves = [("frame", np.asarray(labels), np.asarray(probs))]
    if (video_labels is None) != (video_probs is None):
        raise ValueError("plot_roc: pass both video_labels and video_probs, or neither")
    if video_labels is not None:
        curves.append(("video", np.asarray(video_labels), np.asarray(video_probs)))
    fig = Figure(figsize=(10, 5), layout="constrained")
    full, low = fig.subplots(1, 2)
    for i, (name, y, p) in enumerate(curves):
        if len(np.unique(y)) < 2:
            raise ValueError(f"plot_roc: {name}-level labels hold one class only; a ROC curve needs both")
        colour = f"C{i}"
        RocCurveDisplay.from_predictions(y, p, name=name, ax=full, plot_chance_level=i == 0,
                                         curve_kwargs={"color": colour})
        RocCurveDisplay.from_predictions(y, p, name=name, ax=low, curve_kwargs={"color": colour})
        n_real = int((y == 0).sum())
        unresolved = unresolved_targets(n_real)
        points = operating_points(y, p)
        for target_name, target in FPR_TARGETS.items():
            hollow = target_name in unresolved
            low.plot(target, points[f"tpr_at_fpr_{target_name}"], "o", color=colour, markersize=7,
                     markerfacecolor="white" if hollow else colour, zorder=3)
        if unresolved:
            low.axvline(1 / n_real, color=colour, linestyle=":", linewidth=1.2,
                        label=f"1/{n_real} {'real videos' if name == 'video' else 'reals'}: finest {name} FPR")
    for target_name, target in FPR_TARGETS.items():
        low.axvline(target, color="0.6", linewidth=0.8, zorder=0)
        low.annotate(f"{target_name.replace('pct', '%')} FPR", (target, 0.01), xytext=(3, 0),
                     textcoords="offset points", fontsize=8, color="0.4")
    # Legend-only entries for the operating-point markers.
    low.plot([], [], "o", color="0.3", label="TPR at target FPR")
    low.plot([], [], "o", color="0.3", markerfacecolor="white", label="target finer than 1/n_real")
    low.set(xscale="log", xlim=(min(FPR_TARGETS.values()) / 2, 1), ylim=(0, 1.01), aspect="auto",
            title="low-FPR view (log scale)")
    full.set_title("ROC")
    for ax in (full, low):
        ax.set(xlabel="false positive rate: reals called fake", ylabel="true positive rate: fakes caught (1 = fake)")
        ax.grid(alpha=0.3, which="both")
    full.legend(loc="lower right")
    # Below the axes: a good detector's curve fills the low-FPR view up to its top left corner.
    low.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=2, fontsize=8)
    fig.suptitle(title)
    atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    return fig


def plot_robustness(table: pd.DataFrame, path: Path, title: str, n_real: int | None = None) -> Figure:
    """Save (and return) AUC and TPR at 1% FPR per perturbation (rows of `table`, "none" first) as grouped bars,
    each bar labelled with its value (a zero bar is then still seen), against the 0.5 AUC of chance. Given the
    number of reals, the legend says when 1% FPR is finer than they resolve."""
    fig = Figure(figsize=(1.1 * len(table) + 3.5, 4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(table))
    tpr = "TPR at 1% FPR"
    if n_real is not None and "1pct" in unresolved_targets(n_real):
        tpr += f"\n(below resolution: {n_real} reals,\nthe 0% FPR point)"
    for offset, column, label in ((-0.2, "auc", "AUC"), (0.2, "tpr_at_fpr_1pct", tpr)):
        bars = ax.bar(x + offset, table[column], width=0.4, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    ax.axhline(0.5, color="0.3", linestyle="--", linewidth=1, label="chance AUC (0.5)")
    ax.set_xticks(x, table["perturbation"].replace("none", "none (clean)"), rotation=30, ha="right")
    ax.set(ylim=(0, 1.1), ylabel="score (1 = perfect)", xlabel="perturbation of the images", title=title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    ax.grid(alpha=0.3, axis="y")
    atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    return fig


def plot_training_curves(history: pd.DataFrame, path: Path, *, best_epoch: int | None = None,
                         select_metric: str | None = None) -> Figure:
    """Save (and return) one panel per group of per-epoch columns (loss, loss terms, validation metrics, lr),
    skipping absent, all-NaN and all-zero columns.

    Losses (and the lr) spanning a decade or more are drawn on a log axis, so that one spike (a first epoch, a
    bad batch) cannot flatten the rest; legends sit below the panels.
    `best_epoch` draws a line on every panel and a star on `select_metric`'s curve (added to the validation
    panel if it is none of its usual metrics).
    """
    if "epoch" not in history.columns:
        raise ValueError("plot_training_curves: history has no 'epoch' column")
    plotted = {c for _, cols, _ in _CURVE_PANELS for c in cols}
    panels = []
    for title, cols, log_y in _CURVE_PANELS:
        if title == "validation" and select_metric and select_metric not in plotted:
            cols = (*cols, select_metric)
        cols = [c for c in cols if c in history.columns and history[c].notna().any() and (history[c] != 0).any()]
        if cols:
            panels.append((title, cols, log_y))
    if not panels:
        wanted = [c for _, cols, _ in _CURVE_PANELS for c in cols]
        raise ValueError(f"plot_training_curves: history has none of the columns {wanted}")
    fig = Figure(figsize=(4.5 * len(panels), 4.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    epochs = history["epoch"]
    if best_epoch is not None and not (epochs == best_epoch).any():
        best_epoch = None  # no epoch has improved yet (a NaN metric): nothing to mark
    for ax, (title, cols, log_y) in zip(axes, panels, strict=True):
        for col in cols:
            style = {}
            if title == "loss terms":  # train and val of a term share a colour; val is dashed
                split, term = col.split("_", 1)
                style = {"color": f"C{_TERMS.index(term)}", "linestyle": "--" if split == "val" else "-"}
            # Markers keep a single-epoch history visible (a one-point line draws nothing).
            ax.plot(epochs, history[col], marker="o", markersize=3, label=col, **style)
        values = history[cols].to_numpy(dtype=float)
        values = values[np.isfinite(values)]
        # Log only where the values span a decade or more (a spike, or a loss that fell far); a narrower range
        # reads better on a linear axis, which a spike would not have flattened anyway.
        if log_y and (values > 0).all() and values.max() >= 10 * values.min():
            ax.set_yscale("log")
            _plain_log_ticks(ax)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="0.5", linestyle=":", linewidth=1.2, zorder=0)
            if select_metric in cols:
                value = float(history.loc[epochs == best_epoch, select_metric].iloc[0])
                ax.plot(best_epoch, value, "*", color="black", markersize=12, zorder=3,
                        label=f"best: epoch {best_epoch}, {select_metric} {value:.4f}")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        # Below the panel, where it covers no curve.
        ncols = (len(cols) + 1) // 2 if title == "loss terms" else 2  # loss terms: a column per term, train over val
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=ncols, fontsize=8)
        ax.grid(alpha=0.3, which="both")
    if best_epoch is not None:
        by = f", selected by {select_metric}" if select_metric else ""
        fig.suptitle(f"best epoch {best_epoch} (dotted line){by}")
    atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    return fig


def _plain_log_ticks(ax: Any) -> None:
    """Label a log y-axis in plain numbers (0.2, not 2x10^-1), minor ticks at 2 and 5 too where it spans less than
    two decades (a loss from 0.7 to 0.05 has a single decade tick)."""
    low, high = ax.get_ylim()
    subs = (2, 5) if math.log10(high / low) < 2 else ()

    def minor(value: float, _: Any) -> str:
        mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
        return f"{value:.3g}" if mantissa in subs else ""

    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:.3g}"))
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(minor))

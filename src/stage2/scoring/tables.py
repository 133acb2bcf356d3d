"""The console tables a run and an --evaluate end with: metrics, and operating points on calibrated P(fake)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from stage2.scoring.metrics import FPR_TARGETS


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


def _is_operating_point(key: str) -> bool:
    return key.removeprefix("video_").startswith(("tpr_at_fpr_", "thr_at_fpr_", "eer_threshold"))


def resolution_note(n_real: int, unit: str = "reals") -> str:
    """Why an operating point is marked: its target FPR is finer than one real in the set."""
    return f"below resolution: {n_real} {unit} resolve FPR steps of {100 / n_real:.2g}%; this is the 0% FPR point"


def tpr_footnote(points: Mapping[str, Any], prefix: str = "") -> str:
    """A line to print under a table of frame-level TPRs at target FPRs when some target is below resolution."""
    if not points["below_resolution"]:
        return ""
    columns = ", ".join(f"tpr_at_fpr_{name}" for name in points["below_resolution"])
    return f"\n{prefix}{columns}: {resolution_note(points['n_real'])}"


def format_operating_points(points: Mapping[str, Mapping[str, Any]], calibrated: bool = True) -> str:
    """The operating points of `calibrated_operating_points` as a table, one row per level and target; a target
    finer than its level's reals can resolve says so on its row. Not `calibrated`: the P(fake) they are on is raw
    (no fitted temperature), and the header says so."""
    rows = []
    for level, p in points.items():
        unit = "real videos" if level == "video" else "reals"
        for name in FPR_TARGETS:
            threshold = p[f"thr_at_fpr_{name}"]
            note = resolution_note(p["n_real"], unit) if name in p["below_resolution"] else ""
            rows.append((level, f"{name.replace('pct', '%')} FPR", _format_value(p[f"tpr_at_fpr_{name}"]),
                         "none" if math.isinf(threshold) else _format_value(threshold), note))
        rows.append((level, "EER", "", _format_value(p["eer_threshold"]), ""))
    header = ("level", "target", "TPR", "threshold", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    scores = "calibrated P(fake)" if calibrated else "uncalibrated P(fake) (no fitted temperature)"
    lines = [f"operating points on {scores} (fake when P(fake) >= threshold; none: no threshold flags a fake without "
             "flagging a real)"]
    for r in [header, *rows]:
        lines.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]}"
                     .rstrip())
    return "\n".join(lines)


def format_report(metrics: Mapping[str, float], points: Mapping[str, Mapping[str, Any]], title: str,
                  calibrated: bool = True) -> str:
    """What a run or an --evaluate prints at its end: the metrics, then the operating points on calibrated
    P(fake) (the thresholds to deploy; the metrics' own, on raw P(fake), stay in metrics.csv and the JSON)."""
    shown = {k: v for k, v in metrics.items() if not _is_operating_point(k)}
    return format_metrics_table(shown, title) + "\n\n" + format_operating_points(points, calibrated)

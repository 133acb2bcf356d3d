"""Binary deepfake-detection metrics: frame- and video-level AUC/EER, accuracy, per-method AUC.

Conventions: labels are 1 = fake, 0 = real; probs / scores are P(fake). Metrics that are undefined for the
given data (e.g. AUC with one class only) come back as NaN instead of raising, so a tiny or one-sided
validation split never crashes a training run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn import metrics as skm

# "max": larger is better, "min": smaller is better. metric_direction adds two families: per-method AUCs
# ("auc/<method>", max) and any loss (a name ending in "loss": log_loss, val_loss, val_<term>_loss; min).
METRIC_DIRECTIONS: dict[str, str] = {
    "auc": "max",
    "ap": "max",
    "acc": "max",
    "balanced_acc": "max",
    "video_auc": "max",
    "eer": "min",
    "video_eer": "min",
}

# Keeps log_loss finite when a model outputs exactly 0 or 1.
_PROB_EPS = 1e-7


def _check_binary(labels: np.ndarray, scores: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{what}: {labels.size} labels but {scores.size} scores")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{what}: labels must be 0 (real) or 1 (fake), got {sorted(set(labels.tolist()))}")
    if not np.isfinite(scores).all():
        raise ValueError(f"{what}: scores contain NaN or inf")
    return labels.astype(np.int64), scores


def _has_both_classes(labels: np.ndarray) -> bool:
    return bool(labels.size) and 0 < labels.sum() < labels.size


def eer(labels: np.ndarray, scores: np.ndarray) -> float:
    """Equal error rate: the error rate where the false-positive rate equals the false-negative rate.

    The ROC from sklearn is a polyline through (FPR, FNR) points, and FPR - FNR grows monotonically along it
    from -1 to 1. The EER is taken where that polyline crosses FPR == FNR: exactly at a ROC point if one lies
    on the diagonal, else by linear interpolation between the last point with FPR < FNR and the first with
    FPR > FNR (both rates are linear in the interpolation weight, so they meet there). NaN with one class.
    """
    labels, scores = _check_binary(labels, scores, "eer")
    if not _has_both_classes(labels):
        return math.nan
    fpr, tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
    fnr = 1.0 - tpr
    gap = fpr - fnr
    i = int(np.argmax(gap >= 0))  # first ROC point at or past the crossing; gap[0] = -1, gap[-1] = 1
    if gap[i] == 0:
        return float(fpr[i])
    w = -gap[i - 1] / (gap[i] - gap[i - 1])
    return float(fpr[i - 1] + w * (fpr[i] - fpr[i - 1]))


# The false-positive rates a cascade stage is tuned at; keys read tpr_at_fpr_1pct, thr_at_fpr_1pct, ...
FPR_TARGETS = {"1pct": 0.01, "0.1pct": 0.001}


def unresolved_targets(n_real: int) -> list[str]:
    """The FPR_TARGETS names finer than one real image in `n_real` (target < 1/n_real).

    At such a target the only ROC point allowed is FPR 0: with 84 reals the points at 1% and 0.1% FPR are the
    same point, "no real flagged", and say nothing about the rate a deployment at that target would see.
    """
    return [name for name, target in FPR_TARGETS.items() if n_real * target < 1]


def operating_points(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """TPR at each target FPR with the threshold that reaches it, and the EER threshold. NaN with one class.

    A threshold t means "call it fake when score >= t". At a target FPR the point is the ROC point with the
    highest TPR whose FPR does not exceed the target; inf when no threshold keeps any false positive out
    while flagging a fake (then TPR is 0). Thresholds are in the scale of `scores`: pass calibrated P(fake)
    to read thresholds a deployed stage applies to calibrated outputs.
    """
    labels, scores = _check_binary(labels, scores, "operating_points")
    keys = [k for name in FPR_TARGETS for k in (f"tpr_at_fpr_{name}", f"thr_at_fpr_{name}")] + ["eer_threshold"]
    if not _has_both_classes(labels):
        return dict.fromkeys(keys, math.nan)
    fpr, tpr, thresholds = skm.roc_curve(labels, scores, drop_intermediate=False)
    out: dict[str, float] = {}
    for name, target in FPR_TARGETS.items():
        i = int(np.flatnonzero(fpr <= target)[-1])
        out[f"tpr_at_fpr_{name}"], out[f"thr_at_fpr_{name}"] = float(tpr[i]), float(thresholds[i])
    # The first ROC point at or past FPR == FNR, as in eer(): its threshold is the EER operating point.
    out["eer_threshold"] = float(thresholds[int(np.argmax(fpr - (1.0 - tpr) >= 0))])
    return out


def video_scores(
    labels: np.ndarray, probs: np.ndarray, video_ids: Sequence[str] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aggregate frame predictions per video: (video ids, video labels, mean P(fake)), sorted by video id.

    Raises ValueError naming the first video whose frames carry both labels.
    """
    labels, probs = _check_binary(labels, probs, "video_scores")
    video_ids = np.asarray(video_ids, dtype=object).ravel()
    if video_ids.shape != labels.shape:
        raise ValueError(f"video_scores: {video_ids.size} video ids but {labels.size} labels")
    frames = pd.DataFrame({"video": video_ids.astype(str), "label": labels, "prob": probs})
    per_video = frames.groupby("video", sort=True).agg(
        label=("label", "first"), n_labels=("label", "nunique"), prob=("prob", "mean")
    )
    mixed = per_video.index[per_video["n_labels"] > 1]
    if len(mixed):
        raise ValueError(f"video_scores: video {mixed[0]!r} has both real and fake frames")
    return (
        per_video.index.to_numpy(dtype=object),
        per_video["label"].to_numpy(dtype=np.int64),
        per_video["prob"].to_numpy(dtype=np.float64),
    )


def _blank(values: Sequence[str] | np.ndarray, n: int, what: str) -> np.ndarray:
    """Boolean mask of missing / empty / whitespace-only entries."""
    series = pd.Series(np.asarray(values, dtype=object).ravel(), dtype="string")
    if len(series) != n:
        raise ValueError(f"binary_metrics: {len(series)} {what} but {n} labels")
    return (series.isna() | (series.str.strip() == "")).to_numpy(dtype=bool)


def _auc_or_nan(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(skm.roc_auc_score(labels, scores)) if _has_both_classes(labels) else math.nan


def binary_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    *,
    video_ids: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    threshold: float = 0.5,
) -> dict[str, float]:
    """Frame-level metrics, plus video-level ones given `video_ids` and per-method AUCs given `methods`.

    Keys: auc, ap, eer, acc and balanced_acc (predicting fake when P(fake) >= threshold), log_loss, the operating
    points (tpr_at_fpr_1pct, thr_at_fpr_1pct, tpr_at_fpr_0.1pct, thr_at_fpr_0.1pct, eer_threshold), n;
    with video ids: video_auc, video_eer, the same operating points prefixed video_, n_videos (over frames whose
    video id is not blank; skipped when all are blank); with methods: auc/<method> for every manipulation method
    named on a fake row, i.e. AUC of all real rows against that method's fake rows.
    """
    labels, probs = _check_binary(labels, probs, "binary_metrics")
    if labels.size == 0:
        raise ValueError("binary_metrics: no samples")
    if not ((probs >= 0) & (probs <= 1)).all():
        raise ValueError("binary_metrics: probs must lie in [0, 1] (pass P(fake), not logits)")
    both = _has_both_classes(labels)
    preds = (probs >= threshold).astype(np.int64)
    out: dict[str, float] = {
        "auc": _auc_or_nan(labels, probs),
        "ap": float(skm.average_precision_score(labels, probs)) if both else math.nan,
        "eer": eer(labels, probs),
        "acc": float(skm.accuracy_score(labels, preds)),
        "balanced_acc": float(skm.balanced_accuracy_score(labels, preds)) if both else math.nan,
        "log_loss": float(skm.log_loss(labels, np.clip(probs, _PROB_EPS, 1 - _PROB_EPS), labels=[0, 1])),
        **operating_points(labels, probs),
        "n": int(labels.size),
    }
    if video_ids is not None:
        keep = ~_blank(video_ids, labels.size, "video ids")
        if keep.any():
            _, v_labels, v_probs = video_scores(labels[keep], probs[keep], np.asarray(video_ids)[keep])
            out["video_auc"] = _auc_or_nan(v_labels, v_probs)
            out["video_eer"] = eer(v_labels, v_probs)
            out.update({f"video_{k}": v for k, v in operating_points(v_labels, v_probs).items()})
            out["n_videos"] = int(v_labels.size)
    if methods is not None:
        named_fake = ~_blank(methods, labels.size, "methods") & (labels == 1)
        method_arr = np.asarray(methods, dtype=object).astype(str)
        real = labels == 0
        for method in sorted(set(method_arr[named_fake].tolist())):
            rows = real | (named_fake & (method_arr == method))
            out[f"auc/{method}"] = _auc_or_nan(labels[rows], probs[rows])
    return out


def metric_direction(name: str) -> str:
    """'max' or 'min' for a metric name; ValueError for a name with no known direction."""
    if name.startswith("auc/"):
        return "max"
    if name.endswith("loss"):
        return "min"
    if name not in METRIC_DIRECTIONS:
        known = ", ".join(sorted(METRIC_DIRECTIONS))
        raise ValueError(f"unknown metric {name!r} for model selection; choose {known}, auc/<method> or *loss")
    return METRIC_DIRECTIONS[name]


def is_better(name: str, new: float, old: float | None) -> bool:
    """Whether `new` improves on `old` for metric `name`. NaN never wins; anything finite beats None/NaN."""
    direction = metric_direction(name)
    if math.isnan(new):
        return False
    if old is None or math.isnan(old):
        return True
    return new > old if direction == "max" else new < old

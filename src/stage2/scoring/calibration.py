"""Temperature scaling and expected calibration error for binary fake-vs-real logits.

All functions take fake log-odds: P(fake) = sigmoid(logit / T). For a two-class softmax head (GenConViT),
pass z_fake - z_real: softmax([z_real, z_fake] / T)[fake] = sigmoid((z_fake - z_real) / T), so scaling both
logits by 1/T is the same as scaling their difference, and one temperature fitted here serves both experts.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

Array = np.ndarray | torch.Tensor
log = logging.getLogger(__name__)

# Search range for T, far wider than any sane network needs: a fit at an edge means the logits lack signal.
_LOG_T_BOUNDS = (math.log(1e-2), math.log(1e2))


def _as_float64(x: Array, what: str) -> torch.Tensor:
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.to(torch.float64)
    if t.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D array, got shape {tuple(t.shape)}")
    return t


def _logits_and_labels(logits: Array, labels: Array, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    z = _as_float64(logits, f"{what} logits")
    y = _as_float64(labels, f"{what} labels")
    if z.shape != y.shape:
        raise ValueError(f"{what}: {z.numel()} logits but {y.numel()} labels")
    if z.numel() == 0:
        raise ValueError(f"{what}: no samples")
    if not torch.isfinite(z).all():
        raise ValueError(f"{what}: logits contain NaN or inf")
    if not ((y == 0) | (y == 1)).all():
        raise ValueError(f"{what}: labels must be 0 (real) or 1 (fake)")
    return z, y


def _nll(z: torch.Tensor, y: torch.Tensor, temperature: float) -> float:
    # Computed from logits, not probabilities, so very confident logits stay exact instead of clipping.
    return float(F.binary_cross_entropy_with_logits(z / temperature, y))


def fit_temperature(logits: Array, labels: Array) -> float:
    """Temperature T > 0 minimising the NLL of sigmoid(logits / T) on (validation) logits and labels.

    Hand-written because scikit-learn's CalibratedClassifierCV fits Platt (slope and bias) or isotonic maps
    around an estimator; it has no single-parameter temperature on fixed, precomputed logits, which is what
    keeps the ranking (AUC/EER) unchanged. The search is over log T (so T stays positive) with a bounded
    Brent search from scipy, a hard dependency of scikit-learn.
    """
    z, y = _logits_and_labels(logits, labels, "fit_temperature")
    if y.min() == y.max():
        raise ValueError("fit_temperature: labels hold one class only; calibration needs both classes")
    result = minimize_scalar(
        lambda log_t: _nll(z, y, math.exp(log_t)),
        bounds=_LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-6},
    )
    if min(abs(result.x - edge) for edge in _LOG_T_BOUNDS) < 1e-3:
        log.warning("temperature fit stopped at its bound (T = %.3g): the validation logits carry little signal",
                    math.exp(result.x))
    return math.exp(result.x)


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Binary ECE: sum over equal-width bins of P(fake) of (bin share) * |mean(label) - mean(P(fake))|.

    Bins are [k/n_bins, (k+1)/n_bins), the last one closed at 1. This is the binary form (reliability of
    P(fake) itself), not the top-label form that bins max(p, 1-p). Hand-written because sklearn's
    calibration_curve returns per-bin means but drops the bin counts the weighting needs.
    """
    if n_bins < 1:
        raise ValueError(f"expected_calibration_error: n_bins must be >= 1, got {n_bins}")
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    if y.shape != p.shape or y.size == 0:
        raise ValueError(f"expected_calibration_error: {y.size} labels and {p.size} probs (need equal, > 0)")
    if not ((p >= 0) & (p <= 1)).all():
        raise ValueError("expected_calibration_error: probs must lie in [0, 1]")
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    # n_b * |mean(y_b) - mean(p_b)| == |sum(y_b) - sum(p_b)|, so weighted means reduce to per-bin sums.
    gap = np.bincount(bins, weights=y, minlength=n_bins) - np.bincount(bins, weights=p, minlength=n_bins)
    return float(np.abs(gap).sum() / y.size)


def calibration_report(logits: Array, labels: Array, temperature: float, n_bins: int = 15) -> dict[str, float]:
    """NLL and ECE of sigmoid(logits) before and of sigmoid(logits / temperature) after scaling."""
    if not temperature > 0:
        raise ValueError(f"calibration_report: temperature must be > 0, got {temperature}")
    z, y = _logits_and_labels(logits, labels, "calibration_report")
    y_np = y.numpy()
    return {
        "temperature": float(temperature),
        "nll_before": _nll(z, y, 1.0),
        "nll_after": _nll(z, y, temperature),
        "ece_before": expected_calibration_error(y_np, torch.sigmoid(z).numpy(), n_bins),
        "ece_after": expected_calibration_error(y_np, torch.sigmoid(z / temperature).numpy(), n_bins),
    }

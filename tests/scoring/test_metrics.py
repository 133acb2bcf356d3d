import math

import numpy as np
import pytest
from sklearn import metrics as skm

from stage2.scoring.metrics import binary_metrics, eer, is_better, metric_direction, unresolved_targets, video_scores


@pytest.fixture
def noisy_scores() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    probs = 1 / (1 + np.exp(-(2 * labels - 1 + rng.normal(0, 1.5, 500))))
    return labels, probs


def test_binary_metrics_match_sklearn(noisy_scores):
    labels, probs = noisy_scores
    m = binary_metrics(labels, probs, threshold=0.4)
    preds = (probs >= 0.4).astype(int)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(labels, probs))
    assert m["ap"] == pytest.approx(skm.average_precision_score(labels, probs))
    assert m["acc"] == pytest.approx(skm.accuracy_score(labels, preds))
    assert m["balanced_acc"] == pytest.approx(skm.balanced_accuracy_score(labels, preds))
    assert m["log_loss"] == pytest.approx(skm.log_loss(labels, probs))
    assert m["n"] == 500
    assert not any(k.startswith(("video_", "auc/")) for k in m)


def test_eer_on_random_data_sits_at_the_fpr_fnr_crossing(noisy_scores):
    labels, probs = noisy_scores
    fpr, tpr, _ = skm.roc_curve(labels, probs)
    fnr = 1 - tpr
    i = np.argmin(np.abs(fpr - fnr))
    # The nearest ROC point is within one sample step of the exact crossing.
    step = 1 / min(labels.sum(), (1 - labels).sum())
    assert abs(eer(labels, probs) - (fpr[i] + fnr[i]) / 2) <= step


@pytest.mark.parametrize(
    ("labels", "scores", "expected"),
    [
        # Threshold 0.6: one of two reals above (FPR 1/2), one of two fakes below (FNR 1/2).
        ([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9], 0.5),
        # (FPR, FNR) goes (1/3, 1/2) -> (1/3, 0): the vertical step crosses the diagonal at 1/3.
        ([0, 0, 0, 1, 1], [0.1, 0.2, 0.7, 0.6, 0.9], 1 / 3),
        # A real/fake tie at 0.5 jumps (0, 1/2) -> (1/2, 0); the straight line meets FPR == FNR at 1/4.
        ([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9], 0.25),
        # Same with three reals: (0, 1/2) -> (1/3, 0), w = 0.5 / (0.5 + 1/3) = 0.6, EER = 0.6 / 3 = 0.2.
        ([0, 0, 0, 1, 1], [0.1, 0.2, 0.5, 0.5, 0.9], 0.2),
    ],
)
def test_eer_hand_cases(labels, scores, expected):
    assert eer(np.array(labels), np.array(scores)) == pytest.approx(expected)


def test_perfect_and_inverted_classifier():
    labels = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    good = binary_metrics(labels, probs)
    assert (good["auc"], good["ap"], good["eer"], good["acc"], good["balanced_acc"]) == (1, 1, 0, 1, 1)
    bad = binary_metrics(labels, 1 - probs)
    assert (bad["auc"], bad["eer"], bad["acc"]) == (0, 1, 0)


def test_log_loss_is_finite_for_hard_wrong_predictions():
    m = binary_metrics(np.array([0, 1]), np.array([1.0, 0.0]))
    assert math.isfinite(m["log_loss"]) and m["log_loss"] > 10


def test_video_scores_average_frames_per_video():
    ids, labels, probs = video_scores(
        np.array([1, 0, 1, 0, 1]),
        np.array([0.9, 0.2, 0.5, 0.4, 0.1]),
        ["v2", "v1", "v2", "v1", "v3"],
    )
    assert ids.tolist() == ["v1", "v2", "v3"]
    assert labels.tolist() == [0, 1, 1]
    np.testing.assert_allclose(probs, [0.3, 0.7, 0.1])


def test_video_scores_reject_mixed_labels():
    with pytest.raises(ValueError, match="'v1'"):
        video_scores(np.array([0, 1, 1]), np.array([0.1, 0.2, 0.3]), ["v1", "v1", "v2"])


def test_video_level_metrics_by_hand():
    # Per video: r1 0.3 (real), r2 0.6 (real), f1 0.5 (fake), f2 0.9 (fake); rows without an id are ignored.
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    probs = np.array([0.2, 0.4, 0.6, 0.4, 0.6, 0.9, 0.9, 0.99])
    ids = ["r1", "r1", "r2", "f1", "f1", "f2", "f2", ""]
    m = binary_metrics(labels, probs, video_ids=ids)
    assert m["n_videos"] == 4
    # Fake-real pairs ranked correctly: (f1>r1), (f2>r1), (f2>r2); (f1<r2) wrong -> 3/4.
    assert m["video_auc"] == pytest.approx(0.75)
    # Thresholds 0.9 -> (FPR 0, FNR 1/2), 0.6 -> (1/2, 1/2): EER 1/2.
    assert m["video_eer"] == pytest.approx(0.5)
    assert m["n"] == 8


def test_all_blank_video_ids_skip_video_metrics():
    m = binary_metrics(np.array([0, 1]), np.array([0.2, 0.8]), video_ids=["", None])
    assert "video_auc" not in m and "n_videos" not in m


def test_per_method_auc_by_hand():
    labels = np.array([0, 0, 1, 1, 1, 1])
    probs = np.array([0.3, 0.6, 0.9, 0.7, 0.5, 0.2])
    methods = ["", "real", "Deepfakes", "Deepfakes", "FaceSwap", "FaceSwap"]
    m = binary_metrics(labels, probs, methods=methods)
    assert sorted(k for k in m if k.startswith("auc/")) == ["auc/Deepfakes", "auc/FaceSwap"]
    # Deepfakes {0.9, 0.7} beat both reals {0.3, 0.6}: 1. FaceSwap: 0.5 > 0.3 only -> 1/4.
    assert m["auc/Deepfakes"] == pytest.approx(1.0)
    assert m["auc/FaceSwap"] == pytest.approx(0.25)
    assert "auc/real" not in m  # method names on real rows are not manipulation methods


def test_one_class_gives_nan_not_crash():
    m = binary_metrics(np.ones(4, dtype=int), np.array([0.2, 0.6, 0.7, 0.9]), video_ids=["a", "a", "b", "b"])
    for key in ("auc", "ap", "eer", "balanced_acc", "video_auc", "video_eer"):
        assert math.isnan(m[key]), key
    assert m["acc"] == pytest.approx(0.75)
    assert math.isfinite(m["log_loss"])
    assert math.isnan(eer(np.zeros(3, dtype=int), np.array([0.1, 0.2, 0.3])))


@pytest.mark.parametrize(
    ("labels", "probs", "kwargs", "match"),
    [
        ([0, 1], [0.5], {}, "2 labels but 1 scores"),
        ([0, 2], [0.1, 0.5], {}, "labels must be 0"),
        ([0, 1], [-1.0, 3.0], {}, r"\[0, 1\]"),
        ([], [], {}, "no samples"),
        ([0, 1], [0.1, 0.9], {"video_ids": ["a"]}, "1 video ids but 2 labels"),
    ],
)
def test_bad_input_raises(labels, probs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        binary_metrics(np.array(labels), np.array(probs), **kwargs)


def test_metric_directions():
    assert is_better("auc", 0.9, 0.8) and not is_better("auc", 0.8, 0.9)
    assert is_better("eer", 0.1, 0.2) and not is_better("video_eer", 0.3, 0.2)
    assert is_better("log_loss", 0.3, None)
    assert is_better("auc", 0.5, math.nan) and not is_better("auc", math.nan, 0.5)
    assert metric_direction("auc/Deepfakes") == "max"
    assert metric_direction("val_loss") == metric_direction("val_recon_loss") == metric_direction("log_loss") == "min"
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        is_better("f1", 1.0, 0.0)


def test_a_target_fpr_finer_than_one_real_is_unresolved():
    # 84 reals: one false positive is 1.19% FPR, so 1% and 0.1% can only be met with none (both the 0% point).
    assert unresolved_targets(84) == ["1pct", "0.1pct"]
    assert unresolved_targets(100) == ["0.1pct"]  # one real in 100 is exactly 1%
    assert unresolved_targets(999) == ["0.1pct"]
    assert unresolved_targets(1000) == []

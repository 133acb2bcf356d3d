import numpy as np
import pytest
import torch

from stage2.scoring.calibration import calibration_report, expected_calibration_error, fit_temperature


@pytest.fixture(scope="module")
def calibrated() -> tuple[np.ndarray, np.ndarray]:
    """Logits whose sigmoid is the true P(fake): labels are drawn from exactly that probability."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, 20_000)
    labels = (rng.random(logits.size) < 1 / (1 + np.exp(-logits))).astype(np.int64)
    return logits, labels


@pytest.mark.parametrize("scale", [5.0, 0.5])
def test_temperature_undoes_over_and_under_confidence(calibrated, scale):
    logits, labels = calibrated
    distorted = scale * logits  # scale 5: over-confident; scale 0.5: under-confident
    temperature = fit_temperature(distorted, labels)
    assert temperature == pytest.approx(scale, rel=0.05)
    report = calibration_report(distorted, labels, temperature)
    assert report["temperature"] == temperature
    assert report["nll_after"] < report["nll_before"]
    assert report["ece_after"] < report["ece_before"]
    assert report["ece_after"] < 0.02


def test_temperature_accepts_tensors_and_keeps_calibrated_logits(calibrated):
    logits, labels = calibrated
    assert fit_temperature(torch.from_numpy(logits).float(), torch.from_numpy(labels)) == pytest.approx(1, abs=0.05)


def test_two_class_softmax_equals_log_odds_scaling():
    # What lets GenConViT's two logits use the same temperature: softmax(z / T)[1] == sigmoid((z1 - z0) / T).
    z = torch.tensor([[0.3, 2.0], [1.5, -1.0], [0.0, 0.2]], dtype=torch.float64)
    t = 2.7
    torch.testing.assert_close(torch.softmax(z / t, dim=1)[:, 1], torch.sigmoid((z[:, 1] - z[:, 0]) / t))


def test_fit_temperature_rejects_bad_input():
    with pytest.raises(ValueError, match="one class"):
        fit_temperature(np.array([1.0, 2.0]), np.array([1, 1]))
    with pytest.raises(ValueError, match="3 logits but 2 labels"):
        fit_temperature(np.zeros(3), np.array([0, 1]))
    with pytest.raises(ValueError, match="1-D"):
        fit_temperature(np.zeros((2, 2)), np.array([0, 1]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        calibration_report(np.zeros(2), np.array([0, 1]), 0.0)


def test_ece_hand_case():
    # Two bins. [0, 0.5): p {0.1, 0.3} mean 0.2, labels mean 0.5 -> 2/4 * 0.3 = 0.15.
    # [0.5, 1]: p {0.6, 1.0} mean 0.8, labels mean 1.0 -> 2/4 * 0.2 = 0.10.
    labels = np.array([0, 1, 1, 1])
    probs = np.array([0.1, 0.3, 0.6, 1.0])
    assert expected_calibration_error(labels, probs, n_bins=2) == pytest.approx(0.25)
    # One bin: |mean(label) - mean(p)| = |0.75 - 0.5| over everything.
    assert expected_calibration_error(labels, probs, n_bins=1) == pytest.approx(0.25)
    # Ten bins: each p alone in its bin -> mean |label - p| = (0.1 + 0.7 + 0.4 + 0) / 4.
    assert expected_calibration_error(labels, probs, n_bins=10) == pytest.approx(0.3)


def test_ece_zero_when_bin_means_match():
    labels = np.array([0, 1, 0, 0, 0, 1, 1, 1])
    probs = np.array([0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 1.0, 1.0])
    assert expected_calibration_error(labels, probs, n_bins=4) == pytest.approx(0.0)


def test_ece_rejects_probabilities_outside_unit_interval():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error(np.array([0, 1]), np.array([-0.1, 1.2]))

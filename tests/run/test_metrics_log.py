"""metrics.csv (stage2.run.metrics_log): appended atomically, truncated on resume, never left half-written."""

import os

import pandas as pd
import pytest

from stage2 import atomic
from stage2.run.metrics_log import MetricsLog


def test_metrics_log_round_trip_and_resume(tmp_path):
    path = tmp_path / "run" / "metrics.csv"
    log = MetricsLog(path)
    for epoch in range(4):
        row = {"epoch": epoch, "train_loss": 1.0 / (epoch + 1), "auc": 0.5 + 0.1 * epoch}
        if epoch == 2:
            row["video_auc"] = 0.75  # a column that appears later on is kept, earlier rows get NaN
        log.append(row)
    on_disk = pd.read_csv(path)
    assert on_disk["epoch"].tolist() == [0, 1, 2, 3]
    assert on_disk["train_loss"].tolist() == pytest.approx([1, 0.5, 1 / 3, 0.25])
    assert on_disk["video_auc"].isna().tolist() == [True, True, False, True]
    assert sorted(os.listdir(path.parent)) == ["metrics.csv"]

    resumed = MetricsLog(path)
    resumed.truncate(1)
    assert resumed.frame()["epoch"].tolist() == [0, 1]
    assert pd.read_csv(path)["epoch"].tolist() == [0, 1]  # stale epochs leave the file at once
    resumed.append({"epoch": 2, "train_loss": 0.3, "auc": 0.7})
    pd.testing.assert_frame_equal(pd.read_csv(path), resumed.frame(), check_dtype=False)
    again = MetricsLog(path)
    again.truncate(None)
    assert again.frame()["auc"].tolist() == pytest.approx([0.5, 0.6, 0.7])

def test_metrics_log_truncate_resumes_and_fresh_log_overwrites(tmp_path):
    path = tmp_path / "metrics.csv"
    first = MetricsLog(path)
    for epoch in (1, 2, 3):
        first.append({"epoch": epoch, "stage": "head" if epoch == 1 else "full", "auc": epoch / 10})
    resumed = MetricsLog(path)
    resumed.truncate(2)
    assert resumed.frame()["stage"].tolist() == ["head", "full"]
    resumed.append({"epoch": 3, "stage": "full", "auc": 0.9})
    assert pd.read_csv(path)["auc"].tolist() == pytest.approx([0.1, 0.2, 0.9])
    MetricsLog(path).append({"epoch": 1, "auc": 0.4})
    assert pd.read_csv(path)["auc"].tolist() == [0.4]

def test_metrics_log_rejects_repeated_epoch(tmp_path):
    log = MetricsLog(tmp_path / "metrics.csv")
    log.append({"epoch": 0, "auc": 0.5})
    with pytest.raises(ValueError, match="epoch 0 appended after epoch 0"):
        log.append({"epoch": 0, "auc": 0.6})
    with pytest.raises(ValueError, match="no 'epoch'"):
        log.append({"auc": 0.6})

def test_metrics_log_truncate_of_a_missing_file_is_empty(tmp_path):
    log = MetricsLog(tmp_path / "metrics.csv")
    log.truncate(3)
    assert log.frame().empty

def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "metrics.csv"
    log = MetricsLog(path)
    log.append({"epoch": 0, "auc": 0.5})
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        log.append({"epoch": 1, "auc": 0.6})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["metrics.csv"]

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from src import atomic
from src.engine.report import (
    MetricsLog,
    format_metrics_table,
    plot_roc,
    plot_training_curves,
    write_json_atomic,
)


def _open_png(path) -> tuple[int, int]:
    assert path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
        return im.size


def test_plot_roc_frame_and_video(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(labels * 0.4 + rng.random(200) * 0.6, 0, 1)
    out = tmp_path / "plots" / "roc.png"
    plot_roc(
        labels,
        probs,
        out,
        "val",
        video_labels=np.array([0, 1, 0, 1]),
        video_probs=np.array([0.2, 0.7, 0.4, 0.9]),
    )
    assert _open_png(out) == (500, 500)


def test_plot_roc_legend_names_auc(tmp_path, monkeypatch):
    figures = []
    save = Figure.savefig

    def spy(fig, *args, **kwargs):
        figures.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    plot_roc(np.array([0, 1, 0, 1]), np.array([0.1, 0.8, 0.75, 0.7]), tmp_path / "roc.png", "val")
    legend = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    assert legend[0] == "frame (AUC = 0.75)"


def test_plot_roc_one_class_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="one class"):
        plot_roc(np.ones(3), np.array([0.1, 0.5, 0.9]), tmp_path / "roc.png", "val")


@pytest.mark.parametrize(
    "history",
    [
        pd.DataFrame({"epoch": [0], "train_loss": [0.7], "val_loss": [0.6], "auc": [0.8], "lr_last_step": [1e-3]}),
        pd.DataFrame(
            {
                "epoch": [0, 1, 2],
                "train_loss": [0.7, 0.5, 0.4],
                "val_loss": [0.6, 0.55, 0.5],
                "auc": [0.8, 0.85, 0.9],
                "ap": [0.7, 0.8, 0.85],
                "lr_last_step": [1e-3, 5e-4, 1e-4],
                "acc": [0.7, 0.75, 0.8],
            }
        ),
        pd.DataFrame({"epoch": [0, 1], "train_loss": [0.7, 0.5], "auc": [math.nan, math.nan]}),
    ],
    ids=["one-epoch", "full", "loss-only"],
)
def test_plot_training_curves(tmp_path, history):
    out = tmp_path / "curves.png"
    plot_training_curves(history, out)
    _open_png(out)


def test_plot_training_curves_panel_count_follows_columns(tmp_path):
    base = {"epoch": [0, 1], "train_loss": [0.7, 0.5]}
    plot_training_curves(pd.DataFrame(base), tmp_path / "one.png")
    curves = pd.DataFrame({**base, "auc": [0.8, 0.9], "lr_last_step": [1e-3, 1e-4]})
    plot_training_curves(curves, tmp_path / "three.png")
    assert _open_png(tmp_path / "three.png")[0] == 3 * _open_png(tmp_path / "one.png")[0]


def test_plot_training_curves_needs_something_to_plot(tmp_path):
    with pytest.raises(ValueError, match="none of the columns"):
        plot_training_curves(pd.DataFrame({"epoch": [0], "acc": [0.5]}), tmp_path / "x.png")


def test_format_metrics_table():
    table = format_metrics_table({"auc": 0.912345, "eer": math.nan, "n": 1200}, "val epoch 3")
    assert table.splitlines() == [
        "val epoch 3",
        "---------------",
        "metric |  value",
        "---------------",
        "auc    | 0.9123",
        "eer    |    n/a",
        "n      |   1200",
    ]


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

    resumed = MetricsLog.load(path, up_to_epoch=1)
    assert resumed.frame()["epoch"].tolist() == [0, 1]
    assert pd.read_csv(path)["epoch"].tolist() == [0, 1]  # stale epochs leave the file at once
    resumed.append({"epoch": 2, "train_loss": 0.3, "auc": 0.7})
    pd.testing.assert_frame_equal(pd.read_csv(path), resumed.frame(), check_dtype=False)
    assert MetricsLog.load(path).frame()["auc"].tolist() == pytest.approx([0.5, 0.6, 0.7])


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


def test_metrics_log_load_missing_file_is_empty(tmp_path):
    assert MetricsLog.load(tmp_path / "metrics.csv", up_to_epoch=3).frame().empty


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


def test_write_json_atomic_nan_to_null(tmp_path):
    path = tmp_path / "out" / "metrics.json"
    write_json_atomic(
        path, {"auc": np.float32(0.5), "eer": math.nan, "n": np.int64(3), "curve": np.array([1.0, np.inf])}
    )
    assert json.loads(path.read_text()) == {"auc": 0.5, "eer": None, "n": 3, "curve": [1.0, None]}
    assert "\n  " in path.read_text()  # indent=2
    assert os.listdir(path.parent) == ["metrics.json"]

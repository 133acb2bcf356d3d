"""The scoring plots (stage2.scoring.plots): ROC with its low-FPR view, robustness bars, training curves."""

import math

import numpy as np
import pandas as pd
import pytest
from conftest import open_png
from matplotlib.figure import Figure

from stage2.scoring.metrics import FPR_TARGETS, operating_points
from stage2.scoring.plots import plot_robustness, plot_roc, plot_training_curves


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
    assert open_png(out) == (1000, 500)


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
    open_png(out)


def test_plot_training_curves_panel_count_follows_columns(tmp_path):
    base = {"epoch": [0, 1], "train_loss": [0.7, 0.5]}
    plot_training_curves(pd.DataFrame(base), tmp_path / "one.png")
    curves = pd.DataFrame({**base, "auc": [0.8, 0.9], "lr_last_step": [1e-3, 1e-4]})
    plot_training_curves(curves, tmp_path / "three.png")
    assert open_png(tmp_path / "three.png")[0] == 3 * open_png(tmp_path / "one.png")[0]


def test_plot_training_curves_needs_something_to_plot(tmp_path):
    with pytest.raises(ValueError, match="none of the columns"):
        plot_training_curves(pd.DataFrame({"epoch": [0], "acc": [0.5]}), tmp_path / "x.png")


# ---------------------------------------------------------------- what the plots tell a reader
def _line(ax, label):
    return next(line for line in ax.get_lines() if line.get_label() == label)


def _vertical_lines(ax) -> list[float]:
    return [line.get_xdata()[0] for line in ax.get_lines() if len(set(line.get_xdata())) == 1
            and len(line.get_xdata()) == 2]


def test_roc_says_1_is_fake_and_shows_the_low_fpr_region_on_a_log_axis(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(2000), np.ones(2000)].astype(int)
    probs = 1 / (1 + np.exp(-(labels * 5 + rng.normal(0, 1.2, 4000) - 2.5)))
    fig = plot_roc(labels, probs, tmp_path / "roc.png", "val")
    full, low = fig.axes
    assert full.get_xscale() == "linear" and low.get_xscale() == "log"
    assert low.get_xlim()[0] <= 0.001 and low.get_xlim()[1] == 1  # both targets, 1% and 0.1%, are in view
    for ax in (full, low):
        assert "1 = fake" in ax.get_ylabel() and "reals called fake" in ax.get_xlabel()
    # The operating points at both targets are marked on the curve, filled: 2000 reals resolve 0.1% FPR.
    points = operating_points(labels, probs)
    markers = {float(line.get_xdata()[0]): line for line in low.get_lines() if line.get_marker() == "o"
               and len(line.get_xdata()) == 1}
    for name, target in FPR_TARGETS.items():
        assert markers[target].get_ydata()[0] == pytest.approx(points[f"tpr_at_fpr_{name}"])
        assert markers[target].get_markerfacecolor() != "white"
    assert not any("finest" in t.get_text() for t in low.get_legend().get_texts())


def test_roc_marks_targets_finer_than_one_real(tmp_path):
    # 84 reals: an FPR step is 1.19%, so 1% and 0.1% FPR are both the 0% point; 200 videos resolve 1% only.
    labels = np.r_[np.zeros(84), np.ones(84)].astype(int)
    probs = np.r_[np.linspace(0, 0.7, 84), np.linspace(0.3, 1, 84)]
    video_labels = np.r_[np.zeros(200), np.ones(200)].astype(int)
    video_probs = np.r_[np.linspace(0, 0.7, 200), np.linspace(0.3, 1, 200)]
    fig = plot_roc(labels, probs, tmp_path / "roc.png", "val", video_labels=video_labels, video_probs=video_probs)
    low = fig.axes[1]
    assert {1 / 84, 1 / 200} <= set(_vertical_lines(low))
    legend = [t.get_text() for t in low.get_legend().get_texts()]
    assert {"1/84 reals: finest frame FPR", "1/200 real videos: finest video FPR", "video (AUC = 0.84)"} <= set(legend)
    hollow = {(line.get_color(), float(line.get_xdata()[0])) for line in low.get_lines()
              if line.get_marker() == "o" and line.get_markerfacecolor() == "white" and len(line.get_xdata()) == 1}
    assert hollow == {("C0", 0.01), ("C0", 0.001), ("C1", 0.001)}


def test_robustness_bars_have_a_y_label_a_chance_line_visible_zeros_and_a_legend_beside_them(tmp_path):
    table = pd.DataFrame({"perturbation": ["none", "jpeg:50", "down:0.5"], "auc": [0.9, 0.7, 0.5],
                          "tpr_at_fpr_1pct": [0.6, 0.2, 0.0]})
    fig = plot_robustness(table, tmp_path / "robustness.png", "model on test")
    ax = fig.axes[0]
    assert ax.get_ylabel()
    assert any(set(line.get_ydata()) == {0.5} for line in ax.get_lines())  # the chance line
    labels = [t.get_text() for t in ax.texts]
    assert labels.count("0.00") == 1 and "0.60" in labels  # every bar carries its value, a zero one too
    legend, axes_box = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= axes_box.x1  # beside the bars, covering none
    assert [t.get_text() for t in ax.get_legend().get_texts()][-1] == "TPR at 1% FPR"
    open_png(tmp_path / "robustness.png")
    # 84 reals cannot resolve 1% FPR: the legend says what those bars are.
    fig = plot_robustness(table, tmp_path / "robustness.png", "model on test", n_real=84)
    assert "below resolution: 84 reals" in fig.axes[0].get_legend().get_texts()[-1].get_text()


def test_curves_mark_the_best_epoch_on_every_panel(tmp_path):
    history = pd.DataFrame({"epoch": [1, 2, 3, 4], "train_loss": [0.7, 0.5, 0.4, 0.3],
                            "val_loss": [0.6, 0.5, 0.55, 0.6], "auc": [0.7, 0.8, 0.9, 0.85],
                            "lr_last_step": [1e-3, 8e-4, 3e-4, 1e-5]})
    fig = plot_training_curves(history, tmp_path / "curves.png", best_epoch=3, select_metric="auc")
    for ax in fig.axes:
        assert 3 in _vertical_lines(ax)
        assert list(ax.xaxis.get_major_locator()()) == [int(t) for t in ax.xaxis.get_major_locator()()]
    star = _line(fig.axes[1], "best: epoch 3, auc 0.9000")
    assert (list(star.get_xdata()), list(star.get_ydata())) == ([3], [0.9])
    # A metric outside the usual validation panel joins it when it selects the checkpoint.
    fig = plot_training_curves(history.assign(eer=[0.3, 0.2, 0.1, 0.15]), tmp_path / "curves.png", best_epoch=3,
                               select_metric="eer")
    assert _line(fig.axes[1], "best: epoch 3, eer 0.1000").get_ydata()[0] == 0.1
    # No epoch has improved yet (the trainer's best_epoch 0: a NaN metric): nothing is marked, nothing fails.
    fig = plot_training_curves(history.assign(auc=np.nan), tmp_path / "curves.png", best_epoch=0, select_metric="auc")
    assert not any(_vertical_lines(ax) for ax in fig.axes)


def test_one_loss_spike_cannot_flatten_the_loss_axis(tmp_path):
    history = pd.DataFrame({"epoch": [1, 2, 3, 4, 5], "train_loss": [0.7, 40.0, 0.3, 0.15, 0.1],
                            "val_loss": [0.65, 0.5, 0.3, 0.2, 0.15]})
    ax = plot_training_curves(history, tmp_path / "curves.png").axes[0]
    assert ax.get_yscale() == "log"
    low, high = np.log10(ax.get_ylim())
    rest = np.log10([0.1, 0.7])  # the curve without its spike
    assert (rest[1] - rest[0]) / (high - low) > 0.25  # on a linear axis it would fill under 2% of the height


def test_genconvit_loss_terms_get_their_own_panel(tmp_path):
    history = pd.DataFrame({"epoch": [1, 2], "train_loss": [1.0, 0.8], "val_loss": [0.9, 0.85],
                            "train_cls": [0.69, 0.6], "val_cls": [0.69, 0.65], "train_recon": [0.2, 0.05],
                            "val_recon": [0.19, 0.06], "train_kl": [0.0, 0.0], "val_kl": [0.0, 0.0]})
    fig = plot_training_curves(history, tmp_path / "ed.png")
    terms = next(ax for ax in fig.axes if ax.get_title() == "loss terms")
    assert [line.get_label() for line in terms.get_lines()] == ["train_cls", "val_cls", "train_recon", "val_recon"]
    assert terms.get_yscale() == "log"
    # The VAE's KL term is drawn; train and val of a term share a colour, val dashed.
    fig = plot_training_curves(history.assign(train_kl=[3.0, 1.0], val_kl=[2.5, 1.2]), tmp_path / "vae.png")
    terms = next(ax for ax in fig.axes if ax.get_title() == "loss terms")
    kl = _line(terms, "train_kl"), _line(terms, "val_kl")
    assert kl[0].get_color() == kl[1].get_color() and (kl[0].get_linestyle(), kl[1].get_linestyle()) == ("-", "--")

"""End-to-end runs of train_stage2_effnet.py on real PNG files with timm's tiny test model."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import output_dir, set_flag

import train_stage2_effnet
from stage2.commands.cli import exit_on_error
from stage2.commands.train_args import config_from_args
from stage2.data.dataset import ManifestDataset, collate
from stage2.data.manifest import read_manifest
from stage2.data.transforms import DeviceTransform
from stage2.engine import trainer
from stage2.engine.modes import run
from stage2.errors import ConfigError, TrainingDiverged
from stage2.experts.timm_classifier import TimmExpert
from stage2.models.families import model_from_checkpoint
from stage2.run.checkpoint import load_checkpoint

RUN_OUTPUTS = ["best.pt", "last.pt", "args.json", "metrics.csv", "summary.json", "roc.png", "curves.png",
               "train.log", "val_predictions.csv"]


def test_run_writes_every_output_and_best_reloads_to_the_same_predictions(effnet_args, tiny_data, monkeypatch):
    figures = {}  # the last figure each plot function returned

    def spy(plot):
        def plot_and_keep(*args, **kwargs):
            figures[plot.__name__] = plot(*args, **kwargs)
            return figures[plot.__name__]
        return plot_and_keep

    for plot in (trainer.plot_roc, trainer.plot_training_curves):
        monkeypatch.setattr(trainer, plot.__name__, spy(plot))
    train_stage2_effnet.main(effnet_args)
    out = output_dir(effnet_args)
    for name in RUN_OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    history = pd.read_csv(out / "metrics.csv")
    assert history["epoch"].tolist() == [1, 2]
    for column in ["train_loss", "val_loss", "auc", "ap", "eer", "acc", "balanced_acc", "log_loss", "video_auc",
                   "video_eer", "lr_last_step", "epoch_time", "images_per_s"]:
        assert column in history and history[column].notna().all(), column
    assert any(c.startswith("auc/") for c in history)

    summary = json.loads((out / "summary.json").read_text())
    best_row = history.loc[history["epoch"] == summary["best_epoch"]].iloc[0]
    assert summary["best_epoch"] == int(history.loc[history["auc"].idxmax(), "epoch"])
    assert summary["metrics"]["auc"] == pytest.approx(best_row["auc"])
    assert {"nll_before", "nll_after", "ece_before", "ece_after"} <= summary["calibration"].keys()
    # The plots: curves star the best epoch on the selecting metric; the ROC has a video-level curve (video_id).
    validation = next(ax for ax in figures["plot_training_curves"].axes if ax.get_title() == "validation")
    star = next(line for line in validation.get_lines() if line.get_label().startswith("best: epoch"))
    assert (star.get_xdata()[0], star.get_ydata()[0]) == (summary["best_epoch"], pytest.approx(best_row["auc"]))
    legend = [t.get_text() for t in figures["plot_roc"].axes[0].get_legend().get_texts()]
    assert f"video (AUC = {summary['metrics']['video_auc']:.2f})" in legend
    assert "torch threads" in (out / "train.log").read_text().split("settings:")[1].splitlines()[1]

    best = torch.load(out / "best.pt", weights_only=True)
    assert best["model_name"] == "test_efficientnet" and best["num_classes"] == 1
    assert best["data_config"]["input_size"] == [3, 32, 32] and best["epoch"] == summary["best_epoch"]
    assert "optimizer" not in best and "optimizer" in torch.load(out / "last.pt", weights_only=True)

    # best.pt alone (no training code state) reproduces the predictions the run wrote.
    model = model_from_checkpoint(best).eval()
    frame = read_manifest(tiny_data[1])
    batch = collate([ManifestDataset(frame, 32)[i] for i in range(len(frame))])
    x = DeviceTransform(best["data_config"]["mean"], best["data_config"]["std"]).eval()(batch.images)
    with torch.no_grad():
        p_fake = torch.sigmoid(model(x).squeeze(1)).numpy()
    written = pd.read_csv(out / "val_predictions.csv")
    np.testing.assert_allclose(p_fake, written["p_fake"].to_numpy(), atol=1e-5)
    assert written["path"].tolist() == frame["path"].tolist()


def test_a_previous_run_is_never_overwritten_silently(effnet_args, capsys):
    args = set_flag(effnet_args, "--epochs", "1")
    train_stage2_effnet.main(args)
    best = output_dir(args) / "best.pt"
    before = best.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        exit_on_error(lambda: train_stage2_effnet.main(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err and "--overwrite" in err
    assert best.read_bytes() == before
    train_stage2_effnet.main([*args, "--overwrite", "--seed", "7"])
    assert best.read_bytes() != before


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--val-manifest", "absent.csv", "absent.csv"), ("--model", "no_such_net", "--model"),
     ("--pos-weight", "heavy", "--pos-weight"), ("--resume", "nowhere/last.pt", "--resume"),
     ("--select-metric", "f1", "--select-metric")],
)
def test_bad_input_is_one_line_and_exit_code_2(effnet_args, capsys, flag, value, message):
    args = set_flag(effnet_args, flag, value)
    with pytest.raises(SystemExit) as exit_info:
        exit_on_error(lambda: train_stage2_effnet.main(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (output_dir(effnet_args) / "best.pt").exists()


class _NaNInSecondEpoch(TimmExpert):
    def __init__(self, steps_per_epoch: int, **kwargs):
        super().__init__(**kwargs)
        self.calls, self.steps_per_epoch = 0, steps_per_epoch

    def loss(self, outputs, images, labels):
        terms = super().loss(outputs, images, labels)
        if outputs.requires_grad:
            self.calls += 1
            if self.calls > self.steps_per_epoch:
                terms["loss"] = terms["loss"] * float("nan")
        return terms


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(effnet_args):
    cfg = config_from_args(train_stage2_effnet.build_parser().parse_args(effnet_args))
    expert = _NaNInSecondEpoch(36 // 8, model_name="test_efficientnet", img_size=32, pretrained=False)
    with pytest.raises(TrainingDiverged, match="non-finite loss in epoch 2"):
        run(cfg, expert)
    last = load_checkpoint(output_dir(effnet_args) / "last.pt")
    assert last["next_epoch"] == 1 and last["step"] == 0
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert pd.read_csv(output_dir(effnet_args) / "metrics.csv")["epoch"].tolist() == [1]


def test_warmup_reaches_the_peak_lr_exactly(effnet_args):
    args = [*set_flag(effnet_args, "--epochs", "3"), "--lr", "3e-4", "--warmup-epochs", "1"]
    train_stage2_effnet.main(args)
    lrs = pd.read_csv(output_dir(args) / "metrics.csv")["lr_last_step"]
    assert lrs.iloc[0] == pytest.approx(3e-4)  # the last update of epoch 1 ends the warmup at --lr
    assert lrs.iloc[1] < 3e-4 and lrs.iloc[2] < lrs.iloc[1]


def test_the_new_head_starts_at_p_fake_one_half():
    model = TimmExpert("tf_efficientnetv2_b0", img_size=64, pretrained=False).build_model().train()
    logits = model(torch.randn(4, 3, 64, 64))
    assert torch.equal(logits, torch.zeros_like(logits))
    # timm's own init of a one-output EfficientNet head draws from U(-1, 1): logits of several units.
    assert TimmExpert("tf_efficientnetv2_b0", img_size=64, pretrained=False)._create().train()(
        torch.randn(4, 3, 64, 64)).abs().max() > 0.5


def test_pos_weight_auto_balances_the_loss():
    expert = TimmExpert("test_efficientnet", img_size=32, pretrained=False, pos_weight="auto")
    expert.prepare(3, 1)  # real, fake
    assert expert.pos_weight == pytest.approx(3.0)
    logits, labels = torch.zeros(2, 1), torch.tensor([1, 0])
    loss = expert.loss(logits, None, labels)["loss"]
    assert loss[0] == pytest.approx(3 * loss[1])


@pytest.mark.parametrize("tune", ["head", "norm"])
def test_tune_trains_only_the_head_or_the_norms_and_the_head_and_resumes(effnet_args, tune, monkeypatch):
    built = {}
    build = TimmExpert.build_model

    def keep_start(self):
        model = build(self)
        built.update({k: v.clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(TimmExpert, "build_model", keep_start)
    args = [*set_flag(set_flag(effnet_args, "--epochs", "1"), "--lr", "1e-2"), "--tune", tune, "--no-ema"]
    train_stage2_effnet.main(args)
    model = build(TimmExpert("test_efficientnet", img_size=32, pretrained=False))
    head = {f"{model.pretrained_cfg['classifier']}.{name}" for name, _ in model.get_classifier().named_parameters()}
    norms = {f"{module}.{name}" for module, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
             for name in ("weight", "bias")}
    stats = {k for k in built if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert norms and stats
    after = load_checkpoint(output_dir(args) / "last.pt")["model"]
    changed = {k for k in built if not torch.equal(built[k], after[k])}
    trained = head | (norms | stats if tune == "norm" else set())
    assert changed == trained  # the rest byte-identical to the start (with head, BatchNorm's statistics too)
    assert json.loads((output_dir(args) / "args.json").read_text())["tune"] == tune
    train_stage2_effnet.main(set_flag(args, "--epochs", "2") + ["--resume"])
    again = load_checkpoint(output_dir(args) / "last.pt")["model"]
    assert {k for k in built if not torch.equal(built[k], again[k])} == trained
    other = "norm" if tune == "head" else "all"
    with pytest.raises(ConfigError, match=f"tune={tune!r}.*cannot change on resume"):
        train_stage2_effnet.main(set_flag(set_flag(args, "--epochs", "3"), "--tune", other) + ["--resume"])

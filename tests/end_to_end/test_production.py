"""The bridge to stage three in production: unlabeled inference, evaluation that keeps its outputs, operating
points, the robustness report, and standard exports (timm local-dir, ONNX checked with onnxruntime)."""

from __future__ import annotations

import io
import json
import os
import runpy
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from conftest import ROOT, fails, subprocess_env
from PIL import Image

import feature_extractor
import train_stage2_effnet
import train_stage2_genconvit
from stage2.commands.cli import exit_on_error
from stage2.data.manifest import read_manifest
from stage2.data.preprocessing import DataConfig
from stage2.embeddings import FeatureExtractor, load_features
from stage2.embeddings.export import ExportGraph, check_images, check_onnx, export_checkpoint
from stage2.embeddings.extract import load_model
from stage2.errors import CheckpointError, ConfigError, ExportCheckError, ManifestError
from stage2.models.families import model_from_checkpoint
from stage2.models.genconvit import GenConViTED
from stage2.models.timm_models import create_timm_model, timm_data_config
from stage2.run.checkpoint import BestCheckpoint, load_checkpoint, save_checkpoint
from stage2.scoring.metrics import operating_points


def _main(args: list[str]) -> None:
    feature_extractor.main(args)


# ---------------------------------------------------------------- 1. unlabeled inference
def test_a_manifest_without_labels_and_a_folder_give_the_features_of_the_labelled_manifest(trained_run, tiny_data,
                                                                                          tmp_path):
    val = read_manifest(tiny_data[1])
    unlabeled = tmp_path / "paths.csv"
    val[["path"]].to_csv(unlabeled, index=False)
    folder = tmp_path / "crops"
    for i, path in enumerate(sorted(val["path"])):  # a folder tree: sorted by path it is the same order
        target = folder / f"sub{i % 2}" / f"{i:03d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(Path(path).read_bytes())
    base = ["--checkpoint", str(trained_run / "best.pt"), "--workers", "0"]
    _main([*base, "--manifest", str(tiny_data[1]), "--out", str(tmp_path / "labelled.npz")])
    _main([*base, "--manifest", str(unlabeled), "--out", str(tmp_path / "unlabeled.npz")])
    _main([*base, "--images", str(folder), "--out", str(tmp_path / "folder.npz")])
    labelled, plain, crops = (load_features(tmp_path / f"{n}.npz") for n in ("labelled", "unlabeled", "folder"))
    np.testing.assert_array_equal(plain.embeddings, labelled.embeddings)
    np.testing.assert_array_equal(plain.p_fake, labelled.p_fake)
    assert (plain.labels == -1).all() and plain.video_id is None
    order = np.argsort(val["path"].to_numpy())  # the folder copy is in sorted-path order, sub0/sub1 interleaved
    by_name = np.argsort([Path(p).name for p in crops.paths])
    np.testing.assert_allclose(crops.embeddings[by_name], labelled.embeddings[order], atol=1e-6)
    assert (crops.labels == -1).all() and list(crops.paths) == sorted(crops.paths)


def test_predict_and_extract_paths_for_notebooks(trained_run, tiny_data):
    fx = FeatureExtractor(checkpoint_path=trained_run / "best.pt", workers=0, progress=False)
    val = read_manifest(tiny_data[1])
    predicted = fx.predict(list(val["path"]))
    embeddings, p_fake, paths = fx.extract_paths(list(val["path"]))
    reference = fx.extract(fx.make_loader(tiny_data[1]), return_probs=True)
    assert list(predicted["path"]) == list(paths) == list(val["path"])
    np.testing.assert_array_equal(predicted["p_fake"].to_numpy(), p_fake)
    np.testing.assert_array_equal(embeddings, reference[0])
    np.testing.assert_array_equal(p_fake, reference[2])
    with_labels = fx.predict(tiny_data[1])  # a manifest keeps its columns
    assert {"label", "video_id", "method", "p_fake"} <= set(with_labels.columns)


def test_training_still_needs_labels(effnet_args, tiny_data, tmp_path):
    unlabeled = tmp_path / "train_paths.csv"
    read_manifest(tiny_data[0])[["path"]].to_csv(unlabeled, index=False)
    args = list(effnet_args)
    args[args.index("--train-manifest") + 1] = str(unlabeled)
    with pytest.raises(ManifestError, match="missing column"):
        train_stage2_effnet.main(args)


# ---------------------------------------------------------------- 2-4. evaluation, operating points, robustness
def test_operating_points_are_the_roc_points_a_cascade_uses():
    labels = np.array([0] * 100 + [1] * 100)
    scores = np.r_[np.linspace(0, 0.6, 100), np.linspace(0.3, 1, 100)]
    points = operating_points(labels, scores)
    # FPR 1%: one real (0.6) may pass; the threshold is the lowest that lets only it through.
    t = points["thr_at_fpr_1pct"]
    assert (scores[:100] >= t).mean() == pytest.approx(0.01)
    assert points["tpr_at_fpr_1pct"] == pytest.approx((scores[100:] >= t).mean()) == pytest.approx(0.58)
    assert (scores[:100] >= points["thr_at_fpr_0.1pct"]).sum() == 0 and points["tpr_at_fpr_0.1pct"] == 0.57
    e = points["eer_threshold"]
    assert abs((scores[:100] >= e).mean() - (scores[100:] < e).mean()) < 0.02


def test_runs_report_operating_points_on_calibrated_scores(trained_run):
    history = pd.read_csv(trained_run / "metrics.csv")
    for column in ("tpr_at_fpr_1pct", "thr_at_fpr_1pct", "tpr_at_fpr_0.1pct", "eer_threshold",
                   "video_tpr_at_fpr_1pct", "video_eer_threshold"):
        assert column in history, column
    summary = json.loads((trained_run / "summary.json").read_text())
    predictions = pd.read_csv(trained_run / "val_predictions.csv")
    expected = operating_points(predictions["label"].to_numpy(), predictions["p_fake_calibrated"].to_numpy())
    # JSON has no infinity: a threshold no score can reach (no fake above every real) is written as null.
    expected = {k: None if np.isinf(v) else v for k, v in expected.items()}
    stored = summary["operating_points"]["frame"]
    n_real = int((predictions["label"] == 0).sum())
    assert (stored.pop("n_real"), stored.pop("below_resolution")) == (n_real, ["1pct", "0.1pct"])  # 6 reals
    assert {k for k, v in stored.items() if v is None} == {k for k, v in expected.items() if v is None}
    assert {k: v for k, v in stored.items() if v is not None} == pytest.approx(
        {k: v for k, v in expected.items() if v is not None})
    assert "video" in summary["operating_points"]


def test_evaluate_several_manifests_keeps_every_output_and_overwrites_nothing(trained_run, tiny_data, tmp_path, capsys):
    val = read_manifest(tiny_data[1])
    second = tmp_path / "other" / "test.csv"
    second.parent.mkdir()
    val.iloc[::-1].to_csv(second, index=False)
    out = tmp_path / "eval"
    args = ["--evaluate", str(trained_run / "best.pt"), "--val-manifest", str(tiny_data[1]), str(second), "--model",
            "test_efficientnet", "--img-size", "32", "--workers", "0", "--amp", "off", "--output-dir", str(out)]
    train_stage2_effnet.main(args)
    for name in ("val", "test"):
        report = json.loads((out / f"eval_{name}.json").read_text())
        assert report["metrics"]["n"] == len(val) and "frame" in report["operating_points"]
        predictions = pd.read_csv(out / f"predictions_{name}.csv")
        assert {"path", "label", "video_id", "method", "p_fake", "p_fake_calibrated"} <= set(predictions.columns)
    table = pd.read_csv(out / "eval_summary.csv")
    assert table["manifest"].tolist() == ["val", "test"]
    assert table["auc"].iloc[0] == pytest.approx(table["auc"].iloc[1])  # the same images in another order
    before = (out / "eval_val.json").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        exit_on_error(lambda: train_stage2_effnet.main(args))
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "eval_val.json").read_bytes() == before
    train_stage2_effnet.main([*args, "--overwrite"])


def test_evaluate_overwrite_replaces_the_previous_evaluation_whole(trained_run, tiny_data, tmp_path, capsys):
    val = read_manifest(tiny_data[1])
    second = tmp_path / "b.csv"
    val.iloc[::-1].to_csv(second, index=False)
    out = tmp_path / "eval"
    args = ["--evaluate", str(trained_run / "best.pt"), "--model", "test_efficientnet", "--img-size", "32",
            "--workers", "0", "--amp", "off", "--output-dir", str(out)]
    train_stage2_effnet.main([*args, "--val-manifest", str(tiny_data[1]), "--perturb", "jpeg:50"])
    first = {path.name: path.read_bytes() for path in out.iterdir()}
    assert {"eval_val.json", "predictions_val.csv", "robustness_val.csv", "robustness_val.png"} <= set(first)

    # A failing evaluation (a manifest of missing files) leaves the previous one as it was.
    missing = tmp_path / "missing.csv"
    pd.DataFrame({"path": ["nope_0.png", "nope_1.png"], "label": [0, 1]}).to_csv(missing, index=False)
    fails(train_stage2_effnet.main, [*args, "--val-manifest", str(missing), "--overwrite"], capsys)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == first

    train_stage2_effnet.main([*args, "--val-manifest", str(second), "--overwrite"])
    assert sorted(path.name for path in out.iterdir()) == ["eval_b.json", "eval_summary.csv", "predictions_b.csv",
                                                            "shortcut_audit.csv"]
    assert pd.read_csv(out / "eval_summary.csv")["manifest"].tolist() == ["b"]
    assert set(pd.read_csv(out / "shortcut_audit.csv")["set"]) == {"b"}


def test_a_failed_evaluate_leaves_no_folder_it_created(trained_run, tiny_data, tmp_path, capsys):
    missing = tmp_path / "missing.csv"
    pd.DataFrame({"path": ["nope_0.png", "nope_1.png"], "label": [0, 1]}).to_csv(missing, index=False)
    out = tmp_path / "new" / "reports" / "here"
    fails(train_stage2_effnet.main, ["--evaluate", str(trained_run / "best.pt"), "--val-manifest", str(missing),
                                     "--model", "test_efficientnet", "--output-dir", str(out)], capsys)
    assert not (tmp_path / "new").exists()


def test_evaluate_prints_the_calibrated_operating_points_and_marks_those_too_fine_for_its_reals(trained_run, tiny_data,
                                                                                               tmp_path, capsys):
    out = tmp_path / "eval"
    train_stage2_effnet.main(["--evaluate", str(trained_run / "best.pt"), "--val-manifest", str(tiny_data[1]),
                              "--model", "test_efficientnet", "--img-size", "32", "--workers", "0", "--amp", "off",
                              "--output-dir", str(out)])
    printed = capsys.readouterr().out
    report = json.loads((out / "eval_val.json").read_text())
    n_real = int((read_manifest(tiny_data[1])["label"] == 0).sum())
    for level, unit in (("frame", "reals"), ("video", "real videos")):
        points = report["operating_points"][level]
        assert points["below_resolution"] == ["1pct", "0.1pct"] and points["n_real"] == (n_real if level == "frame"
                                                                                          else n_real // 3)
        rows = [line.split() for line in printed.splitlines() if line.split()[:1] == [level]]
        assert [row[1] for row in rows] == ["1%", "0.1%", "EER"]
        for row, key in ((rows[0], "thr_at_fpr_1pct"), (rows[1], "thr_at_fpr_0.1pct")):
            assert row[4] == ("none" if points[key] is None else f"{points[key]:.4f}")  # JSON's null: no threshold
        assert rows[2][2] == f"{points['eer_threshold']:.4f}"
        note = f"below resolution: {points['n_real']} {unit} resolve FPR steps of"
        assert all(note in " ".join(row) for row in rows[:2]) and note not in " ".join(rows[2])
    # The thresholds on raw P(fake) stay in the JSON (and metrics.csv), off the console.
    assert "thr_at_fpr_1pct" in report["metrics"] and "thr_at_fpr" not in printed and "eer_threshold" not in printed


def test_evaluate_refuses_a_temperature_that_would_make_p_fake_nan_or_inverted(trained_run, tiny_data, tmp_path):
    checkpoint = tmp_path / "nan.pt"
    save_checkpoint({**load_checkpoint(trained_run / "best.pt"), "temperature": float("nan")}, checkpoint)
    with pytest.raises(CheckpointError, match=f"checkpoint {checkpoint}: temperature nan is not a positive finite"):
        train_stage2_effnet.main(["--evaluate", str(checkpoint), "--val-manifest", str(tiny_data[1]), "--model",
                                  "test_efficientnet", "--img-size", "32", "--workers", "0", "--amp", "off",
                                  "--output-dir", str(tmp_path / "eval")])
    assert not (tmp_path / "eval" / "eval_val.json").exists()


def test_several_val_manifests_are_for_evaluation_only(effnet_args, tiny_data):
    args = list(effnet_args)
    args[args.index("--val-manifest") + 1: args.index("--val-manifest") + 2] = [str(tiny_data[1])] * 2
    with pytest.raises(ConfigError, match="--val-manifest"):
        train_stage2_effnet.main(args)


def test_the_robustness_report_is_deterministic_and_perturbs_the_images(trained_run, tiny_data, tmp_path):
    common = ["--evaluate", str(trained_run / "best.pt"), "--val-manifest", str(tiny_data[1]), "--model",
              "test_efficientnet", "--img-size", "32", "--workers", "0", "--amp", "off",
              "--perturb", "jpeg:50,jpeg:30,down:0.5,blur:1.0,noise:0.02"]
    for run in ("a", "b"):
        train_stage2_effnet.main([*common, "--output-dir", str(tmp_path / run)])
    table = pd.read_csv(tmp_path / "a" / "robustness_val.csv")
    assert table["perturbation"].tolist() == ["none", "jpeg:50", "jpeg:30", "down:0.5", "blur:1", "noise:0.02"]
    pd.testing.assert_frame_equal(table, pd.read_csv(tmp_path / "b" / "robustness_val.csv"))
    assert {"auc", "tpr_at_fpr_1pct"} <= set(table.columns)
    assert (tmp_path / "a" / "robustness_val.png").stat().st_size > 0
    clean = json.loads((tmp_path / "a" / "eval_val.json").read_text())["metrics"]
    assert table.loc[0, "auc"] == pytest.approx(clean["auc"])
    # Each row scores other pixels: the model's log-loss moves with every perturbation (AUC may tie on 12 images).
    assert table["log_loss"].nunique() == len(table)
    with pytest.raises(ConfigError, match="--perturb"):
        train_stage2_effnet.main([*common[4:], "--train-manifest", str(tiny_data[0]), "--epochs", "1",
                                  "--output-dir", str(tmp_path / "t")])


# ---------------------------------------------------------------- 5. standard export
@pytest.fixture(scope="module")
def uncalibrated(trained_run, tmp_path_factory) -> Path:
    """The trained run's best.pt at temperature 1: the fitted one (0.01 on 12 val images the model separates
    perfectly) puts every calibrated P(fake) at 0 or 1, where no difference in the scores could show."""
    path = tmp_path_factory.mktemp("uncalibrated") / "best.pt"
    save_checkpoint({**load_checkpoint(trained_run / "best.pt"), "temperature": 1.0}, path)
    return path


@pytest.fixture(scope="module")
def exported(uncalibrated, tmp_path_factory) -> Path:
    """That checkpoint exported through the command line."""
    out = tmp_path_factory.mktemp("exported") / "effnet"
    _main(["--checkpoint", str(uncalibrated), "--export", str(out)])
    return out


def test_features_and_an_export_in_one_command_write_both(uncalibrated, tiny_data, tmp_path, capsys):
    out, export = tmp_path / "val.npz", tmp_path / "export"
    both = ["--checkpoint", str(uncalibrated), "--manifest", str(tiny_data[1]), "--out", str(out), "--export",
            str(export), "--workers", "0"]
    export.mkdir()
    (export / "notes.txt").write_text("not an export")
    err = fails(_main, both, capsys)  # each target is checked before either output is written
    assert "--export" in err and "notes.txt" in err and not out.exists()
    (export / "notes.txt").unlink()
    _main(both)  # it wrote the export alone, no .npz, without a word
    assert len(load_features(out).labels) == 12
    assert json.loads((export / "export.json").read_text())["onnx"]["check"]["passed"]


EXTRACTOR_COMBINATIONS = [
    (["--example", "--out", "x.npz"], "--example extracts the trainers' runs under --output-root: it takes no --out"),
    (["--checkpoint", "c.pt", "--images", "crops"], "--images needs --out FILE.npz (features) or FILE.csv (scores)"),
    (["--checkpoint", "c.pt", "--out", "x.npz"], "--out needs --manifest CSV or --images DIR"),
    (["--export", "exported"], "--export needs --checkpoint"),
    (["--checkpoint", "c.pt"], "nothing to write: give --out FILE.npz or FILE.csv (with --manifest or --images), "
                               "--export DIR, or --example"),
]


@pytest.mark.parametrize(("argv", "message"), EXTRACTOR_COMBINATIONS, ids=[m.split(":")[0] for _, m in
                                                                           EXTRACTOR_COMBINATIONS])
def test_extractor_flags_that_do_nothing_together_are_one_line(argv, message, capsys):
    assert fails(_main, argv, capsys) == f"error: {message}"


def _onnx_outputs(path: Path, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    embedding, logit = session.run(["embedding", "fake_logit"], {"pixels": pixels})
    return embedding, logit


def _assert_check_passed_on_val_images(report: dict, val: Path) -> None:
    check = report["onnx"]["check"]
    assert check["passed"] and check["inputs"] == f"4 val images of {val}" and check["batch_sizes"] == [1, 3]
    for output in ("embedding", "fake_logit"):
        figures = check[output]
        assert figures["max_abs_diff"] <= figures["tolerance"] == pytest.approx(1e-5 + 1e-4 * figures["scale"])
        assert figures["scale"] > 0 and figures["max_rel_diff"] <= 1e-4
    assert check["embedding_cosine_min"] > 0.99999 and check["p_fake_max_diff"] < 1e-5


def test_timm_export_loads_in_timm_and_onnx_matches_the_extractor(uncalibrated, exported, tiny_data):
    out = exported
    report = json.loads((out / "export.json").read_text())
    assert set(report["files"]) == {"model.safetensors", "config.json", "model.onnx"}
    assert sorted(p.name for p in out.iterdir()) == sorted([*report["files"], "export.json"])
    _assert_check_passed_on_val_images(report, tiny_data[1])

    best = load_checkpoint(uncalibrated)
    reference = model_from_checkpoint(best).eval()
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x), rtol=0, atol=0)
    assert list(loaded.pretrained_cfg["mean"]) == list(best["data_config"]["mean"])

    # On the real val images: ONNX from [0, 1] pixels gives the extractor's embeddings and (raw) P(fake).
    fx = FeatureExtractor(checkpoint_path=uncalibrated, workers=0, progress=False)
    embeddings, _, p_fake = fx.extract(fx.make_loader(tiny_data[1]), return_probs=True)
    batch = next(iter(fx.make_loader(tiny_data[1])))
    pixels = (batch.images.float() / 255).numpy()
    onnx_embedding, onnx_logit = _onnx_outputs(out / "model.onnx", pixels)
    np.testing.assert_allclose(onnx_embedding, embeddings[: len(pixels)], atol=1e-4)
    calibrated = 1 / (1 + np.exp(-onnx_logit / report["temperature"]))
    np.testing.assert_allclose(calibrated, p_fake[: len(pixels)], atol=1e-4)

    with pytest.raises(ConfigError, match="--overwrite"):
        export_checkpoint(uncalibrated, out)


def test_timms_own_preprocessing_of_the_export_gives_the_extractors_scores(uncalibrated, exported, tiny_data):
    """Stage three's usual path: the model from the export folder, the eval transform timm builds from its
    pretrained_cfg (or from the checkpoint's data config), PIL images in."""
    loaded = timm.create_model(f"local-dir:{exported}", pretrained=True).eval()
    config = timm.data.resolve_data_config(model=loaded)
    assert (config["crop_pct"], config["crop_mode"], config["interpolation"]) == (1.0, "squash", "bilinear")
    transform = timm.data.create_transform(**config)
    best = load_checkpoint(uncalibrated)
    from_checkpoint = timm.data.create_transform(**best["data_config"])
    fx = FeatureExtractor(checkpoint_path=uncalibrated, workers=0, progress=False)
    predicted = fx.predict(tiny_data[1])  # 64px images, the model's input is 32px: every image is resized

    with torch.no_grad():
        images = [Image.open(path).convert("RGB") for path in predicted["path"]]
        x = torch.stack([transform(image) for image in images])
        torch.testing.assert_close(torch.stack([from_checkpoint(image) for image in images]), x, rtol=0, atol=0)
        extractor_input = fx.normalise(torch.stack([fx.transform(image) for image in images]))
        p_fake = torch.sigmoid(loaded(x).squeeze(1) / fx.temperature).numpy()
    # PIL's and torchvision's antialiased bilinear round a few pixels differently: one uint8 level at most.
    assert (x - extractor_input).abs().max() <= 1.01 / 255 / min(config["std"])
    assert np.abs(p_fake - predicted["p_fake"].to_numpy()).max() <= 0.01


def _onnx_predict(argv: list[str], capsys) -> tuple[int, str, str]:
    """examples/onnx_predict.py run in this process: (exit code, stdout, stderr)."""
    code = runpy.run_path(str(ROOT / "examples" / "onnx_predict.py"))["main"](argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_onnx_example_scores_a_folder_as_predict_does(uncalibrated, exported, tiny_data, tmp_path, capsys):
    folder, elsewhere = tmp_path / "crops", tmp_path / "elsewhere"
    for i, path in enumerate(read_manifest(tiny_data[1])["path"]):
        parent = folder / "with, comma" if i < 4 else elsewhere if i < 8 else folder / Path(path).parent.name
        parent.mkdir(parents=True, exist_ok=True)
        (parent / f"{i:02d}.png").write_bytes(Path(path).read_bytes())
    (folder / "linked").symlink_to(elsewhere, target_is_directory=True)  # skipped before
    grey = np.asarray(Image.open(path).convert("L"), dtype=np.uint16) * 257  # 16-bit: it scored 0.0001 for 0.693
    Image.fromarray(grey).save(folder / "grey16.png")
    code, out, _ = _onnx_predict([str(exported), str(folder)], capsys)
    scores = pd.read_csv(io.StringIO(out))  # a comma in a path split its row before
    predicted = FeatureExtractor(checkpoint_path=uncalibrated, workers=0, progress=False).predict(folder)
    assert code == 0 and scores["path"].tolist() == predicted["path"].tolist() and len(scores) == 13
    assert np.abs(scores["p_fake"].to_numpy() - predicted["p_fake"].to_numpy()).max() <= 0.01


def test_the_onnx_example_refuses_bad_arguments_in_one_line(exported, tmp_path, capsys):
    usage = "usage: python examples/onnx_predict.py EXPORT_DIR IMAGE_FOLDER > scores.csv\n"
    assert _onnx_predict([], capsys) == (2, "", usage)  # an IndexError before
    missing = tmp_path / "missing"  # a header and exit 0 before
    assert _onnx_predict([str(exported), str(missing)], capsys) == (2, "", f"error: {missing}: no such folder\n")
    assert _onnx_predict([str(tmp_path), str(tmp_path)], capsys) == (
        2, "", f"error: {tmp_path}: not an export folder (no export.json)\n")


@pytest.fixture(scope="module")
def genconvit_runs(tiny_data, tmp_path_factory) -> Path:
    """Both GenConViT variants trained 2 epochs on the tiny demo data: the folder holding ed/ and vae/."""
    train, val = tiny_data
    out = tmp_path_factory.mktemp("genconvit") / "gc"
    train_stage2_genconvit.main(["--train-manifest", str(train), "--val-manifest", str(val), "--init", "scratch",
                                 "--backbone", "test_convnext", "--img-size", "64", "--latent-channels", "4",
                                 "--epochs", "2", "--batch-size", "8", "--workers", "0", "--amp", "off",
                                 "--variant", "both", "--output-dir", str(out)])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["ed", "vae"])
def test_trained_genconvit_exports_to_onnx(genconvit_runs, tiny_data, tmp_path, variant):
    report = export_checkpoint(genconvit_runs / variant / "best.pt", tmp_path / "export")
    assert report["files"] == ["model.onnx"]
    _assert_check_passed_on_val_images(report, tiny_data[1])
    # The checkpoint's data config names the loaders' resize, so timm's eval transform built from it is theirs.
    data_config = load_checkpoint(genconvit_runs / variant / "best.pt")["data_config"]
    resize = {"interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "squash"}
    assert {key: data_config.get(key) for key in resize} == resize == report["resize"]
    embedding, logit = _onnx_outputs(tmp_path / "export" / "model.onnx", np.random.rand(5, 3, 64, 64).astype("f4"))
    assert embedding.shape == (5, 500) and logit.shape == (5,)


def test_the_onnx_check_judges_against_the_outputs_scale(trained_run, tmp_path):
    """A correct export of a model with large outputs passes (an absolute 1e-4 failed it); one whose weights are
    off by 1% fails, in one line naming the file and the figures."""
    best = load_checkpoint(trained_run / "best.pt")
    model = model_from_checkpoint(best)
    with torch.no_grad():  # logits in the thousands: float32 rounding alone is then above 1e-4
        model.get_classifier().weight.mul_(1e6)
    best["model"] = model.state_dict()
    save_checkpoint(best, tmp_path / "large.pt")
    report = export_checkpoint(tmp_path / "large.pt", tmp_path / "large")
    logit = report["onnx"]["check"]["fake_logit"]
    assert report["onnx"]["check"]["passed"] and logit["scale"] > 1000 and logit["max_abs_diff"] > 0

    loaded = load_model(tmp_path / "large.pt")
    wrapper = ExportGraph(loaded).eval()
    with torch.no_grad():
        wrapper.model.get_classifier().weight.mul_(1.01)
    pixels, inputs = check_images(loaded, 32)
    with pytest.raises(ExportCheckError) as err:
        check_onnx(wrapper, tmp_path / "large" / "model.onnx", pixels, loaded.temperature, inputs)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'large' / 'model.onnx'}: ONNX and PyTorch differ on 4 val images of ")
    assert "fake_logit max |diff|" in message and "embedding cosine" in message and "\n" not in message


def _broken_checkpoint(trained_run: Path, path: Path, how: str) -> Path:
    """The trained best.pt with one defect and valid checksums, but for an edited mean (the original's checksums)."""
    best = load_checkpoint(trained_run / "best.pt")
    if how == "nan weight":
        best["model"]["classifier.bias"] = torch.full_like(best["model"]["classifier.bias"], float("nan"))
    elif how == "huge weights":  # finite, but the logits overflow float32
        best["model"]["classifier.weight"] = torch.full_like(best["model"]["classifier.weight"], 3e38)
    elif how == "zero std":
        best["data_config"] = {**best["data_config"], "std": [0.0, 0.0, 0.0]}
    else:
        best["data_config"] = {**best["data_config"], "mean": [0.4, 0.4, 0.4]}
        torch.save(best, path)
        return path
    save_checkpoint(best, path)
    return path


@pytest.mark.parametrize(("how", "message"), [
    ("nan weight", "non-finite values in classifier.bias (NaN or inf weights): every score would be NaN"),
    ("zero std", "data_config std [0.0, 0.0, 0.0]: expected 3 numbers from 0.01 to 10.0"),
    ("edited mean", "damaged or edited (its data_config, the input size, mean and std it scores with, does not"),
], ids=["nan weight", "zero std", "edited mean"])
def test_extraction_refuses_a_checkpoint_that_would_give_nan_or_other_scores(trained_run, tiny_data, tmp_path, capsys,
                                                                             how, message):
    # Before: NaN P(fake) written (a valid checksum), a ZeroDivisionError, and other scores without a word.
    broken = _broken_checkpoint(trained_run, tmp_path / "broken.pt", how)
    features = tmp_path / "f.npz"
    err = fails(_main, ["--checkpoint", str(broken), "--manifest", str(tiny_data[1]), "--out", str(features),
                        "--workers", "0"], capsys)
    assert err.startswith(f"error: checkpoint {broken}: ") and message in err and not features.exists()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize(("how", "refused"), [
    ("nan weight", "checkpoint {broken}: non-finite values in"),  # refused when read
    ("zero std", "checkpoint {broken}: data_config"),
    ("huge weights", "--export {out}: {broken}: ONNX check failed: non-finite "),  # by the check
], ids=["nan weight", "zero std", "huge weights"])
def test_non_finite_outputs_fail_the_export_and_leave_the_previous_one_whole(trained_run, exported, tmp_path, capsys,
                                                                            how, refused):
    out = tmp_path / "effnet"
    shutil.copytree(exported, out)
    before = _files(out)
    broken = _broken_checkpoint(trained_run, tmp_path / "broken.pt", how)
    with pytest.raises(SystemExit) as exit_info:
        exit_on_error(lambda: _main(["--checkpoint", str(broken), "--export", str(out), "--overwrite"]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {refused.format(broken=broken, out=out)}")
    assert _files(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["broken.pt", "effnet"]


@pytest.mark.slow
def test_an_export_killed_half_way_leaves_the_previous_one_whole(trained_run, exported, tiny_data, tmp_path):
    out = tmp_path / "effnet"
    shutil.copytree(exported, out)
    before = _files(out)
    other = tmp_path / "other.pt"
    best = load_checkpoint(trained_run / "best.pt")
    best["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in best["model"].items()}
    save_checkpoint(best, other)
    # kill -9 once the new weights and ONNX file are written, while the check runs
    script = ("import os, signal, sys\n"
              "import stage2.embeddings.export as export\n"
              "export.check_onnx = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)\n"
              "export.export_checkpoint(sys.argv[1], sys.argv[2], overwrite=True)\n")
    result = subprocess.run([sys.executable, "-c", script, str(other), str(out)], cwd=ROOT, env=subprocess_env(),
                            capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert _files(out) == before
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".effnet.")]) == 1  # the killed build's folder

    _main(["--checkpoint", str(other), "--export", str(out), "--overwrite"])
    report = json.loads((out / "export.json").read_text())
    assert report["checkpoint"] == str(other) and _files(out)["model.safetensors"] != before["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["effnet", "other.pt"]  # the stale folder is gone


def test_export_files_get_the_umask_mode_and_a_file_in_the_way_is_one_line(exported, trained_run, tmp_path, capsys):
    mask = os.umask(0)
    os.umask(mask)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in exported.iterdir()} == dict.fromkeys(
        ["model.safetensors", "config.json", "model.onnx", "export.json"], 0o666 & ~mask)
    assert stat.S_IMODE(exported.stat().st_mode) == 0o777 & ~mask

    in_the_way = tmp_path / "exported"
    in_the_way.write_text("a file")
    with pytest.raises(SystemExit) as exit_info:
        exit_on_error(lambda: _main(["--checkpoint", str(trained_run / "best.pt"), "--export", str(in_the_way)]))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: --export {in_the_way}: a file, not a folder; give the folder to " \
                                      "write the export into\n"
    assert in_the_way.read_text() == "a file"


def _real_size_checkpoint(tmp_path: Path, model: torch.nn.Module, meta: dict, size: int, mean, std) -> Path:
    path = tmp_path / "best.pt"
    save_checkpoint(BestCheckpoint(model=model.state_dict(), meta=meta, data_config=DataConfig.of(size, mean, std),
                                   temperature=1.3).to_dict(), path)
    return path


def _assert_check_passed_on_synthetic_images(report: dict) -> None:
    check = report["onnx"]["check"]  # no val manifest in the checkpoint: smooth synthetic images
    assert check["passed"] and check["inputs"] == "4 smooth synthetic images"
    assert all(check[output]["max_abs_diff"] <= check[output]["tolerance"] for output in ("embedding", "fake_logit"))
    assert check["embedding_cosine_min"] > 0.99999


@pytest.mark.slow
def test_real_size_efficientnetv2_b3_exports(tmp_path):
    model = create_timm_model("tf_efficientnetv2_b3", pretrained=False, num_classes=1)
    config = timm_data_config(model, 256).to_dict()
    path = _real_size_checkpoint(tmp_path, model, {"family": "timm", "model_name": "tf_efficientnetv2_b3",
                                                   "num_classes": 1}, 256, config["mean"], config["std"])
    report = export_checkpoint(path, tmp_path / "export")
    _assert_check_passed_on_synthetic_images(report)
    assert report["input_size"] == [3, 256, 256]
    loaded = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


@pytest.mark.slow
def test_real_size_genconvit_ed_exports(tmp_path):
    model = GenConViTED()  # convnext_tiny, the official ED sizes
    path = _real_size_checkpoint(tmp_path, model, {"family": "genconvit", "model_name": "genconvit_ed",
                                                   "variant": "ed", "arch": "official", "model_kwargs": {}}, 224,
                                 (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    report = export_checkpoint(path, tmp_path / "export")
    _assert_check_passed_on_synthetic_images(report)
    assert report["input_size"] == [3, 224, 224]

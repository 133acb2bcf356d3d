"""The bridge to stage three in production: unlabeled inference, evaluation that keeps its outputs, operating
points, the robustness report, and standard exports (timm local-dir, ONNX checked with onnxruntime)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch

import feature_extractor
import train_stage2_effnet
import train_stage2_genconvit
from src.data.manifest import read_manifest
from src.embeddings import FeatureExtractor, load_features
from src.embeddings.export import export_expert
from src.engine.checkpoint import load_checkpoint, save_checkpoint
from src.engine.metrics import operating_points
from src.errors import ConfigError, ManifestError
from src.models.families import model_from_checkpoint
from src.models.genconvit import GenConViTED
from src.models.timm_models import create_timm_model, timm_data_config


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    """A 2-epoch test_efficientnet run on the tiny demo data: its folder."""
    train, val = tiny_data
    out = tmp_path_factory.mktemp("trained") / "run"
    train_stage2_effnet.main(["--train-manifest", str(train), "--val-manifest", str(val), "--model",
                              "test_efficientnet", "--no-pretrained", "--img-size", "32", "--batch-size", "8",
                              "--workers", "0", "--epochs", "2", "--amp", "off", "--output-dir", str(out)])
    return out


def _main(args: list[str]) -> None:
    feature_extractor.main(args)


# ---------------------------------------------------------------- 1. unlabeled inference
def test_a_manifest_without_labels_and_a_folder_give_the_features_of_the_labelled_manifest(trained, tiny_data,
                                                                                          tmp_path):
    val = read_manifest(tiny_data[1])
    unlabeled = tmp_path / "paths.csv"
    val[["path"]].to_csv(unlabeled, index=False)
    folder = tmp_path / "crops"
    for i, path in enumerate(sorted(val["path"])):  # a folder tree: sorted by path it is the same order
        target = folder / f"sub{i % 2}" / f"{i:03d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(Path(path).read_bytes())
    base = ["--checkpoint", str(trained / "best.pt"), "--workers", "0"]
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


def test_predict_and_extract_paths_for_notebooks(trained, tiny_data):
    fx = FeatureExtractor(checkpoint_path=trained / "best.pt", workers=0, progress=False)
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


def test_runs_report_operating_points_on_calibrated_scores(trained):
    history = pd.read_csv(trained / "metrics.csv")
    for column in ("tpr_at_fpr_1pct", "thr_at_fpr_1pct", "tpr_at_fpr_0.1pct", "eer_threshold",
                   "video_tpr_at_fpr_1pct", "video_eer_threshold"):
        assert column in history, column
    summary = json.loads((trained / "summary.json").read_text())
    predictions = pd.read_csv(trained / "val_predictions.csv")
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


def test_evaluate_several_manifests_keeps_every_output_and_overwrites_nothing(trained, tiny_data, tmp_path, capsys):
    val = read_manifest(tiny_data[1])
    second = tmp_path / "other" / "test.csv"
    second.parent.mkdir()
    val.iloc[::-1].to_csv(second, index=False)
    out = tmp_path / "eval"
    args = ["--evaluate", str(trained / "best.pt"), "--val-manifest", str(tiny_data[1]), str(second), "--model",
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
        train_stage2_effnet.exit_on_error(lambda: train_stage2_effnet.main(args))
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "eval_val.json").read_bytes() == before
    train_stage2_effnet.main([*args, "--overwrite"])


def test_evaluate_prints_the_calibrated_operating_points_and_marks_those_too_fine_for_its_reals(trained, tiny_data,
                                                                                               tmp_path, capsys):
    out = tmp_path / "eval"
    train_stage2_effnet.main(["--evaluate", str(trained / "best.pt"), "--val-manifest", str(tiny_data[1]), "--model",
                              "test_efficientnet", "--img-size", "32", "--workers", "0", "--amp", "off",
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


def test_several_val_manifests_are_for_evaluation_only(effnet_args, tiny_data):
    args = list(effnet_args)
    args[args.index("--val-manifest") + 1: args.index("--val-manifest") + 2] = [str(tiny_data[1])] * 2
    with pytest.raises(ConfigError, match="--val-manifest"):
        train_stage2_effnet.main(args)


def test_the_robustness_report_is_deterministic_and_perturbs_the_images(trained, tiny_data, tmp_path):
    common = ["--evaluate", str(trained / "best.pt"), "--val-manifest", str(tiny_data[1]), "--model",
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
def _onnx_outputs(path: Path, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    embedding, logit = session.run(["embedding", "fake_logit"], {"pixels": pixels})
    return embedding, logit


def test_timm_export_loads_in_timm_and_onnx_matches_the_extractor(trained, tiny_data, tmp_path):
    out = tmp_path / "export"
    _main(["--checkpoint", str(trained / "best.pt"), "--export", str(out)])
    report = json.loads((out / "export.json").read_text())
    assert set(report["files"]) == {"model.safetensors", "config.json", "model.onnx"}
    assert report["onnx"]["check"]["max_abs_diff"] <= 1e-4

    best = load_checkpoint(trained / "best.pt")
    reference = model_from_checkpoint(best).eval()
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x), rtol=0, atol=0)
    assert list(loaded.pretrained_cfg["mean"]) == list(best["data_config"]["mean"])

    # On the real val images: ONNX from [0, 1] pixels gives the extractor's embeddings and (raw) P(fake).
    fx = FeatureExtractor(checkpoint_path=trained / "best.pt", workers=0, progress=False)
    embeddings, _, p_fake = fx.extract(fx.make_loader(tiny_data[1]), return_probs=True)
    batch = next(iter(fx.make_loader(tiny_data[1])))
    pixels = (batch.images.float() / 255).numpy()
    onnx_embedding, onnx_logit = _onnx_outputs(out / "model.onnx", pixels)
    np.testing.assert_allclose(onnx_embedding, embeddings[: len(pixels)], atol=1e-4)
    calibrated = 1 / (1 + np.exp(-onnx_logit / report["temperature"]))
    np.testing.assert_allclose(calibrated, p_fake[: len(pixels)], atol=1e-4)

    with pytest.raises(ConfigError, match="--overwrite"):
        export_expert(trained / "best.pt", out)


@pytest.mark.parametrize("variant", ["ed", "vae"])
def test_genconvit_exports_to_onnx(tiny_data, tmp_path, variant):
    train, val = tiny_data
    train_stage2_genconvit.main(["--train-manifest", str(train), "--val-manifest", str(val), "--init", "scratch",
                                 "--backbone", "test_convnext", "--img-size", "64", "--latent-channels", "4",
                                 "--epochs", "1", "--batch-size", "8", "--workers", "0", "--amp", "off",
                                 "--variant", variant, "--output-dir", str(tmp_path / "gc")])
    report = export_expert(tmp_path / "gc" / variant / "best.pt", tmp_path / "export")
    assert report["files"] == ["model.onnx"] and report["onnx"]["check"]["max_abs_diff"] <= 1e-4
    embedding, logit = _onnx_outputs(tmp_path / "export" / "model.onnx", np.random.rand(5, 3, 64, 64).astype("f4"))
    assert embedding.shape == (5, 500) and logit.shape == (5,)


def _real_size_checkpoint(tmp_path: Path, model: torch.nn.Module, meta: dict, size: int, mean, std) -> Path:
    path = tmp_path / "best.pt"
    data_config = {"input_size": [3, size, size], "mean": list(mean), "std": list(std), "interpolation": "bilinear"}
    save_checkpoint({"model": model.state_dict(), **meta, "data_config": data_config, "temperature": 1.3}, path)
    return path


def test_real_size_efficientnetv2_b3_exports(tmp_path):
    model = create_timm_model("tf_efficientnetv2_b3", pretrained=False, num_classes=1)
    config = timm_data_config(model, 256)
    path = _real_size_checkpoint(tmp_path, model, {"family": "timm", "model_name": "tf_efficientnetv2_b3",
                                                   "num_classes": 1}, 256, config["mean"], config["std"])
    report = export_expert(path, tmp_path / "export")
    assert report["onnx"]["check"]["max_abs_diff"] <= 1e-4 and report["input_size"] == [3, 256, 256]
    loaded = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_real_size_genconvit_ed_exports(tmp_path):
    model = GenConViTED()  # convnext_tiny, the official ED sizes
    path = _real_size_checkpoint(tmp_path, model, {"family": "genconvit", "model_name": "genconvit_ed",
                                                   "variant": "ed", "arch": "official", "model_kwargs": {}}, 224,
                                 (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    report = export_expert(path, tmp_path / "export")
    assert report["onnx"]["check"]["max_abs_diff"] <= 1e-4 and report["input_size"] == [3, 224, 224]

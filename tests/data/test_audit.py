"""The shortcut audit: header features read without decoding, single-feature AUCs, the warning, and its outputs in
training, --evaluate and --audit-only."""

import io
import json
import logging

import numpy as np
import pandas as pd
import pytest
from conftest import set_flag
from PIL import Image

import train_stage2_effnet
from stage2.commands.cli import exit_on_error
from stage2.data.audit import header_features, jpeg_quality, run_audit, shortcut_audit

SIZE = 48


def _scenes(n: int, seed: int = 0) -> list[np.ndarray]:
    """n textured images; fake i is real i with a patch changed, as a forgery of that real would be."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    return [np.clip(np.stack([yy * rng.uniform(80, 250), xx * rng.uniform(80, 250), (1 - yy) * 150], axis=2)
                    + rng.normal(0, 10, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8) for _ in range(n)]


def _write_set(folder, n: int, save) -> pd.DataFrame:
    """A manifest frame of n reals and their n fakes, each saved by `save(image, path, label)`."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, real in enumerate(_scenes(n)):
        fake = real.copy()
        fake[12:30, 12:30] = np.clip(fake[12:30, 12:30].astype(int) + 25, 0, 255).astype(np.uint8)
        for label, image in ((0, real), (1, fake)):
            path = save(image, folder / f"{i}_{label}", label)
            rows.append((str(path), label))
    return pd.DataFrame(rows, columns=["path", "label"])


def _jpeg_q90_vs_q95(image, stem, label):
    path = stem.with_suffix(".jpg")
    Image.fromarray(image).save(path, quality=95 if label else 90)
    return path


def _reencoded(frame: pd.DataFrame, folder) -> pd.DataFrame:
    """Every image of `frame` decoded and saved again the same way (PNG), whatever its class."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for path in frame["path"]:
        target = folder / (f"{len(paths)}.png")
        Image.open(path).convert("RGB").save(target)
        paths.append(str(target))
    return frame.assign(path=paths)


@pytest.mark.parametrize("quality", [10, 50, 75, 90, 95, 100])
def test_jpeg_quality_is_read_exactly_from_the_quantisation_tables(quality):
    buffer = io.BytesIO()
    Image.fromarray(_scenes(1)[0]).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    assert jpeg_quality(Image.open(buffer).quantization) == quality


def test_header_features_of_jpeg_png_and_a_broken_file(tmp_path):
    image = Image.fromarray(_scenes(1)[0])
    image.save(tmp_path / "a.jpg", quality=80, subsampling=0, progressive=True)
    image.resize((SIZE, 2 * SIZE)).save(tmp_path / "b.png")
    (tmp_path / "c.png").write_bytes(b"not an image")
    a, b, c = (header_features(str(tmp_path / n)) for n in ("a.jpg", "b.png", "c.png"))
    assert (a["format"], a["jpeg_quality"], a["chroma_subsampling"], a["progressive"]) == ("JPEG", 80, "4:4:4", 1)
    assert a["bytes_per_pixel"] == pytest.approx((tmp_path / "a.jpg").stat().st_size / SIZE**2)
    assert (b["format"], b["width"], b["height"]) == ("PNG", SIZE, 2 * SIZE) and np.isnan(b["jpeg_quality"])
    assert c["format"] == "unreadable" and np.isnan(c["width"])


def test_q90_reals_vs_q95_fakes_is_a_shortcut_and_the_reencoded_copy_is_not(tmp_path, caplog):
    cue = _write_set(tmp_path / "cue", 20, _jpeg_q90_vs_q95)
    with caplog.at_level(logging.WARNING, logger="src"):
        table = run_audit({"train": cue}, tmp_path / "out").set_index("feature")
    assert table.loc["jpeg_quality", "auc"] == 1.0 and table.loc["jpeg_quality", "shortcut"]
    assert (table.loc["jpeg_quality", "real"], table.loc["jpeg_quality", "fake"]) == ("90", "95")
    assert table.loc["format", "auc"] == 0.5 and not table.loc["format", "shortcut"]  # both JPEG
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("jpeg_quality" in w and "AUC 1.000" in w and "train" in w for w in warnings)
    saved = pd.read_csv(tmp_path / "out" / "shortcut_audit.csv")
    assert len(saved) == 7 and saved.loc[saved["feature"] == "jpeg_quality", "shortcut"].item()

    clean = shortcut_audit({"train": _reencoded(cue, tmp_path / "reencoded")}).set_index("feature")
    assert not clean["shortcut"].any(), clean
    assert clean.loc["format", "real"] == clean.loc["format", "fake"] == "PNG 100%"


def test_png_reals_vs_jpeg_fakes_is_caught_by_the_format(tmp_path):
    def save(image, stem, label):
        path = stem.with_suffix(".jpg" if label else ".png")
        Image.fromarray(image).save(path)
        return path

    table = shortcut_audit({"val": _write_set(tmp_path, 10, save)}).set_index("feature")
    assert table.loc["format", "auc"] == 1.0 and table.loc["format", "shortcut"]
    assert np.isnan(table.loc["jpeg_quality", "auc"])  # only the fakes have a JPEG quality: not scored


def test_audit_only_writes_the_table_and_summary_and_keeps_them(tmp_path, capsys):
    cue = _write_set(tmp_path / "cue", 6, _jpeg_q90_vs_q95)
    train, val = tmp_path / "train.csv", tmp_path / "val.csv"
    cue.iloc[:8].to_csv(train, index=False)
    cue.iloc[8:].to_csv(val, index=False)
    out = tmp_path / "audit"
    args = ["--train-manifest", str(train), "--val-manifest", str(val), "--audit-only", "--output-dir", str(out)]
    train_stage2_effnet.main(args)
    printed = capsys.readouterr().out
    assert "jpeg_quality alone separates real from fake in train (AUC 1.000" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shortcuts"] >= 2 and {r["set"] for r in summary["shortcut_audit"]} == {"train", "val"}
    assert not (out / "best.pt").exists()  # nothing trained
    before = (out / "summary.json").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        exit_on_error(lambda: train_stage2_effnet.main(args))
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == before


def test_a_training_run_and_an_evaluation_record_the_audit(effnet_args, tmp_path):
    train_stage2_effnet.main(set_flag(effnet_args, "--epochs", "1"))
    out = tmp_path / "run"
    audit = pd.read_csv(out / "shortcut_audit.csv")
    assert set(audit["set"]) == {"train", "val"} and set(audit["feature"]) >= {"format", "jpeg_quality"}
    assert len(json.loads((out / "summary.json").read_text())["shortcut_audit"]) == len(audit)
    val = effnet_args[effnet_args.index("--val-manifest") + 1]
    train_stage2_effnet.main([*set_flag(effnet_args, "--output-dir", str(tmp_path / "ev")), "--evaluate",
                              str(out / "best.pt")])
    report = json.loads((tmp_path / "ev" / "eval_val.json").read_text())
    assert {r["set"] for r in report["shortcut_audit"]} == {"val"} and "val" in val
    assert (tmp_path / "ev" / "shortcut_audit.csv").is_file()

"""Start-up checks remembered across runs (stage2.data.checks): a rerun of the same manifest, its sampled files
unchanged, neither stats every file again nor reads a header; a changed manifest or changed files are checked
again, and an answer that cannot be kept or read changes nothing but the time."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import fails, set_flag
from PIL import Image

import train_stage2_effnet
from stage2.data import audit, checks
from stage2.data.audit import shortcut_audit
from stage2.data.dataset import ManifestDataset
from stage2.data.manifest import read_manifest
from stage2.errors import ImageDecodeError, ManifestError


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """This test's own folder of remembered checks."""
    monkeypatch.setenv("STAGE2_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def headers_read(monkeypatch) -> list[int]:
    """How many headers each read_headers call of the audit read."""
    calls: list[int] = []
    real = audit.read_headers

    def counted(paths, workers=1):
        calls.append(len(paths))
        return real(paths, workers)

    monkeypatch.setattr(audit, "read_headers", counted)
    return calls


def _write_set(folder, n: int = 6):
    """n reals saved as JPEG quality 90 and n fakes as quality 95 (a shortcut), and their manifest."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(2 * n):
        label = i % 2
        path = folder / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path, quality=95 if label else 90)
        rows.append((path.name, label))
    csv = folder / "manifest.csv"
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(csv, index=False)
    return csv


def _shortcut(table: pd.DataFrame, feature: str) -> bool:
    return bool(table.set_index("feature").at[feature, "shortcut"])


def test_a_rerun_of_the_same_manifest_takes_the_audit_table_without_reading_a_header(tmp_path, headers_read):
    frame = read_manifest(_write_set(tmp_path / "set"))
    first = shortcut_audit({"train": frame})
    assert _shortcut(first, "jpeg_quality") and headers_read == [12]
    again = shortcut_audit({"val": frame, "train": read_manifest(tmp_path / "set" / "manifest.csv")})
    assert headers_read == [12] and first.attrs["remembered"] == [] and again.attrs["remembered"] == ["val", "train"]
    pd.testing.assert_frame_equal(again, pd.concat([first.assign(set="val"), first], ignore_index=True))


def test_a_changed_manifest_is_audited_again(tmp_path, headers_read):
    csv = _write_set(tmp_path / "set")
    shortcut_audit({"train": read_manifest(csv)})
    rows = pd.read_csv(csv)
    rows.iloc[:-2].to_csv(csv, index=False)  # a row fewer of each class
    shorter = shortcut_audit({"train": read_manifest(csv)})
    assert headers_read == [12, 10] and shorter["n_real"].max() == 5
    rows.assign(label=1 - rows["label"]).to_csv(csv, index=False)  # the same files, labels swapped
    swapped = shortcut_audit({"train": read_manifest(csv)})
    assert headers_read == [12, 10, 12]
    assert swapped.set_index("feature").at["jpeg_quality", "real"] == "95"


def test_files_rewritten_in_place_are_audited_again(tmp_path, headers_read):
    csv = _write_set(tmp_path / "set")
    frame = read_manifest(csv)
    assert _shortcut(shortcut_audit({"train": frame}), "jpeg_quality")
    for path in frame["path"]:  # the shortcut removed: every file re-encoded alike, names and manifest unchanged
        Image.open(path).convert("RGB").save(path, format="PNG")
    table = shortcut_audit({"train": read_manifest(csv)})
    assert headers_read == [12, 12]
    features = table.set_index("feature")
    assert features.at["format", "real"] == "PNG 100%" and features.at["jpeg_quality", "n_real"] == 0
    assert not _shortcut(table, "jpeg_quality")


def test_the_file_check_of_a_rerun_trusts_its_sample_and_the_loader_names_a_file_gone_since(tmp_path, monkeypatch):
    monkeypatch.setattr(checks, "SAMPLE", 2)  # rows 0 and 11 of 12: a large manifest's sample, in miniature
    csv = _write_set(tmp_path / "set")
    frame = read_manifest(csv)
    gone = frame["path"].iloc[3]
    (tmp_path / "set" / "3.jpg").unlink()
    again = read_manifest(csv)  # not stat'ed again: what a rerun of a million rows saves
    with pytest.raises(ImageDecodeError, match=gone):
        ManifestDataset(again, 16)[3]
    (tmp_path / "set" / "11.jpg").unlink()  # a sampled file: the rows are checked whole again
    with pytest.raises(ManifestError, match=r"2 of 12 image files not found"):
        read_manifest(csv)


def test_a_changed_manifest_has_its_files_checked_again(tmp_path, monkeypatch):
    monkeypatch.setattr(checks, "SAMPLE", 2)
    csv = _write_set(tmp_path / "set")
    read_manifest(csv)
    (tmp_path / "set" / "3.jpg").unlink()
    pd.read_csv(csv).iloc[:-1].to_csv(csv, index=False)
    with pytest.raises(ManifestError, match=r"1 of 11 image files not found.*3\.jpg"):
        read_manifest(csv)


def test_an_answer_that_cannot_be_kept_or_read_costs_only_time(tmp_path, monkeypatch, headers_read):
    csv = _write_set(tmp_path / "set")
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("")
    monkeypatch.setenv("STAGE2_CACHE", str(blocked))
    frame = read_manifest(csv)
    expected = shortcut_audit({"train": frame})
    pd.testing.assert_frame_equal(shortcut_audit({"train": frame}), expected)
    assert headers_read == [12, 12]
    monkeypatch.setenv("STAGE2_CACHE", str(tmp_path / "cache"))
    shortcut_audit({"train": frame})
    for entry in (tmp_path / "cache" / "checks").iterdir():
        entry.write_text(entry.read_text()[:40])  # cut short, as by a full disk without atomic writes
    pd.testing.assert_frame_equal(shortcut_audit({"train": read_manifest(csv)}), expected)
    assert headers_read == [12, 12, 12, 12]


def test_an_audit_only_rerun_in_another_folder_writes_the_same_table_from_the_remembered_one(tmp_path, capsys):
    rows = pd.read_csv(_write_set(tmp_path / "set"))
    train, val = tmp_path / "set" / "train.csv", tmp_path / "set" / "val.csv"
    rows.iloc[:8].to_csv(train, index=False)
    rows.iloc[8:].to_csv(val, index=False)
    args = ["--train-manifest", str(train), "--val-manifest", str(val), "--audit-only"]
    train_stage2_effnet.main([*args, "--output-dir", str(tmp_path / "a")])
    assert "a run of the same" not in capsys.readouterr().out
    train_stage2_effnet.main([*args, "--output-dir", str(tmp_path / "b")])
    printed = capsys.readouterr().out
    assert "shortcut audit of train: the table a run of the same 8 rows made (a sample of 8 files" in printed
    assert "jpeg_quality alone separates real from fake in train (AUC 1.000" in printed
    first, second = (json.loads((tmp_path / name / "summary.json").read_text()) for name in "ab")
    assert first == second
    assert (tmp_path / "a" / "shortcut_audit.csv").read_text() == (tmp_path / "b" / "shortcut_audit.csv").read_text()


def test_a_training_rerun_reads_no_header_and_a_train_image_gone_since_is_one_line_naming_it(
        effnet_args, tiny_data, tmp_path, capsys, monkeypatch, headers_read):
    monkeypatch.setattr(checks, "SAMPLE", 2)
    data = tmp_path / "data"
    shutil.copytree(tiny_data[0].parent, data)
    args = set_flag(set_flag(set_flag(effnet_args, "--train-manifest", str(data / tiny_data[0].name)),
                             "--val-manifest", str(data / tiny_data[1].name)), "--epochs", "1")
    train_stage2_effnet.main(args)
    assert headers_read == [36 + 12]
    gone = read_manifest(data / tiny_data[0].name)["path"].iloc[5]  # not one of the two sampled rows (0 and 35)
    Path(gone).unlink()
    err = fails(train_stage2_effnet.main, set_flag(args, "--output-dir", str(tmp_path / "rerun")), capsys)
    assert headers_read == [36 + 12] and f"cannot decode image {gone}: No such file or directory" in err

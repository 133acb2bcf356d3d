"""benchmarks.real_set: the real-face protocol's sets built the same way every time, and its flags checked."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from benchmarks import real_set
from stage2.data.audit import header_features


def fake_repo(root, counts: dict[str, int], size: int = 40) -> None:
    """A checkout's folders (as in Rees451/faces-fake-vs-real) holding `counts[folder]` small JPEGs each, saved
    differently per class (quality 75 vs 95, like the published sets' cue)."""
    rng = np.random.default_rng(0)
    for folder, n in counts.items():
        (root / folder).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / folder / f"img_{i}.jpg", quality=95 if "fake" in folder else 75)


def test_the_composites_preset_splits_70_30_and_reencodes_both_classes_alike(tmp_path, capsys):
    raw = "data/raw/real_and_fake_face"
    fake_repo(tmp_path / "repo", {f"{raw}/real": 20, f"{raw}/fake": 10})
    real_set.main([str(tmp_path / "set"), "--preset", "composites", "--repo", str(tmp_path / "repo")])
    train, val = (pd.read_csv(tmp_path / "set" / f"{name}.csv") for name in ("train", "val"))
    assert (train["label"].value_counts().to_dict(), val["label"].value_counts().to_dict()) == ({0: 14, 1: 7},
                                                                                                {0: 6, 1: 3})
    assert not set(train["path"]) & set(val["path"]) and not train["path"].str.startswith("/").any()  # movable
    headers = [header_features(str(tmp_path / "set" / path)) for path in pd.concat([train, val])["path"]]
    # one encoding for both classes: baseline JPEG quality 90, 4:2:0, 256x256 (the sources were 75 and 95)
    assert {(h["format"], h["jpeg_quality"], h["chroma_subsampling"], h["progressive"], h["width"], h["height"])
            for h in headers} == {("JPEG", 90, "4:2:0", 0, 256, 256)}
    assert "shortcut" in capsys.readouterr().out  # the audit of what was written


def test_the_lfw_preset_draws_from_the_repositorys_own_split(tmp_path):
    split = "data/processed/LFW_faceswap_split"
    fake_repo(tmp_path / "repo", {f"{split}/train/real": 3, f"{split}/train/fake": 3, f"{split}/val/real": 2,
                                  f"{split}/val/fake": 2})
    real_set.main([str(tmp_path / "set"), "--preset", "lfw_faceswap", "--repo", str(tmp_path / "repo"),
                   "--size", "32"])
    train, val = (pd.read_csv(tmp_path / "set" / f"{name}.csv") for name in ("train", "val"))
    assert (len(train), len(val)) == (6, 4)  # fewer files than the preset's 1,000 / 500 per class: all of them


@pytest.mark.parametrize(("argv", "message"), [
    (["--real", "r", "--fake", "f", "--size", "0"], "--size: expected a positive integer"),
    (["--real", "r", "--fake", "f", "--val-fraction", "1.5"], "--val-fraction: expected a number in (0, 1)"),
    (["--real", "r", "--fake", "f", "--val-fraction", "-0.1"], "--val-fraction: expected a number in (0, 1)"),
    (["--real", "r", "--fake", "f", "--limit", "0"], "--limit: expected a positive integer"),
    (["--preset", "composites"], "--preset needs --repo"),
    (["--preset", "composites", "--repo", "x", "--real", "r"], "drop --real"),
    (["--real", "r"], "give --real and --fake"),
    (["--real", "r", "--fake", "f", "--cross", "x", "--val-fraction", "0.3"], "--val-fraction: not with --cross"),
    (["--preset", "composites", "--repo", "x", "--val-fraction", "0.3"], "drop --val-fraction"),
])
def test_bad_flags_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        real_set.main(["out", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_real_folder_that_holds_the_fakes_is_refused(tmp_path):
    fake_repo(tmp_path, {"faces/real": 2, "faces/real/fake": 2})
    with pytest.raises(SystemExit, match="share 2 images .*would label them both ways"):
        real_set.main([str(tmp_path / "out"), "--real", str(tmp_path / "faces/real"),
                       "--fake", str(tmp_path / "faces/real/fake")])


def _counts(out) -> dict[str, dict[int, int]]:
    return {name: pd.read_csv(out / f"{name}.csv")["label"].value_counts().to_dict() for name in ("train", "val")}


def test_the_audit_reads_the_reencoded_images_beside_the_manifests(tmp_path, monkeypatch, capsys):
    fake_repo(tmp_path, {"real": 5, "fake": 5})
    monkeypatch.chdir(tmp_path / "real")  # the manifests' relative paths mean nothing from here
    real_set.main([str(tmp_path / "set"), "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                   "--reencode", "png", "--size", "16"])
    audit = " ".join(capsys.readouterr().out.split("wrote")[-1].split())
    assert "unreadable" not in audit and audit.count("format 0.500 4 4 PNG 100% PNG 100%") == 1  # train's
    assert audit.count("PNG 100% PNG 100%") == 2  # and val's


def test_a_set_written_inside_its_real_folder_leaves_itself_out_of_the_next_run(tmp_path):
    fake_repo(tmp_path, {"real": 5, "fake": 5})
    argv = [str(tmp_path / "real" / "set"), "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
            "--reencode", "png", "--size", "16"]
    real_set.main(argv)
    first = _counts(tmp_path / "real" / "set")
    real_set.main([*argv, "--overwrite"])
    assert _counts(tmp_path / "real" / "set") == first == {"train": {0: 4, 1: 4}, "val": {0: 1, 1: 1}}


@pytest.mark.parametrize("reencode", [[], ["--reencode", "jpeg:90"]])
def test_a_corrupt_source_image_is_refused_before_anything_is_written(tmp_path, reencode):
    fake_repo(tmp_path, {"real": 4, "fake": 4})
    broken = tmp_path / "real" / "img_2.jpg"
    broken.write_bytes(broken.read_bytes()[:300])  # a header, then nothing: PIL opens it, decoding fails
    with pytest.raises(SystemExit, match=rf"1 of 8 images cannot be decoded .*{broken}"):
        real_set.main([str(tmp_path / "set"), "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                       *reencode])
    assert not (tmp_path / "set").exists()


def test_existing_manifests_are_replaced_only_with_overwrite(tmp_path):
    fake_repo(tmp_path, {"real": 5, "fake": 5})
    argv = [str(tmp_path / "set"), "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake")]
    real_set.main(argv)
    (tmp_path / "set" / "val.csv").write_text("kept\n")
    with pytest.raises(SystemExit, match=r"set/train.csv exists: give --overwrite to replace it"):
        real_set.main([*argv, "--seed", "1"])
    assert (tmp_path / "set" / "val.csv").read_text() == "kept\n"
    real_set.main([*argv, "--seed", "1", "--overwrite"])
    assert _counts(tmp_path / "set")["val"] == {0: 1, 1: 1}

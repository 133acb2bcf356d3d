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

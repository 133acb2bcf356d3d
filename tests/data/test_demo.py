"""The synthetic demo dataset: real PNG files, valid manifests, a video-disjoint balanced split, determinism."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stage2.data import demo
from stage2.data.decode import decode_image
from stage2.data.demo import FAKE_METHODS, make_demo_dataset
from stage2.data.manifest import read_manifest

SIZE = 40
SMALL = {"n_videos": 12, "frames_per_video": 2, "size": SIZE}


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), **SMALL)


def _both(manifests) -> pd.DataFrame:
    return pd.concat([pd.read_csv(m).assign(split=m.stem) for m in manifests], ignore_index=True)


def test_manifests_are_valid_and_point_at_real_pngs(small_demo):
    train, val = small_demo
    assert (train.name, val.name) == ("train.csv", "val.csv") and train.parent == val.parent
    for manifest in small_demo:
        raw = pd.read_csv(manifest)
        assert list(raw.columns) == ["path", "label", "video_id", "method"]
        assert not raw["path"].str.startswith("/").any()  # relative to the manifest's folder
        frame = read_manifest(manifest, require_both_classes=True)
        for path in frame["path"]:
            with Image.open(path) as image:
                assert image.format == "PNG" and image.mode == "RGB" and image.size == (SIZE, SIZE)
        assert decode_image(frame["path"][0]).shape == (3, SIZE, SIZE)
    assert sum(len(pd.read_csv(m)) for m in small_demo) == 12 * 2


def test_split_is_by_video_and_balanced(small_demo):
    rows = _both(small_demo)
    videos = rows.groupby("video_id")
    assert (videos["split"].nunique() == 1).all()  # no video in both splits
    assert (videos["label"].nunique() == 1).all() and (videos["method"].nunique() == 1).all()
    assert (videos.size() == 2).all()
    for _, split in rows.groupby("split"):
        assert (split["label"] == 1).sum() == (split["label"] == 0).sum()
    assert set(rows.loc[rows["label"] == 0, "method"]) == {"real"}
    assert set(rows.loc[rows["label"] == 1, "method"]) == set(FAKE_METHODS)


def test_frames_of_a_video_look_alike(small_demo):
    rows = read_manifest(small_demo[0])
    pixels = {p: np.asarray(Image.open(p), dtype=np.float32) for p in rows["path"]}
    videos = rows.groupby("video_id")["path"].agg(list).tolist()
    same = np.mean([np.abs(pixels[a] - pixels[b]).mean() for a, b in videos])
    different = np.mean([np.abs(pixels[a[0]] - pixels[b[0]]).mean() for a, b in zip(videos, videos[1:])])
    assert same * 2 < different


@pytest.mark.parametrize("method", FAKE_METHODS)
def test_a_manipulation_changes_the_inner_face_only(method):
    rng = np.random.default_rng(0)
    identity = demo._identity(rng)
    image = demo._render_face(identity, rng, 64)
    fake = demo._manipulate(image.copy(), identity, method, strength=1.0, tint=np.full(3, 0.08))
    changed = np.abs(fake - image).max(axis=-1) > 1
    assert changed[24:40, 24:40].mean() > 0.5  # the face centre
    assert not changed[:6].any() and not changed[-6:].any()  # background rows above and below the face


def test_same_seed_same_files_other_seed_other_images(tmp_path):
    kwargs = {"n_videos": 4, "frames_per_video": 2, "size": 24}
    first = make_demo_dataset(tmp_path / "a", **kwargs)
    second = make_demo_dataset(tmp_path / "b", **kwargs)
    other = make_demo_dataset(tmp_path / "c", **kwargs, seed=1)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 4 * 2 + 3  # images, two manifests and the stamp
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert [m.read_text() for m in first] == [m.read_text() for m in second]
    image = "images/vid000/000.png"
    assert (tmp_path / "a" / image).read_bytes() != (tmp_path / "c" / image).read_bytes()
    assert other[0].parent == tmp_path / "c"


def test_an_existing_demo_is_reused_and_other_parameters_regenerate_it(tmp_path):
    kwargs = {"n_videos": 4, "frames_per_video": 1, "size": 24}
    train, val = make_demo_dataset(tmp_path, **kwargs)
    image = tmp_path / "images" / "vid000" / "000.png"
    image.write_bytes(b"marker")  # left alone when the demo is reused
    assert make_demo_dataset(tmp_path, **kwargs) == (train, val)
    assert image.read_bytes() == b"marker"

    make_demo_dataset(tmp_path, **{**kwargs, "frames_per_video": 2})
    assert image.read_bytes() != b"marker"
    assert len(read_manifest(train)) + len(read_manifest(val)) == 8
    assert json.loads((tmp_path / "demo_stamp.json").read_text())["frames_per_video"] == 2


def test_too_few_videos_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="n_videos >= 4"):
        make_demo_dataset(tmp_path, n_videos=2)


def test_the_demo_data_bar_writes_no_carriage_returns_into_a_log(tmp_path, capsys):
    make_demo_dataset(tmp_path, n_videos=4, frames_per_video=1, size=16, progress=True)
    printed = capsys.readouterr()
    assert "demo: 2 train + 2 val images written" in printed.out and "\r" not in printed.out + printed.err

"""Face landmarks (--self-blend's hull masks): found on a real portrait, absent on a faceless picture, cached by
content, and the extra's absence said in one line."""

import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stage2.data import landmarks
from stage2.data.landmarks import default_dir, detect, image_landmarks, missing_extra

pytest.importorskip("dlib")
pytest.importorskip("skimage")
from skimage import data  # noqa: E402


@pytest.fixture(scope="module")
def portrait(tmp_path_factory):
    """scikit-image's astronaut (NASA, public domain) cropped to her face, 256 px, as a PNG; and a faceless one."""
    folder = tmp_path_factory.mktemp("faces")
    face = Image.fromarray(data.astronaut()).crop((100, 0, 300, 240)).resize((256, 256))
    face.save(folder / "face.png")
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "noise.png")
    Image.new("RGB", (120, 90), (128, 128, 128)).save(folder / "flat.png")
    return folder


def test_the_portrait_has_68_landmarks_on_her_face_and_noise_has_none(portrait):
    points = detect(np.asarray(Image.open(portrait / "face.png")))
    assert points.shape == (68, 2) and points.dtype == np.float32
    # in the crop's own pixels, on the face: chin (8) below the nose tip (30), below the brows; eyes either side
    assert (points >= 0).all() and (points < 256).all()
    assert points[8, 1] > points[30, 1] > points[19, 1] and points[36, 0] < points[30, 0] < points[45, 0]
    assert detect(np.asarray(Image.open(portrait / "noise.png"))) is None
    small = Image.open(portrait / "face.png").resize((120, 120))  # under 160 px: upsampled once, still found
    assert detect(np.asarray(small)).shape == (68, 2)


def test_landmarks_are_cached_by_content_and_the_faceless_counted(portrait, tmp_path):
    paths = [str(portrait / name) for name in ("face.png", "noise.png", "flat.png")]
    cache = tmp_path / "lm"
    first = image_landmarks(paths, cache)
    assert first.computed == 3 and first.found.tolist() == [True, False, False]
    assert np.isnan(first.points[1:]).all()
    assert first.summary().startswith("1 of 3 images have a face (2 without one take the ellipse mask)")
    assert len(list(cache.rglob("*.npy"))) == 3  # the faceless are cached too: not looked at again

    moved = tmp_path / "renamed.png"  # same bytes under another name: read from the cache
    moved.write_bytes((portrait / "face.png").read_bytes())
    again = image_landmarks([str(moved), *paths[1:]], cache, workers=2)
    assert again.computed == 0 and np.array_equal(again.points[0], first.points[0])

    Image.open(portrait / "face.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(moved)  # new content
    flipped = image_landmarks([str(moved)], cache)
    assert flipped.computed == 1 and flipped.found.all()
    assert abs(flipped.points[0, 30, 0] - (255 - first.points[0, 30, 0])) < 6  # the nose tip, mirrored

    for entry in cache.rglob("*.npy"):
        entry.write_bytes(b"damaged")
    assert image_landmarks(paths, cache).computed == 3  # a damaged entry is computed again
    missing = image_landmarks([str(tmp_path / "nope.png")], cache)
    assert missing.computed == 0 and not missing.found.any()  # the loader names an unreadable file, not this


def test_the_command_fills_the_cache_and_the_default_folder(portrait, tmp_path, capsys, monkeypatch):
    pd.DataFrame({"path": ["face.png", "noise.png"], "label": [0, 0]}).to_csv(portrait / "m.csv", index=False)
    landmarks.main([str(portrait / "m.csv"), "--cache-dir", str(tmp_path / "c")])
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary == ("landmarks: 1 of 2 images have a face (1 without one take the ellipse mask); 2 computed now, "
                       "0 from the cache")
    assert len(list((tmp_path / "c" / "landmarks").rglob("*.npy"))) == 2
    monkeypatch.delenv("STAGE2_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_dir(None) == tmp_path / "xdg" / "stage2" / "landmarks"
    monkeypatch.setenv("STAGE2_CACHE", str(tmp_path / "mine"))
    assert default_dir(None) == tmp_path / "mine" / "landmarks"


def test_without_the_extra_the_reason_names_the_install_line(monkeypatch, portrait, tmp_path, capsys):
    pd.DataFrame({"path": [str(portrait / "face.png")], "label": [0]}).to_csv(tmp_path / "m.csv", index=False)
    monkeypatch.setitem(sys.modules, "dlib", None)  # as if dlib-bin were not installed
    assert missing_extra() == "dlib is not installed (pip install -r requirements-landmarks.txt)"
    monkeypatch.setattr(landmarks, "_models", None)
    with pytest.raises(SystemExit) as stopped:
        landmarks.main([str(tmp_path / "m.csv")])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: face landmarks: dlib is not installed (pip install -r "
                                               "requirements-landmarks.txt)")

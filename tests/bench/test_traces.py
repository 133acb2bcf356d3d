"""The learnability benchmark's forgery traces: each family leaves its own evidence in the forged region only."""

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from benchmarks.traces import REAL, TRACES, region, split_items, trace_image, write_set

SIZE = 64


def _pair(method: str, index: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(real, fake, changed): the two images of one scene as float, and where the fake differs by > 4 levels."""
    real = trace_image(index, REAL, SIZE).astype(np.float32)
    fake = trace_image(index, method, SIZE).astype(np.float32)
    return real, fake, np.abs(fake - real).max(axis=2) > 4


def _roughness(image: np.ndarray, where: np.ndarray) -> float:
    """Mean absolute difference of horizontal neighbours where both are in `where`: the fine grain."""
    both = where[:, 1:] & where[:, :-1]
    return float(np.abs(np.diff(image, axis=1))[both].mean())


@pytest.mark.parametrize("method", TRACES)
def test_every_trace_changes_one_region_and_leaves_the_corners(method):
    real, fake, changed = _pair(method)
    assert 0.05 < changed.mean() < 0.6, method  # a region, not the whole image
    for corner in (np.s_[:4, :4], np.s_[:4, -4:], np.s_[-4:, :4], np.s_[-4:, -4:]):
        np.testing.assert_array_equal(real[corner], fake[corner])  # outside the region nothing moves


def test_the_real_of_an_index_is_the_same_scene_whatever_the_fakes_method():
    assert np.array_equal(trace_image(5, REAL, SIZE), trace_image(5, REAL, SIZE))
    fakes = [trace_image(5, m, SIZE) for m in TRACES]
    real = trace_image(5, REAL, SIZE)
    assert all(np.array_equal(f[:4, :4], real[:4, :4]) for f in fakes)
    assert len({f.tobytes() for f in fakes}) == len(TRACES)


@pytest.mark.parametrize(("method", "smoother"), [("resample", True), ("denoise", True), ("checkerboard", True),
                                                  ("double_jpeg", True), ("sharpen", False)])
def test_grain_is_removed_or_amplified_inside_the_region(method, smoother):
    ratios = []
    for index in range(1, 20, 2):
        real, fake, changed = _pair(method, index)
        inner = changed & np.roll(changed, 2, 0) & np.roll(changed, -2, 0) & np.roll(changed, 2, 1)
        ratios.append(_roughness(fake, inner) / _roughness(real, inner))
    assert (np.median(ratios) < 0.7) if smoother else (np.median(ratios) > 1.3), ratios


def test_colour_scales_the_region_by_15_to_25_percent_per_channel():
    real, fake, changed = _pair("colour")
    core = region(np.random.default_rng([0, 3, 1 + TRACES.index("colour")]), SIZE)[..., 0] == 1
    gain = (fake[core].mean(axis=0) / real[core].mean(axis=0)) - 1
    assert np.all((np.abs(gain) > 0.12) & (np.abs(gain) < 0.28)), gain  # the soft edge and clipping shave a little


def test_splice_pastes_another_scene_through_a_hard_edge():
    real, fake, _ = _pair("splice")
    inside = region(np.random.default_rng([0, 3, 1 + TRACES.index("splice")]), SIZE, soft=0.0)[..., 0] > 0
    np.testing.assert_array_equal(real[~inside], fake[~inside])  # not one pixel of a blend outside the edge
    assert np.abs(fake[inside] - real[inside]).mean() > 20


def test_checkerboard_repeats_pixels_in_two_by_two_blocks():
    _, fake, changed = _pair("checkerboard")
    core = changed & np.roll(changed, 3, 0) & np.roll(changed, -3, 0) & np.roll(changed, 3, 1) & np.roll(changed, -3, 1)
    rows = np.arange(SIZE)[:, None] % 2 == 0
    pairs = core & rows & np.roll(core, -1, 0)
    within = np.abs(fake - np.roll(fake, -1, 0)).max(axis=2)[pairs].mean()  # rows 2k and 2k+1: one source pixel
    across = np.abs(fake - np.roll(fake, 1, 0)).max(axis=2)[pairs & np.roll(core, 1, 0)].mean()
    assert within < 0.5 * across


def test_double_jpeg_region_shows_blocking_on_a_shifted_grid():
    real, fake, _ = _pair("double_jpeg")
    # the region was JPEG-compressed: recompressing it at quality 95 changes it less than it changes the real
    def recompress_change(image):
        buffer = io.BytesIO()
        Image.fromarray(image.astype(np.uint8)).save(buffer, format="JPEG", quality=95)
        return np.abs(np.asarray(Image.open(buffer), np.float32) - image)

    core = region(np.random.default_rng([0, 3, 1 + TRACES.index("double_jpeg")]), SIZE)[..., 0] == 1
    assert np.abs(fake - real)[core].mean() > 5
    assert recompress_change(fake)[core].mean() < recompress_change(real)[core].mean()


def test_sets_share_images_and_alternate_real_and_fake(tmp_path):
    items = split_items(10, 8, ["resample", "splice"])
    assert items == [(10, REAL), (11, "resample"), (12, REAL), (13, "splice"), (14, REAL), (15, "resample"),
                     (16, REAL), (17, "splice")]
    a = write_set(tmp_path, "a", items)
    b = write_set(tmp_path, "b", split_items(10, 8, ["denoise"]))
    frame_a, frame_b = pd.read_csv(a), pd.read_csv(b)
    assert frame_a["label"].tolist() == [0, 1] * 4 and list(frame_a.columns) == ["path", "label", "method"]
    assert frame_a["path"][frame_a["label"] == 0].tolist() == frame_b["path"][frame_b["label"] == 0].tolist()
    assert len(list((tmp_path / "images").iterdir())) == 4 + 4 + 4  # 4 shared reals, 4 + 4 fakes
    saved = np.asarray(Image.open(tmp_path / frame_a["path"][1]))
    np.testing.assert_array_equal(saved, trace_image(11, "resample", SIZE))

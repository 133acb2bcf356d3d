"""Augmentation: exact geometry (no interpolation), degradations on a fraction only, per-image draws."""

import dataclasses

import pandas as pd
import pytest
import torch

from stage2.data.transforms import AUG_CONFIGS, AugConfig, DeviceTransform, build_cpu_transform

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
IDENTITY = ((0.0,) * 3, (1.0,) * 3)


def _batch(b: int = 6, size: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g)


def _device(cfg: AugConfig) -> DeviceTransform:
    tf = DeviceTransform(*IDENTITY).train()
    tf.cfg = cfg
    return tf


def test_cpu_part_degrades_a_fraction_of_the_images_and_keeps_uint8():
    img = _batch(1)[0]
    assert build_cpu_transform("none") is None and build_cpu_transform("light") is None
    for level in ("standard", "strong"):
        tf = build_cpu_transform(level)
        torch.manual_seed(0)
        outs = [tf(img) for _ in range(400)]
        assert all(o.dtype == torch.uint8 and o.shape == img.shape for o in outs)
        changed = sum(not torch.equal(o, img) for o in outs) / len(outs)
        p = AUG_CONFIGS[level].degrade_p
        assert abs(changed - p) < 0.06, (level, changed)


def test_degradations_start_in_the_second_half_of_the_run(tmp_path):
    from PIL import Image

    from stage2.data.dataset import ManifestDataset

    img = _batch(1)[0]
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / "a.png")
    tf = build_cpu_transform("standard", epochs=8)
    assert tf.start == 4 and build_cpu_transform("standard", epochs=3).start == 2
    dataset = ManifestDataset(pd.DataFrame({"path": [str(tmp_path / "a.png")] * 200, "label": 0}), 48,
                              transform=tf)
    p = AUG_CONFIGS["standard"].degrade_p
    for epoch, expected in ((0, 0.0), (3, 0.0), (4, p), (7, p)):
        dataset.set_epoch(epoch)  # what the trainer calls before each epoch's loader starts
        changed = sum(not torch.equal(dataset[i][0], img) for i in range(200)) / 200
        assert abs(changed - expected) < 0.04, (epoch, changed)


@pytest.mark.parametrize("level", ["light", "standard"])
def test_default_levels_never_interpolate(level):
    # Every output pixel must be an input pixel: a flip or a whole-pixel shift copies values, a bilinear
    # resample (what smeared the forgery traces) makes new ones.
    x = _batch(32)
    tf = DeviceTransform(*IDENTITY, level=level).train()
    out = tf(x, generator=torch.Generator().manual_seed(0)) * 255
    assert torch.equal(out, out.round())
    for o, i in zip(out, x):
        assert set(o.round().to(torch.uint8).unique().tolist()) <= set(i.unique().tolist())


def test_flip_is_an_exact_tensor_flip():
    x = _batch(1, 32).repeat(64, 1, 1, 1)
    out = _device(AugConfig(flip=0.5))(x, generator=torch.Generator().manual_seed(0))
    flipped, kept = x.float().flip(-1) / 255, x.float() / 255
    n_flipped = sum(torch.equal(o, f) for o, f in zip(out, flipped))
    n_kept = sum(torch.equal(o, k) for o, k in zip(out, kept))
    assert n_flipped + n_kept == 64 and 16 < n_flipped < 48


def test_shift_moves_whole_pixels_within_its_range():
    x = _batch(16, 40)
    cfg = AugConfig(shift=0.1)  # up to 4 pixels
    out = _device(cfg)(x, generator=torch.Generator().manual_seed(2))
    moves = set()
    for o, i in zip(out, x.float() / 255):
        # The centre 30x30 of the output is the input's centre moved by some (dy, dx) in [-4, 4].
        found = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
                 if torch.equal(o[:, 5:35, 5:35], i[:, 5 + dy:35 + dy, 5 + dx:35 + dx])]
        assert found, "each output must be an exact whole-pixel shift of its input"
        moves.add(found[0])
    assert len(moves) > 4, "shifts are drawn per image"


def test_eval_transform_is_exactly_the_models_normalisation():
    x = _batch()
    out = DeviceTransform(MEAN, STD).eval()(x)
    expected = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def test_strong_stays_in_range_and_draws_per_image():
    x = _batch(1).repeat(16, 1, 1, 1)  # sixteen copies of one image
    tf = DeviceTransform(MEAN, STD, "strong").train()
    tf.cfg = dataclasses.replace(tf.cfg, jitter_p=1.0)
    out = tf(x, generator=torch.Generator().manual_seed(1))
    pixels = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    distinct = {tuple(o.flatten()[:64].tolist()) for o in out}
    assert len(distinct) > 8, "identical inputs must get different per-image augmentations"


def test_train_transform_is_reproducible_from_its_generator():
    x = _batch()
    tf = DeviceTransform(MEAN, STD, "strong").train()
    a = tf(x, generator=torch.Generator().manual_seed(3))
    b = tf(x, generator=torch.Generator().manual_seed(3))
    c = tf(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_level_none_adds_no_randomness_in_training():
    x = _batch()
    tf = DeviceTransform(MEAN, STD, "none")
    torch.testing.assert_close(tf.train()(x), tf.eval()(x))

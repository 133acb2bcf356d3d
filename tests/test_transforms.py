import torch

from src.data.transforms import DeviceTransform, build_cpu_transform

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _batch(b: int = 6, size: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g)


def test_cpu_part_is_only_jpeg_recompression_and_keeps_uint8():
    img = _batch(1)[0]
    assert build_cpu_transform("none") is None and build_cpu_transform("light") is None
    for level in ("standard", "strong"):
        tf = build_cpu_transform(level)
        outs = [tf(img) for _ in range(8)]
        assert all(o.dtype == torch.uint8 and o.shape == img.shape for o in outs)
        assert any(not torch.equal(o, img) for o in outs), "some images must be re-compressed"


def test_flip_scale_shift_run_per_image_on_the_device():
    x = _batch(1, 32).repeat(64, 1, 1, 1)
    tf = DeviceTransform((0.0,) * 3, (1.0,) * 3, "light").train()
    tf.cfg = type(tf.cfg)(flip=0.5)  # flips only
    out = tf(x, generator=torch.Generator().manual_seed(0))
    flipped = x.float().flip(-1) / 255
    n_flipped = sum(torch.allclose(o, f, atol=1e-5) for o, f in zip(out, flipped))
    n_kept = sum(torch.allclose(o, i.float() / 255, atol=1e-5) for o, i in zip(out, x))
    assert n_flipped + n_kept == 64 and 16 < n_flipped < 48


def test_eval_transform_is_exactly_the_models_normalisation():
    x = _batch()
    out = DeviceTransform(MEAN, STD).eval()(x)
    expected = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def test_train_transform_stays_in_range_and_draws_per_image():
    x = _batch(1).repeat(16, 1, 1, 1)  # sixteen copies of one image
    tf = DeviceTransform(MEAN, STD, "strong").train()
    out = tf(x, generator=torch.Generator().manual_seed(1))
    pixels = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    distinct = {tuple(o.flatten()[:64].tolist()) for o in out}
    assert len(distinct) > 8, "identical inputs must get different per-image augmentations"


def test_train_transform_is_reproducible_from_its_generator():
    x = _batch()
    tf = DeviceTransform(MEAN, STD, "standard").train()
    a = tf(x, generator=torch.Generator().manual_seed(3))
    b = tf(x, generator=torch.Generator().manual_seed(3))
    c = tf(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_level_none_adds_no_randomness_in_training():
    x = _batch()
    tf = DeviceTransform(MEAN, STD, "none")
    torch.testing.assert_close(tf.train()(x), tf.eval()(x))

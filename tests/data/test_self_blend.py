"""Self-blended fakes (--self-blend): the published recipe's masks and blend, the label flip, paired items with one
augmentation draw, determinism, the same images from the cache, the flags, and what the log says."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import fails, open_png, output_dir, set_flag
from PIL import Image

import train_stage2_effnet
from stage2.data import self_blend_grid
from stage2.data.cache import DecodedCache
from stage2.data.dataset import ManifestDataset, collate, manifest_loader
from stage2.data.decode import decode_image, resize_uint8
from stage2.data.manifest import read_manifest
from stage2.data.self_blend import BLEND_RATIOS, HULL_SHAPES, SelfBlend, ellipse_mask, hull_mask, self_blended
from stage2.data.transforms import DeviceTransform, build_cpu_transform
from stage2.engine.trainer import Trainer
from stage2.run.config import TrainConfig
from stage2.run.distributed import setup_distributed
from stage2.run.loaders import train_loader, trained_label_mix

SIZE = 64


@pytest.fixture
def crops(tmp_path) -> pd.DataFrame:
    """Six 80x72 PNGs (resized to 64 on reading): three real, three fake, with texture and a colour gradient."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:72, 0:80] / 80
    rows = []
    for i in range(6):
        image = np.stack([yy * 200, xx * 200, (1 - yy) * 150], axis=2) + rng.normal(0, 12, (72, 80, 3))
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
        rows.append((str(path), i % 2))
    return pd.DataFrame(rows, columns=["path", "label"])


def _face_points() -> np.ndarray:
    """68 iBUG-ordered landmarks of a schematic face in a 64 x 80 (w x h) crop: jaw, brows, nose, eyes, mouth."""
    angle = np.linspace(np.pi, 0, 17)
    jaw = np.stack([32 + 22 * np.cos(angle), 38 + 30 * np.sin(angle)], 1)
    brows = np.stack([np.r_[np.linspace(14, 28, 5), np.linspace(36, 50, 5)], np.full(10, 26.0)], 1)
    nose = np.stack([np.r_[np.full(4, 32.0), np.linspace(27, 37, 5)], np.r_[np.linspace(30, 42, 4), np.full(5, 45)]], 1)
    eye = np.stack([np.cos(np.linspace(0, 2 * np.pi, 7)[:6]) * 5, np.sin(np.linspace(0, 2 * np.pi, 7)[:6]) * 2], 1)
    mouth = np.stack([32 + 9 * np.cos(np.linspace(0, 2 * np.pi, 21)[:20]),
                      56 + 3 * np.sin(np.linspace(0, 2 * np.pi, 21)[:20])], 1)
    return np.concatenate([jaw, brows, nose, eye + [22, 33], eye + [42, 33], mouth]).astype(np.float32)


def test_the_ellipse_mask_is_a_hard_blob_around_the_centre_of_any_crop():
    masks = []
    for seed in range(8):
        torch.manual_seed(seed)
        mask = ellipse_mask(80, 60)
        assert mask.shape == (80, 60) and set(mask.unique().tolist()) == {0.0, 1.0}
        assert mask[40, 30] == 1 and mask[0, 0] == mask[-1, -1] == 0
        masks.append(mask)
    assert all(not torch.equal(masks[0], m) for m in masks[1:])


def test_the_hull_masks_cover_the_face_in_four_shapes():
    points = _face_points()
    shapes = {}
    for seed in range(40):
        torch.manual_seed(seed)
        mask = hull_mask(points, 80, 64)
        assert mask.shape == (80, 64) and mask[45, 32] == 1  # the nose, in every shape
        assert mask[0, 0] == mask[79, 63] == 0
        shapes.setdefault(round(float(mask.sum())), mask)
    assert len(shapes) == len(HULL_SHAPES)  # four distinct shapes
    areas = sorted(shapes)
    assert areas[0] < 0.5 * areas[-1]  # the components are far smaller than the extended hull
    assert hull_mask(np.full((68, 2), 3.0, dtype=np.float32), 80, 64) is None  # a collapsed detection: none


@pytest.mark.parametrize("points", [None, _face_points()], ids=["ellipse", "landmarks"])
def test_a_fake_differs_from_its_real_inside_the_mask_only(points):
    image = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 80, 64), dtype=np.uint8))
    ratios, changed = set(), 0
    for seed in range(24):
        torch.manual_seed(seed)
        real, fake, mask = self_blended(image, points)
        assert real.shape == fake.shape == image.shape and mask.shape == (1, 80, 64)
        assert real.dtype == fake.dtype == torch.uint8
        outside = mask[0] < 1e-4
        assert outside.float().mean() > 0.2 and torch.equal(fake[:, outside], real[:, outside])
        changed += not torch.equal(real, image)
        peak = float(mask.max())  # the drawn ratio (a small mask's peak may lose a little in the resize back)
        ratios.add(min(BLEND_RATIOS, key=lambda r: abs(r - peak)))
        assert min(abs(r - peak) for r in BLEND_RATIOS) < 0.05
    assert len(ratios) >= 3
    assert 4 <= changed <= 20  # about half the time the target is the altered copy, and is the real


def test_a_real_becomes_a_fake_and_a_fake_is_left_alone(crops):
    image = decode_image(crops["path"][0])
    blend = SelfBlend(1.0)
    assert blend.blends(0) and not blend.blends(1) and not SelfBlend(0.0).blends(0)
    real, fake = blend(image.clone(), 0)
    assert real.shape == fake.shape == image.shape and not torch.equal(fake, real)
    with pytest.raises(ValueError, match="--self-blend"):
        SelfBlend(1.5)
    with pytest.raises(ValueError, match="--self-blend"):
        SelfBlend("twice")


def test_the_blend_runs_on_the_crop_at_its_own_resolution(crops):
    seen = []

    class Spy(SelfBlend):
        def __call__(self, image, index):
            seen.append(tuple(image.shape))
            return super().__call__(image, index)

    dataset = ManifestDataset(crops, SIZE, self_blend=Spy("paired"))
    real, fake = dataset[0]
    assert seen == [(3, 72, 80)]  # the file's own size, before the resize to --img-size
    assert real[0].shape == fake[0].shape == (3, SIZE, SIZE)


def test_the_ablations_leave_out_the_transforms_the_shape_variants_or_the_crop_size(crops):
    points = _face_points()
    image = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (3, 80, 64), dtype=np.uint8))
    altered_targets = 0
    for seed in range(12):
        torch.manual_seed(seed)
        target, fake, _ = self_blended(image, points, transforms=False)
        assert torch.equal(target, image) and not torch.equal(fake, image)  # the blend moves the source only
        torch.manual_seed(seed)
        altered_targets += not torch.equal(self_blended(image, points)[0], image)
    assert altered_targets > 0  # with the transforms the target is sometimes the altered copy
    areas = set()
    for seed in range(20):
        torch.manual_seed(seed)
        areas.add(float(hull_mask(points, 80, 64, shapes=HULL_SHAPES[:1]).sum()))
    assert len(areas) == 1  # the plain hull every time (four shapes over the same seeds: the test above)
    # crop-size left out: blended after the resize, the landmarks scaled with it; the fake differs inside the face
    blend = SelfBlend("paired", points[None], without=("crop-size",), size=32)
    torch.manual_seed(0)
    real, fake = blend(image, 0)
    assert real.shape == fake.shape == (3, 32, 32)
    changed = (real != fake).any(0).nonzero()
    top, left = np.floor(points.min(0) * [32 / 64, 32 / 80])[::-1] - 4
    bottom, right = np.ceil(points.max(0) * [32 / 64, 32 / 80])[::-1] + 4
    assert len(changed) and changed[:, 0].min() >= top and changed[:, 0].max() <= bottom
    assert changed[:, 1].min() >= left and changed[:, 1].max() <= right
    with pytest.raises(ValueError, match="--blend-without twice: expected some of transforms, shapes, crop-size"):
        SelfBlend("paired", without=("twice",))


def test_paired_items_a_real_and_its_fake_with_one_augmentation_draw(crops):
    def one_draw(image):  # a transform whose output is its random draw
        return torch.full_like(image, int(torch.randint(0, 256, ())))

    dataset = ManifestDataset(crops, SIZE, transform=one_draw, seed=3, self_blend=SelfBlend("paired"))
    (real, real_label, i), (fake, fake_label, j) = dataset[0]
    assert (real_label, fake_label, i, j) == (0, 1, 0, 0) and torch.equal(real, fake)
    assert not torch.equal(dataset[2][0][0], real)  # another row, another draw
    assert isinstance(dataset[1], tuple) and dataset[1][1] == 1  # a fake row of the manifest is one item

    batch = collate([dataset[i] for i in range(4)])
    assert batch.labels.tolist() == [0, 1, 1, 0, 1, 1] and batch.indices.tolist() == [0, 0, 1, 2, 2, 3]
    assert batch.draws.tolist() == [0, 0, 2, 3, 3, 5]
    # On the device too: the pair's flip, shift and jitter are one draw (strong has all three)
    augment = DeviceTransform((0.5,) * 3, (0.5,) * 3, "strong").train()
    same = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8))
    same[1::2] = same[::2]
    draws = torch.arange(8) // 2 * 2
    out = augment(same, torch.Generator().manual_seed(0), draws)
    assert all(torch.equal(out[k], out[k + 1]) for k in range(0, 8, 2))
    apart = augment(same, torch.Generator().manual_seed(0))
    assert not all(torch.equal(apart[k], apart[k + 1]) for k in range(0, 8, 2))


def test_the_chance_is_per_image_and_deterministic_per_seed_epoch_and_index(crops):
    frame = pd.concat([crops] * 20, ignore_index=True)
    frame = frame[frame["label"] == 0].reset_index(drop=True)  # 30 real rows

    def items(seed, epoch, blend="0.3"):
        dataset = ManifestDataset(frame, SIZE, seed=seed, self_blend=SelfBlend(float(blend) if blend != "paired"
                                                                               else blend))
        dataset.set_epoch(epoch)
        return [dataset[i] for i in range(len(frame))]

    first, again, next_epoch = items(1, 0), items(1, 0), items(1, 1)
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(first, again))
    flipped = [item[1] for item in first]
    assert 0.1 < np.mean(flipped) < 0.55  # about 30% of the reals became fakes
    assert flipped != [item[1] for item in next_epoch]  # a new draw each epoch
    pairs, pairs_again, other_seed = items(1, 0, "paired"), items(1, 0, "paired"), items(2, 0, "paired")
    assert all(torch.equal(a[1][0], b[1][0]) for a, b in zip(pairs, pairs_again))
    assert not all(torch.equal(a[1][0], b[1][0]) for a, b in zip(pairs, other_seed))


@pytest.mark.parametrize("blend", [1.0, "paired"])
def test_from_the_cache_and_with_the_cpu_augmentation_it_gives_the_same_items(crops, tmp_path, blend):
    cache = DecodedCache(tmp_path / "cache", SIZE)
    view = cache.view(cache.prepare(list(crops["path"])))
    kwargs = {"transform": build_cpu_transform("standard"), "seed": 5, "self_blend": SelfBlend(blend)}
    files, cached = ManifestDataset(crops, SIZE, **kwargs), ManifestDataset(crops, SIZE, cache=view, **kwargs)
    for i in range(len(crops)):
        a, b = collate([files[i]]), collate([cached[i]])
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert a.labels.tolist() == ([1] if blend == 1.0 or crops["label"][i] else [0, 1])


def test_two_workers_give_the_batches_of_none(crops):
    def batches(workers):
        loader = manifest_loader(crops, SIZE, batch_size=3, workers=workers, seed=4,
                                 transform=build_cpu_transform("standard"), self_blend=SelfBlend("paired"))
        return list(loader)

    for a, b in zip(batches(0), batches(2), strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.draws, b.draws)


def test_the_paired_loader_keeps_batch_size_images_a_step(tiny_data):
    frame = read_manifest(tiny_data[0])
    reals = frame[frame["label"] == 0].reset_index(drop=True)  # 18 reals
    cfg = TrainConfig(self_blend="paired", blend_mask="ellipse", workers=0, batch_size=8)
    loader, sampler, steps = train_loader(cfg, reals, 32, setup_distributed("cpu"), 0)
    assert loader.batch_size == 4 and steps == 4  # 4 rows a step, each a real and its fake
    batch = next(iter(loader))
    assert batch.images.shape[0] == 8 and batch.labels.tolist() == [0, 1] * 4
    assert trained_label_mix(cfg, frame["label"].to_numpy()) == (18.0, 36.0)  # manifest fakes train as they are


def test_the_flags_are_checked_before_anything_runs(effnet_args, capsys, monkeypatch):
    err = fails(train_stage2_effnet.main, [*effnet_args, "--self-blend", "1"], capsys)
    assert err == "error: --self-blend 1.0: expected a number >= 0 and < 1, or paired"
    err = fails(train_stage2_effnet.main, [*set_flag(effnet_args, "--batch-size", "7"), "--self-blend", "paired"],
                capsys)
    assert err == ("error: --batch-size 7 with --self-blend paired: every real comes with its fake, so a batch holds "
                   "an even number of images")
    err = fails(train_stage2_effnet.main, [*effnet_args, "--self-blend", "paired", "--balanced-sampler"], capsys)
    assert err.startswith("error: --balanced-sampler with --self-blend paired: paired batches hold a fake beside")
    monkeypatch.setitem(__import__("sys").modules, "dlib", None)  # as if the extra were not installed
    err = fails(train_stage2_effnet.main, [*effnet_args, "--self-blend", "0.5", "--blend-mask", "landmarks"], capsys)
    assert err == ("error: --blend-mask landmarks: dlib is not installed (pip install -r requirements-landmarks.txt); "
                   "or use --blend-mask ellipse")
    err = fails(train_stage2_effnet.main, [*effnet_args, "--blend-without", "shapes"], capsys)
    assert err == "error: --blend-without shapes: only with --self-blend"
    assert not output_dir(effnet_args).exists()


def test_without_the_extra_auto_takes_the_ellipse_and_says_why(effnet_args, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "dlib", None)
    train_stage2_effnet.main([*set_flag(effnet_args, "--epochs", "1"), "--self-blend", "0.5"])
    log = (tmp_path / "run" / "train.log").read_text()
    assert ("self-blend masks: the ellipse (--blend-mask auto: dlib is not installed (pip install -r "
            "requirements-landmarks.txt))") in log
    assert "self-blend 0.5 (--blend-mask auto)" in log and (tmp_path / "run" / "best.pt").is_file()


def test_blend_without_reaches_the_blend_and_the_log(effnet_args, stop_before_training, monkeypatch):
    made = []

    class Spy(SelfBlend):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr("stage2.run.loaders.SelfBlend", Spy)
    with pytest.raises(_Stopped):
        train_stage2_effnet.main([*effnet_args, "--self-blend", "paired", "--blend-mask", "ellipse",
                                  "--blend-without", "crop-size", "transforms"])
    log = (output_dir(effnet_args) / "train.log").read_text()
    assert "self-blend paired (--blend-mask ellipse, without transforms,crop-size)" in log
    assert [(b.without, b.size) for b in made] == [(("transforms", "crop-size"), 32)]


class _Stopped(Exception):
    pass


@pytest.fixture
def stop_before_training(monkeypatch):
    def train_epoch(*args, **kwargs):
        raise _Stopped  # the settings and --pos-weight auto are written before the first step

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)


def test_pos_weight_auto_counts_the_labels_trained_and_the_log_says_them(effnet_args, stop_before_training):
    with pytest.raises(_Stopped):  # 18 real / 18 fake in the manifest; half the reals become fakes
        train_stage2_effnet.main([*effnet_args, "--self-blend", "0.5", "--pos-weight", "auto"])
    log = (output_dir(effnet_args) / "train.log").read_text()
    assert "--pos-weight auto: 0.333 (9 real / 27 fake images trained per epoch)" in log
    assert "train 36 images (18 real / 18 fake) from " in log
    assert "trained per epoch, expected after --self-blend 0.5: 9 real / 27 fake" in log


def test_a_chance_next_to_1_is_logged_as_it_is(effnet_args, stop_before_training):
    # Was "0.0 real / 36.0 fake": one decimal rounded the reals left away.
    with pytest.raises(_Stopped):
        train_stage2_effnet.main([*effnet_args, "--self-blend", "0.999999"])
    log = (output_dir(effnet_args) / "train.log").read_text()
    assert "trained per epoch, expected after --self-blend 0.999999: 1.8e-05 real / 36 fake" in log
    assert ("--self-blend 0.999999: an epoch is expected to train 1.8e-05 real and 36 fake images: about one class "
            "only") in log


def test_the_balanced_sampler_balances_the_labels_trained(tiny_data, effnet_args, capsys):
    frame = read_manifest(tiny_data[0])
    frame = frame.drop(frame.index[frame["label"] == 1][6:]).reset_index(drop=True)  # 18 real / 6 fake
    labels = frame["label"].to_numpy()
    cfg = TrainConfig(balanced_sampler=True, self_blend=0.25, blend_mask="ellipse", workers=0, batch_size=8)
    _, sampler, _ = train_loader(cfg, frame, SIZE, setup_distributed("cpu"), 0)
    weights = sampler.weights.numpy()
    real, fake = weights[labels == 0].sum(), weights[labels == 1].sum()
    assert real * (1 - 0.25) == pytest.approx(fake + real * 0.25)  # reals drawn more: a quarter become fakes
    assert trained_label_mix(cfg, labels) == pytest.approx((12.0, 12.0))
    assert trained_label_mix(TrainConfig(self_blend=0.25), labels) == pytest.approx((13.5, 10.5))
    # From 0.5 on no sampling balances them: one line, before anything runs.
    err = fails(train_stage2_effnet.main, [*effnet_args, "--balanced-sampler", "--self-blend", "0.5"], capsys)
    assert err.startswith("error: --balanced-sampler with --self-blend 0.5: from 0.5 on, self-blending leaves")
    assert not output_dir(effnet_args).exists()


def test_tiny_crops_blend_too():
    for side in (1, 2, 7):
        torch.manual_seed(side)
        assert self_blended(torch.zeros(3, side, side + 3, dtype=torch.uint8))[1].shape == (3, side, side + 3)


def test_the_grid_shows_reals_beside_their_blends_and_masks(tmp_path, capsys):
    data = pytest.importorskip("skimage.data")
    Image.fromarray(data.astronaut()).crop((100, 0, 300, 240)).save(tmp_path / "face.png")
    Image.fromarray(data.astronaut()).save(tmp_path / "fake.png")
    pd.DataFrame({"path": ["face.png", "fake.png"], "label": [0, 1]}).to_csv(tmp_path / "m.csv", index=False)
    self_blend_grid.main([str(tmp_path / "m.csv"), str(tmp_path / "grid.png"), "--size", "64", "--seed", "2"])
    assert open_png(tmp_path / "grid.png") == (5 * 64, 64 + 16)  # one real row, five columns, the titles
    assert "wrote " in capsys.readouterr().out
    grid = np.asarray(Image.open(tmp_path / "grid.png"))[16:]
    torch.manual_seed(2 * 1_000_003)  # seed 2's first row: the real is the target its blends were paired with ...
    crop = decode_image(str(tmp_path / "face.png"))
    target = self_blended(crop)[0]
    assert not torch.equal(target, crop)  # ... here the altered copy, not the crop
    real = resize_uint8(target, 64).permute(1, 2, 0).numpy()
    assert np.array_equal(grid[:, :64], real) and not np.array_equal(grid[:, 64:128], real)
    assert grid[:, 128:192].max() == 255  # the ellipse's mask, at its peak
    if self_blend_grid.missing_extra() is None:  # the landmark columns: her face found
        assert grid[:, 256:320].max() == 255 and not np.array_equal(grid[:, 192:256], real)

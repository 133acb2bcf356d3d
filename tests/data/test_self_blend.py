"""Self-blended fakes (--self-blend): the mask, the label flip, determinism, and the same images from the cache."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import fails, output_dir, set_flag
from PIL import Image

import train_stage2_effnet
from stage2.data.cache import DecodedCache
from stage2.data.dataset import ManifestDataset
from stage2.data.manifest import read_manifest
from stage2.data.self_blend import SelfBlend, face_mask, self_blended
from stage2.data.transforms import build_cpu_transform
from stage2.engine.trainer import Trainer
from stage2.run.config import TrainConfig
from stage2.run.distributed import setup_distributed
from stage2.run.loaders import train_loader, trained_label_mix

SIZE = 64


@pytest.fixture
def crops(tmp_path) -> pd.DataFrame:
    """Six 80x80 PNGs (resized to 64 on reading): three real, three fake, with texture and a colour gradient."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:80, 0:80] / 80
    rows = []
    for i in range(6):
        image = np.stack([yy * 200, xx * 200, (1 - yy) * 150], axis=2) + rng.normal(0, 12, (80, 80, 3))
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
        rows.append((str(path), i % 2))
    return pd.DataFrame(rows, columns=["path", "label"])


def test_the_mask_is_a_soft_face_shaped_blob_around_the_centre():
    masks = []
    for seed in range(8):
        torch.manual_seed(seed)
        mask = face_mask(SIZE)
        assert mask.shape == (1, SIZE, SIZE) and mask.min() >= 0 and mask.max() <= 1 + 1e-6
        m = mask[0]
        assert m[SIZE // 2, SIZE // 2] >= 0.2  # the face centre is blended (at the smallest ratio, 0.25)
        assert max(m[0, 0], m[0, -1], m[-1, 0], m[-1, -1]) < 0.01  # the crop's corners are not
        ramp = ((m > 0.05 * m.max()) & (m < 0.95 * m.max())).float().mean()
        assert ramp > 0.05  # a soft edge, not a cut-out
        masks.append(m)
    assert all(not torch.allclose(masks[0], m) for m in masks[1:])  # every mask its own shape and blend ratio


def test_a_real_becomes_a_fake_blended_inside_the_mask_and_a_fake_is_left_alone(crops):
    image = torch.from_numpy(np.array(Image.open(crops["path"][0]).resize((SIZE, SIZE)))).permute(2, 0, 1)
    torch.manual_seed(0)
    blended, mask = self_blended(image)
    assert blended.dtype == torch.uint8 and blended.shape == image.shape
    delta, mask = (blended.float() - image.float()).abs().mean(0), mask[0]
    assert delta[mask > 0.5].mean() > 3 * max(float(delta[mask < 0.01].mean()), 0.3)
    assert torch.equal(blended[:, mask == 0], image[:, mask == 0])  # outside the mask: the original pixels
    blend = SelfBlend(1.0)
    changed, label = blend(image.clone(), 0)
    assert label == 1 and not torch.equal(changed, image)
    unchanged, kept = blend(image.clone(), 1)
    assert kept == 1 and torch.equal(unchanged, image)
    kept_real, real = SelfBlend(0.0)(image.clone(), 0)
    assert real == 0 and torch.equal(kept_real, image)
    with pytest.raises(ValueError, match="--self-blend"):
        SelfBlend(1.5)


def test_the_chance_is_per_image_and_deterministic_per_seed_epoch_and_index(crops):
    frame = pd.concat([crops] * 20, ignore_index=True)
    frame["path"] = list(crops["path"]) * 20
    frame = frame[frame["label"] == 0].reset_index(drop=True)  # 60 real rows

    def items(seed, epoch):
        dataset = ManifestDataset(frame.assign(path=frame["path"]), SIZE, seed=seed, self_blend=SelfBlend(0.3))
        dataset.set_epoch(epoch)
        return [dataset[i] for i in range(len(frame))]

    first, again, next_epoch = items(1, 0), items(1, 0), items(1, 1)
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(first, again))
    flipped = [item[1] for item in first]
    assert 0.1 < np.mean(flipped) < 0.5  # about 30% of the reals became fakes
    assert flipped != [item[1] for item in next_epoch]  # a new draw each epoch


def test_from_the_cache_and_with_the_cpu_augmentation_it_gives_the_same_items(crops, tmp_path):
    cache = DecodedCache(tmp_path / "cache", SIZE)
    view = cache.view(cache.prepare(list(crops["path"])))
    kwargs = {"transform": build_cpu_transform("standard"), "seed": 5, "self_blend": SelfBlend(1.0)}
    files, cached = ManifestDataset(crops, SIZE, **kwargs), ManifestDataset(crops, SIZE, cache=view, **kwargs)
    for i in range(len(crops)):
        (a, label_a, _), (b, label_b, _) = files[i], cached[i]
        assert torch.equal(a, b) and label_a == label_b == 1


def test_the_flag_is_checked_and_a_run_trains_with_it(effnet_args, tmp_path, capsys):
    # At 1 every real would become a fake: a one-class training set.
    err = fails(train_stage2_effnet.main, [*effnet_args, "--self-blend", "1"], capsys)
    assert err == "error: --self-blend 1.0: expected a number >= 0 and < 1"
    train_stage2_effnet.main([*set_flag(effnet_args, "--epochs", "1"), "--self-blend", "0.5"])
    out = tmp_path / "run"
    assert "self-blend 0.5" in (out / "train.log").read_text()
    assert (out / "best.pt").is_file()


class _Stopped(Exception):
    pass


def test_pos_weight_auto_counts_the_labels_trained_and_the_log_says_them(effnet_args, monkeypatch):
    def train_epoch(*args, **kwargs):
        raise _Stopped  # the settings and --pos-weight auto are written before the first step

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    with pytest.raises(_Stopped):  # 18 real / 18 fake in the manifest; half the reals become fakes
        train_stage2_effnet.main([*effnet_args, "--self-blend", "0.5", "--pos-weight", "auto"])
    log = (output_dir(effnet_args) / "train.log").read_text()
    assert "--pos-weight auto: 0.333 (9.0 real / 27.0 fake images trained per epoch)" in log
    assert "train 36 images (18 real / 18 fake) from " in log
    assert "trained per epoch, expected after --self-blend 0.5: 9.0 real / 27.0 fake" in log


def test_the_balanced_sampler_balances_the_labels_trained(tiny_data, effnet_args, capsys):
    frame = read_manifest(tiny_data[0])
    frame = frame.drop(frame.index[frame["label"] == 1][6:]).reset_index(drop=True)  # 18 real / 6 fake
    labels = frame["label"].to_numpy()
    cfg = TrainConfig(balanced_sampler=True, self_blend=0.25, workers=0, batch_size=8)
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


@pytest.mark.parametrize("size", ["1", "2", "7"])
def test_self_blend_below_its_smallest_crop_is_one_line(effnet_args, capsys, size):
    # 1 and 2 px failed in torch's padding ("Padding size should be less...") or affine (INTERNAL ASSERT)
    err = fails(train_stage2_effnet.main, [*set_flag(effnet_args, "--img-size", size), "--self-blend", "0.5"], capsys)
    assert err == f"error: --self-blend at --img-size {size}: self-blending needs crops of at least 8 pixels"
    torch.manual_seed(0)
    assert self_blended(torch.zeros(3, 8, 8, dtype=torch.uint8))[0].shape == (3, 8, 8)  # the smallest taken runs

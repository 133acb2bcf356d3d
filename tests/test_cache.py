"""The decoded-image cache on real PNG files: contents, freshness, resume, bad images, and a training run."""

import json
import logging
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import train_stage2_effnet
from src.data import cache as cache_module
from src.data.cache import DecodedCache
from src.data.dataset import ManifestDataset
from src.data.decode import decode_image, resize_uint8
from src.data.transforms import build_cpu_transform
from src.errors import ImageDecodeError

SIZE = 32


def _write_png(path, seed: int, shape: tuple[int, int] = (40, 48)) -> str:
    """A noise PNG of another size than SIZE, so the cache has to resize it."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture
def pngs(tmp_path) -> list[str]:
    folder = tmp_path / "images"
    folder.mkdir()
    return [_write_png(folder / f"{i}.png", seed=i) for i in range(5)]


def _expected(path: str) -> torch.Tensor:
    return resize_uint8(decode_image(path), SIZE)


def _zero_slot(cache: DecodedCache, slot: int) -> None:
    """Overwrite one cached image in place; it stays zero unless the cache decodes that file again."""
    array = np.memmap(cache.data_path, dtype=np.uint8, mode="r+").reshape(-1, 3, SIZE, SIZE)
    array[slot] = 0
    array.flush()


def _indexed_paths(cache: DecodedCache) -> list[str]:
    return pd.read_csv(cache.index_path)["path"].tolist()


def test_cached_pixels_equal_decode_and_resize(tmp_path, pngs, caplog):
    cache = DecodedCache(tmp_path / "cache", SIZE)
    with caplog.at_level(logging.INFO, logger="src.data.cache"):
        slots = cache.prepare(pngs, workers=2)
    assert "decoding 5 of 5 images" in caplog.text and "GiB on disk" in caplog.text
    assert sorted(slots.tolist()) == [0, 1, 2, 3, 4]
    assert cache.data_path.stat().st_size == 5 * 3 * SIZE * SIZE
    view = cache.view(slots)
    for row, path in enumerate(pngs):
        assert torch.equal(view[row], _expected(path))


def test_a_second_prepare_decodes_nothing(tmp_path, pngs):
    cache = DecodedCache(tmp_path / "cache", SIZE)
    slots = cache.prepare(pngs)
    index_before = cache.index_path.stat()
    _zero_slot(cache, int(slots[0]))

    again = cache.prepare(pngs)
    np.testing.assert_array_equal(again, slots)
    assert cache.index_path.stat().st_ino == index_before.st_ino  # the index was not rewritten
    assert int(cache.view(again)[0].sum()) == 0  # nor was the image decoded again


def test_a_changed_file_is_decoded_again_into_its_old_slot(tmp_path, pngs):
    cache = DecodedCache(tmp_path / "cache", SIZE)
    slots = cache.prepare(pngs)
    _write_png(pngs[1], seed=99)  # new content
    stamp = os.stat(pngs[2]).st_mtime_ns + 5_000_000_000
    os.utime(pngs[2], ns=(stamp, stamp))  # same content, new mtime
    _zero_slot(cache, int(slots[2]))
    _zero_slot(cache, int(slots[3]))
    extra = _write_png(tmp_path / "images" / "extra.png", seed=7)

    again = cache.prepare([*pngs, extra])
    np.testing.assert_array_equal(again[:5], slots)
    assert again[5] == 5  # a new file gets a new slot after the others
    view = cache.view(again)
    assert torch.equal(view[1], _expected(pngs[1])) and not torch.equal(view[1], _expected(pngs[0]))
    assert torch.equal(view[2], _expected(pngs[2]))
    assert int(view[3].sum()) == 0  # unchanged file: not decoded again
    assert torch.equal(view[5], _expected(extra))
    index = pd.read_csv(cache.index_path).set_index("path")
    assert index.loc[pngs[2], "mtime_ns"] == stamp


def test_an_interrupted_build_resumes_where_it_stopped(tmp_path, pngs, monkeypatch):
    monkeypatch.setattr(cache_module, "CHUNK", 2)  # chunks [0, 1], [2, 3], [4]
    with open(pngs[3], "rb") as f:
        original = f.read()
    with open(pngs[3], "wb") as f:
        f.write(original[:60])  # truncated PNG
    cache = DecodedCache(tmp_path / "cache", SIZE)
    with pytest.raises(ImageDecodeError, match=r"cannot decode image .*3\.png"):
        cache.prepare(pngs)
    # Finished chunks, and the good image of the failing one, are kept; the bad file is not.
    assert _indexed_paths(cache) == pngs[:3]
    slots_done = pd.read_csv(cache.index_path)["slot"].tolist()
    for slot in slots_done:
        _zero_slot(cache, slot)

    with open(pngs[3], "wb") as f:
        f.write(original)
    slots = cache.prepare(pngs)
    assert sorted(_indexed_paths(cache)) == sorted(pngs)
    assert len(set(slots.tolist())) == 5
    view = cache.view(slots)
    for row in range(3):
        assert int(view[row].sum()) == 0  # kept from the first build, not decoded again
    for row in (3, 4):
        assert torch.equal(view[row], _expected(pngs[row]))


def test_a_corrupt_file_is_skipped_with_a_warning_when_asked(tmp_path, pngs):
    with open(pngs[2], "wb") as f:
        f.write(b"not a png at all")
    cache = DecodedCache(tmp_path / "cache", SIZE)
    with pytest.warns(UserWarning, match=r"skipping cannot decode image .*2\.png"):
        slots = cache.prepare(pngs, skip_bad_images=True)
    assert slots[2] == -1 and (slots[[0, 1, 3, 4]] >= 0).all()
    # Reported again when a later run reads the same cache, and still an error without the flag.
    with pytest.warns(UserWarning, match=r"2\.png: undecodable when the cache was built"):
        assert cache.prepare(pngs, skip_bad_images=True)[2] == -1
    with pytest.raises(ImageDecodeError, match=r"2\.png"):
        cache.prepare(pngs)

    frame = pd.DataFrame({"path": pngs, "label": [0, 1, 0, 1, 0]})
    dataset = ManifestDataset(frame, SIZE, skip_bad_images=True, cache=cache.view(slots))
    assert dataset[2] == (None, 0, 2)
    assert torch.equal(dataset[3][0], _expected(pngs[3]))


def test_the_dataset_yields_the_same_items_with_and_without_the_cache(tmp_path, pngs):
    frame = pd.DataFrame({"path": pngs, "label": [0, 1, 0, 1, 1]})
    cache = DecodedCache(tmp_path / "cache", SIZE)
    view = cache.view(cache.prepare(pngs))
    transform = build_cpu_transform("standard")
    plain = ManifestDataset(frame, SIZE, transform=transform, seed=3)
    cached = ManifestDataset(frame, SIZE, transform=transform, seed=3, cache=view)
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in range(len(frame)):
            (a, label_a, index_a), (b, label_b, index_b) = plain[i], cached[i]
            assert torch.equal(a, b) and (label_a, index_a) == (label_b, index_b)


def test_training_from_the_cache_gives_the_same_run(effnet_args, tiny_data, tmp_path):
    out = tmp_path / "run"
    plain_args = [*effnet_args, "--epochs", "1"]
    train_stage2_effnet.main(plain_args)
    plain = pd.read_csv(out / "val_predictions.csv")

    cache_dir = tmp_path / "cache"
    cached_args = [*plain_args, "--output-dir", str(tmp_path / "cached_run"), "--cache-dir", str(cache_dir)]
    train_stage2_effnet.main(cached_args)
    cached = pd.read_csv(tmp_path / "cached_run" / "val_predictions.csv")

    n_images = sum(len(pd.read_csv(m)) for m in tiny_data)
    index = pd.read_csv(cache_dir / f"{SIZE}px" / "index.csv")
    assert len(index) == n_images and index["ok"].all()
    assert json.loads((tmp_path / "cached_run" / "summary.json").read_text())["best_epoch"] == 1
    np.testing.assert_allclose(cached["p_fake"], plain["p_fake"], atol=1e-5)

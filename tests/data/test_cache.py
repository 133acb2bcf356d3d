"""The decoded-image cache on real PNG files: contents, freshness, resume, bad images, and a training run."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, set_flag, subprocess_env
from PIL import Image

import train_stage2_effnet
from stage2.data import cache as cache_module
from stage2.data.cache import DecodedCache
from stage2.data.dataset import ManifestDataset
from stage2.data.decode import decode_image, resize_uint8
from stage2.data.transforms import build_cpu_transform
from stage2.errors import ImageDecodeError

SIZE = 32
# A cache build that takes seconds (each decode sleeps 0.2 s, two images a chunk, two workers), under the CLI's
# error handling: argv is the cache folder, then the images.
_SLOW_BUILD = """
import sys, time
from stage2.data import cache
from stage2.commands.cli import exit_on_error

decode = cache.decode_image
def slow(*args):
    time.sleep(0.2)
    return decode(*args)
cache.decode_image, cache.CHUNK = slow, 2
exit_on_error(lambda: cache.DecodedCache(sys.argv[1], 32).prepare(sys.argv[2:], workers=2))
"""


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
    """Overwrite one cached image in place, as a damaged data file would."""
    array = np.memmap(cache.data_path, dtype=np.uint8, mode="r+").reshape(-1, 3, SIZE, SIZE)
    array[slot] = 0
    array.flush()


def _indexed_paths(cache: DecodedCache) -> list[str]:
    return pd.read_csv(cache.index_path)["path"].tolist()


def test_cached_pixels_equal_decode_and_resize(tmp_path, pngs, caplog):
    cache = DecodedCache(tmp_path / "cache", SIZE)
    with caplog.at_level(logging.INFO, logger="stage2.data.cache"):
        slots = cache.prepare(pngs, workers=2)
    assert "decoding 5 of 5 images" in caplog.text and "GiB on disk" in caplog.text
    assert sorted(slots.tolist()) == [0, 1, 2, 3, 4]
    assert cache.data_path.stat().st_size == 5 * 3 * SIZE * SIZE
    view = cache.view(slots)
    for row, path in enumerate(pngs):
        assert torch.equal(view[row], _expected(path))


def test_a_second_prepare_decodes_nothing(tmp_path, pngs, caplog):
    cache = DecodedCache(tmp_path / "cache", SIZE)
    slots = cache.prepare(pngs)
    index_before = cache.index_path.stat()

    caplog.clear()  # the first build's lines, captured where an earlier test left the package's logger at INFO
    with caplog.at_level(logging.INFO, logger="stage2.data.cache"):
        again = cache.prepare(pngs)
    np.testing.assert_array_equal(again, slots)
    assert cache.index_path.stat().st_ino == index_before.st_ino  # the index was not rewritten
    assert "5 cached images checked against their checksums" in caplog.text and "decoding" not in caplog.text


def test_a_changed_file_is_decoded_again_into_its_old_slot(tmp_path, pngs, caplog):
    cache = DecodedCache(tmp_path / "cache", SIZE)
    slots = cache.prepare(pngs)
    _write_png(pngs[1], seed=99)  # new content
    stamp = os.stat(pngs[2]).st_mtime_ns + 5_000_000_000
    os.utime(pngs[2], ns=(stamp, stamp))  # same content, new mtime
    extra = _write_png(tmp_path / "images" / "extra.png", seed=7)

    with caplog.at_level(logging.INFO, logger="stage2.data.cache"):
        again = cache.prepare([*pngs, extra])
    assert "decoding 3 of 6 images" in caplog.text  # the unchanged files are not decoded again
    np.testing.assert_array_equal(again[:5], slots)
    assert again[5] == 5  # a new file gets a new slot after the others
    view = cache.view(again)
    assert torch.equal(view[1], _expected(pngs[1])) and not torch.equal(view[1], _expected(pngs[0]))
    assert torch.equal(view[2], _expected(pngs[2]))
    assert torch.equal(view[5], _expected(extra))
    index = pd.read_csv(cache.index_path).set_index("path")
    assert index.loc[pngs[2], "mtime_ns"] == stamp


def test_a_file_replaced_by_one_of_the_same_size_and_mtime_is_decoded_again(tmp_path):
    # Uncompressed PNGs of one shape have one byte size; the mtime is put back as it was.
    folder = tmp_path / "images"
    folder.mkdir()
    path = folder / "face.png"
    Image.fromarray(np.full((40, 48, 3), 30, dtype=np.uint8)).save(path, compress_level=0)
    cache = DecodedCache(tmp_path / "cache", SIZE)
    cache.prepare([str(path)])
    before = os.stat(path)
    Image.fromarray(np.full((40, 48, 3), 220, dtype=np.uint8)).save(path, compress_level=0)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_size == before.st_size  # served the first image before
    assert torch.equal(cache.view(cache.prepare([str(path)]))[0], _expected(str(path)))


def test_cached_images_follow_max_image_pixels(tmp_path, pngs):
    cache = DecodedCache(tmp_path / "cache", SIZE)
    cache.prepare(pngs)  # 48x40 originals, under the default limit
    with pytest.raises(ImageDecodeError, match=r"0\.png: 48x40 pixels, over the limit of 1000 \(--max-image-pixels\)"):
        cache.prepare(pngs, max_pixels=1000)  # they were served before
    with pytest.warns(UserWarning, match="over the limit of 1000"):
        assert (cache.prepare(pngs, max_pixels=1000, skip_bad_images=True) == -1).all()
    # Refused under a lower limit than a later run's: decoded then, not "undecodable when the cache was built".
    other = DecodedCache(tmp_path / "other", SIZE)
    with pytest.warns(UserWarning, match="over the limit of 1000"):
        assert (other.prepare(pngs, max_pixels=1000, skip_bad_images=True) == -1).all()
    view = other.view(other.prepare(pngs))
    assert all(torch.equal(view[row], _expected(path)) for row, path in enumerate(pngs))


def test_an_interrupted_build_resumes_where_it_stopped(tmp_path, pngs, monkeypatch, caplog):
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

    with open(pngs[3], "wb") as f:
        f.write(original)
    with caplog.at_level(logging.INFO, logger="stage2.data.cache"):
        slots = cache.prepare(pngs)
    assert "decoding 2 of 5 images" in caplog.text  # the first three are kept from the first build
    assert sorted(_indexed_paths(cache)) == sorted(pngs)
    assert len(set(slots.tolist())) == 5
    view = cache.view(slots)
    for row in range(5):
        assert torch.equal(view[row], _expected(pngs[row]))


def test_a_cached_image_that_no_longer_matches_its_checksum_is_decoded_again(tmp_path, pngs, caplog):
    cache = DecodedCache(tmp_path / "cache", SIZE)
    slots = cache.prepare(pngs)
    _zero_slot(cache, int(slots[3]))
    with caplog.at_level(logging.INFO, logger="stage2.data.cache"):
        again = cache.prepare(pngs)
    assert "1 cached images no longer match their checksums" in caplog.text and "decoding 1 of 5" in caplog.text
    np.testing.assert_array_equal(again, slots)
    assert torch.equal(cache.view(again)[3], _expected(pngs[3]))


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_lost_data_file_is_rebuilt_not_served_as_zeros(tmp_path, damage):
    # The case: 50 cached images, images.u8 deleted (or cut short), one new image; a rerun recreated a sparse
    # file and served the 50 as zeros.
    folder = tmp_path / "images"
    folder.mkdir()
    paths = [_write_png(folder / f"{i}.png", seed=i, shape=(8, 8)) for i in range(50)]
    cache = DecodedCache(tmp_path / "cache", SIZE)
    cache.prepare(paths)
    if damage == "deleted":
        cache.data_path.unlink()
    else:
        os.truncate(cache.data_path, 20 * 3 * SIZE * SIZE)
    paths.append(_write_png(folder / "new.png", seed=50, shape=(8, 8)))
    view = cache.view(cache.prepare(paths))
    for row, path in enumerate(paths):
        assert torch.equal(view[row], _expected(path)), path


def test_an_index_of_the_previous_version_is_rebuilt(tmp_path, pngs):
    cache = DecodedCache(tmp_path / "cache", SIZE)
    cache.prepare(pngs)
    pd.read_csv(cache.index_path).drop(columns="crc32").to_csv(cache.index_path, index=False)
    _zero_slot(cache, 0)
    view = cache.view(cache.prepare(pngs))
    assert list(pd.read_csv(cache.index_path).columns) == cache_module.INDEX_COLUMNS
    for row, path in enumerate(pngs):
        assert torch.equal(view[row], _expected(path))


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
    plain_args = set_flag(effnet_args, "--epochs", "1")
    train_stage2_effnet.main(plain_args)
    plain = pd.read_csv(out / "val_predictions.csv")

    cache_dir = tmp_path / "cache"
    cached_args = [*set_flag(plain_args, "--output-dir", str(tmp_path / "cached_run")), "--cache-dir", str(cache_dir)]
    train_stage2_effnet.main(cached_args)
    cached = pd.read_csv(tmp_path / "cached_run" / "val_predictions.csv")

    n_images = sum(len(pd.read_csv(m)) for m in tiny_data)
    index = pd.read_csv(cache_dir / f"{SIZE}px" / "index.csv")
    assert len(index) == n_images and index["ok"].all()
    assert json.loads((tmp_path / "cached_run" / "summary.json").read_text())["best_epoch"] == 1
    np.testing.assert_allclose(cached["p_fake"], plain["p_fake"], atol=1e-5)


def _slow_build(folder: Path, paths: list[str]) -> subprocess.Popen:
    env = subprocess_env()
    return subprocess.Popen([sys.executable, "-c", _SLOW_BUILD, str(folder), *paths], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_first_chunk(cache: DecodedCache, proc: subprocess.Popen) -> None:
    for _ in range(1200):
        if cache.index_path.is_file() or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None and cache.index_path.is_file(), proc.communicate()[1][-2000:]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the parenthesised name
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _many_pngs(folder: Path, n: int) -> list[str]:
    folder.mkdir()
    return [_write_png(folder / f"{i}.png", seed=i, shape=(8, 8)) for i in range(n)]


@pytest.mark.slow
def test_killing_a_cache_build_ends_its_workers_and_frees_the_cache(tmp_path):
    paths = _many_pngs(tmp_path / "images", 40)
    cache = DecodedCache(tmp_path / "cache", SIZE)
    proc = _slow_build(tmp_path / "cache", paths)
    _wait_for_first_chunk(cache, proc)
    workers = _children(proc.pid)
    assert len(workers) == 2
    proc.kill()
    proc.wait(timeout=60)
    for _ in range(100):  # they die with their parent, at once; orphans used to build on, holding the lock
        if not any(_alive(pid) for pid in workers):
            break
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers)
    # The next build takes the cache over (a subprocess: a relapse would hang on the lock) and completes it.
    rerun = subprocess.run([sys.executable, "-c", _SLOW_BUILD.replace("time.sleep(0.2)", "pass"),
                            str(tmp_path / "cache"), *paths], env=subprocess_env(), cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    view = cache.view(cache.prepare(paths))
    for row, path in enumerate(paths):
        assert torch.equal(view[row], _expected(path))


@pytest.mark.slow
@pytest.mark.parametrize("group", [False, True], ids=["main", "group"])
def test_sigterm_during_a_cache_build_stops_in_one_line_and_a_rerun_continues(tmp_path, group):
    paths = _many_pngs(tmp_path / "images", 40)
    cache = DecodedCache(tmp_path / "cache", SIZE)
    proc = _slow_build(tmp_path / "cache", paths)
    _wait_for_first_chunk(cache, proc)
    os.killpg(proc.pid, signal.SIGTERM) if group else proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    err = stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stopped: stopped by SIGTERM while caching images in"), stderr[-2000:]
    kept = len(pd.read_csv(cache.index_path))
    assert 0 < kept < len(paths) and f"({kept} of {len(paths)} decoded and kept)" in err[0]
    view = cache.view(cache.prepare(paths))
    for row, path in enumerate(paths):
        assert torch.equal(view[row], _expected(path))

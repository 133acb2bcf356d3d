"""Image decoding, resizing, the manifest dataset and collate, on real image files written here."""

import runpy
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import DataLoader

from stage2.data.cache import DecodedCache
from stage2.data.dataset import Batch, ManifestDataset, collate
from stage2.data.decode import MAX_IMAGE_PIXELS, decode_image, resize_uint8
from stage2.data.manifest import IMAGE_SUFFIXES, frame_from_images
from stage2.errors import ImageDecodeError
from stage2.run.config import TrainConfig

H, W = 13, 21  # odd, non-square


def _pixels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array)).permute(2, 0, 1)


def _png16(path: Path, samples: np.ndarray) -> None:
    """Write a 16-bit PNG (grey [H, W] or RGB [H, W, 3]) chunk by chunk: PIL cannot write 16-bit RGB."""
    height, width = samples.shape[:2]
    colour_type = 2 if samples.ndim == 3 else 0
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in samples)  # filter byte 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P"])
def test_8bit_png_modes_decode_to_rgb_with_alpha_dropped(tmp_path, mode):
    image = Image.fromarray(_pixels()).convert(mode)
    path = tmp_path / f"{mode}.png"
    image.save(path)
    decoded = decode_image(str(path))
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, H, W)
    assert torch.equal(decoded, _chw(np.asarray(image.convert("RGB"))))


def test_alpha_is_dropped_not_composited(tmp_path):
    rgba = np.dstack([_pixels(), np.zeros((H, W), np.uint8)])  # fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert torch.equal(decode_image(str(tmp_path / "clear.png")), _chw(_pixels()))


def test_palette_png_with_transparency(tmp_path):
    image = Image.fromarray(_pixels()).convert("P")
    image.save(tmp_path / "p.png", transparency=0)
    assert "transparency" in Image.open(tmp_path / "p.png").info
    assert torch.equal(decode_image(str(tmp_path / "p.png")), _chw(np.asarray(image.convert("RGB"))))


SAMPLES_16 = np.array([0, 255, 256, 30000, 40000, 65535], dtype=np.uint16)
EXPECTED_8 = torch.tensor([0, 0, 1, 117, 156, 255], dtype=torch.uint8)  # scaled (v >> 8), never clipped


def test_16bit_grey_png_is_scaled_to_8bit(tmp_path):
    grey = np.tile(SAMPLES_16, (H, 1))
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    decoded = decode_image(str(tmp_path / "grey16.png"))
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, H, len(SAMPLES_16))
    assert torch.equal(decoded[:, 0], EXPECTED_8.expand(3, -1))


def test_16bit_rgb_png_is_scaled_per_channel(tmp_path):
    rgb = np.stack([SAMPLES_16, SAMPLES_16[::-1], np.full_like(SAMPLES_16, 30000)], axis=-1)[None].repeat(2, 0)
    _png16(tmp_path / "rgb16.png", rgb)
    decoded = decode_image(str(tmp_path / "rgb16.png"))
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 2, len(SAMPLES_16))
    assert torch.equal(decoded[0, 0], EXPECTED_8) and torch.equal(decoded[1, 0], EXPECTED_8.flip(0))
    assert (decoded[2] == 117).all()


def test_formats_only_pil_reads(tmp_path):
    Image.fromarray(_pixels()).save(tmp_path / "a.bmp")
    assert torch.equal(decode_image(str(tmp_path / "a.bmp")), _chw(_pixels()))
    Image.fromarray(np.tile(SAMPLES_16, (H, 1))).save(tmp_path / "grey16.tif")
    assert torch.equal(decode_image(str(tmp_path / "grey16.tif"))[:, 0], EXPECTED_8.expand(3, -1))


def test_images_reads_every_format_training_decodes(tmp_path):
    # --images once kept only PNG/JPEG: "14 of 14 images" for a folder of 24 that a manifest would train on whole.
    images = [tmp_path / f"a{suffix}" for suffix in (".png", ".jpg", ".JPEG", ".webp", ".bmp", ".tif", ".tiff", ".gif")]
    for path in images:
        Image.fromarray(_pixels()).save(path)
    (tmp_path / "notes.txt").write_text("not an image")
    paths = frame_from_images(tmp_path)["path"].tolist()
    assert paths == sorted(str(path) for path in images)
    assert all(decode_image(path).shape == (3, H, W) for path in paths)  # each one the loaders read
    # the ONNX example, which runs without the package, reads the same files
    example = runpy.run_path(str(ROOT / "examples" / "onnx_predict.py"))
    assert example["SUFFIXES"] == IMAGE_SUFFIXES


def test_32bit_tiffs_decode_by_their_range(tmp_path):
    floats = np.tile(np.array([0.0, 0.25, 0.5001, 1.0], dtype=np.float32), (H, 1))
    Image.fromarray(floats, "F").save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    assert decode_image(str(tmp_path / "float.tif"))[:, 0].tolist() == [[0, 64, 128, 255]] * 3
    Image.fromarray(np.tile(SAMPLES_16.astype(np.int32), (H, 1)), "I").save(tmp_path / "int32.tif")
    assert Image.open(tmp_path / "int32.tif").mode == "I"
    assert torch.equal(decode_image(str(tmp_path / "int32.tif"))[:, 0], EXPECTED_8.expand(3, -1))


@pytest.mark.parametrize(("mode", "samples", "message"),
                         [("F", [0.0, 1.5], r"mode F\) outside \[0, 1\] \(from 0 to 1\.5\)"),
                          ("F", [0.0, np.nan], r"mode F\) outside \[0, 1\]"),
                          ("I", [0, 70000], r"mode I\) outside \[0, 65535\] \(from 0 to 70000\)"),
                          ("I", [-1, 10], r"mode I\) outside \[0, 65535\] \(from -1 to 10\)")])
def test_32bit_tiffs_without_a_known_white_are_refused_naming_the_file(tmp_path, mode, samples, message):
    dtype = np.float32 if mode == "F" else np.int32
    path = tmp_path / "wide.tif"
    Image.fromarray(np.tile(np.array(samples, dtype=dtype), (H, 1)), mode).save(path)
    with pytest.raises(ImageDecodeError, match=f"cannot decode image {path}: .*{message}"):
        decode_image(str(path))


def test_jpeg_matches_pil(tmp_path):
    Image.fromarray(_pixels()).save(tmp_path / "a.jpg", quality=90)
    expected = _chw(np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB")))
    assert torch.equal(decode_image(str(tmp_path / "a.jpg")), expected)


def _oriented(path: Path, orientation: int, fmt: str = "JPEG") -> Path:
    """An image saved with an EXIF Orientation tag, as phones write them (pixels stored sideways)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(_pixels()).save(path, fmt, exif=exif, **({"quality": 90} if fmt == "JPEG" else {}))
    return path


def _upright(path: Path) -> torch.Tensor:
    return _chw(np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB")))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pil_exif_transpose_does(tmp_path, orientation):
    path = _oriented(tmp_path / "phone.jpg", orientation)
    decoded = decode_image(str(path))
    assert decoded.shape == (3, W, H) if orientation >= 5 else (3, H, W)
    assert torch.equal(decoded, _upright(path))


@pytest.mark.parametrize("fmt", ["WEBP", "TIFF"])
def test_exif_orientation_of_formats_torchvision_would_leave_sideways(tmp_path, fmt):
    path = _oriented(tmp_path / f"phone.{fmt.lower()}", 6, fmt)
    assert torch.equal(decode_image(str(path)), _upright(path))


def test_training_and_the_cache_see_the_upright_image(tmp_path):
    path = _oriented(tmp_path / "phone.jpg", 6)
    expected = resize_uint8(_upright(path), 16)
    frame = pd.DataFrame({"path": [str(path)], "label": [1]})
    assert torch.equal(ManifestDataset(frame, 16)[0][0], expected)
    cache = DecodedCache(tmp_path / "cache", 16)
    assert torch.equal(cache.view(cache.prepare([str(path)]))[0], expected)


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A 100-byte PNG whose header claims width x height pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path):
    assert MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS == TrainConfig().max_image_pixels
    bomb = _png_claiming(tmp_path / "bomb.png", 30_000, 30_000)
    with pytest.raises(ImageDecodeError, match=rf"{bomb}: 30000x30000 pixels, over the limit of {MAX_IMAGE_PIXELS}"):
        decode_image(str(bomb))
    Image.fromarray(_pixels()).save(tmp_path / "a.jpg")
    with pytest.raises(ImageDecodeError, match=rf"a\.jpg: {W}x{H} pixels, over the limit of 200"):
        decode_image(str(tmp_path / "a.jpg"), max_pixels=200)
    assert decode_image(str(tmp_path / "a.jpg"), max_pixels=H * W).shape == (3, H, W)


def test_resize_uint8_to_a_square(tmp_path):
    img = _chw(_pixels())
    out = resize_uint8(img, 16)
    assert out.dtype == torch.uint8 and out.shape == (3, 16, 16)
    flat = torch.full((3, H, W), 77, dtype=torch.uint8)
    assert (resize_uint8(flat, 40) == 77).all()  # interpolation, not padding or cropping
    square = resize_uint8(img, 16)
    assert resize_uint8(square, 16) is square


def _write_bad_files(folder: Path) -> dict[str, Path]:
    good = folder / "good.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        folder / "good.jpg", quality=90
    )
    data, jpeg = good.read_bytes(), (folder / "good.jpg").read_bytes()
    bad = {
        "zero": (folder / "zero.png", b""),
        "garbage": (folder / "garbage.png", b"this is not an image at all\n" * 20),
        "truncated_png": (folder / "truncated.png", data[: len(data) // 2]),
        "truncated_jpeg": (folder / "truncated.jpg", jpeg[: len(jpeg) // 2]),
        "bad_header": (folder / "header.png", data[:8] + b"\x00" * 64),
    }
    for path, content in bad.values():
        path.write_bytes(content)
    return {name: path for name, (path, _) in bad.items()} | {"missing": folder / "missing.png"}


@pytest.mark.parametrize("kind", ["zero", "garbage", "truncated_png", "truncated_jpeg", "bad_header", "missing"])
def test_bad_files_raise_one_line_naming_the_file(tmp_path, kind):
    path = _write_bad_files(tmp_path)[kind]
    with pytest.raises(ImageDecodeError) as info:
        decode_image(str(path))
    message = str(info.value)
    assert message.startswith(f"cannot decode image {path}: ") and "\n" not in message
    assert info.value.path == str(path)


def test_truncated_png_fails_even_when_pil_is_told_to_load_truncated_images(tmp_path, monkeypatch):
    path = _write_bad_files(tmp_path)["truncated_png"]
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(str(path))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for whoever set it


def _frame(tmp_path: Path, bad: set[int] = frozenset(), n: int = 6) -> pd.DataFrame:
    paths = []
    for i in range(n):
        path = tmp_path / f"{i}.png"
        if i in bad:
            path.write_bytes(b"broken")
        else:
            size = (20 + i, 30 - i)  # every image another, non-square size
            Image.fromarray(np.full((*size, 3), 10 * i, dtype=np.uint8)).save(path)
        paths.append(str(path))
    return pd.DataFrame({"path": paths, "label": [i % 2 for i in range(n)]})


def test_dataset_items_are_resized_uint8_with_label_and_index(tmp_path):
    dataset = ManifestDataset(_frame(tmp_path), img_size=16)
    assert len(dataset) == 6
    image, label, index = dataset[3]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16) and (image == 30).all()
    assert (label, index) == (1, 3) and type(label) is int and type(index) is int


def test_dataset_applies_the_transform_after_resizing(tmp_path):
    seen = []

    def invert(image: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(image.shape))
        return 255 - image

    image, _, _ = ManifestDataset(_frame(tmp_path), img_size=8, transform=invert)[2]
    assert seen == [(3, 8, 8)] and (image == 235).all() and image.dtype == torch.uint8


def test_bad_image_raises_unless_skipped(tmp_path):
    frame = _frame(tmp_path, bad={1})
    with pytest.raises(ImageDecodeError, match=r"1\.png"):
        ManifestDataset(frame, 8)[1]
    with pytest.warns(UserWarning, match=r"skipping cannot decode image .*1\.png"):
        assert ManifestDataset(frame, 8, skip_bad_images=True)[1] == (None, 1, 1)


@pytest.mark.filterwarnings("ignore:skipping cannot decode image")
@pytest.mark.parametrize("workers", [0, 2])
def test_loader_with_collate_returns_the_good_images_and_counts_the_skipped(tmp_path, workers):
    frame = _frame(tmp_path, bad={1, 4})
    dataset = ManifestDataset(frame, 8, skip_bad_images=True)
    loader = DataLoader(dataset, batch_size=3, num_workers=workers, collate_fn=collate)
    batches = list(loader)
    assert all(isinstance(b, Batch) for b in batches)
    assert [b.skipped.tolist() for b in batches] == [[1], [4]]
    indices = torch.cat([b.indices for b in batches])
    assert indices.tolist() == [0, 2, 3, 5]
    assert torch.cat([b.labels for b in batches]).tolist() == [0, 0, 1, 1]
    images = torch.cat([b.images for b in batches])
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 8, 8)
    assert images.flatten(1)[:, 0].tolist() == [0, 20, 30, 50]


def test_collate_stacks_and_types(tmp_path):
    items = [(torch.full((3, 4, 4), i, dtype=torch.uint8), i % 2, i) for i in range(3)]
    batch = collate([items[0], (None, 1, 7), items[1], items[2]])
    assert batch.images.shape == (3, 3, 4, 4) and batch.images.dtype == torch.uint8
    assert batch.labels.dtype == torch.int64 and batch.labels.tolist() == [0, 1, 0]
    assert batch.indices.dtype == torch.int64 and batch.indices.tolist() == [0, 1, 2]
    assert batch.skipped.tolist() == [7]


def test_collate_of_an_all_skipped_batch_is_empty():
    batch = collate([(None, 0, 3), (None, 1, 4)])
    assert batch.skipped.tolist() == [3, 4]
    assert batch.images.shape == (0, 3, 0, 0) and batch.images.dtype == torch.uint8
    assert batch.labels.shape == (0,) and batch.labels.dtype == torch.int64
    assert batch.indices.shape == (0,) and batch.indices.dtype == torch.int64


def test_transform_randomness_depends_only_on_seed_epoch_and_index(tmp_path):
    def noisy(image: torch.Tensor) -> torch.Tensor:
        return image // 2 + torch.randint(0, 100, image.shape, dtype=torch.uint8)

    frame = _frame(tmp_path)
    dataset = ManifestDataset(frame, 8, transform=noisy, seed=5)
    rng_state = torch.get_rng_state()
    first = dataset[2][0]
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's random stream is left alone
    assert torch.equal(ManifestDataset(frame, 8, transform=noisy, seed=5)[2][0], first)
    assert not torch.equal(ManifestDataset(frame, 8, transform=noisy, seed=6)[2][0], first)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[2][0], first)

"""Image decoding and the manifest-backed dataset.

Workers only decode, resize and run an optional uint8 transform; images stay uint8 so batches are small to
move, and float conversion/normalisation happens on the device.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFile, UnidentifiedImageError
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as tv_decode_image

# torchvision 0.29 marks its image codecs deprecated (in favour of torchcodec, not installed here) and warns on
# every call; the fast path is chosen on purpose, so silence exactly that warning rather than flood the logs.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
    module="torchvision.io.image",
)

if TYPE_CHECKING:
    from src.data.cache import CacheView

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ImageItem = tuple[torch.Tensor | None, int, int]  # (image, label, index); image None: undecodable, skipped


class ImageDecodeError(RuntimeError):
    """An image file that cannot be decoded; the message names the file.

    A DataLoader worker's error reaches the main process re-raised as ``ImageDecodeError(text)``, ``text`` being
    the worker's whole traceback; the message is then the original one, taken from its last line, so that users
    get the same one line with ``--workers 0`` and ``--workers 8``.
    """

    def __init__(self, path: str, reason: str | None = None) -> None:
        if reason is None:  # re-raised from a worker: `path` holds the worker's traceback
            last = [line for line in path.strip().splitlines() if line.strip()][-1]
            message = last.split("ImageDecodeError: ", 1)[-1]
            self.path = message.removeprefix("cannot decode image ").rsplit(": ", 1)[0]
        else:
            message, self.path = f"cannot decode image {path}: {reason}", path
        super().__init__(message)


@contextmanager
def _strict_truncation() -> Iterator[None]:
    # With ImageFile.LOAD_TRUNCATED_IMAGES set (other libraries flip it globally) PIL pads a truncated file
    # with grey instead of failing; force it off here so a damaged file is always an error.
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _pil_decode(data: bytes) -> torch.Tensor:
    with _strict_truncation(), Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.mode.startswith("I"):
            # 16-bit grey (I;16*, or I as some plugins report it): convert("RGB") would clip at 255.
            grey = np.clip(np.asarray(image, dtype=np.int64), 0, 65535).astype(np.uint16)
            tensor = TF.to_dtype(torch.from_numpy(grey), torch.uint8, scale=True)
            return tensor.expand(3, -1, -1).contiguous()
        # Alpha (RGBA, LA, P with transparency) is dropped, as the torchvision path does.
        rgb = np.asarray(image.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def decode_image(path: str) -> torch.Tensor:
    """Decode an image file to uint8 RGB ``[3, H, W]``; alpha is dropped, 16-bit samples are scaled to 8-bit.

    torchvision's decoder (faster than PIL) handles PNG/JPEG/WebP/GIF; anything it rejects is retried with PIL.
    A missing, empty, corrupt or truncated file raises :class:`ImageDecodeError`.
    """
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as err:
        raise ImageDecodeError(path, err.strerror or type(err).__name__) from None
    if not data:
        raise ImageDecodeError(path, "empty file")
    if data.startswith(_PNG_SIGNATURE) and data[12:16] != b"IHDR":
        # Caught here because libpng would also print its own complaint to stderr, around our one-line error.
        raise ImageDecodeError(path, "corrupt PNG header (no IHDR chunk after the signature)")
    try:
        image = tv_decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        try:
            return _pil_decode(data)
        except UnidentifiedImageError:
            raise ImageDecodeError(path, "not a recognised image format (or a corrupt header)") from None
        # PIL's format plugins raise many unrelated types (OSError, SyntaxError, ValueError, struct.error...)
        # on damaged data; all of them mean the same thing here.
        except Exception as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ImageDecodeError(path, reason) from None
    if image.ndim == 4:  # animated GIF: first frame
        image = image[0]
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = TF.to_dtype(image, torch.uint8, scale=True)
    return image


def resize_uint8(img: torch.Tensor, size: int) -> torch.Tensor:
    """Square antialiased bilinear resize of a uint8 ``[..., H, W]`` image; no-op when already that size."""
    if img.shape[-2:] == (size, size):
        return img
    return TF.resize(img, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


class ManifestDataset(torch.utils.data.Dataset):
    """Images of a manifest frame (see :func:`src.data.manifest.read_manifest`) as uint8 ``[3, S, S]``.

    Items are ``(image, label, index)``; with ``skip_bad_images`` an undecodable file warns and yields image None,
    which :func:`collate` drops and lists. ``seed`` and :meth:`set_epoch` make each sample's CPU transform a
    function of (seed, epoch, index); ``cache`` (a :class:`~src.data.cache.CacheView`) serves images decoded
    and resized beforehand instead of reading the files.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        img_size: int,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        skip_bad_images: bool = False,
        seed: int = 0,
        cache: CacheView | None = None,
    ) -> None:
        # numpy arrays rather than lists of Python objects: forked workers then don't touch (and copy) pages
        # of per-item refcounts.
        self.paths = frame["path"].to_numpy(dtype=str)
        self.labels = frame["label"].to_numpy(dtype=np.int64)
        self.img_size = img_size
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.seed = seed
        self.epoch = 0
        self.cache = cache

    def set_epoch(self, epoch: int) -> None:
        """Reseed the augmentation: workers fork after this, so the new epoch reaches them."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> ImageItem:
        if self.cache is not None:
            image = self.cache[index]  # already resized; None: skipped (and reported) when the cache was built
            if image is None:
                return None, int(self.labels[index]), int(index)
        else:
            path = str(self.paths[index])
            try:
                image = decode_image(path)
            except ImageDecodeError as err:
                if not self.skip_bad_images:
                    raise
                warnings.warn(f"skipping {err}", stacklevel=2)
                return None, int(self.labels[index]), int(index)
            image = resize_uint8(image, self.img_size)
        if self.transform is not None:
            # Each sample's augmentation is a function of (seed, epoch, index) alone: identical for any number
            # of workers or ranks, and after a resume from any step. Only the CPU generator is reseeded (the
            # transforms draw from it): torch.manual_seed also visits every accelerator backend, ~0.4 ms a call.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
                image = self.transform(image)
        return image, int(self.labels[index]), int(index)


class Batch(NamedTuple):
    images: torch.Tensor  # uint8 [B, 3, S, S]
    labels: torch.Tensor  # int64 [B]
    indices: torch.Tensor  # int64 [B], rows of the manifest frame
    skipped: torch.Tensor  # int64 [k], rows dropped as undecodable


def collate(items: Sequence[ImageItem]) -> Batch:
    """Stack dataset items into a :class:`Batch`, dropping (and listing) the undecodable ones.

    A batch where every item was skipped has zero-length tensors and ``images`` of shape ``[0, 3, 0, 0]``
    (the image size is unknown here); callers should skip batches with ``len(batch.labels) == 0``.
    """
    kept = [item for item in items if item[0] is not None]
    skipped = torch.tensor([item[2] for item in items if item[0] is None], dtype=torch.int64)
    if not kept:
        empty = torch.empty(0, dtype=torch.int64)
        return Batch(torch.empty(0, 3, 0, 0, dtype=torch.uint8), empty, empty.clone(), skipped)
    images, labels, indices = zip(*kept)
    return Batch(
        torch.stack(images),
        torch.tensor(labels, dtype=torch.int64),
        torch.tensor(indices, dtype=torch.int64),
        skipped,
    )

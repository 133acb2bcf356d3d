"""Image files -> uint8 RGB tensors: decoding (torchvision, PIL as the fallback) and resizing.

Every way a file can be unreadable (missing, empty, corrupt, truncated) becomes one ImageDecodeError naming it.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFile, UnidentifiedImageError
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as tv_decode_image

from src.errors import ImageDecodeError

# torchvision 0.29 marks its image codecs deprecated (in favour of torchcodec, not installed here) and warns on
# every call; the fast path is chosen on purpose, so silence exactly that warning rather than flood the logs.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
    module="torchvision.io.image",
)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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


# What resize_uint8 does, in timm's data-config terms: the whole image squashed to S x S (no crop), bilinear. Written
# into checkpoints and exports, so that timm.data.create_transform(**config) rebuilds the experts' preprocessing.
RESIZE_CONFIG = {"interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "squash"}


def resize_uint8(img: torch.Tensor, size: int) -> torch.Tensor:
    """Square antialiased bilinear resize of a uint8 ``[..., H, W]`` image (the aspect ratio is not kept, nothing
    is cropped); no-op when already that size."""
    if img.shape[-2:] == (size, size):
        return img
    interpolation = TF.InterpolationMode(RESIZE_CONFIG["interpolation"])
    return TF.resize(img, [size, size], interpolation=interpolation, antialias=True)

"""Image files -> uint8 RGB tensors: decoding (torchvision, PIL as the fallback) and resizing.

Every way a file can be unreadable (missing, empty, corrupt, truncated, more pixels than the limit) becomes one
ImageDecodeError naming it. EXIF orientation is applied, as PIL's `ImageOps.exif_transpose` does: a phone photo
decodes upright, in training, evaluation and extraction alike.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as tv_decode_image

from stage2.errors import ImageDecodeError, first_line

# torchvision 0.29 marks its image codecs deprecated (in favour of torchcodec, not installed here) and warns on
# every call; the fast path is chosen on purpose, so silence exactly that warning rather than flood the logs.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
    module="torchvision.io.image",
)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PIL's Image.MAX_IMAGE_PIXELS (the pixels of a 1 GiB RGBA image), the default of --max-image-pixels.
MAX_IMAGE_PIXELS = 89_478_485
_EXIF_ORIENTATION = 0x0112
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # start-of-frame markers


@contextmanager
def _pil_settings() -> Iterator[None]:
    # With ImageFile.LOAD_TRUNCATED_IMAGES set (other libraries flip it globally) PIL pads a truncated file
    # with grey instead of failing; force it off here so a damaged file is always an error. PIL's own pixel limit
    # is lifted: ours (`max_pixels`) was checked before, and it is the one a user sets.
    saved = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = False, None
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = saved


def _inspect(data: bytes) -> tuple[tuple[int, int] | None, bool]:
    """(width, height) from the file's header, without decoding (None when PIL does not know the format), and
    whether PIL must decode it to apply its EXIF orientation.

    PNG and JPEG: read here, in microseconds. Other formats: PIL's lazy open. torchvision applies the orientation
    of JPEG and PNG itself; any other format that carries one (WebP, TIFF) goes to PIL.
    """
    if data.startswith(_PNG_SIGNATURE):
        return (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")), False
    if data.startswith(b"\xff\xd8") and (size := _jpeg_size(data)) is not None:
        return size, False
    try:
        with _pil_settings(), Image.open(io.BytesIO(data)) as image:
            oriented = image.format != "JPEG" and image.getexif().get(_EXIF_ORIENTATION, 1) != 1
            return image.size, oriented
    except Exception:  # PIL raises many types on damaged headers; the decoders below name the problem
        return None, False


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame segment, skipping the segments before it (EXIF, ICC...).

    By hand because PIL's lazy open, which also reads every marker, costs ~15% of decoding a 256px JPEG; None on
    anything unexpected (PIL then has a look)."""
    i = 2
    while i + 9 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _JPEG_SOF:
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """A PIL image as uint8 RGB ``[3, H, W]``, as :func:`decode_image` gives its file: upright by its EXIF
    orientation, alpha dropped, and samples of more than 8 bits brought to 8 by their range:

    - 16-bit grey (I;16, I;16B...): scaled, 65535 -> 255, as 16-bit PNGs are;
    - 32-bit integer grey (I, as TIFFs store it): read as 16-bit when every sample lies in [0, 65535] (what
      16-bit data saved as 32-bit holds); anything else has no known white and is refused (ValueError);
    - 32-bit float grey (F): samples in [0, 1] scaled, 1.0 -> 255; any other value (or NaN) is refused.

    PIL's own convert("RGB") would clip integers at 255 and truncate floats to 0 or 1, both silently.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode == "F":
        samples = np.asarray(image, dtype=np.float64)
        if samples.size and not (np.isfinite(samples).all() and samples.min() >= 0 and samples.max() <= 1):
            raise ValueError(f"32-bit float samples (mode F) outside [0, 1] (from {np.nanmin(samples):g} to "
                             f"{np.nanmax(samples):g}): no known white; save it as 8- or 16-bit, or scaled to [0, 1]")
        grey = torch.from_numpy(np.rint(samples * 255).astype(np.uint8))
        return grey.expand(3, -1, -1).contiguous()
    if image.mode.startswith("I"):
        samples = np.asarray(image, dtype=np.int64)
        if samples.size and (samples.min() < 0 or samples.max() > 65535):
            raise ValueError(f"integer samples (mode {image.mode}) outside [0, 65535] (from {samples.min()} "
                             f"to {samples.max()}): no known white; save it as 8- or 16-bit")
        tensor = TF.to_dtype(torch.from_numpy(samples.astype(np.uint16)), torch.uint8, scale=True)
        return tensor.expand(3, -1, -1).contiguous()
    try:
        rgb = np.asarray(image.convert("RGB"))  # alpha (RGBA, LA, P with transparency) is dropped, as torchvision does
    except ValueError:
        raise ValueError(f"image mode {image.mode} cannot be converted to RGB") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def _pil_decode(path: str, data: bytes) -> torch.Tensor:
    try:
        with _pil_settings(), Image.open(io.BytesIO(data)) as image:
            image.load()
            return pil_to_uint8(image)
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not a recognised image format (or a corrupt header)") from None
    # PIL's format plugins raise many unrelated types (OSError, SyntaxError, ValueError, struct.error...)
    # on damaged data; all of them mean the same thing here.
    except Exception as err:
        raise ImageDecodeError(path, first_line(err)) from None


def decode_image(path: str, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Decode an image file to uint8 RGB ``[3, H, W]``, upright by its EXIF orientation; alpha is dropped, samples
    of more than 8 bits are scaled to 8 by their range (16-bit, 32-bit integer and float: see :func:`pil_to_uint8`,
    which refuses those without a known white).

    torchvision's decoder (faster than PIL) handles PNG/JPEG/WebP/GIF; anything it rejects is retried with PIL.
    A missing, empty, corrupt or truncated file, or one of more than `max_pixels` pixels (read from its header,
    before anything is decoded: a small file can hold a huge image), raises :class:`ImageDecodeError`.
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
    size, oriented = _inspect(data)
    if size is not None and size[0] * size[1] > max_pixels:
        raise ImageDecodeError(path, f"{size[0]}x{size[1]} pixels, over the limit of {max_pixels} "
                                     "(--max-image-pixels)")
    if oriented:
        return _pil_decode(path, data)
    try:
        image = tv_decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                                apply_exif_orientation=True)
    except RuntimeError:
        return _pil_decode(path, data)
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

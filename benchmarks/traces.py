"""Forgery traces for the learnability benchmark: textured scenes, and face-swap-like manipulations of them.

Every fake carries one trace, its ``method``, in a region blended into (or pasted over) the scene; reals are the
same scenes untouched. The families are the evidence the face-swap literature finds in manipulated faces:

- ``resample``: the region was down-scaled 2-3x and scaled back (bilinear): resampling / warping (FWA, Li & Lyu 2019);
- ``denoise``: the region keeps only 15-40% of the scene's sensor grain: a noise-level mismatch (noiseprint, SRM);
- ``colour``: the region's colour is scaled by 15-25% per channel: a colour / illumination step (Face X-ray);
- ``sharpen``: the region went through an unsharp mask: the over-sharpened swaps of FF++ post-processing;
- ``double_jpeg``: the region was JPEG-compressed at quality 40-75 on an 8x8 grid shifted by 1-7 pixels from the
  frame's, the rest never was: a misaligned / double compression (Bianchi & Piva 2012);
- ``splice``: the region comes from another scene: a splicing boundary (CASIA, Columbia);
- ``checkerboard``: the region was down-scaled 2x and up-scaled by pixel repetition: a generator's up-sampling
  artefacts (Zhang et al. 2019, AutoGAN).

All but ``splice`` are blended in through a soft-edged ellipse (a face swap's blending mask); ``splice`` is
pasted through a hard-edged one.

Each image is a function of (seed, index, method) alone, and the scene of index i is the same whatever its
method, so two datasets that differ in their fakes' method share their reals image for image.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

TRACES = ("resample", "denoise", "colour", "sharpen", "double_jpeg", "splice", "checkerboard")
REAL = "real"
GRAIN = 24.0  # std of the scene's sensor grain, in 0-255 units


def scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured scene as (content, grain), float32 [H, W, 3] in 0-255 units: a colour gradient and a few
    sharp-edged shapes, and the fine sensor grain over them (kept apart so a trace can remove part of it)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b = rng.uniform(40, 215, (2, 3)).astype(np.float32)
    angle = rng.uniform(0, np.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    content = a * (1 - t) + b * t
    for _ in range(int(rng.integers(3, 7))):
        cx, cy, rx, ry = rng.uniform(0, 1, 2).tolist() + rng.uniform(0.08, 0.3, 2).tolist()
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        content[inside] = rng.uniform(20, 235, 3).astype(np.float32)
    return content, rng.normal(0, GRAIN, content.shape).astype(np.float32)


def region(rng: np.random.Generator, size: int, soft: float = 0.15) -> np.ndarray:
    """The forged region: an ellipse somewhere in the middle of the image, [H, W, 1] in [0, 1], its edge a linear
    ramp ``soft`` radius units wide (0: a hard edge)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx, cy = rng.uniform(0.3, 0.7, 2)
    rx, ry = rng.uniform(0.2, 0.32, 2)
    r = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    if soft == 0:
        return (r < 1).astype(np.float32)[..., None]
    return np.clip((1 - r) / soft, 0, 1)[..., None]


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8))


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    _pil(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"), np.float32)


def _manipulated(method: str, content: np.ndarray, grain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The whole image as the forger's source for ``method``; the caller blends it in through a region."""
    image = content + grain
    size = image.shape[0]
    if method == "resample":
        low = max(4, round(size / rng.uniform(2.0, 3.0)))
        return np.asarray(_pil(image).resize((low, low), Image.BILINEAR).resize((size, size), Image.BILINEAR),
                          np.float32)
    if method == "denoise":
        return content + grain * np.float32(rng.uniform(0.15, 0.4))
    if method == "colour":
        gain = rng.choice([-1.0, 1.0], 3) * rng.uniform(0.15, 0.25, 3)
        return image * (1 + gain).astype(np.float32)
    if method == "sharpen":
        sharpen = ImageFilter.UnsharpMask(radius=1, percent=int(rng.integers(150, 251)), threshold=0)
        return np.asarray(_pil(image).filter(sharpen), np.float32)
    if method == "double_jpeg":
        dy, dx = rng.integers(1, 8, 2).tolist()  # the patch's 8x8 grid does not line up with the frame's
        shifted = np.roll(image, (dy, dx), axis=(0, 1))
        return np.roll(_jpeg(shifted, int(rng.integers(40, 76))), (-dy, -dx), axis=(0, 1))
    if method == "splice":
        other, other_grain = scene(rng, size)
        return other + other_grain
    if method == "checkerboard":
        half = max(2, size // 2)
        return np.asarray(_pil(image).resize((half, half), Image.BOX).resize((size, size), Image.NEAREST),
                          np.float32)
    raise ValueError(f"unknown trace {method!r} (expected one of {', '.join(TRACES)})")


def trace_image(index: int, method: str, size: int = 64, seed: int = 0) -> np.ndarray:
    """Image ``index`` as uint8 [H, W, 3]: the scene alone (``method`` "real"), or carrying that trace."""
    rng = np.random.default_rng([seed, index])
    content, grain = scene(rng, size)
    if method == REAL:
        image = content + grain
    else:
        # The fake's own draws come from a second stream: the scene does not depend on the method.
        fake_rng = np.random.default_rng([seed, index, 1 + TRACES.index(method) if method in TRACES else 0])
        mask = region(fake_rng, size, soft=0.0 if method == "splice" else 0.15)
        source = _manipulated(method, content, grain, fake_rng)
        image = content + grain + (source - content - grain) * mask
    image += rng.normal(0, 1.0, image.shape)  # light sensor noise over everything, forged region included
    return np.clip(image, 0, 255).round().astype(np.uint8)


def write_set(root: Path, name: str, items: Sequence[tuple[int, str]], size: int = 64, seed: int = 0) -> Path:
    """Write manifest ``root/name.csv`` (path, label, method) of images (index, method), each saved once as
    ``root/images/<method>_<index>.png`` and shared by every set that lists it; returns the manifest."""
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, method in items:
        path = folder / f"{method}_{index:05d}.png"
        if not path.is_file():
            Image.fromarray(trace_image(index, method, size, seed)).save(path, compress_level=1)
        rows.append((f"images/{path.name}", int(method != REAL), method))
    manifest = root / f"{name}.csv"
    pd.DataFrame(rows, columns=["path", "label", "method"]).to_csv(manifest, index=False)
    return manifest


def split_items(start: int, count: int, methods: Sequence[str]) -> list[tuple[int, str]]:
    """Indices start..start+count-1, alternately real and fake; the fakes take ``methods`` in turn."""
    return [(i, REAL if (i - start) % 2 == 0 else methods[((i - start) // 2) % len(methods)])
            for i in range(start, start + count)]

"""Self-blended fakes (``--self-blend``), as published by Shiohara & Yamasaki, "Detecting Deepfakes with
Self-Blended Images", CVPR 2022.

A real face crop becomes a fake by blending a slightly altered copy of itself back over it through a soft,
deformed face mask: the result carries the generic traces of a face swap (a blending boundary, a colour and
frequency mismatch, resampling) and none of any one manipulation method's own, which is what lets a detector
trained on it hold on methods it never saw. The recipe, step by step (this project's own code, written from the
paper's published description):

1. Source and target are two copies of the crop; one of them (the source or the target, even odds) is transformed:
   an RGB shift of up to 20 levels (p=0.3), brightness and contrast within 10%, then either a downscale by 2 or 4
   (nearest) and back up (bilinear) or a sharpen (alpha 0.2-0.5, lightness 0.5-1). The published hue, saturation
   and value shift of +-0.3 is in OpenCV's uint8 units, under one level, less than the brightness step: left out.
2. Mask: the filled convex hull of the 68 landmarks (:mod:`stage2.data.landmarks`), one of four shapes drawn per
   fake as published (its plain hull alone scored lower): the hull, the hull extended up over the forehead, the
   face's components (eyes and brows, nose, mouth) and the inner face (without the brows and the jaw's outer
   edge). A crop without landmarks (no face found, or ``--blend-mask ellipse``) takes an ellipse around the centre
   with a randomly waved outline, stage-one crops being face-centred.
3. Source and mask move together by a small affine (x +-3%, y +-1.5%, scale 0.95-1/0.95); the mask alone then gets
   an elastic deformation (alpha 50, sigma 7 at a 320 px crop, the middle of the published 256-380 px, scaled
   with the crop).
4. The mask is resized to a random 192-256 x 192-256 px, blurred (odd kernel 5-25), renormalised and cut below 1
   (an erosion), blurred again (odd kernel 5-25, sigma 5-45), renormalised and resized back.
5. fake = r*mask*source + (1 - r*mask)*target, with r drawn from {0.25, 0.5, 0.75, 1, 1, 1}.

It runs on the decoded crop at its own resolution, before the resize to the model's input size; the real paired
with its fake (``--self-blend paired``) is the target, transformed or not, so the two differ inside the mask only.
Every draw comes from torch's default generator, which :class:`~stage2.data.dataset.ManifestDataset` seeds per
(seed, epoch, index): the same images for any number of workers or ranks, from the files or the decoded cache.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from stage2.data.decode import resize_uint8
from stage2.data.levels import BLEND_PARTS, PAIRED
from stage2.errors import ConfigError

BLEND_RATIOS = (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)  # how much of the source shows through, as published
ELASTIC_SIDE = 320  # the crop side (px) at which the published elastic alpha 50, sigma 7 apply
HULL_SHAPES = ("hull", "extended", "components", "inner")
# iBUG 68-point groups
JAW, BROWS, NOSE, EYES, MOUTH = (slice(0, 17), slice(17, 27), slice(27, 36), slice(36, 48), slice(48, 68))
_CV_SIGMA = 0.3  # (kernel side - 1) / 2 - 1 -> sigma, as OpenCV derives a Gaussian's sigma from its kernel


def _uniform(low: float, high: float) -> float:
    return float(torch.rand(()) * (high - low) + low)


def _randint(low: int, high: int) -> int:
    """An integer in [low, high], both included."""
    return int(torch.randint(low, high + 1, ()))


def _odd(low: int, high: int) -> int:
    """An odd integer in [low, high]."""
    return low + 2 * _randint(0, (high - low) // 2)


def _blur(x: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """Gaussian blur of a float [..., H, W] tensor over its last two axes (an odd `kernel`-tap window), mirrored at
    the border as OpenCV does; scipy's separable filters, several times faster here than torch's conv2d."""
    radius = kernel // 2
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    x = x.numpy()
    for axis in (-1, -2):
        x = ndimage.correlate1d(x, taps, axis=axis, mode="mirror")
    return torch.from_numpy(x)


def ellipse_mask(height: int, width: int) -> torch.Tensor:
    """A hard face-shaped mask, float [H, W] of 0 and 1: an ellipse around the centre (the inner face of a
    face-centred crop), its outline waved by a few random low-frequency waves."""
    cx, cy = 0.5 + _uniform(-0.05, 0.05), 0.5 + _uniform(-0.03, 0.08)
    ax, ay = _uniform(0.22, 0.34), _uniform(0.28, 0.42)  # half-axes, fractions of the side
    dx = ((torch.arange(width, dtype=torch.float32) + 0.5) / width - cx) / ax
    dy = ((torch.arange(height, dtype=torch.float32) + 0.5) / height - cy) / ay
    radius, angle = torch.sqrt(dx[None, :] ** 2 + dy[:, None] ** 2), torch.atan2(dy[:, None], dx[None, :])
    edge = torch.ones_like(angle)
    for k in (2, 3, 4):
        edge += _uniform(-0.08, 0.08) * torch.cos(k * angle + _uniform(0, 2 * math.pi))
    return (radius < edge).float()


def hull_mask(points: np.ndarray, height: int, width: int, shapes: tuple[str, ...] = HULL_SHAPES
              ) -> torch.Tensor | None:
    """A hard face mask, float [H, W] of 0 and 1, from 68 landmarks (x, y) in the crop's pixels: one of `shapes`
    (of HULL_SHAPES), drawn. None when the landmarks cover too little of the crop (under 1%) to blend through."""
    shape = shapes[_randint(0, len(shapes) - 1)]
    if shape == "extended":  # the brows lifted a third of the way from the chin to the nose's top: the forehead
        lift = (points[27] - points[8]) * 0.33
        parts = [np.concatenate([points, points[BROWS] + lift])]
    elif shape == "components":
        parts = [points[np.r_[BROWS, EYES]], points[NOSE], points[MOUTH]]
    elif shape == "inner":
        parts = [points[np.r_[3:14, 27:68]]]
    else:
        parts = [points]
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for part in parts:
        part = np.clip(part, 0, [width - 1, height - 1])
        try:
            hull = part[ConvexHull(part).vertices]
        except QhullError:  # all points on a line (a degenerate detection): nothing to fill
            continue
        draw.polygon([tuple(p) for p in hull.tolist()], fill=1)
    mask = torch.from_numpy(np.asarray(canvas, dtype=np.float32))
    return mask if mask.mean() >= 0.01 else None


def altered(image: torch.Tensor) -> torch.Tensor:
    """Step 1's transform of a uint8 [3, H, W] copy: RGB shift (p=0.3), brightness and contrast, then a downscale
    or a sharpen; uint8."""
    x = image.float()
    if torch.rand(()) < 0.3:
        x = x + (torch.rand(3, 1, 1) * 40 - 20)
    x = (x * _uniform(0.9, 1.1) + _uniform(-0.1, 0.1) * 255).clamp(0, 255).round()
    height, width = x.shape[-2:]
    if torch.rand(()) < 0.5:
        factor = (2, 4)[_randint(0, 1)]
        low = TF.resize(x, [max(1, height // factor), max(1, width // factor)],
                        interpolation=TF.InterpolationMode.NEAREST)
        x = TF.resize(low, [height, width], interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
    else:
        alpha, lightness = _uniform(0.2, 0.5), _uniform(0.5, 1.0)
        # (1 - alpha) * identity + alpha * [[-1, -1, -1], [-1, 8 + lightness, -1], [-1, -1, -1]], by way of the
        # 3x3 sum (box filter x 9) of each channel
        neighbours = torch.from_numpy(ndimage.uniform_filter(x.numpy(), size=(1, 3, 3), mode="mirror")) * 9 - x
        x = x * (1 - alpha + alpha * (8 + lightness)) - alpha * neighbours
    return x.clamp(0, 255).round().to(torch.uint8)


def _warped(source: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: source (float [3, H, W]) and mask (float [H, W]) moved by one small affine, then the mask deformed
    elastically."""
    height, width = mask.shape
    tx, ty, scale = _uniform(-0.03, 0.03), _uniform(-0.015, 0.015), _uniform(0.95, 1 / 0.95)
    # output -> input, in grid_sample's [-1, 1] coordinates: scaled about the centre, then shifted
    theta = torch.tensor([[[1 / scale, 0, -2 * tx / scale], [0, 1 / scale, -2 * ty / scale]]])
    grid = F.affine_grid(theta, [1, 1, height, width], align_corners=False)
    source = F.grid_sample(source[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    mask = F.grid_sample(mask[None, None], grid, mode="nearest", align_corners=False)
    # The published field: uniform noise in [-1, 1] a pixel, blurred (sigma 7) and scaled by alpha 50, in pixels of
    # a 320 px crop. Drawn on a 4x coarser grid (the blurred noise's spread grows with the grid step: alpha / 4),
    # then upsampled: the same smooth field for 1/16 of the work.
    px = min(height, width) / ELASTIC_SIDE  # crop pixels per reference pixel
    coarse = [max(2, math.ceil(height / (4 * px))), max(2, math.ceil(width / (4 * px)))]
    sigma = 7 / 4
    field = _blur(torch.rand(2, 1, *coarse) * 2 - 1, 2 * math.ceil(4 * sigma) + 1, sigma) * (50 / 4) * px
    field = F.interpolate(field, size=[height, width], mode="bilinear", align_corners=True)[:, 0]
    base = F.affine_grid(torch.eye(2, 3)[None], [1, 1, height, width], align_corners=False)
    shift = torch.stack([field[0] * 2 / width, field[1] * 2 / height], dim=-1)[None]
    mask = F.grid_sample(mask, base + shift, mode="nearest", padding_mode="zeros", align_corners=False)
    return source, mask[0, 0]


def _softened(mask: torch.Tensor) -> torch.Tensor:
    """Step 4: the hard mask (float [H, W]) made soft at a random 192-256 px scale; float [H, W] in [0, 1]."""
    height, width = mask.shape
    size = [_randint(192, 256), _randint(192, 256)]
    x = F.interpolate(mask[None, None], size=size, mode="bilinear", align_corners=False)
    first = _odd(5, 25)
    x = _blur(x, first, _CV_SIGMA * ((first - 1) / 2 - 1) + 0.8)
    x = x / x.max().clamp_min(1e-6)
    x = torch.where(x < 1, 0.0, x)  # only what the blur left whole: the mask eroded by the kernel's radius
    x = _blur(x, _odd(5, 25), float(_randint(5, 45)))
    x = x / x.max().clamp_min(1e-6)
    return F.interpolate(x, size=[height, width], mode="bilinear", align_corners=False)[0, 0].clamp_(0, 1)


def self_blended(image: torch.Tensor, points: np.ndarray | None = None, transforms: bool = True,
                 shapes: tuple[str, ...] = HULL_SHAPES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(target, fake, mask) of a uint8 [3, H, W] crop: the real (the target copy, transformed or not), its
    self-blended fake (uint8 [3, H, W]), and the mask it was blended through with its ratio (float [1, H, W]).
    `points`: the crop's 68 landmarks (float [68, 2], x and y in its pixels), or None for the ellipse mask;
    `transforms` False leaves step 1 out (an ablation: source and target the same crop), `shapes` the hull shapes
    drawn from."""
    height, width = image.shape[-2:]
    source, target = image, image
    if transforms and torch.rand(()) < 0.5:
        source = altered(image)
    elif transforms:
        target = altered(image)
    hard = hull_mask(points, height, width, shapes) if points is not None else None
    if hard is None:
        hard = ellipse_mask(height, width)
    moved, hard = _warped(source.float(), hard)
    ratio = BLEND_RATIOS[_randint(0, len(BLEND_RATIOS) - 1)]
    mask = (_softened(hard) * ratio)[None]
    fake = moved * mask + target.float() * (1 - mask)
    return target, fake.round_().clamp_(0, 255).to(torch.uint8), mask


class SelfBlend:
    """Which reals become fakes, and how: ``p`` the chance that a real becomes its fake (a float in [0, 1]), or
    ``"paired"``: every real comes with its fake. ``landmarks``: float [N, 68, 2] by dataset row (NaN: none, the
    ellipse mask), or None for ellipse masks throughout. ``without``: the recipe's parts left out (of BLEND_PARTS,
    ``--blend-without``, for ablations); leaving out ``crop-size`` blends at ``size``, the model's input size."""

    def __init__(self, p: float | str, landmarks: np.ndarray | None = None, without: tuple[str, ...] = (),
                 size: int | None = None) -> None:
        self.paired = p == PAIRED
        if not self.paired and not (isinstance(p, (int, float)) and 0 <= p <= 1):
            raise ConfigError(f"--self-blend {p}: expected a chance in [0, 1] or {PAIRED}")
        if unknown := set(without) - set(BLEND_PARTS):
            raise ConfigError(f"--blend-without {','.join(sorted(unknown))}: expected some of {', '.join(BLEND_PARTS)}")
        if "crop-size" in without and not size:
            raise ConfigError("--blend-without crop-size: blending after the resize needs the input size")
        self.p = p
        self.landmarks = landmarks
        self.without = tuple(without)
        self.size = size
        # fixed for the run: read once here, not per image
        self._shapes = HULL_SHAPES[:1] if "shapes" in without else HULL_SHAPES
        self._transforms = "transforms" not in without
        self._at_input_size = "crop-size" in without

    def blends(self, label: int) -> bool:
        """Whether this image's item is made by blending (a real: with chance p, or always when paired)."""
        return label == 0 and (self.paired or bool(torch.rand(()) < self.p))

    def __call__(self, image: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(real, fake) of the uint8 crop of dataset row `index`, at its own resolution (at the input size without
        ``crop-size``)."""
        points = None if self.landmarks is None else self.landmarks[index]
        if points is not None and np.isnan(points).any():
            points = None
        if self._at_input_size:
            height, width = image.shape[-2:]
            image = resize_uint8(image, self.size)
            points = None if points is None else points * np.array([self.size / width, self.size / height],
                                                                   dtype=np.float32)
        target, fake, _ = self_blended(image, points, transforms=self._transforms, shapes=self._shapes)
        return target, fake

    def __repr__(self) -> str:
        masks = "ellipse" if self.landmarks is None else "landmarks"
        without = f", without={','.join(self.without)}" if self.without else ""
        return f"SelfBlend({self.p!r}, masks={masks}{without})"

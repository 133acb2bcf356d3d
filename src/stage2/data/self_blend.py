"""Self-blended fakes (``--self-blend P``), after Shiohara & Yamasaki, "Detecting Deepfakes with Self-Blended
Images", CVPR 2022.

With chance P a real training crop becomes a fake: a copy of it with its colour, sharpness, scale and position
slightly changed is blended back over it through a soft, randomly deformed face-shaped mask. The result carries
the generic traces of a face swap (a blending boundary, a colour and frequency mismatch, resampling) and none of
any one manipulation method's own, which is what lets a detector trained on it hold on methods it never saw.

Stage-one crops are face-centred, so the mask is an ellipse around the centre (the inner face), its edge
deformed by a few random low-frequency waves, grown or shrunk, blurred by a random amount and scaled by a
blend ratio (as SBI: 1 half the time, else 0.25, 0.5 or 0.75). No landmarks are used.

Runs per image on the uint8 crop at the model's input size, in the loader workers, before the other CPU
augmentation; every draw comes from torch's default generator, which
:class:`~stage2.data.dataset.ManifestDataset` seeds per (seed, epoch, index): the same images for any number of
workers or ranks, from the files or the decoded cache.
"""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import v2

from stage2.errors import ConfigError

BLEND_RATIOS = (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)  # SBI's choice of how much of the copy shows through


def _uniform(low: float, high: float, n: int = 1) -> torch.Tensor:
    return torch.rand(n) * (high - low) + low


def face_mask(size: int) -> torch.Tensor:
    """A soft, randomly deformed face-shaped mask, float [1, S, S] in [0, 1], at most 1 near the centre."""
    cx, cy = 0.5 + _uniform(-0.05, 0.05).item(), 0.5 + _uniform(-0.03, 0.08).item()
    ax, ay = _uniform(0.22, 0.34).item(), _uniform(0.28, 0.42).item()  # half-axes, fractions of the side
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    dx, dy = (coords[None, :] - cx) / ax, (coords[:, None] - cy) / ay
    radius, angle = torch.sqrt(dx**2 + dy**2), torch.atan2(dy, dx)
    edge = torch.ones_like(angle)
    for k in (2, 3, 4):  # low-frequency waves on the outline: no two masks have the same shape
        edge += _uniform(-0.08, 0.08).item() * torch.cos(k * angle + _uniform(0, 2 * math.pi).item())
    mask = (radius < edge).float()[None]
    sigma = _uniform(0.02, 0.08).item() * size
    mask = TF.gaussian_blur(mask, kernel_size=2 * math.ceil(3 * sigma) + 1, sigma=sigma)
    mask = mask / mask.max().clamp_min(1e-6)
    ratio = BLEND_RATIOS[int(torch.randint(len(BLEND_RATIOS), ()).item())]
    return mask * ratio


def jittered_copy(image: torch.Tensor) -> torch.Tensor:
    """The blended-in source, float [3, S, S] in 0-255: ``image`` (uint8) with its colour, then sharpness or
    resolution, then scale and position changed a little (the last by a bilinear warp: resampling traces)."""
    size = image.shape[-1]
    source = v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02)(image)
    shift = (torch.rand(3) * 0.1 - 0.05).mul(255).round().to(torch.int16).view(3, 1, 1)  # RGB shift, +-5%
    source = (source.to(torch.int16) + shift).clamp(0, 255).to(torch.uint8)
    if torch.rand(()) < 0.5:
        source = TF.adjust_sharpness(source, _uniform(1.5, 3.0).item())
    else:
        low = max(1, round(size * _uniform(0.6, 0.95).item()))
        source = TF.resize(TF.resize(source, [low, low], antialias=True), [size, size], antialias=True)
    # Warped with a reflected border around it, so no fill colour moves in from the edges.
    pad = math.ceil(0.06 * size)
    padded = torch.nn.functional.pad(source[None].float(), [pad] * 4, mode="reflect")[0]
    translate = (_uniform(-0.03, 0.03, 2) * size).tolist()
    warped = TF.affine(padded, angle=0.0, translate=translate, scale=_uniform(0.95, 1.05).item(),
                       shear=[0.0, 0.0], interpolation=TF.InterpolationMode.BILINEAR)
    return warped[:, pad:pad + size, pad:pad + size]


def self_blended(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A self-blended fake of a uint8 [3, S, S] crop, and the mask it was blended through (float [1, S, S])."""
    mask = face_mask(image.shape[-1])
    blended = image.float() * (1 - mask) + jittered_copy(image) * mask
    return blended.round_().clamp_(0, 255).to(torch.uint8), mask


class SelfBlend:
    """``(image, label) -> (image, label)``: with chance ``p`` a real uint8 crop becomes a self-blended fake."""

    def __init__(self, p: float) -> None:
        if not 0 <= p <= 1:
            raise ConfigError(f"--self-blend {p}: expected a chance in [0, 1]")
        self.p = p

    def __call__(self, image: torch.Tensor, label: int) -> tuple[torch.Tensor, int]:
        if label != 0 or torch.rand(()) >= self.p:
            return image, label
        return self_blended(image)[0], 1

    def __repr__(self) -> str:
        return f"SelfBlend(p={self.p})"

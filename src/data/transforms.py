"""Augmentation for face-forgery crops, split into a cheap CPU part and a batched device part.

Forgery evidence lives in small things: the blending boundary, resampling traces, a colour step
at the mask edge. So the geometric part stays mild (no RandomResizedCrop down to 8 %: it crops the
boundary away), and the photometric part imitates what real-world copies go through (re-compression,
blur, noise, colour drift) so the detector cannot rely on pristine pixels.

CPU (per image, uint8, in the DataLoader workers): JPEG re-compression only, since it needs a real
codec. Device (per batch, float): flip, mild scale/shift, colour jitter, Gaussian blur, Gaussian
noise, random erasing, then the model's own normalisation. Everything per image that can be
batched runs on the device, where it is nearly free; workers return uint8 so a batch costs 1/4 of
float32 in shared memory, and a worker core feeds several times more images per second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.transforms import v2

AUG_LEVELS = ("none", "light", "standard", "strong")


@dataclass(frozen=True)
class AugConfig:
    """Strengths for one augmentation level; probabilities are per image."""

    flip: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    translate: float = 0.0
    jpeg_p: float = 0.0
    jpeg_quality: tuple[int, int] = (60, 100)
    jitter_p: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    noise_p: float = 0.0
    noise_std: tuple[float, float] = (0.0, 0.03)
    erase_p: float = 0.0
    erase_area: tuple[float, float] = (0.02, 0.15)


AUG_CONFIGS: dict[str, AugConfig] = {
    "none": AugConfig(),
    "light": AugConfig(flip=0.5, scale=(0.95, 1.05), translate=0.03, jitter_p=0.5, brightness=0.1,
                       contrast=0.1, saturation=0.1),
    "standard": AugConfig(flip=0.5, scale=(0.9, 1.1), translate=0.05, jpeg_p=0.5, jitter_p=0.8,
                          brightness=0.2, contrast=0.2, saturation=0.2, blur_p=0.2, noise_p=0.2, erase_p=0.25),
    "strong": AugConfig(flip=0.5, scale=(0.85, 1.15), translate=0.08, jpeg_p=0.7, jpeg_quality=(50, 100),
                        jitter_p=0.9, brightness=0.3, contrast=0.3, saturation=0.3, blur_p=0.35,
                        blur_sigma=(0.1, 2.0), noise_p=0.35, noise_std=(0.0, 0.05), erase_p=0.4,
                        erase_area=(0.02, 0.25)),
}


def aug_config(level: str) -> AugConfig:
    if level not in AUG_CONFIGS:
        raise ValueError(f"--aug {level!r}: expected one of {', '.join(AUG_LEVELS)}")
    return AUG_CONFIGS[level]


def build_cpu_transform(level: str) -> v2.Transform | None:
    """Per-image uint8 -> uint8 transform run in the loader workers; None when there is nothing to do."""
    cfg = aug_config(level)
    if cfg.jpeg_p == 0:
        return None
    return v2.RandomApply([v2.JPEG(quality=cfg.jpeg_quality)], p=cfg.jpeg_p)


def _uniform(n: int, low: float, high: float, like: torch.Tensor, generator: torch.Generator | None):
    return torch.rand(n, device=like.device, generator=generator) * (high - low) + low


def _chance(n: int, p: float, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, device=like.device, generator=generator) < p


class DeviceTransform(nn.Module):
    """uint8 [B,3,H,W] batch -> normalised float batch, with per-image random augmentation in training.

    torchvision's v2 transforms draw one set of parameters per call, so calling them on a batch would
    give every image the same jitter and blur, and calling them per image costs a kernel launch
    each. The photometric ops here are therefore written batched, with parameters drawn per image.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], level: str = "none"):
        super().__init__()
        self.cfg = aug_config(level)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = images.float().div_(255)
        if self.training:
            x = self._augment(x, generator)
        return (x - self.mean) / self.std

    def _augment(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        cfg, b = self.cfg, x.shape[0]
        if cfg.flip > 0 or cfg.scale != (1.0, 1.0) or cfg.translate > 0:
            x = self._flip_scale_shift(x, g)
        if cfg.jitter_p > 0:
            x = self._jitter(x, _chance(b, cfg.jitter_p, x, g), g)
        if cfg.blur_p > 0:
            blurred = _gaussian_blur(x, _uniform(b, *cfg.blur_sigma, x, g))
            x = torch.where(_chance(b, cfg.blur_p, x, g).view(b, 1, 1, 1), blurred, x)
        if cfg.noise_p > 0:
            std = _uniform(b, *cfg.noise_std, x, g) * _chance(b, cfg.noise_p, x, g)
            noise = torch.randn(x.shape, device=x.device, generator=g)
            x = (x + noise * std.view(b, 1, 1, 1)).clamp_(0, 1)
        if cfg.erase_p > 0:
            x = self._erase(x, _chance(b, cfg.erase_p, x, g), g)
        return x

    def _flip_scale_shift(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        """Horizontal flip plus a mild zoom and shift, one affine matrix per image (zero fill, like
        v2.RandomAffine); no rotation or shear, which would smear the pixel-level traces."""
        cfg, b = self.cfg, x.shape[0]
        sign = 1 - 2 * _chance(b, cfg.flip, x, g).to(x.dtype)
        inv_scale = 1 / _uniform(b, *cfg.scale, x, g)
        theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = sign * inv_scale
        theta[:, 1, 1] = inv_scale
        theta[:, :, 2] = _uniform(2 * b, -2 * cfg.translate, 2 * cfg.translate, x, g).view(b, 2)
        grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        return nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _jitter(self, x: torch.Tensor, apply: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        cfg, b = self.cfg, x.shape[0]

        def factor(strength: float) -> torch.Tensor:
            f = _uniform(b, 1 - strength, 1 + strength, x, g)
            return torch.where(apply, f, torch.ones_like(f)).view(b, 1, 1, 1)

        x = x * factor(cfg.brightness)
        gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = (x - gray.mean(dim=(2, 3), keepdim=True)) * factor(cfg.contrast) + gray.mean(dim=(2, 3), keepdim=True)
        gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = (x - gray) * factor(cfg.saturation) + gray
        return x.clamp_(0, 1)

    def _erase(self, x: torch.Tensor, apply: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        """Cutout: one rectangle per chosen image, filled with uniform noise (RandomErasing's 'random')."""
        b, _, h, w = x.shape
        area = _uniform(b, *self.cfg.erase_area, x, g)
        log_ratio = _uniform(b, math.log(0.3), math.log(3.3), x, g)
        ratio = log_ratio.exp()
        eh = (area * ratio).sqrt().mul(h).clamp(1, h)
        ew = (area / ratio).sqrt().mul(w).clamp(1, w)
        top = _uniform(b, 0, 1, x, g) * (h - eh)
        left = _uniform(b, 0, 1, x, g) * (w - ew)
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        inside = ((rows >= top.view(b, 1, 1)) & (rows < (top + eh).view(b, 1, 1))
                  & (cols >= left.view(b, 1, 1)) & (cols < (left + ew).view(b, 1, 1)))
        mask = (inside & apply.view(b, 1, 1)).unsqueeze(1)
        fill = torch.rand(x.shape, device=x.device, generator=g)
        return torch.where(mask, fill, x)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image, as a grouped convolution over the batch."""
    b, c, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets.view(1, -1) / sigma.view(-1, 1).clamp_min(1e-3)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [b*c, k]
    flat = x.reshape(1, b * c, h, w)
    flat = nn.functional.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = nn.functional.conv2d(flat, kernel.view(b * c, 1, 1, -1), groups=b * c)
    flat = nn.functional.conv2d(flat, kernel.view(b * c, 1, -1, 1), groups=b * c)
    return flat.view(b, c, h, w)

"""Augmentation for face-forgery crops that keeps the forgery traces: a CPU part and a batched device part.

The evidence a stage-two expert learns lives in single pixels: resampling traces, the blending boundary, a
colour step at the mask edge. Every op was checked against that with ``python -m benchmarks.learn`` (a plain
flip-only loop vs each level, clean and perturbed val; BENCHMARKS.md has the table):

- Geometry is exact: the flip is a tensor flip and the shift moves whole pixels (reflect padding), so no
  image is ever interpolated. The bilinear flip/zoom/shift this module used to apply to every image smeared the
  traces away (clean AUC 0.73 vs the plain loop's 0.98).
- Degradations that weaken a trace but leave it learnable (JPEG, noise) are there for robustness: one of them,
  on a few images (``degrade_p``), so most keep their pixels as they are, and only in the second half of the
  epochs (``degrade_from``): from the first step they cost up to 7% of the clean AUC on the traces they weaken
  most (a noise-level mismatch, a double JPEG) at 3 epochs. On 15% of the images a JPEG of the whole crop still
  cost a double-JPEG trace 2.5% at 8 epochs (it puts block artefacts on the reals too); on 8% the default meets
  0.98x the plain loop's clean AUC on every trace type at 3 and 8 epochs, with a higher perturbed mean
  (BENCHMARKS.md, three seeds).
- Left out on purpose: resampling zoom, blur and down-scaling erase resampling traces outright (a blurred real
  and a blurred fake look alike), and cutout can hide the forged region; each turns part of the batch into
  label noise. Trained on, blur and down-scaling even lowered the AUC on blurred and down-scaled images.
  ``stage2.data.perturb`` still applies them, to measure robustness.
- Colour jitter changes no pixel-level trace but costs signal on a short budget: ``strong`` only.

CPU (per image, uint8, in the DataLoader workers): the degradations, since JPEG needs a real codec and the
others then run in the same place. Device (per batch): flip, shift and jitter, then the
model's own normalisation; workers return uint8, so a batch costs 1/4 of float32 in shared memory. A run's
`Augmentation` holds both parts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.transforms import v2

from stage2.data.levels import AUG_LEVELS
from stage2.data.perturb import Perturbation, parse_perturbations
from stage2.errors import ConfigError

# The degradations `standard` draws from, strengths drawn per image; `strong` goes further.
DEGRADATIONS = "jpeg:50-95,noise:0.005-0.03"
STRONG_DEGRADATIONS = "jpeg:30-95,noise:0.005-0.04"


@dataclass(frozen=True)
class AugConfig:
    """Chances (per image) and strengths of one augmentation level."""

    flip: float = 0.0  # exact horizontal flip
    shift: float = 0.0  # largest whole-pixel shift, as a fraction of the side
    degrade_p: float = 0.0  # one of `degrade` (a stage2.data.perturb spec)
    degrade: str = DEGRADATIONS
    degrade_from: float = 0.0  # fraction of the epochs trained on clean images before degradations start
    jitter_p: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0


AUG_CONFIGS: dict[str, AugConfig] = {
    "none": AugConfig(),
    "light": AugConfig(flip=0.5, shift=0.03),
    "standard": AugConfig(flip=0.5, shift=0.03, degrade_p=0.08, degrade_from=0.5),
    # For long runs on large data (BENCHMARKS.md, learnability).
    "strong": AugConfig(flip=0.5, shift=0.06, degrade_p=0.35, degrade=STRONG_DEGRADATIONS, degrade_from=0.5,
                        jitter_p=0.3, brightness=0.1, contrast=0.1, saturation=0.1),
}


def aug_config(level: str) -> AugConfig:
    if level not in AUG_CONFIGS:
        raise ConfigError(f"--aug {level!r}: expected one of {', '.join(AUG_LEVELS)}")
    return AUG_CONFIGS[level]


class Degradations:
    """The CPU part of a level: with chance ``p`` one of ``choices`` (drawn per image), from epoch ``start`` on.

    :meth:`set_epoch` (which :class:`~stage2.data.dataset.ManifestDataset` forwards) says which epoch is loading.
    """

    def __init__(self, choices: list[Perturbation], p: float, start: int = 0) -> None:
        self.apply = v2.RandomApply([v2.RandomChoice(choices)], p=p)
        self.start = start
        self.epoch = start

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.apply(image) if self.epoch >= self.start else image

    def __repr__(self) -> str:
        return f"Degradations({self.apply.transforms[0].transforms}, p={self.apply.p}, from epoch {self.start + 1})"


def build_cpu_transform(level: str, epochs: int | None = None) -> Degradations | None:
    """Per-image uint8 -> uint8 transform run in the loader workers; None when there is nothing to do.

    ``epochs`` is the run's length, which places the level's ``degrade_from``; without it the degradations apply
    from the start."""
    cfg = aug_config(level)
    if cfg.degrade_p == 0:
        return None
    start = math.ceil(cfg.degrade_from * epochs) if epochs else 0
    return Degradations(parse_perturbations(cfg.degrade), cfg.degrade_p, start)


def _uniform(n: int, low: float, high: float, like: torch.Tensor, generator: torch.Generator | None):
    return torch.rand(n, device=like.device, generator=generator) * (high - low) + low


def _chance(n: int, p: float, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, device=like.device, generator=generator) < p


class Normalise(nn.Module):
    """Pixels in [0, 1] <-> the model's normalised input, per channel, as buffers that follow the module's device.

    Written here rather than torchvision's v2.Normalize because GenConViT's reconstruction loss also needs the
    inverse (normalised input -> pixels), and the ONNX export needs the normalisation inside its graph.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse: normalised input -> float32 pixels in [0, 1] (on x's device)."""
        return x.float() * self.std.to(x.device) + self.mean.to(x.device)


class DeviceTransform(nn.Module):
    """uint8 [B,3,H,W] batch -> normalised float batch, with per-image random augmentation in training.

    torchvision's v2 transforms draw one set of parameters per call, so calling them on a batch would
    give every image the same shift and jitter, and calling them per image costs a kernel launch
    each. The ops here are therefore written batched, with parameters drawn per image.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], level: str = "none"):
        super().__init__()
        self.cfg = aug_config(level)
        self.normalise = Normalise(mean, std)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None,
                draws: torch.Tensor | None = None) -> torch.Tensor:
        """`draws` (int64 [B], a Batch's): the image whose random draw each one takes, so that a real and its
        self-blended fake get the same flip, shift and jitter; None: each its own."""
        x = images.float().div_(255)
        if self.training:
            x = self._augment(x, generator, draws)
        return self.normalise(x)

    def _augment(self, x: torch.Tensor, g: torch.Generator | None, draws: torch.Tensor | None) -> torch.Tensor:
        cfg, b = self.cfg, x.shape[0]

        def shared(values: torch.Tensor) -> torch.Tensor:
            return values if draws is None else values[draws]

        if cfg.flip > 0:
            x = torch.where(shared(_chance(b, cfg.flip, x, g)).view(b, 1, 1, 1), x.flip(-1), x)
        if cfg.shift > 0:
            x = self._shift(x, g, shared)
        if cfg.jitter_p > 0:
            x = self._jitter(x, shared(_chance(b, cfg.jitter_p, x, g)), g, shared)
        return x

    def _shift(self, x: torch.Tensor, g: torch.Generator | None,
               shared: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Move each image by whole pixels (up to `shift` of its side), filling the border by reflection.

        A crop of the reflect-padded batch: every output pixel is an input pixel, nothing is interpolated.
        """
        b, c, h, w = x.shape
        m = min(round(self.cfg.shift * min(h, w)), h - 1, w - 1)
        if m == 0:
            return x
        padded = nn.functional.pad(x, (m, m, m, m), mode="reflect")
        top = shared(torch.randint(0, 2 * m + 1, (b,), device=x.device, generator=g))
        left = shared(torch.randint(0, 2 * m + 1, (b,), device=x.device, generator=g))
        rows = (top.view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1).expand(b, c, h, w + 2 * m)
        x = padded.gather(2, rows)
        cols = (left.view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w).expand(b, c, h, w)
        return x.gather(3, cols)

    def _jitter(self, x: torch.Tensor, apply: torch.Tensor, g: torch.Generator | None,
                shared: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        cfg, b = self.cfg, x.shape[0]

        def factor(strength: float) -> torch.Tensor:
            f = shared(_uniform(b, 1 - strength, 1 + strength, x, g))
            return torch.where(apply, f, torch.ones_like(f)).view(b, 1, 1, 1)

        x = x * factor(cfg.brightness)
        gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = (x - gray.mean(dim=(2, 3), keepdim=True)) * factor(cfg.contrast) + gray.mean(dim=(2, 3), keepdim=True)
        gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = (x - gray) * factor(cfg.saturation) + gray
        return x.clamp_(0, 1)


@dataclass(frozen=True)
class Augmentation:
    """One run's --aug level, both parts: `in_workers`, the per-image degradations the loader workers run (None:
    the level has none), and `on_device`, the batched flip, shift and jitter, then the model's normalisation."""

    in_workers: Degradations | None
    on_device: DeviceTransform

    @property
    def degrade_start(self) -> int | None:
        """The 0-based epoch the degradations begin at; None when the level has none."""
        return None if self.in_workers is None else self.in_workers.start


def build_augmentation(level: str, epochs: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Augmentation:
    """--aug `level` for a run of `epochs` epochs, normalising with the model's `mean` and `std`."""
    return Augmentation(build_cpu_transform(level, epochs), DeviceTransform(mean, std, level))

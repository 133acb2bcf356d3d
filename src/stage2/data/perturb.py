"""Named, deterministic perturbations of the kind real uploads go through: JPEG, down-scaling, blur, noise.

They measure robustness: the learnability benchmark scores every model on perturbed copies of its val set
with them, and ``--evaluate --perturb`` does the same for a checkpoint. JPEG and noise, which weaken forgery
traces without erasing them, also augment training (``stage2.data.transforms``). A spec is a comma list of
``KIND:VALUE`` with VALUE a number or a ``LOW-HIGH`` range drawn per image:

    jpeg:50      JPEG re-compression at quality 50 (jpeg:50-70: a quality drawn per image)
    down:0.5     down-scale by 0.5 (antialiased) and back up (bilinear): what a re-upload at lower size does
    blur:1.0     Gaussian blur with that sigma in pixels
    noise:0.02   additive Gaussian noise with that std, in [0, 1] pixel units

Each works on a uint8 ``[3, H, W]`` crop (at the model's input size) and returns one of the same size. The
random draws come from torch's default generator, which :class:`~stage2.data.dataset.ManifestDataset` seeds per
(seed, epoch, index): a perturbed set is the same image for image every time it is scored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF

from stage2.errors import ConfigError

KINDS = ("jpeg", "down", "blur", "noise")
_BOUNDS = {"jpeg": (1, 100), "down": (0.05, 1.0), "blur": (0.01, 20.0), "noise": (0.0, 1.0)}
# VALUE or LOW-HIGH, each a plain non-negative decimal (1e-3 too: the range's dash is not an exponent's minus).
_NUMBER = r"(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_VALUE = re.compile(rf"(?P<low>{_NUMBER})(?:-(?P<high>{_NUMBER}))?")


@dataclass(frozen=True)
class Perturbation:
    """One perturbation: ``kind`` in :data:`KINDS`, strength ``low`` (or drawn in [low, high] per image)."""

    kind: str
    low: float
    high: float

    @property
    def name(self) -> str:
        value = _fmt(self.low) if self.low == self.high else f"{_fmt(self.low)}-{_fmt(self.high)}"
        return f"{self.kind}:{value}"

    def _strength(self) -> float:
        if self.low == self.high:
            return self.low
        if self.kind == "jpeg":
            return float(torch.randint(int(self.low), int(self.high) + 1, ()).item())
        return self.low + (self.high - self.low) * float(torch.rand(()).item())

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        value = self._strength()
        if self.kind == "jpeg":
            return TF.jpeg(image, quality=int(value))
        if self.kind == "down":
            h, w = image.shape[-2:]
            small = TF.resize(image, [max(1, round(h * value)), max(1, round(w * value))], antialias=True)
            return TF.resize(small, [h, w], antialias=True)
        if self.kind == "blur":
            return TF.gaussian_blur(image, kernel_size=2 * math.ceil(3 * value) + 1, sigma=value)
        noisy = image.float() / 255 + torch.randn(image.shape) * value
        return noisy.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


def parse_perturbations(spec: str) -> list[Perturbation]:
    """``"jpeg:50,down:0.5,blur:1.0,noise:0.02"`` -> perturbations; ConfigError naming the bad item.

    JPEG qualities are whole numbers (jpeg:50.5 is refused rather than silently applied as 50).
    """
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise ConfigError(f"--perturb {spec!r}: no perturbation given (e.g. jpeg:50,down:0.5,blur:1.0,noise:0.02)")
    out = []
    for item in items:
        kind, _, value = item.partition(":")
        if kind not in KINDS or not value:
            raise ConfigError(f"--perturb {spec!r}: item {item!r} is not KIND:VALUE with KIND one of "
                              f"{', '.join(KINDS)}")
        match = _VALUE.fullmatch(value)
        if match is None:
            raise ConfigError(f"--perturb {spec!r}: item {item!r} has a bad number")
        lo, hi = float(match["low"]), float(match["high"] or match["low"])
        bound_lo, bound_hi = _BOUNDS[kind]
        if not bound_lo <= lo <= hi <= bound_hi:
            raise ConfigError(f"--perturb {spec!r}: {kind} takes values in [{bound_lo:g}, {bound_hi:g}], got {value}")
        if kind == "jpeg" and not (lo.is_integer() and hi.is_integer()):
            raise ConfigError(f"--perturb {spec!r}: jpeg takes a whole quality in [1, 100], got {value}")
        out.append(Perturbation(kind, lo, hi))
    return out


def check_image_size(perturbations: list[Perturbation], size: int) -> None:
    """ConfigError, before any image is scored, for a perturbation that cannot work on `size`-pixel crops: a
    blur whose kernel (radius ceil(3 sigma), reflect-padded) is wider than the crop."""
    for p in perturbations:
        if p.kind == "blur" and math.ceil(3 * p.high) > size - 1:
            largest = math.floor((size - 1) / 3 * 100) / 100
            raise ConfigError(f"--perturb {p.name}: a blur of sigma {p.high:g} needs a crop of more than "
                             f"{math.ceil(3 * p.high)} pixels; the model's input is {size}px "
                             f"(at most blur:{largest:g})")


def _fmt(value: float) -> str:
    return f"{value:g}"

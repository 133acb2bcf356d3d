"""Sections 1 and 2: images/s per loader-worker core, ours vs the classic recipe vs decode alone, and the same
from the decoded cache.

Everything runs in this one process on one thread, which is what one DataLoader worker gets (PyTorch sets
one thread per worker), so the figures are per core.
"""

from __future__ import annotations

import io
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T

from benchmarks.data import SIZE
from benchmarks.timing import Row, derived, interleaved, row
from stage2.data.cache import DecodedCache
from stage2.data.dataset import ManifestDataset, collate
from stage2.data.decode import decode_image
from stage2.data.perturb import parse_perturbations
from stage2.data.transforms import AUG_CONFIGS, DeviceTransform, build_cpu_transform

LEVEL = "standard"
DEVICE_BATCH = 16
DEVICE = "ours: device aug on CPU"


class PILJpeg:
    """JPEG re-compression the way the classic recipes write it: tensor to PIL, save to memory, open again."""

    def __init__(self, quality: tuple[float, float]):
        self.quality = quality

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        buffer = io.BytesIO()
        quality = int(torch.randint(int(self.quality[0]), int(self.quality[1]) + 1, ()))
        T.functional.to_pil_image(x).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        return T.functional.to_tensor(Image.open(buffer).convert("RGB"))


class GaussianNoise:
    """Additive noise with a std drawn per image, clamped to [0, 1]."""

    def __init__(self, std: tuple[float, float]):
        self.std = std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        std = self.std[0] + (self.std[1] - self.std[0]) * float(torch.rand(()))
        return (x + torch.randn_like(x) * std).clamp(0, 1)


def classic_transform() -> T.Compose:
    """The baseline: torchvision transforms v1 on PIL images, with our `standard` chances and strengths."""
    cfg = AUG_CONFIGS[LEVEL]
    shift = round(cfg.shift * SIZE)
    degrade = {p.kind: (p.low, p.high) for p in parse_perturbations(cfg.degrade)}
    return T.Compose(
        [
            T.RandomHorizontalFlip(cfg.flip),
            T.RandomCrop(SIZE, padding=shift, padding_mode="reflect"),
            T.ToTensor(),
            T.RandomApply([T.RandomChoice([PILJpeg(degrade["jpeg"]), GaussianNoise(degrade["noise"])])], cfg.degrade_p),
            T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ]
    )


def _classic_item(path: str, transform: T.Compose) -> torch.Tensor:
    with Image.open(path) as image:
        return transform(image.convert("RGB"))


def _pil_decode(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _over(n: int, fn: Callable[[int], object]) -> Callable[[], int]:
    def run() -> int:
        for i in range(n):
            fn(i)
        return n

    return run


def input_pipeline(frame: pd.DataFrame, work: Path, *, warmup: int, repeats: int) -> list[Row]:
    """Rows of section 1 (from PNG files) and section 2 (from the decoded cache), measured side by side."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(frame, work, warmup, repeats)
    finally:
        torch.set_num_threads(threads)


def _measure(frame: pd.DataFrame, work: Path, warmup: int, repeats: int) -> list[Row]:
    paths, n = frame["path"].tolist(), len(frame)
    cpu_tf = build_cpu_transform(LEVEL)
    ours = ManifestDataset(frame, SIZE, transform=cpu_tf, seed=0)
    classic = classic_transform()

    build_rates, slots = [], None
    for i in range(max(repeats // 2, 1)):
        # A fresh folder each time: the build is what a first run pays once per dataset.
        folder = work / f"cache_build_{i}"
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        slots = DecodedCache(folder, SIZE).prepare(paths, workers=1)
        build_rates.append(n / (time.perf_counter() - start))
    view = DecodedCache(folder, SIZE).view(slots)
    cached = ManifestDataset(frame, SIZE, cache=view)
    cached_ours = ManifestDataset(frame, SIZE, transform=cpu_tf, seed=0, cache=view)

    # The device-side half of our augmentation, on this CPU: what a CPU-only box pays on top.
    device_tf = DeviceTransform(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, LEVEL).train()
    batches = [
        collate([cached[j] for j in range(i, min(i + DEVICE_BATCH, n))]).images for i in range(0, n, DEVICE_BATCH)
    ]
    generator = torch.Generator().manual_seed(0)

    def device_aug() -> int:
        for images in batches:
            device_tf(images, generator=generator)
        return n

    rates = interleaved(
        {
            "decode only (torchvision)": _over(n, lambda i: decode_image(paths[i])),
            "decode only (PIL)": _over(n, lambda i: _pil_decode(paths[i])),
            "classic recipe": _over(n, lambda i: _classic_item(paths[i], classic)),
            "ours": _over(n, ours.__getitem__),
            DEVICE: device_aug,
            "cache read only": _over(n, cached.__getitem__),
            "cache + ours": _over(n, cached_ours.__getitem__),
        },
        warmup=warmup,
        repeats=repeats,
    )
    s1, s2 = "1 input/core", "2 cache/core"

    def measured(section: str, case: str, **kwargs) -> Row:
        baseline = None if case == "classic recipe" else "classic recipe"
        return row(section, case, rates[case], baseline=baseline, group="input", **kwargs)

    ours_rate, cache_rate, device_rate = (float(np.median(rates[k])) for k in ("ours", "cache + ours", DEVICE))
    return [
        measured(s1, "decode only (torchvision)"),
        measured(s1, "decode only (PIL)"),
        measured(s1, "classic recipe", note="PIL + transforms v1: flip, shift, ToTensor, JPEG or noise, Normalize"),
        measured(s1, "ours", note="worker part: decode + JPEG or noise (flip and shift run batched on the device)"),
        measured(s1, DEVICE, note=f"DeviceTransform('{LEVEL}') on this CPU, batch {DEVICE_BATCH}, per image"),
        derived(
            s1,
            "ours incl. device aug on CPU",
            ours_rate,
            device_rate,
            baseline="classic recipe",
            note="a CPU-only box does both on its cores",
        ),
        row(s2, "cache build", build_rates, note="decode + resize + write, one worker process"),
        measured(s2, "cache read only"),
        # Repeated here so that each ratio reads against a row of its own table.
        measured(s2, "classic recipe", note="the same runs as in section 1"),
        measured(s2, "cache + ours", note="worker part from the cache: read + JPEG or noise"),
        derived(s2, "cache + ours incl. device aug on CPU", cache_rate, device_rate, baseline="classic recipe"),
    ]

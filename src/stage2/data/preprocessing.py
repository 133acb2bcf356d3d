"""The preprocessing a model expects, in timm's data-config terms: input size, normalisation and the resize.

A `DataConfig` is made once, by the model family or the expert (`Expert.data_config`), and passed down to the
loaders, the device transform, the settings line and the exporters. Checkpoints keep timm's dict (`to_dict`, read
back with `from_dict`), so the checkpoint schema and its checksum are those of before.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stage2.data.decode import RESIZE_CONFIG


@dataclass(frozen=True)
class DataConfig:
    """A square input of `size` pixels, normalised per channel with `mean` and `std` (of [0, 1] pixels), reached by
    the loaders' resize (stage2.data.decode.resize_uint8: the whole image squashed to size x size, bilinear)."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = RESIZE_CONFIG["interpolation"]
    crop_pct: float = RESIZE_CONFIG["crop_pct"]
    crop_mode: str = RESIZE_CONFIG["crop_mode"]

    @classmethod
    def of(cls, size: int, mean: Sequence[float], std: Sequence[float]) -> DataConfig:
        """The loaders' resize to `size`, then this normalisation."""
        return cls(size, tuple(float(v) for v in mean), tuple(float(v) for v in std))

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> DataConfig:
        """A checkpoint's data config. Whatever resize an older one names, its images went through the loaders'."""
        return cls.of(int(config["input_size"][-1]), config["mean"], config["std"])

    def to_dict(self) -> dict[str, Any]:
        """timm's dict, as checkpoints record it: input_size [3, S, S], mean, std, interpolation, crop_pct,
        crop_mode (`timm.data.create_transform(**config)` rebuilds the preprocessing from it)."""
        return {"input_size": [3, self.size, self.size], "mean": list(self.mean), "std": list(self.std), **self.resize}

    @property
    def resize(self) -> dict[str, Any]:
        """The resize alone, in timm's keys."""
        return {"interpolation": self.interpolation, "crop_pct": self.crop_pct, "crop_mode": self.crop_mode}

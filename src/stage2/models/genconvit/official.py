"""Official GenConViT checkpoints: strict loading and the class order of their logits.

The official files (``genconvit_ed_inference.pth``, ``genconvit_vae_inference.pth``) hold a raw state_dict;
upstream training checkpoints wrap it as ``{"state_dict": ..., "epoch", "optimizer", "min_loss"}``. Both
carry an inert Swin-tiny twice (``embedder.*`` and ``<backbone>.patch_embed.*``) in timm 0.6.5's layout, which
no forward pass uses; those keys are dropped and every other key must match exactly.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from stage2.errors import OfficialCheckpointError, first_line
from stage2.models.weights_file import file_format

logger = logging.getLogger(__name__)

# Official logits follow torchvision ImageFolder order over `fake/`, `real/`; project labels use 1 = fake.
FAKE_INDEX = 0
REAL_INDEX = 1

SWIN_PREFIXES = ("embedder.", "backbone.patch_embed.", "convnext_backbone.patch_embed.")
OFFICIAL_IMG_SIZE = 224  # the official weights were trained on 224px crops


@dataclass(frozen=True)
class LoadReport:
    variant: Literal["ed", "vae"]
    loaded: int
    dropped_swin: int


def targets_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """Project labels (1 = fake, 0 = real) -> class indices for cross-entropy over official-order logits."""
    if ((labels != 0) & (labels != 1)).any():
        raise ValueError(f"labels must be 0 (real) or 1 (fake), got values {labels.unique().tolist()}")
    return torch.where(labels == 1, FAKE_INDEX, REAL_INDEX)


def fake_logit(logits: torch.Tensor) -> torch.Tensor:
    """[B, 2] logits -> [B] log-odds of fake; ``sigmoid(fake_logit(l)) == softmax(l)[:, FAKE_INDEX]``."""
    return logits[:, FAKE_INDEX] - logits[:, REAL_INDEX]


def official_vae_sizes(weights: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Input size and latent channels from an official VAE's encoder ``mu`` head (official: 224px, 256 channels)."""
    latent, flat = weights["encoder.mu.weight"].shape  # latent_channels*(S/32)^2, 128*(S/16)^2
    side = 16 * math.isqrt(flat // 128)
    return {"img_size": side, "latent_channels": latent // (side // 32) ** 2}


def detect_variant(keys: Iterable[str]) -> Literal["ed", "vae"]:
    """Which official model a state_dict belongs to, from its top-level module names."""
    tops = {key.split(".", 1)[0] for key in keys}
    if "convnext_backbone" in tops:
        return "vae"
    if "backbone" in tops:
        return "ed"
    raise OfficialCheckpointError(
        f"not a GenConViT checkpoint: no 'backbone' or 'convnext_backbone' keys (top level: {sorted(tops)})"
    )


def read_state_dict(path_or_state: str | os.PathLike | Mapping[str, object]) -> dict[str, torch.Tensor]:
    """A raw or ``{'state_dict': ...}``-wrapped state_dict from a file or an in-memory mapping; anything else is
    an OfficialCheckpointError naming the file."""
    source = "state_dict" if isinstance(path_or_state, Mapping) else os.fspath(path_or_state)
    if isinstance(path_or_state, Mapping):
        state = path_or_state
    else:
        if not os.path.isfile(path_or_state):
            raise OfficialCheckpointError(f"{source}: no such file")
        if file_format(path_or_state) != "torch":  # the unpickler reads other files as nonsense ("KeyError: 101")
            raise OfficialCheckpointError(f"{source}: not a PyTorch checkpoint (what torch.save writes)")
        try:
            state = torch.load(path_or_state, map_location="cpu", weights_only=True)
        except Exception as err:  # a damaged checkpoint
            raise OfficialCheckpointError(
                f"{source}: cannot load checkpoint ({type(err).__name__}: {first_line(err)})"
            ) from err
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise OfficialCheckpointError(f"{source}: expected a state_dict (mapping), got {type(state).__name__}")
    bad = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise OfficialCheckpointError(f"{source}: state_dict entries that are not tensors: {_names(bad)}")
    return dict(state)


def load_official_checkpoint(
    model: nn.Module, path_or_state: str | os.PathLike | Mapping[str, object], assign: bool = False
) -> LoadReport:
    """Load official GenConViT weights into ``model``: Swin keys dropped, everything else strict.

    ``assign=True`` adopts the checkpoint's tensors instead of copying them, so a model built under
    ``torch.device("meta")`` loads the 2.8 GB VAE without allocating and initialising it first.

    Raises:
        OfficialCheckpointError: naming any missing or unexpected key, or any shape mismatch.
    """
    source = "state_dict" if isinstance(path_or_state, Mapping) else os.fspath(path_or_state)
    state = read_state_dict(path_or_state)
    try:
        variant = detect_variant(state)
    except OfficialCheckpointError as err:
        raise OfficialCheckpointError(f"{source}: {err}") from None
    kept = {key: value for key, value in state.items() if not key.startswith(SWIN_PREFIXES)}
    dropped = len(state) - len(kept)
    expected = model.state_dict()
    missing = [key for key in expected if key not in kept]
    unexpected = [key for key in kept if key not in expected]
    if missing or unexpected:
        raise OfficialCheckpointError(
            f"{source}: {variant} checkpoint does not match the model: "
            f"missing {_names(missing)}; unexpected {_names(unexpected)}"
        )
    mismatched = [
        f"{key} {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
        for key, value in kept.items()
        if value.shape != expected[key].shape
    ]
    if mismatched:
        raise OfficialCheckpointError(f"{source}: {variant} checkpoint shape mismatch: {_names(mismatched)}")
    model.load_state_dict(kept, strict=True, assign=assign)
    logger.info(
        "%s: GenConViT-%s loaded %d keys, dropped %d Swin keys (embedder/patch_embed: never called "
        "upstream, timm 0.6.5 layout)",
        source,
        variant.upper(),
        len(kept),
        dropped,
    )
    return LoadReport(variant, len(kept), dropped)


def _names(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more

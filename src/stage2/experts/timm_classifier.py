"""The local-artefact expert: any timm classifier (EfficientNetV2-B3 by default) with one logit."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stage2.data.preprocessing import DataConfig
from stage2.errors import ConfigError, PretrainedWeightsError
from stage2.experts.base import Expert
from stage2.models.families import FAMILIES, TimmFamily
from stage2.models.names import TUNE_MODES
from stage2.models.recipes import EFFNET
from stage2.models.timm_models import create_timm_model, timm_data_config

log = logging.getLogger(__name__)

# The normalisation layers --tune norm trains (timm's BatchNormAct2d, LayerNorm2d and GroupNorm1 subclass these).
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


class TimmExpert(Expert):
    """A timm backbone with a one-logit head trained with BCE-with-logits.

    `pos_weight` ("auto", None or a number) scales the loss of fake (positive) samples, e.g. n_real / n_fake for an
    imbalanced manifest; `label_smoothing` pulls targets towards 0.5 by that amount. `tune` (TUNE_MODES) is what
    trains: every weight, the normalisation layers' affine parameters and the head (the lever GenD reports for
    generalisation from a pretrained backbone: it tunes only a CLIP encoder's LayerNorms), or the head alone over a
    frozen backbone.
    """

    family: TimmFamily = FAMILIES["timm"]

    def __init__(
        self,
        model_name: str,
        *,
        img_size: int,
        pretrained: bool = EFFNET.model["pretrained"],
        pretrained_file: str | Path | None = None,
        drop_path_rate: float | None = EFFNET.model["drop_path"],
        pos_weight: str | float | None = EFFNET.model["pos_weight"],
        label_smoothing: float = EFFNET.model["label_smoothing"],
        tune: str = EFFNET.model["tune"],
    ):
        if tune not in TUNE_MODES:
            raise ConfigError(f"--tune {tune!r}: expected one of {', '.join(TUNE_MODES)}")
        self.tune = tune
        self.model_name = model_name
        self.img_size = img_size
        self.pretrained = pretrained
        self.pretrained_file = pretrained_file
        self.drop_path_rate = drop_path_rate
        self.pos_weight = _parse_pos_weight(pos_weight)
        self.pos_weight_setting = self.pos_weight  # before "auto" is resolved from the training labels
        self.label_smoothing = label_smoothing

    def build_model(self) -> nn.Module:
        model = self._create()
        # The one-logit head is always new. Start it at zero, so every image starts at P(fake) = 0.5 (loss ln 2):
        # timm's EfficientNet init draws a 1-output head from U(-1, 1), which gave logits of +-5 and a first-epoch
        # loss of 3 that the demo spent epochs working off, with large gradients into a pretrained backbone.
        head = model.get_classifier()
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        if self.tune != "all":
            # Built frozen, a parameter stays frozen in every stage (the trainer reads requires_grad once, here).
            tuned = {id(p) for p in head.parameters()}
            if self.tune == "norm":
                tuned |= {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters()}
            for p in model.parameters():
                p.requires_grad_(id(p) in tuned)
        return model

    def train_mode(self, model: nn.Module) -> None:
        """With --tune head the backbone is a fixed feature extractor: in eval mode, so that its BatchNorm running
        statistics, dropout and stochastic depth stay as loaded; only the head trains. With --tune norm the
        normalisation layers train, statistics included."""
        if self.tune == "head":
            model.eval()
            model.get_classifier().train()
        else:
            model.train()

    def _create(self) -> nn.Module:
        try:
            return create_timm_model(
                self.model_name,
                pretrained=self.pretrained,
                pretrained_file=self.pretrained_file,
                num_classes=1,
                drop_path_rate=self.drop_path_rate,
            )
        except PretrainedWeightsError as err:
            if self.pretrained_file is not None:
                raise PretrainedWeightsError(f"--pretrained-file: {err}") from err
            raise PretrainedWeightsError(f"{err}; offline, pass --pretrained-file PATH (safetensors or .pth) or "
                                         "--no-pretrained") from err

    def prepare(self, n_real: float, n_fake: float) -> None:
        if self.pos_weight == "auto":
            self.pos_weight = n_real / n_fake
            log.info("--pos-weight auto: %.3g (%.6g real / %.6g fake images trained per epoch)", self.pos_weight,
                     n_real, n_fake)

    def data_config(self, model: nn.Module) -> DataConfig:
        return timm_data_config(model, self.img_size)

    def checkpoint_meta(self) -> dict[str, Any]:
        return self.family.meta(self.model_name)

    def loss(self, outputs: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = outputs.squeeze(1).float()
        target = labels.float() * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        # "auto" stays unresolved in --evaluate runs, which never read the training manifest.
        weight = self.pos_weight if isinstance(self.pos_weight, float) else None
        pos_weight = None if weight is None else logits.new_tensor(weight)
        bce = nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")
        return {"loss": bce}

    def recipe(self) -> dict[str, Any]:
        return {"pos_weight": self.pos_weight_setting, "label_smoothing": self.label_smoothing,
                "drop_path": self.drop_path_rate, "tune": self.tune}

    def for_checkpoint(self, data_config: DataConfig, settings: Mapping[str, Any]) -> TimmExpert:
        """With its run's --pos-weight and --label-smoothing."""
        scored = copy.copy(self)
        scored.label_smoothing = settings.get("label_smoothing", self.label_smoothing)
        scored.pos_weight = scored.pos_weight_setting = _parse_pos_weight(
            settings.get("pos_weight", self.pos_weight_setting))
        return scored

    def describe(self) -> dict[str, Any]:
        source = self.pretrained_file or ("hub" if self.pretrained else "none (random init)")
        return {"model": self.model_name, "pretrained": source, "pos_weight": self.pos_weight,
                "label_smoothing": self.label_smoothing, "tune": self.tune}


def _parse_pos_weight(value: str | float | None) -> str | float | None:
    if value is None or value == "none":
        return None
    if value == "auto":
        return "auto"
    try:
        weight = float(value)
    except ValueError:
        raise ConfigError(f"--pos-weight {value!r}: expected auto, none or a positive number") from None
    if not (math.isfinite(weight) and weight > 0):
        raise ConfigError(f"--pos-weight {value!r}: expected auto, none or a positive number")
    return weight

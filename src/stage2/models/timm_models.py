"""timm models by name, with offline-friendly pretrained weights and the data config.

Any timm model name works; the design notes' `efficientnetv2_b3.in21k_ft_in1k` is accepted as an
alias of timm's real name. Pretrained weights come from the hub when online, or from a local file
(`--pretrained-file`, read by stage2.models.weights_file), which is how GPU boxes without internet access use them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
from torch import nn

from stage2.data.preprocessing import DataConfig
from stage2.errors import ConfigError, PretrainedWeightsError, first_line
from stage2.models.names import MODEL_ALIASES
from stage2.models.weights_file import load_weights_file

log = logging.getLogger(__name__)


def resolve_model_name(name: str) -> str:
    """Map an alias to its timm name, saying so, and reject names timm does not know."""
    resolved = MODEL_ALIASES.get(name, name)
    if resolved != name:
        log.info("model %s is not a timm name: using %s", name, resolved)
    if not timm.is_model(resolved):
        raise ConfigError(f"--model {name!r}: timm has no such model (see timm.list_models())")
    return resolved


def create_timm_model(
    name: str,
    *,
    pretrained: bool = True,
    pretrained_file: str | Path | None = None,
    num_classes: int = 1,
    drop_path_rate: float | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """A timm classifier with `num_classes` outputs (0: pooled features); the pretrained head is
    dropped when sizes differ.

    `pretrained_file` (safetensors or a torch checkpoint) replaces the hub download and must hold every tensor of
    the model but its classifier (stage2.models.weights_file); with `pretrained=False` and no file the weights are
    random. A download or file that fails raises PretrainedWeightsError (the caller names its own flags).
    """
    kwargs: dict[str, Any] = {"num_classes": num_classes, **model_kwargs}
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if pretrained_file is not None:
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_weights_file(model, pretrained_file, name)
        return model
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as err:
        if not pretrained:
            raise
        # The caller adds which of its flags give a local file instead.
        raise PretrainedWeightsError(
            f"could not download pretrained weights for {name} ({type(err).__name__}: {first_line(err)})"
        ) from err


def timm_data_config(model: nn.Module, img_size: int) -> DataConfig:
    """Mean and std from the model's pretrained config (never hard-coded), the input size trained at, and the
    resize every loader applies (not the pretrained config's bicubic centre crop: images are never cropped)."""
    cfg = timm.data.resolve_data_config({}, model=model)
    return DataConfig.of(img_size, cfg["mean"], cfg["std"])



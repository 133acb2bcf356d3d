"""Model families: what a checkpoint records about each kind of expert model, and how it is rebuilt and read.

A checkpoint records its family ("timm" or "genconvit") and the arguments that rebuild its model; the family
writes that record (``meta``) and reads it back (``build``). The trainer, the feature extractor, the exporter and
the benchmarks ask that family (rebuild, embedding and fake-logit read-out, native export format, GenConViT's
official files), never switch on a model name: another kind of expert adds a family here and an Expert (its
training recipe) in ``src/stage2/experts``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import get_arch_name, get_pretrained_cfg, save_for_hf
from torch import nn

from stage2.data.preprocessing import DataConfig
from stage2.errors import CheckpointError
from stage2.models.genconvit import (
    OFFICIAL_IMG_SIZE,
    build_genconvit,
    detect_variant,
    fake_logit,
    load_official_checkpoint,
    official_vae_sizes,
)
from stage2.models.names import CONVNEXT_NAME
from stage2.models.timm_models import create_timm_model, resolve_model_name
from stage2.models.weights_file import mismatched_keys


class ReadOut(NamedTuple):
    """What a family reads off one forward pass."""

    embeddings: torch.Tensor  # [B, D]: the activation the last linear layer reads
    fake_logit: torch.Tensor  # [B]: what that layer gives, as log-odds of "fake"
    recon: torch.Tensor | None = None  # [B, 3, H, W]: a generative expert's reconstruction, in [0, 1] pixels

    def recon_error(self, pixels: torch.Tensor) -> torch.Tensor | None:
        """Per-image MSE of the reconstruction against the input `pixels` in [0, 1] (GenConViT's reconstruction
        loss term), float32 [B]; None for an expert that does not reconstruct."""
        if self.recon is None:
            return None
        return (self.recon.float() - pixels.float()).pow(2).flatten(1).mean(dim=1)


class MetaKey(NamedTuple):
    """A key of a family's meta that ``build`` reads: whether a value is usable, and what that means in words."""

    usable: Callable[[Any], bool]
    expected: str
    required: bool = True


MODEL_NAME = MetaKey(lambda v: isinstance(v, str) and bool(v), "a model name", required=False)


class ModelFamily:
    """What every family provides; `embed` and `fake_logit` agree: embed's logit is the fake logit."""

    name: str
    #: What ``build`` reads of a checkpoint's meta (an edited key is named, not a KeyError deep in a constructor).
    meta_keys: dict[str, MetaKey] = {}
    #: Files `export_native` writes (beyond the ONNX file every family gets, see stage2.embeddings.export).
    native_files: tuple[str, ...] = ()

    def check_meta(self, meta: Mapping[str, Any]) -> None:
        """CheckpointError naming the first of `meta_keys` that `meta` lacks or holds an unusable value of."""
        for key, check in self.meta_keys.items():
            if key not in meta:
                if check.required:
                    raise CheckpointError(f"model family {self.name!r} without {key!r} ({check.expected})")
            elif not check.usable(meta[key]):
                raise CheckpointError(f"model family {self.name!r} with {key} {meta[key]!r}: expected "
                                      f"{check.expected}")

    def build(self, meta: Mapping[str, Any]) -> nn.Module:
        """The (randomly initialised) model a checkpoint's metadata (this family's ``meta``) describes; nothing is
        downloaded."""
        raise NotImplementedError

    def fake_logit(self, outputs: Any) -> torch.Tensor:
        """Log-odds of "fake" per sample, [B], from the model's forward output: P(fake) = sigmoid of it."""
        raise NotImplementedError

    def embed(self, model: nn.Module, x: torch.Tensor) -> ReadOut:
        """The embeddings, fake logits (and a reconstruction, for a generative expert) of a normalised batch."""
        raise NotImplementedError

    def classifier(self, model: nn.Module) -> nn.Linear:
        """The last linear layer (its input is the embedding)."""
        raise NotImplementedError

    def same_model(self, requested: str, recorded: str) -> bool:
        """Whether a model name someone asks for names the model a checkpoint records."""
        return requested == recorded

    def export_native(self, model: nn.Module, out: Path, data_config: DataConfig) -> list[str]:
        """Write the family's own standard format into `out` (none by default); returns the file names."""
        return []


class TimmFamily(ModelFamily):
    """Any timm classifier with a one-logit head (EfficientNetV2-B3 by default)."""

    name = "timm"
    native_files = ("model.safetensors", "config.json")
    meta_keys = {"model_name": MODEL_NAME,
                 "num_classes": MetaKey(lambda v: type(v) is int and v >= 1, "a positive integer (1: one logit)")}

    def meta(self, model_name: str) -> dict[str, Any]:
        """What a checkpoint records to rebuild the model (read back by ``build``)."""
        return {"family": self.name, "model_name": model_name, "num_classes": 1}

    def build(self, meta: Mapping[str, Any]) -> nn.Module:
        return create_timm_model(meta["model_name"], pretrained=False, num_classes=meta["num_classes"])

    def fake_logit(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.squeeze(1).float()

    def embed(self, model: nn.Module, x: torch.Tensor) -> ReadOut:
        # timm's pooled pre-logits features: what num_classes=0 would return (1536-d for EfficientNetV2-B3).
        embeddings = model.forward_head(model.forward_features(x), pre_logits=True)
        return ReadOut(embeddings, self.classifier(model)(embeddings).squeeze(1))

    def classifier(self, model: nn.Module) -> nn.Linear:
        return model.get_classifier()

    def same_model(self, requested: str, recorded: str) -> bool:
        """By architecture: aliases (``efficientnetv2_b3.in21k_ft_in1k``) and pretrained tags (where training
        started, irrelevant once the checkpoint's own weights are loaded) match."""
        try:
            return get_arch_name(resolve_model_name(requested)) == get_arch_name(recorded)
        except ValueError:
            return False

    def export_native(self, model: nn.Module, out: Path, data_config: DataConfig) -> list[str]:
        """timm's own format, which ``timm.create_model("local-dir:OUT", pretrained=True)`` loads as it was; its
        pretrained_cfg is `data_config` (size, mean, std, resize), so timm's eval transform is the training one."""
        size = data_config.size
        preprocessing = {"input_size": (3, size, size), "mean": data_config.mean, "std": data_config.std,
                         **data_config.resize}
        try:
            save_for_hf(model, str(out), safe_serialization=True, data_config=preprocessing)
        except SafetensorError as err:  # an I/O failure (a full disk) as the OSError it is: "... (os error 28)"
            code = re.search(r"\(os error (\d+)\)", str(err))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(out)) from err
        return list(self.native_files)


class GenConViTFamily(ModelFamily):
    """GenConViT ED, VAE and the Swin hybrid; two logits in the official order (fake first)."""

    name = "genconvit"
    meta_keys = {"model_name": MODEL_NAME,
                 "variant": MetaKey(lambda v: v in ("ed", "vae"), "'ed' or 'vae'"),
                 "arch": MetaKey(lambda v: v in ("official", "hybrid"), "'official' or 'hybrid'"),
                 "model_kwargs": MetaKey(lambda v: isinstance(v, Mapping), "a mapping of constructor arguments",
                                         required=False)}

    def meta(self, variant: str, arch: str, model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """What a checkpoint records to rebuild the model (read back by ``build``): `model_kwargs` are the
        constructor arguments beyond the official defaults."""
        suffix = "" if arch == "official" else f"_{arch}"
        return {"family": self.name, "model_name": f"genconvit_{variant}{suffix}", "variant": variant, "arch": arch,
                "model_kwargs": dict(model_kwargs)}

    def build(self, meta: Mapping[str, Any]) -> nn.Module:
        return build_genconvit(meta["variant"], meta["arch"], **meta.get("model_kwargs", {}))

    def data_config(self, img_size: int, backbone: str = CONVNEXT_NAME) -> DataConfig:
        """The classifier backbone's normalisation at `img_size`, and the resize every loader applies.

        ConvNeXt's (the official weights') is ImageNet's; another backbone's pretrained weights expect their own
        (EfficientNet-Lite0's: 0.5, 0.5), as the EfficientNet expert's data config does."""
        cfg = get_pretrained_cfg(backbone)
        mean, std = (cfg.mean, cfg.std) if cfg is not None else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        return DataConfig.of(img_size, mean, std)

    def official_meta(self, weights: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The meta of an official file's model: the variant from its keys, a VAE's sizes from its ``mu`` head.
        Raises OfficialCheckpointError for weights that are no official GenConViT."""
        variant = detect_variant(weights)
        return self.meta(variant, "official", official_vae_sizes(weights) if variant == "vae" else {})

    def official_data_config(self, meta: Mapping[str, Any]) -> DataConfig:
        """The data config of the official model `meta` describes: a VAE's input size is in its sizes, the ED's is
        the size the official weights were trained at."""
        kwargs = meta["model_kwargs"]
        return self.data_config(kwargs.get("img_size", OFFICIAL_IMG_SIZE), kwargs.get("convnext_name", CONVNEXT_NAME))

    def load_official(self, weights: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> nn.Module:
        """The official model `meta` (from ``official_meta``) describes, holding `weights` (strictly loaded)."""
        # Built on the meta device and filled by assignment: the official VAE is 2.8 GB, so never hold it twice.
        with torch.device("meta"):
            model = self.build(meta)
        load_official_checkpoint(model, weights, assign=True)
        return model

    def fake_logit(self, outputs: Any) -> torch.Tensor:
        return fake_logit(outputs.logits.float())

    def embed(self, model: nn.Module, x: torch.Tensor) -> ReadOut:
        out = model(x)  # `features` is the 500-d activation that feeds the classifier (fc2)
        return ReadOut(out.features, fake_logit(out.logits), out.recon)

    def classifier(self, model: nn.Module) -> nn.Linear:
        return model.classifier


FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (TimmFamily(), GenConViTFamily())}


def family_of(meta: Mapping[str, Any]) -> ModelFamily:
    """The family a checkpoint's meta names, after checking the meta holds what that family's ``build`` reads."""
    name = meta.get("family")
    if not isinstance(name, str) or name not in FAMILIES:
        raise CheckpointError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})")
    FAMILIES[name].check_meta(meta)
    return FAMILIES[name]


def model_from_checkpoint(checkpoint: Mapping[str, Any]) -> nn.Module:
    """Rebuild the model a trainer checkpoint describes and load its weights (no download)."""
    model = family_of(checkpoint).build(checkpoint)
    check_weights_fit(model, checkpoint["model"], checkpoint.get("model_name", "the model"))
    model.load_state_dict(checkpoint["model"])
    return model


def check_weights_fit(model: nn.Module, weights: Mapping[str, torch.Tensor], name: str) -> None:
    """Raise CheckpointError, in one line naming a few keys of each kind, unless `weights` has exactly the model's
    keys at the model's shapes."""
    problems = mismatched_keys(model.state_dict(), weights)
    if problems:
        raise CheckpointError(f"weights do not fit {name}: {problems}")

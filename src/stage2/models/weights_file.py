"""Local weights files (--pretrained-file, --backbone-file, --swin-file): told apart from files that hold no weights,
read, and loaded into a timm model only when every tensor of its backbone is in them.

timm's own file override loads what fits and leaves the rest random whenever the classifier's class count differs
(tf_efficientnet_lite0's weights in tf_efficientnet_b0: 294 of its 360 tensors, every squeeze-excite layer random,
and no word); a file made for another model is refused here instead, in one line naming a few keys.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from stage2.errors import PretrainedWeightsError, first_line


def file_format(path: str | Path) -> str | None:
    """"torch" for what torch.save writes (a zip archive, or a pickle in the legacy format), "safetensors" for a
    safetensors file (an 8-byte header length, then its JSON header), None for anything else (a text file, an image)."""
    with open(path, "rb") as file:
        head = file.read(9)
    if head[:1] == b"\x80" or zipfile.is_zipfile(path):
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return None


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or a torch checkpoint (a state_dict, or one wrapped as timm's and the
    trainers' checkpoints wrap it: ``state_dict``, ``model``); PretrainedWeightsError naming the file otherwise."""
    import safetensors.torch
    from timm.models import load_state_dict

    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"weights file {path}: no such file")
    kind = file_format(path)
    if kind is None:
        raise PretrainedWeightsError(f"weights file {path}: neither a safetensors file nor a PyTorch checkpoint")
    try:
        weights = safetensors.torch.load_file(path) if kind == "safetensors" else load_state_dict(str(path))
    except Exception as err:  # a damaged file: safetensors and the unpickler fail in many ways
        raise PretrainedWeightsError(f"weights file {path}: cannot be read ({type(err).__name__}: "
                                     f"{first_line(err)})") from err
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise PretrainedWeightsError(f"weights file {path}: holds no state_dict of tensors")
    return dict(weights)


def load_weights_file(model: nn.Module, path: str | Path, name: str) -> None:
    """Load `path` into the timm model `model` (called `name`): every tensor but the classifier's must be in the file
    at the model's shape, and the file may hold no other (PretrainedWeightsError naming the file, how many keys are
    missing, unexpected or of another shape, and the first few). The classifier loads where its shape matches
    (ImageNet's 1,000 logits); where it does not (another class count), it stays as the model built it."""
    weights = read_weights_file(path)
    expected = model.state_dict()
    problems = mismatched_keys(expected, weights, exempt=_classifier_keys(model))
    if problems:
        raise PretrainedWeightsError(f"weights file {path} does not fit {name}: {problems}")
    model.load_state_dict({key: value for key, value in weights.items()
                           if key in expected and value.shape == expected[key].shape}, strict=False)


def mismatched_keys(expected: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
                    exempt: set[str] = frozenset(), shown: int = 3) -> str:
    """How `weights` fails to hold exactly the `expected` keys at their shapes, in one line naming the first `shown`
    keys of each kind ("keys 66 missing (a, b, c, ...); 2 unexpected (...)"); "" when it holds them. Keys in
    `exempt` may be missing, unexpected or of another shape. (load_state_dict says so over many lines, keys after
    the first.)"""
    missing = [key for key in expected if key not in weights and key not in exempt]
    unexpected = [key for key in weights if key not in expected and key not in exempt]
    reshaped = [f"{key} {list(weights[key].shape)} vs {list(value.shape)}" for key, value in expected.items()
                if key in weights and key not in exempt and hasattr(weights[key], "shape")
                and weights[key].shape != value.shape]
    problems = [f"{len(keys)} {kind} ({', '.join(keys[:shown])}{', ...' if len(keys) > shown else ''})"
                for kind, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped))
                if keys]
    return f"keys {'; '.join(problems)}" if problems else ""


def _classifier_keys(model: nn.Module) -> set[str]:
    """The state_dict keys of the classifier timm's pretrained config names (``classifier``, ``head.fc``)."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else names
    return {f"{name}.{kind}" for name in names for kind in ("weight", "bias")}

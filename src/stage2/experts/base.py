"""What the shared training loop needs to know about one expert model.

The training loop (`stage2.engine.loop.train_one_epoch`, driven by `stage2.engine.trainer.Trainer`) is
model-agnostic: everything that differs between the EfficientNet and GenConViT experts (model construction and
initialisation, loss terms, training stages, per-epoch artefacts) enters through an `Expert`, and how a model is
rebuilt and read through its `ModelFamily`, never through `if model == ...` branches inside the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from stage2.data.preprocessing import DataConfig
from stage2.models.families import ModelFamily


@dataclass(frozen=True)
class Stage:
    """A block of epochs with its own learning rate and set of trainable parameters.

    Each stage gets a fresh optimizer and warmup+cosine schedule; `trainable(name)` picks the
    parameters that learn in it (None: all of them).
    """

    name: str
    epochs: int
    lr: float
    trainable: Callable[[str], bool] | None = field(default=None, compare=False)


class Expert:
    """Base class: subclasses build the model and define the loss; the loop does the rest."""

    #: Loss terms whose per-class (real / fake) validation means are worth logging.
    per_class_terms: tuple[str, ...] = ()
    #: DDP must be told when some parameters get no gradient (unused upstream layers).
    find_unused_parameters: bool = False
    #: How its models are rebuilt from a checkpoint and read (stage2.models.families).
    family: ModelFamily

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def prepare(self, n_real: float, n_fake: float) -> None:
        """Called once before training with the expected real and fake images an epoch trains on (after
        --balanced-sampler and --self-blend, not the manifest's labels), e.g. to balance the loss."""

    def data_config(self, model: nn.Module) -> DataConfig:
        """The preprocessing `model` expects (input size, mean, std, resize); asked once, by the trainer, which
        passes it on to the loaders, the evaluator and the checkpoints."""
        raise NotImplementedError

    def checkpoint_meta(self) -> dict[str, Any]:
        """What a checkpoint must record to rebuild the model: its family's ``meta`` for this recipe's model."""
        raise NotImplementedError

    def recipe(self) -> dict[str, Any]:
        """Loss and regularisation settings a resumed run must keep (recorded in last.pt)."""
        return {}

    def for_checkpoint(self, data_config: DataConfig, settings: Mapping[str, Any]) -> Expert:
        """This expert as --evaluate scores a checkpoint with (its model is rebuilt from the checkpoint): the loss of
        the checkpoint's run, from `settings` (its command's flags, as best.pt records them; a `recipe` key they lack
        keeps this command's value) and, where the loss reads pixels, the checkpoint's `data_config`."""
        return self

    def loss(self, outputs: Any, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample loss terms, each [B]; "loss" is the total that is optimised (its batch mean)."""
        raise NotImplementedError

    def sample_metrics(self, outputs: Any, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample validation measures besides the loss terms, each [B]; logged as their means, val_<name>."""
        return {}

    def train_mode(self, model: nn.Module) -> None:
        """Put ``model`` in training mode for an epoch (the loop calls this first): all of it by default."""
        model.train()

    def stages(self, epochs: int, lr: float) -> list[Stage]:
        return [Stage("train", epochs, lr)]

    def param_groups(self, model: nn.Module, weight_decay: float, lr: float) -> list[dict[str, Any]]:
        """The optimizer's groups of the trainable parameters, for a stage at peak `lr`: timm's (no decay on norms,
        biases and the model's ``no_weight_decay()`` patterns). A group's ``lr_scale`` multiplies the schedule's lr
        for it (timm's schedulers apply it)."""
        return param_groups_weight_decay(model, weight_decay,
                                         no_weight_decay_list=getattr(model, "no_weight_decay", set)())

    def clip_groups(self, model: nn.Module) -> list[list[nn.Parameter]]:
        """Parameters whose gradients --clip-grad bounds as one norm, a norm per group; the loop asks once per stage
        and skips the stage's frozen ones.

        One group by default. Parts of a model that learn from separate losses each get their own group, so that
        one part's large gradients do not shrink every step of the other.
        """
        return [list(model.parameters())]

    def describe(self) -> dict[str, Any]:
        """Expert-specific settings printed at start."""
        return {}

    def epoch_artifacts(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        epoch: int,
        out_dir: Path,
    ) -> dict[str, Path]:
        """Hook run on rank 0 after each validation with a fixed batch of normalised val images; returns the
        images it wrote ({tag: path}), which a tracker (--log-to) shows."""
        return {}

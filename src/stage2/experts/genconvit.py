"""The generative-discriminative expert: GenConViT ED or VAE in the shared training loop.

Adds to the loop what only GenConViT needs: official / ImageNet / scratch initialisation, the
classification + reconstruction + KL loss, staged training (backbone frozen first), and a grid
of reconstructions per epoch (drawn here, by `plot_recon_samples`).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from stage2.atomic import atomic_write
from stage2.data.preprocessing import DataConfig
from stage2.errors import ConfigError, PretrainedWeightsError
from stage2.experts.base import Expert, Stage
from stage2.models.families import FAMILIES, GenConViTFamily
from stage2.models.genconvit import GenConViTLoss, build_genconvit, init_var_from_mu, load_official_checkpoint
from stage2.models.names import CONVNEXT_NAME, GENCONVIT_HF_FILES, GENCONVIT_HF_REPO
from stage2.models.recipes import GENCONVIT, check_genconvit_start

log = logging.getLogger(__name__)

# Attribute names of the timm backbones inside the GenConViT modules; frozen in a "frozen" stage.
BACKBONE_PREFIXES = ("backbone.", "convnext_backbone.", "convnext.", "swin.")


def parse_stages(spec: str, epochs: int, lr: float) -> list[Stage]:
    """`NAME:EPOCHS[:LR_SCALE],...` with NAME frozen (backbones frozen) or full, EPOCHS a number or
    `rest` (what is left of --epochs). Stages that end up with no epochs are dropped."""
    stages, used, rest_index = [], 0, None
    for i, item in enumerate(filter(None, (part.strip() for part in spec.split(",")))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or parts[0] not in ("frozen", "full"):
            raise ConfigError(f"--stages {spec!r}: item {item!r} is not NAME:EPOCHS[:LR_SCALE] with NAME frozen|full")
        try:
            n = -1 if parts[1] == "rest" else int(parts[1])
            scale = float(parts[2]) if len(parts) == 3 else 1.0
        except ValueError:
            raise ConfigError(f"--stages {spec!r}: item {item!r} has a bad number") from None
        if (parts[1] != "rest" and n < 0) or not (math.isfinite(scale) and scale > 0):
            raise ConfigError(f"--stages {spec!r}: item {item!r} needs EPOCHS >= 0 (or rest) and LR_SCALE > 0")
        if n == -1:
            if rest_index is not None:
                raise ConfigError(f"--stages {spec!r}: only one stage may take the rest")
            rest_index = i
        else:
            used += n
        trainable = _not_backbone if parts[0] == "frozen" else None
        stages.append(Stage(parts[0], n, lr * scale, trainable))
    if used > epochs:
        raise ConfigError(f"--stages {spec!r}: {used} epochs but --epochs is {epochs}")
    if rest_index is not None:
        rest = stages[rest_index]
        stages[rest_index] = Stage(rest.name, epochs - used, rest.lr, rest.trainable)
    elif used != epochs:
        raise ConfigError(f"--stages {spec!r}: {used} epochs but --epochs is {epochs} (use 'rest')")
    return [s for s in stages if s.epochs > 0]


def _not_backbone(name: str) -> bool:
    return not name.startswith(BACKBONE_PREFIXES)


class GenConViTExpert(Expert):
    """GenConViT ED or VAE. Labels are 1 = fake; the two logits keep the official order (FAKE first)
    so that fine-tuning from the official weights and training from scratch read P(fake) the same way."""

    per_class_terms = ("recon",)
    family: GenConViTFamily = FAMILIES["genconvit"]

    def __init__(
        self,
        variant: str,
        *,
        img_size: int = GENCONVIT.train["img_size"],
        arch: str = GENCONVIT.model["arch"],
        init: str = GENCONVIT.model["init"],
        weights: str | Path | None = None,
        backbone_file: str | Path | None = None,
        swin_file: str | Path | None = None,
        recon_weight: float = GENCONVIT.model["recon_weight"],
        kl_weight: float = GENCONVIT.model["kl_weight"],
        label_smoothing: float = GENCONVIT.model["label_smoothing"],
        stages: str | None = None,
        backbone: str = GENCONVIT.model["backbone"],
        latent_channels: int = GENCONVIT.model["latent_channels"],
        head_input: str | None = None,
        ae_lr: float | None = None,
        model_kwargs: dict[str, Any] | None = None,
        recon_on: str = GENCONVIT.model["recon_on"],
    ):
        """`stages`, `head_input` and `ae_lr` default to what the recipe gives this `init` (GENCONVIT.init_model)."""
        check_genconvit_start(init, arch, backbone_file, swin_file)
        by_init = GENCONVIT.init_model[init]
        head_input = head_input or by_init["head"]
        if init == "official" and head_input != "logits":
            raise ConfigError("--head features: the official weights' head reads ImageNet logits (--head logits)")
        if arch == "hybrid" and head_input != "features":
            raise ConfigError("--head logits: the hybrid's head reads the pooled features of both backbones")
        if ae_lr is not None and not (math.isfinite(ae_lr) and ae_lr > 0):
            raise ConfigError(f"--ae-lr {ae_lr}: expected a positive number")
        self.variant, self.arch, self.init = variant, arch, init
        self.head_input, self.ae_lr = head_input, ae_lr or by_init["ae_lr"]
        self.img_size = img_size
        self.backbone = backbone
        self.weights = weights
        self.backbone_file = backbone_file
        self.swin_file = swin_file
        self.stage_spec = stages or by_init["stages"]
        # Constructor arguments beyond the official defaults, recorded in checkpoints to rebuild the model;
        # `model_kwargs` adds others (the tests' tiny Swin sizes).
        self.model_kwargs: dict[str, Any] = {}
        if backbone != CONVNEXT_NAME:
            self.model_kwargs["convnext_name"] = backbone
        if variant == "vae" or arch == "hybrid":  # ED's official module is fully convolutional
            self.model_kwargs["img_size"] = img_size
        if variant == "vae":
            self.model_kwargs["latent_channels"] = latent_channels
        if head_input != "logits" and arch == "official":  # the hybrid's head always reads pooled features
            self.model_kwargs["head_input"] = head_input
        self.model_kwargs.update(model_kwargs or {})
        # The reconstruction target un-normalises the inputs with the normalisation the loaders apply: one source.
        self.preprocessing = self.family.data_config(img_size, backbone)
        self.criterion = self._criterion(recon_weight, kl_weight, label_smoothing, recon_on)

    def _criterion(self, recon_weight: float, kl_weight: float, label_smoothing: float, recon_on: str
                   ) -> GenConViTLoss:
        """The loss, un-normalising its reconstruction target with `preprocessing`; the KL term is the VAE's."""
        return GenConViTLoss(recon_weight, kl_weight if self.variant == "vae" else 0.0, label_smoothing,
                             self.preprocessing.mean, self.preprocessing.std, recon_on)

    def for_checkpoint(self, data_config: DataConfig, settings: Mapping[str, Any]) -> GenConViTExpert:
        """With the checkpoint's normalisation (a Lite0 backbone's 0.5, not ConvNeXt's ImageNet mean: the evaluator
        normalises with it) and its run's loss weights."""
        scored = copy.copy(self)
        scored.preprocessing = data_config
        recipe = {**self.recipe(), **{key: settings[key] for key in self.recipe() if key in settings}}
        scored.criterion = scored._criterion(recipe["recon_weight"], recipe["kl_weight"], recipe["label_smoothing"],
                                             recipe["recon_on"])
        return scored

    def build_model(self) -> nn.Module:
        files = {"backbone_file": _str(self.backbone_file)} if self.arch == "official" else {
            "convnext_file": _str(self.backbone_file), "swin_file": _str(self.swin_file)}
        try:
            model = build_genconvit(self.variant, self.arch, **self.model_kwargs,
                                    backbone_pretrained=self.init == "imagenet", **files)
        except PretrainedWeightsError as err:
            raise PretrainedWeightsError(self._weights_advice(err)) from err
        if self.init == "official":
            report = load_official_checkpoint(model, self._official_weights())
            log.info("loaded official GenConViT-%s weights: %s", self.variant.upper(), report)
            if self.variant == "vae":
                init_var_from_mu(model)
                log.info("VAE var head initialised from the mu head: the first steps sample as the official "
                         "model was trained (std = exp(mu / 2)); see src/stage2/models/genconvit/vae.py")
        return model

    def _weights_advice(self, err: PretrainedWeightsError) -> str:
        """What a backbone weights failure says: the flag of a file that failed, or else the flags that give the
        hub's weights from files (never one that was passed)."""
        files = {"--backbone-file": self.backbone_file, "--swin-file": self.swin_file}
        failed = next((flag for flag, path in files.items() if path is not None and str(path) in str(err)), None)
        if failed is not None:
            return f"{failed}: {err}"
        backbone = self.model_kwargs.get("convnext_name", CONVNEXT_NAME)
        parts = {"--backbone-file": f"({backbone})", "--swin-file": "(Swin)"}
        wanted = [f"{flag} {parts[flag]}" for flag, path in files.items()
                  if path is None and (flag == "--backbone-file" or self.arch == "hybrid")]
        return f"{err}; offline, pass {' and '.join(wanted)}, or use --init scratch"

    def _official_weights(self) -> str:
        if self.weights is not None:
            if not Path(self.weights).is_file():
                raise PretrainedWeightsError(f"--weights {self.weights}: no such file")
            return str(self.weights)
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download(GENCONVIT_HF_REPO, GENCONVIT_HF_FILES[self.variant])
        except Exception as err:
            raise PretrainedWeightsError(
                f"could not download {GENCONVIT_HF_REPO}/{GENCONVIT_HF_FILES[self.variant]} ({type(err).__name__}); "
                "offline, pass "
                "--weights PATH (or --weights-dir) to the official file, or use --init imagenet|scratch") from err

    def data_config(self, model: nn.Module) -> DataConfig:
        return self.preprocessing

    def checkpoint_meta(self) -> dict[str, Any]:
        return self.family.meta(self.variant, self.arch, self.model_kwargs)

    def loss(self, outputs: Any, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.criterion(outputs, images, labels)

    def sample_metrics(self, outputs: Any, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """val_recon_psnr and, for comparison, val_mean_colour_psnr (see GenConViTLoss.psnr)."""
        return self.criterion.psnr(outputs, images)

    def stages(self, epochs: int, lr: float) -> list[Stage]:
        return parse_stages(self.stage_spec, epochs, lr)

    def param_groups(self, model: nn.Module, weight_decay: float, lr: float) -> list[dict[str, Any]]:
        """timm's groups, with the autoencoder in its own undecayed group at ``--ae-lr`` (when set) in every stage."""
        groups = super().param_groups(model, weight_decay, lr)
        if self.ae_lr is None:
            return groups
        ids = {id(p) for p in model.autoencoder_parameters()}
        rest = [{**group, "params": [p for p in group["params"] if id(p) not in ids]} for group in groups]
        ae = [p for p in model.autoencoder_parameters() if p.requires_grad]
        scale = self.ae_lr / lr if lr else 0.0  # the schedule scales each group's lr: --lr 0 stops them all
        own = [{"params": ae, "weight_decay": 0.0, "lr_scale": scale}] if ae else []
        return [g for g in rest if g["params"]] + own

    def clip_groups(self, model: nn.Module) -> list[list[nn.Parameter]]:
        """The autoencoder, and the rest. The classifier's gradient norm (5-20 on the demo's first steps, against
        0.02-0.06 for the autoencoder's) would otherwise set the clip factor of the autoencoder's steps too: with
        a norm per part the demo ED's val PSNR after 8 epochs was 19.95 dB against 19.49 dB with one (AUC 0.952
        and 0.953)."""
        autoencoder = model.autoencoder_parameters()
        ids = {id(p) for p in autoencoder}
        return [autoencoder, [p for p in model.parameters() if id(p) not in ids]]

    def recipe(self) -> dict[str, Any]:
        return {"recon_weight": self.criterion.recon_weight, "kl_weight": self.criterion.kl_weight,
                "label_smoothing": self.criterion.label_smoothing, "stages": self.stage_spec,
                "recon_on": self.criterion.recon_on}

    def describe(self) -> dict[str, Any]:
        return {"model": self.checkpoint_meta()["model_name"], "init": self.init,
                "weights": self.weights or self.backbone_file, "head": self.head_input,
                "recon_weight": self.criterion.recon_weight, "kl_weight": self.criterion.kl_weight,
                "stages": self.stage_spec, "ae_lr": self.ae_lr, "recon_on": self.criterion.recon_on,
                "autoencoder": "no weight decay, clipped apart from the classifier"}

    @torch.no_grad()
    def epoch_artifacts(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epoch: int,
                        out_dir: Path) -> dict[str, Path]:
        """recon_samples/epoch_NNN.png: one row per image, input | reconstruction | |difference| x 4, all in
        the [0, 1] pixel space the reconstruction loss is computed in, each row labelled real or fake with its MSE;
        the title compares the reconstruction's PSNR with that of each image's own mean colour.

        Real images come first, then fakes: GenConViT's premise is that fakes reconstruct worse.
        """
        model.eval()
        outputs = model(images)
        shown, rebuilt = self.criterion.pixels(images).clamp(0, 1), outputs.recon.float().clamp(0, 1)
        per_image = self.criterion(outputs, images, labels.to(images.device))["recon"].cpu().numpy()
        labels_np = labels.cpu().numpy()
        psnr = {k: float(v.mean()) for k, v in self.criterion.psnr(outputs, images).items()}
        path = out_dir / "recon_samples" / f"epoch_{epoch:03d}.png"
        title = (f"{self.checkpoint_meta()['model_name']}: {len(labels_np)} validation images after epoch {epoch}\n"
                 f"their PSNR {psnr['recon_psnr']:.1f} dB (each image's mean colour: "
                 f"{psnr['mean_colour_psnr']:.1f} dB)")
        plot_recon_samples(shown.cpu().numpy(), rebuilt.cpu().numpy(), labels_np, per_image, path, title)
        log.info("recon samples: %s; the grid's %d images (the whole val set's are val_recon_* in metrics.csv): MSE "
                 "real %.4f, fake %.4f; PSNR %.1f dB, mean colour %.1f dB", path, len(labels_np),
                 float(np.mean(per_image[labels_np == 0])), float(np.mean(per_image[labels_np == 1])),
                 psnr["recon_psnr"], psnr["mean_colour_psnr"])
        return {"recon_samples": path}


RECON_COLUMNS = ("input", "reconstruction", "difference x4")


def plot_recon_samples(inputs: np.ndarray, recons: np.ndarray, labels: np.ndarray, errors: np.ndarray, path: Path,
                       title: str) -> Figure:
    """Save (and return) one row per image, input | reconstruction | |difference| x 4, headed by RECON_COLUMNS,
    each row labelled real or fake with its reconstruction error. `inputs`, `recons`: [N, 3, H, W] in [0, 1].

    One mosaic in one axes, its ticks as the headers and row labels: the tiles keep their pixels (no resampling
    between subplots) and the figure stays one draw however many rows it has.
    """
    n, _, h, w = inputs.shape
    pad = max(2, h // 32)
    tiles = np.stack([inputs, recons, np.clip(np.abs(inputs - recons) * 4, 0, 1)], axis=1).clip(0, 1)
    mosaic = np.ones((n * (h + pad) - pad, 3 * (w + pad) - pad, 3), dtype=np.float32)
    for row in range(n):
        for col in range(3):
            y, x = row * (h + pad), col * (w + pad)
            mosaic[y:y + h, x:x + w] = tiles[row, col].transpose(1, 2, 0)
    scale = max(1.0, 128 / h)  # small images are drawn larger, so that the column headers fit above them
    fig = Figure(figsize=(mosaic.shape[1] * scale / 100 + 1.5, mosaic.shape[0] * scale / 100 + 0.8),
                 layout="constrained")
    ax = fig.subplots()
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([c * (w + pad) + w / 2 for c in range(3)], RECON_COLUMNS)
    ax.xaxis.tick_top()
    ax.set_yticks([r * (h + pad) + h / 2 for r in range(n)],
                  [f"{'fake' if label else 'real'}\nMSE {error:.4f}" for label, error in zip(labels, errors)])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=10)
    atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    return fig


def _str(path: str | Path | None) -> str | None:
    return None if path is None else str(path)

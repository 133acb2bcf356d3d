"""Each expert's recipe: the defaults of its command's flags and of its constructor, in one torch-free table.

A default changes here, once: the commands' flags and their --help (stage2.commands.train_effnet,
train_genconvit) and the experts' constructors (stage2.experts) read it, and the numbers' reasons sit beside them.
Every table is keyed by flag name (argparse's dest).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stage2.errors import ConfigError
from stage2.models.names import CONVNEXT_NAME, DEFAULT_EFFNET, GENCONVIT_INIT_MODES


@dataclass(frozen=True)
class Recipe:
    """One expert's defaults.

    `train`: the shared flags' (stage2.commands.train_args) where this expert's differ from TrainConfig's
    (stage2.run.config); `model`: its own flags', which its constructor takes as well; `init_flags`: shared flags'
    defaults that follow --init, {init: {flag: value}}; `init_model`: its own flags' defaults that follow --init,
    applied by the expert when the flag is not given; `demo`: what --demo sets (a flag given still wins).
    """

    train: Mapping[str, Any]
    model: Mapping[str, Any]
    demo: Mapping[str, Any]
    init_flags: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    init_model: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


# The local-artefact expert (stage2.experts.timm_classifier). Its optimisation is TrainConfig's: AdamW, lr 3e-4,
# weight decay 0.05, warmup 0.3 epochs (the reasons are there). The demo trains from scratch (no weights offline),
# small and short for two CPU cores: 96px, and no stochastic depth, a regulariser that slows learning from scratch
# on 420 images (best AUC 0.93 with it, 0.98 without).
EFFNET = Recipe(
    train={"output_dir": "output/stage2_effnet"},
    model={"model": DEFAULT_EFFNET, "pretrained": True, "drop_path": 0.2, "pos_weight": "none",
           "label_smoothing": 0.0, "tune": "all"},
    demo={"model": "tf_efficientnetv2_b3", "pretrained": False, "img_size": 96, "epochs": 10, "batch_size": 32,
          "lr": 1e-3, "warmup_epochs": 0.5, "drop_path": 0.0, "workers": 2},
)

# The generative-discriminative expert (stage2.experts.genconvit).
GENCONVIT = Recipe(
    # Upstream's recipe (erprogs/GenConViT): Adam (L2 weight decay 1e-4), lr 1e-4, batch 32, 224px input, ImageNet
    # normalisation, no warmup. Upstream steps the lr down 10x at epoch 15; we decay it by cosine.
    train={"output_dir": "output/stage2_genconvit", "img_size": 224, "batch_size": 32, "lr": 1e-4, "opt": "adam",
           "weight_decay": 1e-4, "warmup_epochs": 0.0, "epochs": 20},
    # latent_channels 256 gives the official 12544-d VAE latent; the official weights need the convnext_tiny backbone.
    model={"variant": "both", "arch": "official", "init": "official", "recon_weight": 1.0, "kl_weight": 0.5,
           "label_smoothing": 0.0, "backbone": CONVNEXT_NAME, "latent_channels": 256, "recon_on": "all"},
    # From ImageNet backbones, upstream's lr of 1e-4 with no warmup left GenConViT-ED well behind the EfficientNet
    # expert on the same backbone and budget (best val AUC 0.702 against 0.743 on the composites, 0.749 against
    # 0.856 on LFW FaceSwap, seed 0); at that expert's lr and warmup (3e-4, 0.3 epochs) it gave 0.825 on LFW
    # FaceSwap (0.813 at 3e-4 without warmup, 0.819 with AdamW and weight decay 0.05 as well).
    init_flags={"imagenet": {"lr": 3e-4, "warmup_epochs": 0.3}},
    # stages: every stage trains at --lr (the recipe's Adam 1e-4), everything from the first step. From ImageNet
    # backbones a frozen first epoch used to keep the new head's random gradients out of the pretrained features;
    # the head now starts at zero, which does that without losing an epoch, and each stage's fresh optimizer
    # restarted the autoencoder's Adam state (its val PSNR fell 13.7 -> 12.4 dB at the stage change; BENCHMARKS.md,
    # "Real faces").
    # head: what the head reads of each view (models.genconvit.ed.create_backbone): the official weights' ImageNet
    # logits, or pooled features for a head that starts new.
    # ae_lr: the autoencoder's lr. A new autoencoder at the classifier's 1e-4 stayed a flat grey tile for the
    # hundreds of steps of a real set (val PSNR 12.7 dB against 12.8 dB for each image's mean colour); alone, 176
    # Adam steps on 1,429 real faces at 128px gave ED 13.6 / 16.7 / 17.7 / 11.7 dB at 1e-4 / 1e-3 / 3e-3 / 1e-2 and
    # the VAE 16.7 / 14.2 dB at 1e-3 / 3e-3. The official autoencoders are trained: they keep --lr (None).
    init_model={"official": {"stages": "full:rest", "head": "logits", "ae_lr": None},
                "imagenet": {"stages": "full:rest", "head": "features", "ae_lr": 1e-3},
                "scratch": {"stages": "full:rest", "head": "features", "ae_lr": 1e-3}},
    # The demo trains from scratch, on two CPU cores, with EfficientNetV2-B0 as the classifier backbone: a ConvNeXt
    # from random weights does not learn this task from 420 crops in CPU minutes (best val AUC 0.51-0.60 over
    # atto/96-128px/lr 1e-4..4e-3), while every GenConViT part (autoencoder, both passes, heads, losses) runs as is.
    demo={"init": "scratch", "backbone": "tf_efficientnetv2_b0", "img_size": 96, "epochs": 8, "batch_size": 16,
          "lr": 1e-3, "workers": 2, "latent_channels": 8},
)


def check_genconvit_start(init: str, arch: str, backbone_file: object, swin_file: object) -> None:
    """Refuse a GenConViT start that --init and the weight files contradict; torch-free, so the command checks it
    before the hub check and the expert again for callers of its constructor."""
    if init not in GENCONVIT_INIT_MODES:
        raise ConfigError(f"--init {init!r}: expected one of {', '.join(GENCONVIT_INIT_MODES)}")
    if init == "official" and arch != "official":
        raise ConfigError(f"--init official needs --arch official: the {arch} model has no official weights")
    if swin_file is not None and arch != "hybrid":
        raise ConfigError("--swin-file: only --arch hybrid has a Swin that is used")
    files = [flag for flag, path in (("--backbone-file", backbone_file), ("--swin-file", swin_file)) if path]
    if files and init != "imagenet":  # timm would still load the file: an "init scratch" run from ImageNet
        start = "the official weights" if init == "official" else "random weights"
        raise ConfigError(f"{files[0]}: only with --init imagenet (--init {init} starts from {start})")

"""Model and weight-file names, torch-free so that the command lines can show them without importing torch."""

from __future__ import annotations

DEFAULT_EFFNET = "tf_efficientnetv2_b3.in21k_ft_in1k"

# Names used in the design notes that timm does not have, mapped to the timm model they mean.
MODEL_ALIASES = {
    "efficientnetv2_b3.in21k_ft_in1k": DEFAULT_EFFNET,
    "efficientnetv2_b3": DEFAULT_EFFNET,
}

CONVNEXT_NAME = "convnext_tiny"  # GenConViT's classifier backbone; the official weights need this one
SWIN_NAME = "swin_tiny_patch4_window7_224"  # the hybrid's second backbone

GENCONVIT_HF_REPO = "Deressa/GenConViT"
GENCONVIT_HF_FILES = {"ed": "genconvit_ed_inference.pth", "vae": "genconvit_vae_inference.pth"}
GENCONVIT_INIT_MODES = ("official", "imagenet", "scratch")
# What GenConViT's head reads of each view: the backbone's ImageNet logits (the official layout) or pooled features.
HEAD_INPUTS = ("logits", "features")
# The images GenConViT's autoencoder learns from (--recon-on): all, or the reals alone (a fake's error: an anomaly).
RECON_ON = ("all", "reals")
# What the EfficientNet expert trains (--tune): every weight, the normalisation layers' affine parameters and the
# head, or the head alone over a frozen backbone.
TUNE_MODES = ("all", "norm", "head")

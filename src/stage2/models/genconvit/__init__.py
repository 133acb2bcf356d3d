"""GenConViT (Wodajo et al. 2023): a generative-discriminative deepfake detector.

Why a generative part helps: an autoencoder trained mostly on natural faces reconstructs what it has learnt
to model and smooths away what it has not, so the pair (input, reconstruction) exposes high-frequency
blending seams, warping and GAN/diffusion fingerprints that a classifier on the input alone can overlook.
The classifier therefore sees both images through the same ConvNeXt.

- ED (``GenConViTED``): a plain conv encoder-decoder; its reconstruction is a second, denoised view.
- VAE (``GenConViTVAE``): a variational encoder-decoder; the KL-regularised latent forces a smooth model of
  faces, so reconstructions of manipulated regions drift further from the input, and the latent
  (``mu``, ``logvar``) is a compact description of the face.

Honest caveat: the published models name a Swin transformer, but it is wired as ConvNeXt's ``patch_embed``,
which timm's ConvNeXt never calls, so the official models are ConvNeXt-only and their Swin weights are
inert (``official.py`` drops them). ``GenConViTHybrid`` is a version where Swin's features do reach the
classifier; it has no official weights.
"""

from __future__ import annotations

from torch import nn

from .ed import GenConViTED, GenConViTOutput
from .hybrid import GenConViTHybrid
from .loss import GenConViTLoss, gaussian_kl
from .official import (
    FAKE_INDEX,
    OFFICIAL_IMG_SIZE,
    REAL_INDEX,
    LoadReport,
    detect_variant,
    fake_logit,
    load_official_checkpoint,
    official_vae_sizes,
    read_state_dict,
    targets_from_labels,
)
from .vae import GenConViTVAE, init_var_from_mu

__all__ = [
    "FAKE_INDEX",
    "OFFICIAL_IMG_SIZE",
    "REAL_INDEX",
    "GenConViTED",
    "GenConViTHybrid",
    "GenConViTLoss",
    "GenConViTOutput",
    "GenConViTVAE",
    "LoadReport",
    "build_genconvit",
    "detect_variant",
    "fake_logit",
    "gaussian_kl",
    "init_var_from_mu",
    "load_official_checkpoint",
    "official_vae_sizes",
    "read_state_dict",
    "targets_from_labels",
]


def build_genconvit(variant: str, arch: str = "official", **kwargs: object) -> nn.Module:
    """``variant`` in {"ed", "vae"}; ``arch`` "official" (loads official weights) or "hybrid" (Swin used).

    ``kwargs`` go to the model's constructor.
    """
    if variant not in ("ed", "vae"):
        raise ValueError(f"GenConViT variant must be 'ed' or 'vae', got {variant!r}")
    if arch == "hybrid":
        return GenConViTHybrid(variant, **kwargs)
    if arch == "official":
        return GenConViTED(**kwargs) if variant == "ed" else GenConViTVAE(**kwargs)
    raise ValueError(f"GenConViT arch must be 'official' or 'hybrid', got {arch!r}")

"""GenConViT with a Swin that is actually used: the hybrid the paper describes, not the official wiring.

ConvNeXt (local texture) and Swin (windowed global attention) each embed the input and its reconstruction;
their four pooled feature vectors are concatenated before ``fc``. There are no official weights for this
architecture; backbones start from scratch or from local ImageNet files.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from stage2.models.names import CONVNEXT_NAME, SWIN_NAME
from stage2.models.timm_models import create_timm_model

from .ed import EDDecoder, EDEncoder, GenConViTHead, GenConViTOutput, classifier_view
from .vae import VAEDecoder, VAEEncoder, check_img_size, resize_to


class GenConViTHybrid(GenConViTHead):
    """ED or VAE autoencoder + ConvNeXt + Swin; logits depend on both backbones.

    Args:
        variant: ``"ed"`` (deterministic autoencoder) or ``"vae"`` (variational, as in ``GenConViTVAE``).
        img_size: square input side, a multiple of 32 (Swin's patch grid is fixed at construction).
        latent_channels: VAE latent channels (ignored for ED).
        convnext_name, swin_name: timm model names; tests pass tiny configs through ``*_kwargs``.
        backbone_pretrained: start both backbones from timm's ImageNet weights (needs the hub unless files).
        convnext_file, swin_file: local safetensors/.pth ImageNet weights; each implies pretrained.
        convnext_kwargs, swin_kwargs: extra ``timm.create_model`` arguments (e.g. ``embed_dim``, ``depths``).
    """

    def __init__(
        self,
        variant: Literal["ed", "vae"],
        img_size: int = 224,
        latent_channels: int = 256,
        convnext_name: str = CONVNEXT_NAME,
        swin_name: str = SWIN_NAME,
        backbone_pretrained: bool = False,
        convnext_file: str | None = None,
        swin_file: str | None = None,
        convnext_kwargs: Mapping[str, object] | None = None,
        swin_kwargs: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__()
        check_img_size(img_size)
        if variant == "ed":
            self.encoder: nn.Module = EDEncoder()
            self.decoder: nn.Module = EDDecoder()
        elif variant == "vae":
            self.encoder = VAEEncoder(img_size, latent_channels)
            self.decoder = VAEDecoder(img_size, latent_channels)
        else:
            raise ValueError(f"variant must be 'ed' or 'vae', got {variant!r}")
        self.variant = variant
        self.convnext = create_timm_model(
            convnext_name,
            pretrained=backbone_pretrained,
            pretrained_file=convnext_file,
            num_classes=0,
            **dict(convnext_kwargs or {}),
        )
        self.swin = create_timm_model(
            swin_name,
            pretrained=backbone_pretrained,
            pretrained_file=swin_file,
            num_classes=0,
            img_size=img_size,
            **dict(swin_kwargs or {}),
        )
        self._build_head(2 * (self.convnext.num_features + self.swin.num_features), nn.GELU())

    def forward(self, x: torch.Tensor) -> GenConViTOutput:
        if self.variant == "vae":
            z, mu, logvar = self.encoder(x)
            decoded = self.decoder(z)
            recon = resize_to(decoded, x.shape[-2:])
        else:
            decoded = recon = self.decoder(self.encoder(x))
            mu = logvar = None
        # Both backbones normalise per sample (LayerNorm), so input and reconstruction can share one batch.
        pair = torch.cat([x, classifier_view(recon)])
        f = torch.cat([*self.convnext(pair).chunk(2), *self.swin(pair).chunk(2)], dim=1)
        fc_out = self.fc(f)
        features = self.act(fc_out)
        return GenConViTOutput(self.fc2(features), fc_out, features, decoded, recon, mu, logvar)

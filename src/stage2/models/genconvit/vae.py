"""GenConViT-VAE: a variational conv autoencoder; input and reconstruction both go through ConvNeXt.

Layer names follow the official checkpoint so its weights load strictly (Swin keys dropped, see
``official.py``). Two deliberate departures from upstream, neither of which touches the weights:

- Upstream sampled ``std = exp(0.5 * mu)`` (the ``var`` head was never used) and sampled in eval mode too.
  Here training samples ``z = mu + eps * exp(0.5 * logvar)`` with ``logvar`` from the ``var`` head, and eval
  uses ``z = mu``, so predictions are deterministic.
- ``mu`` and ``logvar`` are returned so the loss can add the KL term (upstream computed and dropped it).

Fine-tuning the official weights: since upstream never used ``var``, the official file's ``var`` head never
received a gradient, and a std taken from it would feed the decoder noise of arbitrary scale.
:func:`init_var_from_mu` copies ``mu`` into ``var`` before training, so step 0 samples exactly as the official
model was trained (``logvar = mu``, std ``exp(0.5 * mu)``); from there the KL term and the gradients shape
``var`` into a real log-variance head.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from stage2.models.names import CONVNEXT_NAME

from .ed import (
    EMBED_DIM,
    GenConViTHead,
    GenConViTOutput,
    classifier_view,
    create_backbone,
    init_upsampling,
    input_statistics_only,
    view_width,
)

ENCODER_CHANNELS = (3, 16, 32, 64, 128)
DECODER_CHANNELS = (64, 32, 16, 3)  # after the latent channels
LEAKY_SLOPE = 0.01


def check_img_size(img_size: int) -> None:
    """The VAE flattens a fixed-size feature map, so the input size is part of the architecture."""
    if img_size <= 0 or img_size % 32:
        raise ValueError(f"img_size must be a positive multiple of 32, got {img_size}")


def resize_to(image: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Antialiased bilinear resize: what torchvision ``Resize(size, antialias=True)`` does to tensors."""
    # float32 because the antialiased kernel has no reduced-precision CPU implementation (autocast bf16).
    resized = F.interpolate(
        image.float(), size=tuple(size), mode="bilinear", align_corners=False, antialias=True
    )
    return resized.to(image.dtype)


class VAEEncoder(nn.Module):
    """Four [conv 3x3 stride 2, BatchNorm, LeakyReLU] blocks, then ``mu`` and ``var`` (log-variance) heads.

    ``forward`` returns ``(z, mu, logvar)``: in training ``z = mu + eps * exp(0.5 * logvar)`` (upstream took
    the std from ``mu``, a bug fixed here), in eval ``z = mu``.

    Args:
        img_size: square input side; the heads read the flat ``128 x img/16 x img/16`` map (official: 224).
        latent_channels: the latent is ``latent_channels x img/32 x img/32`` (official: 256 x 7 x 7).
        upstream_unused: also build upstream's ``fc1`` and ``fc2``, which no forward pass uses. They exist
            only so official checkpoints load strictly, and are frozen so optimisers and DDP skip them.
    """

    def __init__(
        self, img_size: int = 224, latent_channels: int = 256, upstream_unused: bool = False
    ) -> None:
        super().__init__()
        check_img_size(img_size)
        layers: list[nn.Module] = []
        for c_in, c_out in pairwise(ENCODER_CHANNELS):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
                nn.BatchNorm2d(c_out),
                nn.LeakyReLU(LEAKY_SLOPE),
            ]
        self.features = nn.Sequential(*layers)
        flat = ENCODER_CHANNELS[-1] * (img_size // 16) ** 2
        latent = latent_channels * (img_size // 32) ** 2
        if upstream_unused:
            self.fc1 = nn.Linear(flat, 256).requires_grad_(False)
            self.fc2 = nn.Linear(256, 128).requires_grad_(False)
        self.mu = nn.Linear(flat, latent)
        self.var = nn.Linear(flat, latent)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.features(x).flatten(1)
        mu, logvar = self.mu(h), self.var(h)
        if not self.training:
            return mu, mu, logvar
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar), mu, logvar


class VAEDecoder(nn.Module):
    """Reshape the latent to ``latent_channels x img/32 x img/32``; four [transposed conv 2x2 s2, LeakyReLU].

    Output is half the input resolution (official: 3 x 112 x 112).
    """

    def __init__(self, img_size: int = 224, latent_channels: int = 256) -> None:
        super().__init__()
        check_img_size(img_size)
        grid = img_size // 32
        self.unflatten = nn.Unflatten(1, (latent_channels, grid, grid))
        channels = (latent_channels, *DECODER_CHANNELS)
        layers: list[nn.Module] = []
        for c_in, c_out in pairwise(channels):
            layers += [nn.ConvTranspose2d(c_in, c_out, 2, stride=2), nn.LeakyReLU(LEAKY_SLOPE)]
        self.features = nn.Sequential(*layers)
        init_upsampling(self.features, LEAKY_SLOPE)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.features(self.unflatten(z))


class GenConViTVAE(GenConViTHead):
    """GenConViT-VAE, official layout (the defaults are the official sizes: ~695M parameters, ~2.8 GB fp32).

    Args:
        img_size: square input side, a multiple of 32 (official weights: 224).
        latent_channels: latent channels; smaller values shrink the two 25088-wide heads (for tests).
        backbone_pretrained: start ConvNeXt from timm's ImageNet weights (from the hub unless a file).
        backbone_file: local safetensors/.pth file of ImageNet ``convnext_tiny`` weights; implies pretrained.
        convnext_name: the timm backbone (the official weights need ``convnext_tiny``).
        head_input: ``"logits"`` (official) or ``"features"``: what ``fc`` reads of each view (``ed.create_backbone``).

    ``fc3`` (like ``encoder.fc1``/``fc2``) is unused upstream and kept frozen only for strict loading.
    """

    def __init__(
        self,
        img_size: int = 224,
        latent_channels: int = 256,
        backbone_pretrained: bool = False,
        backbone_file: str | None = None,
        convnext_name: str = CONVNEXT_NAME,
        head_input: str = "logits",
    ) -> None:
        super().__init__()
        self.encoder = VAEEncoder(img_size, latent_channels, upstream_unused=True)
        self.decoder = VAEDecoder(img_size, latent_channels)
        self.convnext_backbone = create_backbone(convnext_name, head_input, backbone_pretrained, backbone_file)
        width = view_width(self.convnext_backbone)
        self._build_head(2 * width, nn.ReLU())
        self.fc3 = nn.Linear(width, EMBED_DIM).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> GenConViTOutput:
        z, mu, logvar = self.encoder(x)
        decoded = self.decoder(z)
        # Official order is (input, reconstruction), the reverse of ED; the reconstruction enters at 112x112.
        seen = self.convnext_backbone(x)
        with input_statistics_only(self.convnext_backbone):
            rebuilt = self.convnext_backbone(classifier_view(decoded))
        f = torch.cat([seen, rebuilt], dim=1)
        fc_out = self.fc(self.act(f))
        features = self.act(fc_out)
        recon = resize_to(decoded, x.shape[-2:])
        return GenConViTOutput(self.fc2(features), fc_out, features, decoded, recon, mu, logvar)


def init_var_from_mu(model: nn.Module) -> None:
    """Copy the VAE encoder's ``mu`` head into its ``var`` head (see the module docstring for why)."""
    encoder = model.encoder
    with torch.no_grad():
        encoder.var.weight.copy_(encoder.mu.weight)
        encoder.var.bias.copy_(encoder.mu.bias)

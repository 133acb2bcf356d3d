"""GenConViT training loss: classification + reconstruction + KL (for the VAE).

Compared with upstream: the ED decoder also gets a reconstruction term (upstream trained it through the
classifier only), both reconstructions are compared with the input in [0, 1] pixels (upstream: the VAE's with
the normalised input), and the VAE's KL term is really added (upstream computed it and dropped it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from stage2.data.transforms import Normalise
from stage2.models.names import RECON_ON

from .ed import GenConViTOutput
from .official import targets_from_labels


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(N(mu, exp(logvar)) || N(0, 1)) in nats, summed over latent dimensions: [B]. Float32."""
    mu, logvar = mu.float().flatten(1), logvar.float().flatten(1)
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def psnr(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample peak signal-to-noise ratio in dB of images in [0, 1]: [B] (100 dB for a perfect match)."""
    mse = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return -10 * torch.log10(mse.clamp_min(1e-10))


class GenConViTLoss(nn.Module):
    """Per-sample ``cls + recon_weight * recon + kl_weight * kl``.

    ``cls`` is cross-entropy over the official class order (labels: 1 = fake); ``recon`` the MSE between
    ``out.recon`` and the input *as pixels in [0, 1]* (the normalised input, which the loop feeds the model,
    mapped back with ``mean`` and ``std``); ``kl`` the Gaussian KL summed over the latent and divided by the
    number of pixel values (zero for ED, which has no latent distribution). Terms are per sample, so the training
    loop can average them exactly over a validation set split across ranks.

    Why the KL per pixel value: ``recon + kl_weight * kl`` is then proportional to the VAE's negative ELBO for a
    Gaussian decoder of variance ``kl_weight / 2``, whatever the image and latent sizes. Averaged over latent
    dimensions instead, the KL weighed (pixel values / latent dimensions) times more against the MSE: 12x at
    the official sizes, 384x in the demo, where the latent collapsed (KL 0.003 nats per dimension) and the VAE
    reconstructed every image as the same mean face.

    Why pixels: the ED decoder ends in a ReLU, so it cannot output the negative half of a normalised image
    (55% of the values of the demo's crops); measured against it, the ED's MSE could never fall below 0.33.
    In [0, 1] both decoders can reach their target, and the reconstruction is an image one can look at.
    Upstream compared the VAE's reconstruction with the normalised input.

    ``recon_on`` (RECON_ON) says which images the autoencoder learns from: all of them (upstream), or the reals
    alone, so that it models real faces only and a fake's reconstruction error is an anomaly score of its own. Then
    a real's recon and KL terms weigh n / n_real in the total (a batch's mean is its reals' mean, the step's size
    independent of how many fakes came with them) and a fake's 0; the returned "recon" stays every image's error.
    """

    def __init__(
        self,
        recon_weight: float,
        kl_weight: float,
        label_smoothing: float = 0.0,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        recon_on: str = "all",
    ) -> None:
        super().__init__()
        if recon_on not in RECON_ON:
            raise ValueError(f"recon_on {recon_on!r}: expected one of {', '.join(RECON_ON)}")
        self.recon_on = recon_on
        self.recon_weight = recon_weight
        self.kl_weight = kl_weight
        self.label_smoothing = label_smoothing
        self.normalise = Normalise(mean, std)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised model inputs -> pixels in [0, 1], the space of the reconstruction target."""
        return self.normalise.pixels(images)

    def psnr(self, out: GenConViTOutput, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"recon_psnr", "mean_colour_psnr"}``, each ``[B]``: how well the reconstruction matches the input, and
        how well each image's own mean colour does, the trivial reconstruction an autoencoder must beat."""
        target = self.pixels(images)
        flat = target.mean(dim=(2, 3), keepdim=True).expand_as(target)
        return {"recon_psnr": psnr(out.recon, target), "mean_colour_psnr": psnr(flat, target)}

    def forward(self, out: GenConViTOutput, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"loss", "cls", "recon", "kl"}``, each ``[B]``; "loss" is the weighted total."""
        cls = F.cross_entropy(
            out.logits.float(),
            targets_from_labels(labels),
            label_smoothing=self.label_smoothing,
            reduction="none",
        )
        recon = (out.recon.float() - self.pixels(images)).pow(2).flatten(1).mean(dim=1)
        # Per pixel value, like the MSE (see the class docstring).
        kl = torch.zeros_like(cls) if out.mu is None else gaussian_kl(out.mu, out.logvar) / images[0].numel()
        weight = torch.ones_like(cls)
        if self.recon_on == "reals":
            real = (labels == 0).to(cls.dtype)
            weight = real * len(real) / real.sum().clamp_min(1)
        total = cls + weight * (self.recon_weight * recon + self.kl_weight * kl)
        return {"loss": total, "cls": cls, "recon": recon, "kl": kl}

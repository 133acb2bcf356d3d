"""GenConViT-ED: a conv autoencoder whose reconstruction and input both go through ConvNeXt.

The layer names follow the official checkpoint (timm 0.6.5 naming, which timm 1.x ConvNeXt shares), so
official weights load strictly once their inert Swin keys are dropped (see ``official.py``). The official
model's Swin "hybrid embed" is not built here: timm's ConvNeXt never calls ``patch_embed``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from typing import NamedTuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN
from torch import nn

from stage2.models.names import CONVNEXT_NAME, HEAD_INPUTS
from stage2.models.timm_models import create_timm_model

EMBED_DIM = 500  # width of ``fc``; fixed by the official checkpoints
OUTPUT_GAIN = 0.1  # init scale of a decoder's output layer, relative to a variance-preserving one


def create_backbone(name: str, head_input: str, pretrained: bool, pretrained_file: str | None) -> nn.Module:
    """The timm backbone both views go through, returning what `head_input` names: its 1,000 ImageNet logits
    (upstream's layout, which the official weights need) or its pooled features (the activation timm's classifier
    reads: 768-d for ConvNeXt-Tiny, 1,280-d for EfficientNet-Lite0)."""
    if head_input not in HEAD_INPUTS:
        raise ValueError(f"GenConViT head input must be one of {', '.join(HEAD_INPUTS)}, got {head_input!r}")
    return create_timm_model(name, pretrained=pretrained, pretrained_file=pretrained_file,
                             num_classes=1000 if head_input == "logits" else 0)


def view_width(backbone: nn.Module) -> int:
    """Width of one view's vector: the logits, or the pooled features of a backbone built with no classifier."""
    return backbone.num_classes or backbone.num_features


def init_upsampling(features: nn.Sequential, negative_slope: float) -> None:
    """Initialise a stack of [ConvTranspose2d(kernel 2, stride 2), (Leaky)ReLU] blocks so that it learns to reconstruct.

    PyTorch's default init takes a transposed conv's fan-in from its *output* channels and scales it by 1/sqrt(3),
    so each block shrinks the signal ~6x: the untrained decoder outputs its last bias, and a final ReLU whose
    bias starts negative is dead (ED: blue 0% active at init; trained, green stayed exactly 0). Here every output
    pixel of a kernel-2 stride-2 conv sums exactly ``in_channels`` products, so He init uses that fan-in; the
    output layer starts small (``OUTPUT_GAIN``) around the mean ImageNet pixel, so the untrained reconstruction
    lies inside the [0, 1] target range with every ReLU alive. (A variance-preserving output layer, gain 1, learns
    as fast: 21.2 dB val PSNR after 210 Adam steps on the demo crops, against 21.3 dB.) Official weights overwrite
    all of this.
    """
    convs = [m for m in features if isinstance(m, nn.ConvTranspose2d)]
    for conv in convs:
        last = conv is convs[-1]
        gain = OUTPUT_GAIN if last else nn.init.calculate_gain("leaky_relu", negative_slope)
        nn.init.normal_(conv.weight, std=gain / math.sqrt(conv.in_channels))
        with torch.no_grad():
            conv.bias.copy_(torch.tensor(IMAGENET_DEFAULT_MEAN) if last else torch.zeros_like(conv.bias))


@contextmanager
def input_statistics_only(backbone: nn.Module) -> Iterator[None]:
    """Within, the backbone's BatchNorm layers (if any) leave their running statistics as they are.

    GenConViT passes the input and its reconstruction through one backbone. A BatchNorm backbone (the official
    ConvNeXt has none, so this changes nothing for it) would keep running statistics of the mix of two image
    populations and normalise both with that mix in eval: a train/eval mismatch that left a GenConViT with an
    EfficientNet backbone at chance (val loss 40-77). With the reconstruction pass run in here, the running
    statistics describe the inputs; that pass normalises with its batch's statistics in training (AUC 0.95 on
    the demo).
    """
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.momentum = 0.0  # running = (1 - momentum) * running + momentum * batch: unchanged
    try:
        yield
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum


def classifier_view(recon: torch.Tensor) -> torch.Tensor:
    """The reconstruction as the classifier reads it: without a gradient path back into the autoencoder.

    The autoencoder learns from the reconstruction loss alone. Let the classification loss reach it too and its
    gradient (56x the reconstruction's on the demo's ED decoder at init, 10^4x on the encoder) decides what the
    decoder outputs: a near-constant image the classifier can use instead of a reconstruction (ED demo, 8 epochs:
    val PSNR 15.9 dB, below each image's mean colour at 17.6 dB, and best AUC 0.898; detached: 19.9 dB, 0.952).
    The forward pass is unchanged, so official weights give upstream's outputs. Upstream's training
    (erprogs/GenConViT, train/train_ed.py, train_vae.py) does not detach: its ED autoencoder learns from the
    classification loss only, its VAE from classification + MSE.
    """
    return recon.detach()


class GenConViTOutput(NamedTuple):
    """What every GenConViT variant returns.

    ``features`` is the activation that feeds ``classifier`` (``fc2``), so ``classifier(features) == logits``;
    it is the embedding the feature extractor exports. ``recon`` is the reconstruction at the input
    resolution, ``decoder_out`` the raw decoder output (VAE: half the input resolution).
    """

    logits: torch.Tensor
    fc_out: torch.Tensor
    features: torch.Tensor
    decoder_out: torch.Tensor
    recon: torch.Tensor
    mu: torch.Tensor | None = None
    logvar: torch.Tensor | None = None


class GenConViTHead(nn.Module):
    """Base of every GenConViT variant: the head they share, under the official checkpoints' names.

    ``fc`` maps the backbone features of input and reconstruction to the 500-d embedding, ``act`` follows it, and
    ``fc2`` (the ``classifier``) gives the two logits in the official class order, fake first
    (``official.FAKE_INDEX``).
    """

    def _build_head(self, in_features: int, act: nn.Module) -> None:
        self.fc = nn.Linear(in_features, EMBED_DIM)
        self.fc2 = nn.Linear(EMBED_DIM, 2)
        self.act = act
        # A new head starts at zero, so every image starts at P(fake) = 0.5 and no random gradient reaches the
        # pretrained backbone before the head has learnt something; the EfficientNet expert's head does the same.
        # With PyTorch's init, GenConViT-ED on a real set from ImageNet weights reached 0.91x that expert's AUC
        # (BENCHMARKS.md, "Real faces"). Official weights overwrite it.
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    @property
    def classifier(self) -> nn.Linear:
        return self.fc2

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        """The encoder's and decoder's parameters: a model of its own, trained by the reconstruction loss alone."""
        return [*self.encoder.parameters(), *self.decoder.parameters()]

    def no_weight_decay(self) -> set[str]:
        """Parameter name patterns timm's optimizer factory leaves without weight decay: the autoencoder's.

        Its gradient (the reconstruction's MSE alone, see ``classifier_view``) is small, ~1e-5 per weight in the
        deep encoder layers. Adam's L2 decay (upstream's recipe, 1e-4) adds ``1e-4 * w`` to it, a term of the same
        size, and Adam's normalised step then shrinks those weights by ~lr per step: on the demo the encoder's
        layer-4 weights fell 10x in 40 steps and the autoencoder output one image for every input (val PSNR
        16.0 dB against 17.6 dB for each image's mean colour).
        """
        return {"encoder.*", "decoder.*"}


class EDEncoder(nn.Module):
    """Five [conv 3x3, ReLU, maxpool 2] blocks, 3 -> 256 channels, H x W -> H/32 x W/32."""

    def __init__(self, channels: tuple[int, ...] = (3, 16, 32, 64, 128, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in pairwise(channels):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class EDDecoder(nn.Module):
    """Five [transposed conv 2x2 stride 2, ReLU] blocks, 256 -> 3 channels, H/32 -> H.

    The final ReLU is upstream's; the reconstruction is trained towards the input in [0, 1] pixels, which it can
    reach (see ``GenConViTLoss``).
    """

    def __init__(self, channels: tuple[int, ...] = (256, 128, 64, 32, 16, 3)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in pairwise(channels):
            layers += [nn.ConvTranspose2d(c_in, c_out, 2, stride=2), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        init_upsampling(self.features, negative_slope=0.0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.features(z)


class GenConViTED(GenConViTHead):
    """GenConViT-ED, official layout.

    Fully convolutional up to the ConvNeXt head, so any input whose sides are multiples of 32 works; the
    official weights were trained at 224x224.

    Args:
        backbone_pretrained: start ConvNeXt from timm's ImageNet weights (from the hub unless a file).
        backbone_file: local safetensors/.pth file of ImageNet ``convnext_tiny`` weights; implies pretrained.
        convnext_name: the timm backbone (the official weights need ``convnext_tiny``).
        head_input: ``"logits"`` (official) or ``"features"``: what ``fc`` reads of each view (``create_backbone``).
    """

    def __init__(
        self,
        backbone_pretrained: bool = False,
        backbone_file: str | None = None,
        convnext_name: str = CONVNEXT_NAME,
        head_input: str = "logits",
    ) -> None:
        super().__init__()
        self.encoder = EDEncoder()
        self.decoder = EDDecoder()
        self.backbone = create_backbone(convnext_name, head_input, backbone_pretrained, backbone_file)
        self._build_head(2 * view_width(self.backbone), nn.GELU())

    def forward(self, x: torch.Tensor) -> GenConViTOutput:
        recon = self.decoder(self.encoder(x))
        seen = self.backbone(x)
        with input_statistics_only(self.backbone):
            rebuilt = self.backbone(classifier_view(recon))
        # Order (reconstruction, input) is the official one; fc's weight columns depend on it.
        fc_out = self.fc(self.act(torch.cat([rebuilt, seen], dim=1)))
        features = self.act(fc_out)
        return GenConViTOutput(self.fc2(features), fc_out, features, recon, recon)

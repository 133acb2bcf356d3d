"""GenConViT modules: output contract, VAE sampling, loss terms, the Swin hybrid, backbone init, factory."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.distributions import Normal, kl_divergence

from stage2.models.genconvit import (
    GenConViTED,
    GenConViTHybrid,
    GenConViTLoss,
    GenConViTVAE,
    build_genconvit,
    init_var_from_mu,
)
from stage2.models.genconvit.vae import VAEEncoder

# Small inputs keep the suite fast; the official 224x224 sizes are covered by test_genconvit_official.py.
IMG = 64
LATENT = 4  # reduced VAE latent: 4 x 2 x 2 at 64x64 (official: 256 x 7 x 7 at 224x224)
TINY_SWIN = {"embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2), "window_size": 4}


def tiny_hybrid(variant: str) -> GenConViTHybrid:
    return GenConViTHybrid(
        variant, img_size=IMG, latent_channels=LATENT, convnext_name="test_convnext", swin_kwargs=TINY_SWIN
    )


@pytest.fixture(scope="module")
def ed_model() -> GenConViTED:
    return GenConViTED().eval()


@pytest.fixture(scope="module")
def vae_model() -> GenConViTVAE:
    torch.manual_seed(0)
    return GenConViTVAE(img_size=IMG, latent_channels=LATENT).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def test_ed_output_contract(ed_model, images):
    with torch.no_grad():
        out = ed_model(images)
    assert out.logits.shape == (2, 2) and out.fc_out.shape == out.features.shape == (2, 500)
    assert out.decoder_out.shape == out.recon.shape == images.shape
    assert out.mu is None and out.logvar is None
    torch.testing.assert_close(out.features, F.gelu(out.fc_out))
    torch.testing.assert_close(ed_model.classifier(out.features), out.logits)


def test_vae_output_contract_and_eval_is_deterministic(vae_model, images):
    with torch.no_grad():
        out = vae_model(images)
        again = vae_model(images)
        decoded_mu = vae_model.decoder(out.mu)
    assert out.logits.shape == (2, 2) and out.features.shape == (2, 500)
    assert out.decoder_out.shape == (2, 3, IMG // 2, IMG // 2) and out.recon.shape == images.shape
    assert out.mu.shape == out.logvar.shape == (2, LATENT * (IMG // 32) ** 2)
    assert torch.equal(out.logits, again.logits)
    torch.testing.assert_close(out.decoder_out, decoded_mu)  # z = mu in eval
    torch.testing.assert_close(out.features, F.relu(out.fc_out))
    torch.testing.assert_close(vae_model.classifier(out.features), out.logits)
    torch.testing.assert_close(
        out.recon, F.interpolate(out.decoder_out, size=(IMG, IMG), mode="bilinear", antialias=True)
    )


def test_vae_img_size_is_checked():
    with pytest.raises(ValueError, match="multiple of 32"):
        VAEEncoder(img_size=200)


@pytest.mark.parametrize("logvar_bias", [-30.0, 4.0])
def test_vae_training_samples_with_std_from_the_var_head(logvar_bias):
    encoder = VAEEncoder(img_size=IMG, latent_channels=LATENT).train()
    with torch.no_grad():
        # mu == 0, so upstream's bug (std = exp(0.5 * mu) = 1) would give unit spread in both cases.
        for head, bias in ((encoder.mu, 0.0), (encoder.var, logvar_bias)):
            head.weight.zero_()
            head.bias.fill_(bias)
        z, mu, logvar = encoder(torch.randn(64, 3, IMG, IMG))
    assert torch.all(mu == 0) and torch.all(logvar == logvar_bias)
    spread = (z - mu).std().item()
    assert spread == pytest.approx(torch.exp(torch.tensor(0.5 * logvar_bias)).item(), rel=0.1)


def test_vae_train_mode_is_stochastic(vae_model, images):
    vae_model.train()
    try:
        with torch.no_grad():
            first, second = vae_model(images), vae_model(images)
    finally:
        vae_model.eval()
    assert not torch.equal(first.decoder_out, second.decoder_out)
    torch.testing.assert_close(first.mu, second.mu)


def test_unused_upstream_layers_are_frozen_and_every_trainable_parameter_learns(vae_model, images):
    frozen = {name for name, p in vae_model.named_parameters() if not p.requires_grad}
    assert frozen == {
        f"{layer}.{kind}" for layer in ("encoder.fc1", "encoder.fc2", "fc3") for kind in ("weight", "bias")
    }
    vae_model.train()
    vae_model.zero_grad()
    try:
        terms = GenConViTLoss(recon_weight=1.0, kl_weight=0.5)(vae_model(images), images, torch.tensor([1, 0]))
        terms["loss"].mean().backward()
    finally:
        vae_model.eval()
    # DDP without find_unused_parameters needs a gradient for every trainable parameter.
    assert [n for n, p in vae_model.named_parameters() if p.requires_grad and p.grad is None] == []
    vae_model.zero_grad(set_to_none=True)


def test_kl_term_is_added_and_reaches_the_var_head(vae_model, images):
    labels = torch.tensor([1, 0])
    vae_model.zero_grad(set_to_none=True)
    out = vae_model(images)  # eval: z = mu, so only the KL term depends on the var head
    without_kl = GenConViTLoss(recon_weight=1.0, kl_weight=0.0)(out, images, labels)["loss"]
    terms = GenConViTLoss(recon_weight=1.0, kl_weight=0.5)(out, images, labels)
    # Summed over the latent, per pixel value (the MSE's scale).
    expected_kl = kl_divergence(Normal(out.mu, (0.5 * out.logvar).exp()), Normal(0.0, 1.0)).flatten(1).sum(1)
    expected_kl = expected_kl / images[0].numel()
    torch.testing.assert_close(terms["kl"], expected_kl.detach())
    torch.testing.assert_close(terms["loss"] - without_kl, 0.5 * expected_kl)
    terms["loss"].mean().backward()
    assert vae_model.encoder.var.bias.grad.abs().sum() > 0
    vae_model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("variant", ["ed", "vae"])
def test_recon_on_reals_trains_the_autoencoder_on_the_reals_alone(variant):
    torch.manual_seed(0)
    sizes = {"img_size": IMG, "latent_channels": LATENT} if variant == "vae" else {}
    model = build_genconvit(variant, convnext_name="test_efficientnet", **sizes).eval()
    images = torch.randn(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 0, 1])
    reals_only = GenConViTLoss(recon_weight=1.0, kl_weight=0.5, recon_on="reals")

    def autoencoder_grads(loss: GenConViTLoss, keep: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss(model(images[keep]), images[keep], labels[keep])["loss"].mean().backward()
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.autoencoder_parameters()]

    fakes = labels == 1
    assert all((g == 0).all() for g in autoencoder_grads(reals_only, fakes))
    everything = GenConViTLoss(recon_weight=1.0, kl_weight=0.5)
    assert any((g != 0).any() for g in autoencoder_grads(everything, fakes))  # recon_on all (upstream's)
    with torch.no_grad():  # eval mode: each image's terms do not depend on the others in its batch
        mixed = reals_only(model(images), images, labels)
        reals = reals_only(model(images[~fakes]), images[~fakes], labels[~fakes])
        kept = everything(model(images), images, labels)
    torch.testing.assert_close((mixed["loss"] - mixed["cls"]).mean(), (reals["loss"] - reals["cls"]).mean())
    torch.testing.assert_close(reals["loss"], everything(model(images[~fakes]), images[~fakes], labels[~fakes])["loss"])
    torch.testing.assert_close(mixed["recon"], kept["recon"])  # every image's error is still measured


def pixels(images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)
    return images * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)


@pytest.mark.parametrize("variant", ["ed", "vae"])
def test_reconstruction_target_is_the_input_in_pixels_which_the_decoder_can_reach(variant, ed_model, vae_model):
    # A normalised crop: most of its values are negative, which the ED decoder's final ReLU cannot output.
    crop = torch.rand(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))
    images = (crop - torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    assert (images < 0).float().mean() > 0.4
    model = ed_model if variant == "ed" else vae_model
    with torch.no_grad():
        out = model(images)
    loss = GenConViTLoss(recon_weight=1.0, kl_weight=0.0)
    perfect = out._replace(recon=crop.clone())
    torch.testing.assert_close(loss(perfect, images, torch.tensor([0, 1]))["recon"], torch.zeros(2))
    # The best a ReLU output can do is 0 where the target is negative: against pixels that costs nothing.
    clipped = out._replace(recon=loss.pixels(images).clamp_min(0))
    assert loss(clipped, images, torch.tensor([0, 1]))["recon"].max() < 1e-10


def test_ed_loss_terms(ed_model, images):
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        out = ed_model(images)
    terms = GenConViTLoss(recon_weight=2.0, kl_weight=1.0)(out, images, labels)
    assert terms["loss"].shape == (2,) and (terms["kl"] == 0).all()
    torch.testing.assert_close(terms["recon"].mean(), F.mse_loss(out.recon, pixels(images)))
    targets = torch.tensor([1, 0])  # official order: real -> 1, fake -> 0
    torch.testing.assert_close(terms["cls"], F.cross_entropy(out.logits, targets, reduction="none"))
    torch.testing.assert_close(terms["loss"], terms["cls"] + 2.0 * terms["recon"])
    smoothed = GenConViTLoss(recon_weight=2.0, kl_weight=1.0, label_smoothing=0.2)(out, images, labels)
    expected = F.cross_entropy(out.logits, targets, label_smoothing=0.2, reduction="none")
    torch.testing.assert_close(smoothed["cls"], expected)


@pytest.mark.parametrize("variant", ["ed", "vae"])
def test_hybrid_logits_depend_on_swin(variant, images):
    torch.manual_seed(0)
    model = tiny_hybrid(variant).eval()
    with torch.no_grad():
        model.fc2.weight.normal_()  # a new head starts at zero: a trained one does not
        before = model(images)
        for p in model.swin.parameters():
            p.add_(0.5 * torch.randn_like(p))
        after = model(images)
    assert before.logits.shape == (2, 2) and before.recon.shape == images.shape
    assert (before.mu is None) == (variant == "ed")
    assert not torch.allclose(before.logits, after.logits)
    torch.testing.assert_close(before.decoder_out, after.decoder_out)  # only the Swin path changed
    torch.testing.assert_close(model.classifier(after.features), after.logits)


def test_backbone_file_initialises_convnext_offline(tmp_path):
    torch.manual_seed(3)
    imagenet = timm.create_model("convnext_tiny", pretrained=False)
    path = tmp_path / "convnext_tiny.safetensors"
    save_file(imagenet.state_dict(), str(path))
    loaded = GenConViTED(backbone_file=str(path)).backbone.state_dict()
    for name, tensor in imagenet.state_dict().items():
        assert torch.equal(loaded[name], tensor), name


def test_factory():
    assert isinstance(build_genconvit("vae", img_size=IMG, latent_channels=LATENT), GenConViTVAE)
    hybrid = build_genconvit(
        "ed", arch="hybrid", img_size=IMG, convnext_name="test_convnext", swin_kwargs=TINY_SWIN
    )
    assert isinstance(hybrid, GenConViTHybrid) and hybrid.variant == "ed"
    with pytest.raises(ValueError, match="variant"):
        build_genconvit("gan")
    with pytest.raises(ValueError, match="arch"):
        build_genconvit("ed", arch="swin")


def test_var_from_mu_makes_step_zero_sample_as_upstream_did(vae_model, images):
    torch.manual_seed(0)
    model = GenConViTVAE(img_size=IMG, latent_channels=LATENT)
    init_var_from_mu(model)
    encoder = model.encoder.train()
    torch.manual_seed(1)
    z, mu, logvar = encoder(images)
    torch.manual_seed(1)
    eps = torch.randn_like(mu)
    torch.testing.assert_close(logvar, mu)
    torch.testing.assert_close(z, mu + eps * torch.exp(0.5 * mu))  # upstream: std from the mu head


@pytest.mark.parametrize("variant", ["ed", "vae"])
def test_batchnorm_backbones_keep_running_statistics_of_the_inputs_alone(variant, images):
    # A BatchNorm backbone sees inputs and reconstructions; statistics of that mix would normalise both wrongly in
    # eval. After a training forward, the running statistics are exactly those of a pass over the inputs alone.
    torch.manual_seed(0)
    kwargs = {"img_size": IMG, "latent_channels": LATENT} if variant == "vae" else {}
    model = build_genconvit(variant, convnext_name="test_efficientnet", **kwargs).train()
    backbone = model.backbone if variant == "ed" else model.convnext_backbone
    reference = copy.deepcopy(backbone)
    with torch.no_grad():
        model(images)
        reference(images)
    stats = {k: v for k, v in backbone.state_dict().items() if "running" in k}
    assert stats and all(torch.equal(v, reference.state_dict()[k]) for k, v in stats.items())
    assert any(not torch.equal(v, build_genconvit(variant, convnext_name="test_efficientnet", **kwargs)
                               .state_dict()[f"{'backbone' if variant == 'ed' else 'convnext_backbone'}.{k}"])
               for k, v in stats.items())  # they did move: from the inputs

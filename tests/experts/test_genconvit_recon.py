"""GenConViT's autoencoders reconstruct: they learn to beat each image's own mean colour; PSNR; their init; the
recon grid the expert draws."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import open_png
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from stage2.data.manifest import read_manifest
from stage2.engine.trainer import Trainer
from stage2.experts.genconvit import GenConViTExpert, plot_recon_samples
from stage2.models.genconvit import GenConViTLoss, build_genconvit
from stage2.models.genconvit.loss import psnr
from stage2.run.config import TrainConfig
from stage2.run.distributed import setup_distributed
from stage2.scoring.evaluator import grid_rows

IMG = 64
MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
STEPS = 40  # batches of 12 from the 36 tiny training crops


def load_split(manifest: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A manifest's PNGs as the normalised batch the trainer feeds the model, and their labels (1 = fake)."""
    frame = pd.read_csv(manifest)
    pixels = np.stack([np.asarray(Image.open(manifest.parent / p).convert("RGB")) for p in frame["path"]])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    return (x - MEAN) / STD, torch.tensor(frame["label"].to_numpy())


def tiny_model(variant: str, latent_channels: int = 4) -> torch.nn.Module:
    kwargs = {"img_size": IMG, "latent_channels": latent_channels} if variant == "vae" else {}
    return build_genconvit(variant, convnext_name="test_convnext", **kwargs)


def mean_colour_mse(images: torch.Tensor) -> float:
    """MSE of the trivial reconstruction: every pixel of an image set to that image's mean colour."""
    pixels = images * STD + MEAN
    return float((pixels - pixels.mean(dim=(2, 3), keepdim=True)).pow(2).mean())


def test_a_few_plain_adam_steps_make_the_vae_reconstruct_better_than_each_images_mean_colour(tiny_data):
    # The whole model and loss, classification included: before the fix the VAE's latent collapsed (KL too strong).
    # The ED learns through the trainer's own steps below, which cover its model and loss as well.
    variant, lr = "vae", 3e-3
    images, labels = load_split(tiny_data[0])
    torch.manual_seed(0)
    model = tiny_model(variant, latent_channels=16)
    criterion = GenConViTLoss(recon_weight=1.0, kl_weight=0.5)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(STEPS):
        pick = torch.randperm(len(images), generator=generator)[:12]
        loss = criterion(model(images[pick]), images[pick], labels[pick])["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        recon = float(criterion(model(images), images, labels)["recon"].mean())
    # Measured: 0.80x the mean colour's MSE after 40 steps; it starts 1.5x above it.
    assert recon < 0.9 * mean_colour_mse(images), (recon, mean_colour_mse(images))


@pytest.mark.slow
def test_the_trainers_steps_reconstruct_better_than_each_images_mean_colour(tiny_data, tmp_path):
    # The loop's own optimizer and gradient clipping at GenConViT's defaults (Adam with L2 decay 1e-4, clip 1), a
    # constant lr, one update per epoch of the 36 training crops. Before the fix the L2 term outweighed the
    # autoencoder's small gradient, clipped by the classifier's norm, and Adam shrank the encoder's weights towards
    # zero (measured: 0.84x the mean colour's MSE here; on the demo the ED output one image for every input).
    cfg = TrainConfig(train_manifest=str(tiny_data[0]), val_manifest=str(tiny_data[1]), img_size=IMG, aug="none",
                      workers=0, epochs=STEPS, batch_size=36, lr=2e-3, min_lr=2e-3, warmup_epochs=0.0,
                      weight_decay=1e-4, opt="adam", clip_grad=1.0, amp="off", channels_last=False, device="cpu",
                      output_dir=str(tmp_path), save_every_minutes=0, calibrate=False)
    # the autoencoder at the loop's lr too (a new one's default is 1e-3): one constant lr for the whole model
    expert = GenConViTExpert("ed", img_size=IMG, init="scratch", backbone="test_convnext", ae_lr=cfg.lr)
    trainer = Trainer(cfg, expert, setup_distributed("cpu"))
    ctx = trainer.start_stage(0, expert.stages(cfg.epochs, cfg.lr)[0])
    decay = {id(p): group["weight_decay"] for group in ctx.optimizer.param_groups for p in group["params"]}
    assert {decay[id(p)] for p in trainer.model.autoencoder_parameters()} == {0.0}
    assert decay[id(trainer.model.fc.weight)] == 1e-4
    batch = next(iter(trainer.train_loader))
    for epoch in range(STEPS):
        trainer.train_epoch(epoch, ctx, batches=[batch], steps=1)
    pixels = batch.images.float() / 255
    images = trainer.augmentation.on_device.normalise(pixels)  # as the loop feeds them: the backbone's normalisation
    trainer.model.eval()
    with torch.no_grad():
        recon = float(expert.criterion(trainer.model(images), images, batch.labels)["recon"].mean())
    flat = float((pixels - pixels.mean(dim=(2, 3), keepdim=True)).pow(2).mean())
    assert recon < 0.75 * flat, (recon, flat)  # measured: 0.67x


@pytest.mark.parametrize("variant", ["ed", "vae"])
def test_the_autoencoder_and_the_classifier_are_clipped_apart(variant):
    expert = GenConViTExpert(variant, img_size=IMG, init="scratch", backbone="test_convnext", latent_channels=4)
    model = expert.build_model()
    autoencoder, rest = expert.clip_groups(model)
    assert {id(p) for p in autoencoder} == {id(p) for p in [*model.encoder.parameters(), *model.decoder.parameters()]}
    assert {id(p) for p in autoencoder} | {id(p) for p in rest} == {id(p) for p in model.parameters()}
    assert not {id(p) for p in autoencoder} & {id(p) for p in rest}


def test_psnr_of_known_errors():
    target = torch.zeros(2, 3, 4, 4)
    prediction = torch.stack([torch.full((3, 4, 4), 0.1), torch.zeros(3, 4, 4)])
    torch.testing.assert_close(psnr(prediction, target), torch.tensor([20.0, 100.0]))  # MSE 0.01; exact


def test_mean_colour_psnr_is_each_images_own_baseline():
    # Image 0: left half black, right half white (mean grey, MSE 0.25, 6.02 dB); image 1: one flat colour (exact).
    pixels = torch.zeros(2, 3, 32, 32)
    pixels[0, :, :, 16:] = 1.0
    pixels[1] = torch.tensor([0.2, 0.5, 0.7]).view(3, 1, 1)
    images = (pixels - MEAN) / STD
    out = tiny_model("ed")(images)
    scores = GenConViTLoss(recon_weight=1.0, kl_weight=0.0).psnr(out._replace(recon=pixels.clone()), images)
    torch.testing.assert_close(scores["mean_colour_psnr"], torch.tensor([10 * float(np.log10(4)), 100.0]))
    torch.testing.assert_close(scores["recon_psnr"], torch.tensor([100.0, 100.0]))


@pytest.mark.parametrize("variant", ["ed", "vae"])
def test_the_classifier_loss_does_not_reach_the_autoencoder(variant):
    # The autoencoder learns from the reconstruction loss alone (see ed.classifier_view).
    model = tiny_model(variant).train()
    torch.nn.init.normal_(model.fc2.weight)  # a trained head passes the loss on to fc (a new one starts at zero)
    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    GenConViTLoss(recon_weight=0.0, kl_weight=0.0)(model(images), images, torch.tensor([0, 1]))["loss"].sum().backward()
    for part in (model.encoder, model.decoder):
        assert all(p.grad is None or not p.grad.any() for p in part.parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.fc.parameters())


@pytest.mark.parametrize("variant", ["ed", "vae"])
def test_untrained_decoder_outputs_an_image_dependent_picture_in_range(variant):
    # PyTorch's default init shrank the signal ~6x per transposed conv: the output was its last bias, and ED's final
    # ReLU was dead on whole channels.
    torch.manual_seed(0)
    model = tiny_model(variant).eval()
    images = torch.randn(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        recon = model(images).recon
    per_channel = recon.mean(dim=(0, 2, 3))
    torch.testing.assert_close(per_channel, torch.tensor(IMAGENET_DEFAULT_MEAN), atol=0.05, rtol=0)
    assert (recon > 0).float().mean(dim=(0, 2, 3)).min() > 0.9  # every channel alive


def test_the_recon_grid_shows_different_videos_and_says_its_figures_are_its_own(tiny_data, tmp_path, caplog):
    # It showed the first four reals of val: frames of one or two videos.
    val = read_manifest(tiny_data[1])  # 2 real and 2 fake videos of 3 frames: a second frame of each
    rows = grid_rows(val)
    assert val.iloc[rows][["label", "video_id"]].values.tolist() == [
        [0, "vid002"], [0, "vid004"], [0, "vid002"], [0, "vid004"], [1, "vid010"], [1, "vid014"], [1, "vid010"],
        [1, "vid014"]]
    train = read_manifest(tiny_data[0])  # 6 videos a class: four of them, spread over the set
    assert train.iloc[grid_rows(train)]["video_id"].tolist() == ["vid000", "vid003", "vid005", "vid007", "vid008",
                                                                  "vid011", "vid012", "vid015"]
    expert = GenConViTExpert("ed", img_size=IMG, init="scratch", backbone="test_convnext")
    images, labels = load_split(tiny_data[1])
    with caplog.at_level(logging.INFO, logger="stage2"):  # its 8 images' figures, beside metrics.csv's whole val
        expert.epoch_artifacts(expert.build_model(), images[rows], labels[rows], 1, tmp_path)
    assert "the grid's 8 images (the whole val set's are val_recon_* in metrics.csv): MSE real " in caplog.text


def test_recon_samples_have_column_headers_and_real_fake_row_labels(tmp_path):
    rng = np.random.default_rng(0)
    inputs = rng.random((4, 3, 16, 16)).astype(np.float32)
    recons = np.clip(inputs + 0.1, 0, 1)
    fig = plot_recon_samples(inputs, recons, np.array([0, 0, 1, 1]), np.array([0.01, 0.02, 0.03, 0.04]),
                             tmp_path / "recon_samples" / "epoch_001.png", "genconvit_ed: epoch 1")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["input", "reconstruction", "difference x4"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["real\nMSE 0.0100", "real\nMSE 0.0200",
                                                            "fake\nMSE 0.0300", "fake\nMSE 0.0400"]
    # The tiles are the images themselves, row by row: input, reconstruction, |difference| x 4.
    mosaic = ax.get_images()[0].get_array()  # 16px tiles, 2px apart
    np.testing.assert_allclose(mosaic[:16, :16], inputs[0].transpose(1, 2, 0))
    np.testing.assert_allclose(mosaic[3 * 18:3 * 18 + 16, 18:34], recons[3].transpose(1, 2, 0))
    np.testing.assert_allclose(mosaic[18:34, 36:52], np.clip(np.abs(inputs[1] - recons[1]) * 4, 0, 1)
                               .transpose(1, 2, 0), atol=1e-6)
    open_png(tmp_path / "recon_samples" / "epoch_001.png")

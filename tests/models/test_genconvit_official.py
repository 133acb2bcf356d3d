"""Official GenConViT checkpoints: equivalence with upstream outputs, strict loading, class order."""

from __future__ import annotations

import gc
import json
import logging
import math
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stage2.errors import OfficialCheckpointError
from stage2.models.genconvit import (
    FAKE_INDEX,
    REAL_INDEX,
    GenConViTED,
    GenConViTLoss,
    GenConViTVAE,
    detect_variant,
    fake_logit,
    load_official_checkpoint,
    targets_from_labels,
)
from stage2.models.genconvit.official import SWIN_PREFIXES

FIXTURES = Path(__file__).parents[1] / "fixtures" / "genconvit"
ATOL = 1e-4


def official_keys(variant: str) -> list[tuple[str, list[int]]]:
    return [
        (key, shape) for key, shape in json.loads((FIXTURES / f"official_{variant}_keys.json").read_text())
    ]


def recipe_tensor(key: str, shape: list[int]) -> torch.Tensor:
    """The spec's "Equivalence fixture" weights: seeded by the key's crc32, scaled by fan-in."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    if key.endswith("num_batches_tracked"):
        return torch.tensor(0)
    if key.endswith("running_mean"):
        return 0.1 * torch.randn(shape, generator=g)
    if key.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=g)
    if len(shape) >= 2:
        return torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    if key.endswith("weight"):
        return 1 + 0.1 * torch.randn(shape, generator=g)
    return 0.1 * torch.randn(shape, generator=g)


def recipe_state(variant: str) -> dict[str, torch.Tensor]:
    return {
        key: recipe_tensor(key, shape)
        for key, shape in official_keys(variant)
        if not key.startswith(SWIN_PREFIXES)
    }


def swin_placeholders(variant: str) -> dict[str, torch.Tensor]:
    # Shape-only stand-ins (one shared element each) keep the files small; the loader drops them unread.
    return {
        key: torch.zeros(()).expand(shape)
        for key, shape in official_keys(variant)
        if key.startswith(SWIN_PREFIXES)
    }


def reference(variant: str) -> dict[str, object]:
    return torch.load(FIXTURES / f"reference_outputs_{variant}.pt", weights_only=True)


def reference_input(ref: dict[str, object]) -> torch.Tensor:
    return torch.randn(*ref["x_shape"], generator=torch.Generator().manual_seed(ref["x_seed"]))


def max_diffs(out: object, ref: dict[str, object], names: tuple[str, ...]) -> dict[str, float]:
    return {name: (getattr(out, name) - ref[name]).abs().max().item() for name in names}


@pytest.fixture(scope="module")
def ed_model() -> GenConViTED:
    return GenConViTED().eval()


@pytest.fixture(scope="module")
def ed_state() -> dict[str, torch.Tensor]:
    return recipe_state("ed")


def test_ed_matches_upstream_reference(ed_model, ed_state, tmp_path):
    path = tmp_path / "genconvit_ed_inference.pth"
    torch.save(ed_state, path)
    report = load_official_checkpoint(ed_model, path)
    assert (report.variant, report.loaded, report.dropped_swin) == ("ed", 206, 0)

    ref = reference("ed")
    with torch.no_grad():
        out = ed_model(reference_input(ref))
    diffs = max_diffs(out, ref, ("logits", "fc_out", "decoder_out"))
    print("ED max |diff|:", diffs)
    assert max(diffs.values()) < ATOL, diffs
    assert out.recon is out.decoder_out and out.mu is None and out.logvar is None
    torch.testing.assert_close(out.features, F.gelu(out.fc_out))
    torch.testing.assert_close(ed_model.classifier(out.features), out.logits)


@pytest.mark.slow
def test_vae_official_size_matches_upstream_reference(tmp_path):
    path = tmp_path / "genconvit_vae_inference.pth"
    torch.save(recipe_state("vae"), path)
    gc.collect()
    # Built on the meta device and loaded by assignment: no 2.8 GB random init, one copy of the weights.
    with torch.device("meta"):
        model = GenConViTVAE()
    try:
        report = load_official_checkpoint(model, path, assign=True)
    finally:
        path.unlink()  # pytest keeps recent tmp dirs; do not leave 2.7 GB behind
    assert (report.variant, report.loaded, report.dropped_swin) == ("vae", 232, 0)
    model.eval()

    ref = reference("vae")
    x = reference_input(ref)
    with torch.no_grad():
        out = model(x)
        again = model(x)
    diffs = max_diffs(out, ref, ("logits", "fc_out", "decoder_out", "recon", "mu"))
    print("VAE max |diff|:", diffs)
    assert max(diffs.values()) < ATOL, diffs
    assert torch.equal(out.logits, again.logits)  # eval uses z = mu: no sampling
    torch.testing.assert_close(out.features, F.relu(out.fc_out))
    del model, out, again
    gc.collect()


@pytest.mark.parametrize("wrapped", [False, True], ids=["raw", "wrapped"])
@pytest.mark.parametrize("with_swin", [False, True], ids=["no_swin", "swin"])
def test_loads_raw_and_wrapped_with_or_without_swin(ed_model, ed_state, tmp_path, caplog, wrapped, with_swin):
    state = {**ed_state, **swin_placeholders("ed")} if with_swin else dict(ed_state)
    source = state  # raw state_dicts are also read from a file in test_ed_matches_upstream_reference
    if wrapped:  # what upstream's trainer saves; read from disk to check weights_only=True copes with it
        source = tmp_path / "checkpoint.pth"
        optimizer = torch.optim.Adam([torch.zeros(2, requires_grad=True)], lr=1e-4, weight_decay=1e-4)
        extras = {"epoch": 31, "optimizer": optimizer.state_dict(), "min_loss": 0.2}
        torch.save({"state_dict": state, **extras}, source)
    with torch.no_grad():
        ed_model.fc2.weight.zero_()

    with caplog.at_level(logging.INFO, logger="stage2.models.genconvit.official"):
        report = load_official_checkpoint(ed_model, source)

    dropped = 382 if with_swin else 0
    assert (report.loaded, report.dropped_swin) == (206, dropped)
    assert f"dropped {dropped} Swin keys" in caplog.text
    assert torch.equal(ed_model.fc2.weight, ed_state["fc2.weight"])
    assert not hasattr(ed_model.backbone, "patch_embed")  # the inert Swin is not rebuilt


def test_foreign_key_is_named(ed_model, ed_state):
    with pytest.raises(OfficialCheckpointError, match=r"unexpected head\.extra\.weight"):
        load_official_checkpoint(ed_model, {**ed_state, "head.extra.weight": torch.zeros(1)})


def test_missing_key_is_named(ed_model, ed_state):
    state = {key: value for key, value in ed_state.items() if key != "backbone.stages.2.blocks.4.gamma"}
    with pytest.raises(OfficialCheckpointError, match=r"missing backbone\.stages\.2\.blocks\.4\.gamma"):
        load_official_checkpoint(ed_model, {"state_dict": state})


def test_shape_mismatch_is_named(ed_model, ed_state):
    with pytest.raises(OfficialCheckpointError, match=r"fc2\.weight \(3, 500\) vs model \(2, 500\)"):
        load_official_checkpoint(ed_model, {**ed_state, "fc2.weight": torch.zeros(3, 500)})


def test_unreadable_file_names_the_path(ed_model, tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(OfficialCheckpointError, match="broken.pth"):
        load_official_checkpoint(ed_model, path)


def test_detect_variant_from_official_key_lists():
    assert detect_variant(key for key, _ in official_keys("ed")) == "ed"
    assert detect_variant(key for key, _ in official_keys("vae")) == "vae"
    with pytest.raises(OfficialCheckpointError, match="not a GenConViT checkpoint"):
        detect_variant(["conv_stem.weight"])


def test_label_mapping_agrees_with_official_class_order(ed_model, ed_state):
    assert (FAKE_INDEX, REAL_INDEX) == (0, 1)
    labels = torch.tensor([1, 0, 1])  # project convention: 1 = fake
    assert targets_from_labels(labels).tolist() == [FAKE_INDEX, REAL_INDEX, FAKE_INDEX]
    assert targets_from_labels(labels.float()).dtype == torch.long

    # An official-layout model whose classifier says "fake" for every input.
    load_official_checkpoint(ed_model, ed_state)
    with torch.no_grad():
        ed_model.fc2.weight.zero_()
        ed_model.fc2.bias.copy_(torch.tensor([3.0, -3.0]))
        out = ed_model(torch.randn(3, 3, 64, 64))  # fully convolutional: a small input is enough here
    p_fake = torch.sigmoid(fake_logit(out.logits))
    torch.testing.assert_close(p_fake, out.logits.softmax(1)[:, FAKE_INDEX])
    assert bool((p_fake > 0.99).all())

    loss = GenConViTLoss(recon_weight=0.0, kl_weight=0.0)
    fake_loss = loss(out, out.recon, torch.ones(3))["loss"]
    real_loss = loss(out, out.recon, torch.zeros(3))["loss"]
    assert bool((fake_loss < 0.01).all()) and bool((real_loss > 5.0).all())


def test_labels_other_than_zero_or_one_are_rejected():
    with pytest.raises(ValueError, match="labels must be 0"):
        targets_from_labels(torch.tensor([0, 2]))

"""Feature extraction: embeddings against the full models, feature files, joins, the CLI and --example."""

from __future__ import annotations

import copy
import math
import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from conftest import ROOT, fails, subprocess_env
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset

import feature_extractor
from stage2.commands.cli import exit_on_error
from stage2.data.preprocessing import DataConfig
from stage2.embeddings import (
    FeatureExtractor,
    FeatureFileError,
    NpzStreamWriter,
    check_model_name,
    join_features,
    load_features,
)
from stage2.embeddings.extract import source_frame
from stage2.embeddings.stacking_preview import print_preview
from stage2.embeddings.store import FeatureSet
from stage2.errors import CheckpointError, ConfigError
from stage2.models.families import FAMILIES
from stage2.models.genconvit import GenConViTED, GenConViTVAE, build_genconvit, fake_logit
from stage2.models.timm_models import create_timm_model, timm_data_config
from stage2.run.checkpoint import BestCheckpoint, save_checkpoint

IMG = 64
N = 6
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_dataset(root: Path, n: int, size: int = IMG, frames: int = 1, offset: int = 0) -> Path:
    """n random PNGs (fakes brighter by `offset`, so a classifier can tell them apart) and their manifest."""
    rng = np.random.default_rng(n + offset)
    rows = []
    for i in range(n):
        label = (i // frames) % 2
        pixels = rng.integers(0, 256 - offset, (size, size, 3)) + offset * label
        path = root / "img" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        rows.append(
            {
                "path": f"img/{i:03d}.png",
                "label": label,
                "video_id": f"v{i // frames}",
                "method": "swap" if label else "",
            }
        )
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def read_images(manifest: Path) -> torch.Tensor:
    frame = pd.read_csv(manifest)
    arrays = [np.asarray(Image.open(manifest.parent / p).convert("RGB")) for p in frame["path"]]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def normalise(images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def data_config(size: int = IMG) -> DataConfig:
    return DataConfig.of(size, MEAN, STD)


def save_trainer_checkpoint(path: Path, model: torch.nn.Module, meta: dict, temperature: float, **extra) -> Path:
    best = BestCheckpoint(model=model.state_dict(), meta=meta, data_config=data_config(), epoch=1,
                          temperature=temperature)
    save_checkpoint({**best.to_dict(), **extra}, path)
    return path


def extractor(path: Path, model_name: str | None = None, batch_size: int = 4) -> FeatureExtractor:
    return FeatureExtractor(model_name, path, "cpu", batch_size=batch_size, workers=0, progress=False)


def rows_of(fx: FeatureExtractor, manifest: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return fx.extract(fx.make_loader(manifest), return_probs=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), N)


@pytest.fixture(scope="module")
def timm_expert(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = create_timm_model("test_efficientnet", pretrained=False, num_classes=1).eval()
    assert timm_data_config(model, IMG).to_dict()["mean"] == list(MEAN)
    meta = {"family": "timm", "model_name": "test_efficientnet", "num_classes": 1}
    return save_trainer_checkpoint(tmp_path_factory.mktemp("timm") / "best.pt", model, meta, 2.0), model


@pytest.fixture(scope="module")
def genconvit_experts(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("genconvit")
    vae_kwargs = {"img_size": IMG, "latent_channels": 4}
    models = {"ed": (GenConViTED().eval(), {}), "vae": (GenConViTVAE(**vae_kwargs).eval(), vae_kwargs)}
    experts = {}
    for variant, (model, kwargs) in models.items():
        meta = {
            "family": "genconvit",
            "model_name": f"genconvit_{variant}",
            "variant": variant,
            "arch": "official",
            "model_kwargs": kwargs,
        }
        experts[variant] = save_trainer_checkpoint(root / f"{variant}.pt", model, meta, 1.5), model
    return experts


@pytest.fixture(scope="module")
def timm_fx(timm_expert) -> FeatureExtractor:
    return extractor(timm_expert[0])


@pytest.fixture(scope="module")
def genconvit_fx(genconvit_experts) -> dict[str, FeatureExtractor]:
    return {variant: extractor(path) for variant, (path, _) in genconvit_experts.items()}


def test_timm_embeddings_are_pre_logits_and_rebuild_the_logits(data, timm_expert, timm_fx):
    model, fx = timm_expert[1], timm_fx
    embeddings, labels, p_fake = rows_of(fx, data)

    assert embeddings.dtype == np.float32 and embeddings.shape == (N, model.num_features) == (N, fx.embed_dim)
    assert labels.dtype == np.int64 and labels.tolist() == pd.read_csv(data)["label"].tolist()
    x = normalise(read_images(data))
    with torch.no_grad():
        pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model(x)
        headless = copy.deepcopy(model)
        headless.reset_classifier(0)
        no_head = headless(x)
        rebuilt = model.get_classifier()(torch.from_numpy(embeddings))
    # Rows compared image by image across two batches (4 + 2): the loader's order is kept.
    torch.testing.assert_close(torch.from_numpy(embeddings), pre_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(embeddings), no_head, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rebuilt, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(p_fake), torch.sigmoid(logits.squeeze(1) / 2.0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", ["ed", "vae"])
def test_genconvit_features_rebuild_the_logits(data, genconvit_experts, genconvit_fx, variant):
    model, fx = genconvit_experts[variant][1], genconvit_fx[variant]
    embeddings, labels, p_fake = rows_of(fx, data)

    assert fx.model_name == f"genconvit_{variant}" and fx.temperature == 1.5
    assert embeddings.dtype == np.float32 and embeddings.shape == (N, 500)
    assert labels.tolist() == pd.read_csv(data)["label"].tolist()
    with torch.no_grad():
        out = model(normalise(read_images(data)))
        rebuilt = model.classifier(torch.from_numpy(embeddings))
    torch.testing.assert_close(torch.from_numpy(embeddings), out.features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rebuilt, out.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        torch.from_numpy(p_fake), torch.sigmoid(fake_logit(out.logits) / 1.5), rtol=1e-4, atol=1e-6
    )


def test_order_follows_the_loader(tmp_path, data, timm_fx):
    reversed_manifest = tmp_path / "reversed.csv"
    frame = pd.read_csv(data)
    frame["path"] = [str(data.parent / p) for p in frame["path"]]
    frame.iloc[::-1].to_csv(reversed_manifest, index=False)
    forward, labels, _ = rows_of(timm_fx, data)
    backward, reversed_labels, _ = rows_of(timm_fx, reversed_manifest)
    np.testing.assert_allclose(backward, forward[::-1], rtol=1e-4, atol=1e-5)
    assert reversed_labels.tolist() == labels[::-1].tolist()


def test_decoded_cache_gives_the_same_features(tmp_path, data, timm_fx):
    direct, labels, probs = rows_of(timm_fx, data)
    for _ in range(2):  # the second pass reads a cache that is already complete
        cached = timm_fx.extract(timm_fx.make_loader(data, cache_dir=tmp_path / "cache"), return_probs=True)
        np.testing.assert_array_equal(cached[0], direct)
        np.testing.assert_array_equal(cached[1], labels)
    assert (tmp_path / "cache" / f"{timm_fx.img_size}px" / "images.u8").stat().st_size > 0


def test_plain_image_label_batches(data, timm_fx):
    fx = timm_fx
    expected, labels, _ = rows_of(fx, data)
    images, targets = read_images(data), torch.tensor(labels)
    for batch_images in (images, normalise(images)):  # raw uint8 (normalised here) and preprocessed float
        loader = DataLoader(TensorDataset(batch_images, targets), batch_size=4)
        embeddings, got_labels = fx.extract(loader)
        np.testing.assert_allclose(embeddings, expected, rtol=1e-4, atol=1e-5)
        assert got_labels.tolist() == labels.tolist()


class PilDataset(Dataset):
    """What a user writes around their own images: PIL in, `transform` applied, (image, label) out."""

    def __init__(self, paths: list[Path], labels: list[int], transform) -> None:
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as image:
            return self.transform(image), self.labels[i]


def test_fx_transform_makes_a_users_dataset_give_the_extractors_features(tmp_path, timm_fx):
    manifest = write_dataset(tmp_path, N, size=IMG + 16)  # resized on the way in, as in training
    fx = timm_fx
    expected, labels, _ = rows_of(fx, manifest)
    paths = [manifest.parent / p for p in pd.read_csv(manifest)["path"]]
    loader = DataLoader(PilDataset(paths, labels.tolist(), fx.transform), batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the transform's batches are exactly what extract expects: no warning
        embeddings, got_labels = fx.extract(loader)
    np.testing.assert_array_equal(embeddings, expected)
    assert got_labels.tolist() == labels.tolist()
    image = fx.transform(Image.open(paths[0]))
    assert image.dtype == torch.uint8 and image.shape == (3, IMG, IMG)


def _phone_jpeg(path: Path) -> Path:
    """A 40x24 photo stored sideways with EXIF Orientation 6, as phones write them."""
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels = np.stack([*np.meshgrid(np.linspace(0, 255, 40), np.linspace(0, 255, 24)), np.full((24, 40), 90.0)], -1)
    Image.fromarray(pixels.astype(np.uint8)).save(path, "JPEG", quality=95, exif=exif)
    return path


def _grey16_png(path: Path) -> Path:
    Image.fromarray((np.arange(40 * 24).reshape(24, 40) * 60).astype(np.uint16)).save(path)
    return path


@pytest.mark.parametrize("make", [_phone_jpeg, _grey16_png], ids=["EXIF-rotated JPEG", "16-bit grey PNG"])
def test_fx_transform_decodes_a_pil_image_as_the_loaders_decode_its_file(tmp_path, timm_fx, make):
    path = make(tmp_path / ("image.jpg" if make is _phone_jpeg else "image.png"))
    from_file = next(iter(timm_fx.make_loader([str(path)]))).images[0]
    with Image.open(path) as image:
        transformed = timm_fx.transform(image)
        naive = TF.resize(TF.pil_to_tensor(image.convert("RGB")), [IMG, IMG], antialias=True)
    assert transformed.dtype == torch.uint8 and transformed.shape == (3, IMG, IMG)
    torch.testing.assert_close(transformed, from_file, rtol=0, atol=0)
    assert (naive.int() - from_file.int()).abs().max() > 50  # sideways, or clipped to white: not the training input


@pytest.mark.parametrize("case", ["[0, 1] floats", "0-255 floats", "other size"])
def test_extract_warns_once_about_batches_the_transform_would_not_give(tmp_path, data, timm_fx, case):
    images = read_images(data)
    batches = {"[0, 1] floats": images.float() / 255, "0-255 floats": images.float(),
               "other size": torch.nn.functional.interpolate(images.float(), size=IMG // 2).to(torch.uint8)}[case]
    loader = DataLoader(TensorDataset(batches, torch.zeros(N, dtype=torch.int64)), batch_size=2)  # 3 batches
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        timm_fx.extract(loader)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1, messages
    expected = {"[0, 1] floats": "unnormalised [0, 1] pixels", "0-255 floats": "outside [",
                "other size": f"[2, 3, {IMG // 2}, {IMG // 2}], but the model was trained on [B, 3, {IMG}, {IMG}]"}
    assert expected[case] in messages[0] and "fx.transform" in messages[0]


def test_official_genconvit_files(tmp_path, genconvit_experts):
    ed = genconvit_experts["ed"][1]
    state = dict(ed.state_dict())
    state["embedder.patch_embed.proj.weight"] = torch.zeros(1)  # inert Swin keys of the official files: dropped
    raw, wrapped = tmp_path / "genconvit_ed_inference.pth", tmp_path / "wrapped.pth"
    torch.save(state, raw)
    torch.save({"state_dict": state, "epoch": 3}, wrapped)

    fx = extractor(raw, model_name="genconvit_ed", batch_size=2)
    assert (fx.model_name, fx.family.name, fx.temperature, fx.data_config["input_size"]) == (
        "genconvit_ed",
        "genconvit",
        1.0,
        [3, 224, 224],
    )
    # ED is fully convolutional: small plain batches check the weights without the cost of 224px inputs (and
    # extract says they are not what the model was trained on).
    images = torch.randint(0, 256, (2, 3, IMG, IMG), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    with pytest.warns(UserWarning, match=rf"\[2, 3, {IMG}, {IMG}\], but the model was trained on \[B, 3, 224, 224\]"):
        embeddings, _ = fx.extract([(images, torch.tensor([0, 1]))])
    with torch.no_grad():
        out = ed(normalise(images))
    torch.testing.assert_close(torch.from_numpy(embeddings), out.features, rtol=1e-4, atol=1e-5)
    assert extractor(wrapped).model_name == "genconvit_ed"
    with pytest.raises(CheckpointError, match="holds 'genconvit_ed'"):
        extractor(raw, model_name="genconvit_vae")

    vae_file = tmp_path / "genconvit_vae_inference.pth"
    torch.save(genconvit_experts["vae"][1].state_dict(), vae_file)
    vae = extractor(vae_file)  # input size and latent width read off the weights
    assert vae.model_name == "genconvit_vae" and vae.img_size == IMG


def test_model_name_checks(timm_expert):
    timm = FAMILIES["timm"]
    check_model_name("efficientnetv2_b3.in21k_ft_in1k", "tf_efficientnetv2_b3", timm, "ckpt")
    check_model_name("test_efficientnet.r160_in1k", "test_efficientnet", timm, "ckpt")
    for requested, recorded, family in [
        ("resnet18", "test_efficientnet", "timm"),
        ("no_such_model", "test_efficientnet", "timm"),
        ("genconvit_vae", "genconvit_ed", "genconvit"),
    ]:
        with pytest.raises(CheckpointError, match=f"'{requested}' does not match ckpt, which holds '{recorded}'"):
            check_model_name(requested, recorded, FAMILIES[family], "ckpt")
    with pytest.raises(CheckpointError, match="holds 'test_efficientnet'"):
        extractor(timm_expert[0], model_name="resnet18")


def test_feature_file_streams_what_extract_returns_and_joins_checked(tmp_path, data, timm_fx, genconvit_fx):
    fx = timm_fx
    embeddings, labels, p_fake = rows_of(fx, data)
    path = fx.extract_to_file(data, tmp_path / "effnet.npz")  # two batches (4 + 2) appended

    features = load_features(path)
    frame = pd.read_csv(data)
    np.testing.assert_array_equal(features.embeddings, embeddings)
    np.testing.assert_array_equal(features.p_fake, p_fake)
    np.testing.assert_array_equal(features.labels, labels)
    assert features.paths.tolist() == [str(data.parent / p) for p in frame["path"]]
    assert features.video_id.tolist() == frame["video_id"].tolist()
    assert features.method.tolist() == frame["method"].fillna("").tolist()
    assert features.index.tolist() == list(range(N))
    assert (features.model_name, features.family, features.temperature) == ("test_efficientnet", "timm", 2.0)
    assert features.checkpoint == str(fx.checkpoint_path) and features.manifest == str(data)
    with np.load(path, allow_pickle=False) as raw:  # plain numpy reads it, no pickles
        assert raw["embeddings"].shape == (N, fx.embed_dim)

    ed_path = genconvit_fx["ed"].extract_to_file(data, tmp_path / "ed.npz")
    joined = join_features([path, ed_path])
    assert joined.embeddings.shape == (N, fx.embed_dim + 500) and joined.p_fake.shape == (N, 2)
    np.testing.assert_array_equal(joined.embeddings[:, joined.blocks[0]], embeddings)
    np.testing.assert_array_equal(joined.p_fake[:, 0], p_fake)
    assert joined.model_names == ["test_efficientnet", "genconvit_ed"]

    shuffled = tmp_path / "shuffled.csv"
    frame.assign(path=[str(data.parent / p) for p in frame["path"]]).iloc[[1, 0, 2, 3, 4, 5]].to_csv(
        shuffled, index=False
    )
    other = fx.extract_to_file(shuffled, tmp_path / "shuffled.npz")
    with pytest.raises(FeatureFileError, match=r"same images in a different order \(2 rows differ; first row 0"):
        join_features([path, other])
    elsewhere = write_dataset(tmp_path / "elsewhere", N)
    with pytest.raises(FeatureFileError, match="different images"):
        join_features([path, fx.extract_to_file(elsewhere, tmp_path / "elsewhere.npz")])


def test_skipped_images_leave_out_their_rows(tmp_path, timm_fx):
    manifest = write_dataset(tmp_path, 4)
    (tmp_path / "img" / "001.png").write_bytes(b"not a png")
    fx = timm_fx
    with pytest.warns(UserWarning, match="001.png"):
        features = load_features(fx.extract_to_file(manifest, tmp_path / "f.npz", skip_bad_images=True))
    assert features.index.tolist() == [0, 2, 3]
    assert [Path(p).name for p in features.paths] == ["000.png", "002.png", "003.png"]
    assert features.embeddings.shape == (3, fx.embed_dim)


def test_stream_writer_assembles_blocks_in_order(tmp_path):
    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((int(n), 3), dtype=np.float32) for n in rng.integers(0, 5, 40)]
    names = [np.array([f"img{i}_{j}" for j in range(len(b))], dtype=str) for i, b in enumerate(blocks)]
    with NpzStreamWriter(tmp_path / "out.npz", dtypes={"name": "<U12"}) as writer:
        for block, name in zip(blocks, names):
            writer.append(x=block, name=name)
        writer.close({"note": "hello"})
    with np.load(tmp_path / "out.npz") as data:
        np.testing.assert_array_equal(data["x"], np.concatenate(blocks))
        assert data["name"].tolist() == np.concatenate(names).tolist() and data["note"].item() == "hello"

    with NpzStreamWriter(tmp_path / "bad.npz", dtypes={"name": "<U3"}) as writer, pytest.raises(TypeError):
        writer.append(name=np.array(["too long"]))
    with NpzStreamWriter(tmp_path / "bad.npz") as writer, pytest.raises(ValueError, match="differ in length"):
        writer.append(a=np.zeros(2), b=np.zeros(3))
        writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]  # no partial file, no temporary folder


def test_cli_writes_the_feature_file(tmp_path, data, timm_fx):
    out = tmp_path / "features" / "effnet_val.npz"
    feature_extractor.main(
        [
            "--checkpoint",
            str(timm_fx.checkpoint_path),
            "--manifest",
            str(data),
            "--out",
            str(out),
            "--model-name",
            "test_efficientnet",
            "--workers",
            "0",
            "--batch-size",
            "4",
        ]
    )
    np.testing.assert_array_equal(load_features(out).embeddings, rows_of(timm_fx, data)[0])


def _extract(capsys, *argv: str, code: int = 0) -> str:
    """Run the extractor command on the tiny model; return its one-line error (code 2) or ''."""
    args = ["--workers", "0", "--batch-size", "4", "--device", "cpu", *argv]
    if code == 0:
        feature_extractor.main(args)
        return ""
    return fails(feature_extractor.main, args, capsys, code)


def test_a_csv_out_is_a_scores_table_of_a_folder_or_a_manifest(tmp_path, data, timm_fx, capsys):
    checkpoint = str(timm_fx.checkpoint_path)
    _extract(capsys, "--checkpoint", checkpoint, "--images", str(data.parent / "img"), "--out", str(tmp_path / "f.csv"))
    folder = pd.read_csv(tmp_path / "f.csv")
    expected = timm_fx.predict(data.parent / "img")
    assert list(folder.columns) == ["path", "p_fake"] and folder["path"].tolist() == expected["path"].tolist()
    np.testing.assert_allclose(folder["p_fake"], expected["p_fake"], rtol=1e-6)
    # a labelled manifest with videos: its labels, and each video's mean P(fake) on every row of the video
    _extract(capsys, "--checkpoint", checkpoint, "--manifest", str(data), "--out", str(tmp_path / "m.csv"))
    table = pd.read_csv(tmp_path / "m.csv")
    manifest = pd.read_csv(data)
    assert list(table.columns) == ["path", "p_fake", "label", "video_id", "video_p_fake"]
    assert table["label"].tolist() == manifest["label"].tolist()
    assert table["video_id"].tolist() == manifest["video_id"].tolist()
    np.testing.assert_allclose(table["video_p_fake"], table.groupby("video_id")["p_fake"].transform("mean"))
    np.testing.assert_allclose(table["p_fake"], folder["p_fake"], rtol=1e-6)  # the same images, in the same order
    # --overwrite replaces a table the extractor wrote, with the other source's
    _extract(capsys, "--checkpoint", checkpoint, "--images", str(data.parent / "img"), "--out", str(tmp_path / "m.csv"),
             "--overwrite")
    assert list(pd.read_csv(tmp_path / "m.csv").columns) == ["path", "p_fake"]


def test_out_must_be_a_file_the_extractor_writes_and_overwrite_replaces_only_its_own(tmp_path, data, timm_fx,
                                                                                      capsys):
    source = ["--checkpoint", str(timm_fx.checkpoint_path), "--manifest", str(data)]
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"a run's resume point")
    other_manifest = tmp_path / "other.csv"
    other_manifest.write_text("path,label\na.png,1\n")
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.ones(3))
    cases = [
        (run / "last.pt", "the extractor writes a feature file (.npz) or a scores table (.csv), not .pt"),
        (tmp_path / "scores", "not a file without a suffix"),
        (other_manifest, "exists and is not a scores table the extractor wrote; --overwrite replaces only those"),
        (foreign, "exists and is not a feature file the extractor wrote"),
    ]
    for out, message in cases:
        err = _extract(capsys, *source, "--out", str(out), "--overwrite", code=2)
        assert err.startswith(f"error: --out {out}: ") and message in err, err
    assert (run / "last.pt").read_bytes() == b"a run's resume point"
    assert other_manifest.read_text() == "path,label\na.png,1\n"
    assert set(np.load(foreign).files) == {"weights"}
    assert not (tmp_path / "scores").exists()
    # a feature file the extractor wrote is replaced, and only with --overwrite
    out = tmp_path / "f.npz"
    _extract(capsys, *source, "--out", str(out))
    assert "exists; pass --overwrite" in _extract(capsys, *source, "--out", str(out), code=2)
    out.write_bytes(out.read_bytes())  # a copy of it: still the extractor's by its contents
    _extract(capsys, *source, "--out", str(out), "--overwrite")
    assert load_features(out).paths.tolist() == pd.read_csv(data)["path"].map(lambda p: str(data.parent / p)).tolist()


CLI_CASES = {
    "missing checkpoint": "nope.pt: no such file",
    "wrong model name": "'resnet18' does not match",
    "an image as manifest": "000.png: an image, not a manifest (CSV) or a folder",
    "an image as --images": "000.png: a file, not a folder of images",
    "missing --images folder": "missing/: no such folder",
    "weights of another model": ("weights do not fit test_efficientnet: keys 2 missing (conv_stem.weight, bn1.weight);"
                                 " 1 unexpected (fc.weight); 1 of another shape (conv_head.weight [3, 3] vs"),
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, data, timm_expert, capsys, case):
    checkpoint, source, extra = str(timm_expert[0]), ["--manifest", str(data)], []
    if case == "missing checkpoint":
        checkpoint = str(tmp_path / "nope.pt")
    elif case == "wrong model name":
        extra = ["--model-name", "resnet18"]
    elif case == "an image as manifest":
        source = ["--manifest", str(data.parent / "img" / "000.png")]
    elif case == "an image as --images":
        source = ["--images", str(data.parent / "img" / "000.png")]
    elif case == "missing --images folder":
        source = ["--images", str(tmp_path / "missing") + "/"]
    else:  # the right model name over weights that are not its own (renamed, reshaped, missing and extra keys)
        weights = dict(timm_expert[1].state_dict())
        del weights["conv_stem.weight"], weights["bn1.weight"]
        weights["fc.weight"] = torch.zeros(1)
        weights["conv_head.weight"] = torch.zeros(3, 3)
        checkpoint = str(tmp_path / "foreign.pt")
        save_checkpoint({**torch.load(timm_expert[0], weights_only=True), "model": weights}, checkpoint)
    argv = ["--checkpoint", checkpoint, *source, "--out", str(tmp_path / "f.npz"), *extra]
    with pytest.raises(SystemExit) as exit_info:
        exit_on_error(lambda: feature_extractor.main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert CLI_CASES[case] in err
    if "--images" in source:
        assert "CSV" not in err and "manifest" not in err
    assert not (tmp_path / "f.npz").exists()


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -2.0, 0.0])
def test_a_temperature_that_is_not_positive_and_finite_is_refused(tmp_path, timm_expert, temperature):
    checkpoint = tmp_path / "best.pt"
    save_checkpoint({**torch.load(timm_expert[0], weights_only=True), "temperature": temperature}, checkpoint)
    with pytest.raises(CheckpointError) as err:
        extractor(checkpoint)
    assert str(err.value) == (f"checkpoint {checkpoint}: temperature {temperature!r} is not a positive finite number "
                              "(P(fake) = sigmoid(logit / temperature)); set it to 1.0 or refit it")


def test_images_below_symlinked_folders_are_found_once(tmp_path, data):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "deep").mkdir(parents=True)
    for name in ("a.png", "deep/b.png"):
        (elsewhere / name).write_bytes((data.parent / "img" / "000.png").read_bytes())
    root = tmp_path / "crops"
    (root / "own").mkdir(parents=True)
    (root / "own" / "c.png").write_bytes((data.parent / "img" / "001.png").read_bytes())
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "own" / "loop").symlink_to(root, target_is_directory=True)  # a link back up: read once, no loop
    (root / "same").symlink_to(elsewhere, target_is_directory=True)  # a second way to the same folder

    frame = source_frame(root)

    assert [os.path.relpath(p, root) for p in frame["path"]] == ["linked/a.png", "linked/deep/b.png", "own/c.png"]
    assert (frame["label"] == -1).all()


def test_a_feature_file_that_cannot_be_written_names_out_not_a_temporary_file(tmp_path):
    out = Path("/proc/features.npz")  # a folder where nothing can be created, even by root
    with pytest.raises(OSError) as err:
        NpzStreamWriter(out)
    assert err.value.filename == str(out)
    script = (  # a write that runs out of room half way (the file size limit stands in for a full disk)
        "import resource, signal, sys, numpy as np\n"
        "from stage2.embeddings.store import NpzStreamWriter\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))\n"
        "with NpzStreamWriter(sys.argv[1]) as writer:\n"
        "    try:\n"
        "        writer.append(x=np.zeros((1 << 19, 1), dtype=np.float32))\n"
        "        writer.close()\n"
        "    except OSError as err:\n"
        "        print(err.filename)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "f.npz")], cwd=ROOT, env=subprocess_env(),
                            capture_output=True,
                            text=True)
    assert result.stdout == f"{tmp_path / 'f.npz'}\n", result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_killed_feature_file_write_is_cleaned_by_the_next_one(tmp_path):
    script = (
        "import os, signal, sys, numpy as np\n"
        "from stage2.embeddings.store import NpzStreamWriter\n"
        "writer = NpzStreamWriter(sys.argv[1])\n"
        "writer.append(x=np.zeros((1000, 8), dtype=np.float32))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    out = tmp_path / "f.npz"
    result = subprocess.run([sys.executable, "-c", script, str(out)], cwd=ROOT, env=subprocess_env(),
                            capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert [p.name.startswith(".f.npz.") for p in tmp_path.iterdir()] == [True]  # what the killed write left
    with NpzStreamWriter(out) as writer:
        writer.append(x=np.ones((2, 8), dtype=np.float32))
        writer.close()
    assert [p.name for p in tmp_path.iterdir()] == ["f.npz"]
    with np.load(out) as written:
        assert written["x"].shape == (2, 8)


def test_cli_entry_point_exit_code(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "feature_extractor.py",
            "--checkpoint",
            str(tmp_path / "nope.pt"),
            "--manifest",
            "m.csv",
            "--out",
            str(tmp_path / "f.npz"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr == f"error: checkpoint {tmp_path / 'nope.pt'}: no such file\n"


def test_example_previews_stacking_from_demo_checkpoints(tmp_path, timm_expert, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # 8 videos x 2 frames; fakes are brighter, so even random-weight embeddings separate the classes.
    manifest = write_dataset(tmp_path / "val", 16, frames=2, offset=60)
    args = {"args": {"val_manifest": str(manifest), "data_root": None}}
    output = tmp_path / "output"
    timm_meta = {"family": "timm", "model_name": "test_efficientnet", "num_classes": 1}
    save_trainer_checkpoint(output / "stage2_effnet_demo/best.pt", timm_expert[1], timm_meta, 1.0, **args)
    with pytest.raises(CheckpointError, match=r"stage2_genconvit_demo/ed/best.pt .*train_stage2_genconvit.py --demo"):
        feature_extractor.example(output, tmp_path / "features", device="cpu", workers=0)
    # The hybrid with tiny backbones keeps this fast; it goes through the same GenConViT code path.
    kwargs = {
        "img_size": IMG,
        "convnext_name": "test_convnext",
        "swin_kwargs": {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4},
    }
    ed_meta = {
        "family": "genconvit",
        "model_name": "genconvit_ed_hybrid",
        "variant": "ed",
        "arch": "hybrid",
        "model_kwargs": kwargs,
    }
    torch.manual_seed(0)
    model = build_genconvit("ed", "hybrid", **kwargs)
    torch.nn.init.normal_(model.fc2.weight)  # a new head starts at zero: a trained one does not
    save_trainer_checkpoint(output / "stage2_genconvit_demo/ed/best.pt", model, ed_meta, 1.0, **args)
    # The README's own --out name, holding the user's file: kept without --overwrite, and with it (not a feature
    # file), each checked before the first feature file is written.
    users = tmp_path / "features" / "genconvit_ed_val.npz"
    users.parent.mkdir()
    users.write_bytes(b"the user's own")
    for overwrite, message in ((False, "exists; pass --overwrite to replace it"),
                               (True, "exists and is not a feature file the extractor wrote")):
        with pytest.raises(ConfigError, match=re.escape(f"--example's feature file {users}: {message}")):
            feature_extractor.example(output, users.parent, overwrite=overwrite, device="cpu", workers=0)
    assert [p.name for p in users.parent.iterdir()] == [users.name] and users.read_bytes() == b"the user's own"
    users.unlink()

    rows = feature_extractor.example(output, "features", device="cpu", workers=0)

    assert [(row.name, row.dims, row.kind) for row in rows] == [
        ("effnet", 1, "expert"),
        ("genconvit_ed", 1, "expert"),
        ("stack: effnet + genconvit_ed", 2, "stack"),
        ("stack: effnet + genconvit_ed + genconvit_ed recon", 3, "stack"),
        ("embeddings: effnet + genconvit_ed", 756, "reference"),
    ]
    gc_features = load_features(tmp_path / "features" / "genconvit_ed_val.npz")
    assert gc_features.model_name == "genconvit_ed_hybrid"
    # the reconstruction error is GenConViT's own: the MSE of its reconstruction against the input in [0, 1] pixels
    assert gc_features.recon_error.shape == gc_features.labels.shape and (gc_features.recon_error > 0).all()
    assert load_features(tmp_path / "features" / "effnet_val.npz").recon_error is None
    # untrained experts separate these images, each in its own direction; a stacker learns the directions
    assert all(abs(row.auc - 0.5) > 0.4 for row in rows if row.kind == "expert"), rows
    assert all(row.auc > 0.9 for row in rows if row.kind == "stack"), rows
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == ["effnet_val.npz", "genconvit_ed_val.npz"]
    printed = capsys.readouterr().out
    assert "out-of-fold (folds grouped by video_id)" in printed
    assert "stacking preview on the 16 validation images of val/manifest.csv:" in printed  # relative, as given
    # the last line: the best stack of the table against the best expert, both named as the table names them
    stack = max((row for row in rows if row.kind == "stack"), key=lambda row: row.auc)
    expert = max((row for row in rows if row.kind == "expert"), key=lambda row: row.auc)
    assert printed.splitlines()[-1] == (f"best stack ({stack.name.removeprefix('stack: ')}) - best expert "
                                        f"({expert.name}): {stack.auc - expert.auc:+.4f} AUC")
    assert f"{stack.name:<58} {stack.dims:>6} {stack.auc:>8.4f}" in printed.splitlines()


def test_stacking_preview_without_video_ids_says_its_folds_are_not_grouped(capsys):
    # A val manifest with a blank video_id: the folds are stratified, and the preview must not claim otherwise.
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 10)
    common = {"labels": labels, "paths": np.array([f"{i}.png" for i in range(20)]), "index": np.arange(20),
              "family": "timm", "checkpoint": "best.pt", "manifest": "val.csv", "temperature": 1.0,
              "video_id": np.array(["v1"] * 19 + [""])}
    sets = {name: FeatureSet(embeddings=rng.normal(size=(20, 4)) + labels[:, None], p_fake=labels * 0.5 + 0.2,
                             model_name=name, **common) for name in ("a", "b")}
    print_preview(sets)
    printed = capsys.readouterr().out
    assert "stratified folds: no source_id/video_id on every row" in printed and "grouped" not in printed


def test_example_names_the_missing_checkpoints(tmp_path):
    with pytest.raises(CheckpointError) as err:
        feature_extractor.example(tmp_path, tmp_path / "features")
    message = str(err.value)
    assert "stage2_effnet_demo/best.pt" in message and "train_stage2_effnet.py --demo" in message
    assert "stage2_genconvit/vae/best.pt" in message and "\n" not in message

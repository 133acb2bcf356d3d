"""Robustness perturbations: parsing, what each one does to a crop, and determinism inside a dataset."""

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from stage2.data.dataset import ManifestDataset
from stage2.data.manifest import read_manifest
from stage2.data.perturb import Perturbation, parse_perturbations


def _image(size: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)


def test_spec_parsing_and_names():
    parsed = parse_perturbations("jpeg:50, down:0.5,blur:1.0,noise:0.02,jpeg:50-70")
    assert [p.name for p in parsed] == ["jpeg:50", "down:0.5", "blur:1", "noise:0.02", "jpeg:50-70"]
    assert parsed[-1] == Perturbation("jpeg", 50, 70)
    for bad, words in (("", "no perturbation"), ("gamma:2", "KIND:VALUE"), ("jpeg", "KIND:VALUE"),
                       ("jpeg:x", "bad number"), ("jpeg:0", "[1, 100]"), ("down:2", "[0.05, 1]"),
                       ("noise:0.5-0.1", "[0, 1]")):
        with pytest.raises(ValueError, match="--perturb") as err:
            parse_perturbations(bad)
        assert words in str(err.value)


@pytest.mark.parametrize("spec", ["jpeg:50", "down:0.5", "blur:1.0", "noise:0.02"])
def test_each_perturbation_keeps_shape_and_type_and_changes_the_crop(spec):
    image = _image()
    (perturbation,) = parse_perturbations(spec)
    out = perturbation(image)
    assert out.shape == image.shape and out.dtype == torch.uint8
    assert (out.float() - image.float()).abs().mean() > 1


def test_down_scaling_is_a_resize_down_and_back_and_blur_a_gaussian():
    image = _image()
    expected = TF.resize(TF.resize(image, [24, 24], antialias=True), [48, 48], antialias=True)
    assert torch.equal(parse_perturbations("down:0.5")[0](image), expected)
    assert torch.equal(parse_perturbations("blur:1")[0](image), TF.gaussian_blur(image, [7, 7], [1.0, 1.0]))


def test_stronger_jpeg_loses_more():
    image = _image(64)
    errors = [(parse_perturbations(f"jpeg:{q}")[0](image).float() - image.float()).abs().mean() for q in (90, 30)]
    assert errors[0] < errors[1]


def test_a_perturbed_dataset_is_the_same_every_time(tiny_data):
    frame = read_manifest(tiny_data[1])
    (noise,) = parse_perturbations("noise:0.05")
    (jpeg,) = parse_perturbations("jpeg:30-90")
    for perturbation in (noise, jpeg):
        first = [ManifestDataset(frame, 32, transform=perturbation, seed=0)[i][0] for i in range(6)]
        again = [ManifestDataset(frame, 32, transform=perturbation, seed=0)[i][0] for i in range(6)]
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    clean = ManifestDataset(frame, 32)[0][0]
    assert not torch.equal(first[0], clean)

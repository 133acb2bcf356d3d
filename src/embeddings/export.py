"""Standard exports of a trained expert, for stage three and for serving without this repository.

    python feature_extractor.py --export exported/effnet --checkpoint output/stage2_effnet/best.pt

writes into the folder:

- ``model.onnx`` (every expert): input ``pixels``, float32 RGB in [0, 1], [B, 3, S, S] at the model's input size
  (the model's own normalisation is inside the graph); outputs ``embedding`` [B, D] (what the extractor
  exports) and ``fake_logit`` [B], with a dynamic batch. Calibrated P(fake) = sigmoid(fake_logit / temperature).
  A model over 1.8 GB (the official GenConViT-VAE) keeps its weights beside it in ``model.onnx.data``.
- ``model.safetensors`` + ``config.json`` (timm experts): what ``timm.create_model("local-dir:DIR",
  pretrained=True)`` loads, to the same logits; its pretrained_cfg carries the input size, mean and std.
- ``export.json``: model name, family, input size, mean, std, temperature, the files, and the check below.

Every ONNX file is checked before the export counts as done: onnxruntime against PyTorch on random inputs at two
batch sizes, both outputs, max |diff| <= 1e-4 in fp32.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from src.embeddings.extract import LoadedExpert, load_expert
from src.engine.report import write_json_atomic
from src.errors import ConfigError

log = logging.getLogger(__name__)

ONNX_TOLERANCE = 1e-4
# Past ~2 GB a protobuf cannot hold the weights; below that one self-contained file is simpler to ship.
EXTERNAL_DATA_BYTES = 1.8 * 2**30


class ExportedExpert(nn.Module):
    """pixels in [0, 1] -> (embedding, fake logit): the model's normalisation and its family's read-out."""

    def __init__(self, expert: LoadedExpert) -> None:
        super().__init__()
        self.model, self.family = expert.model, expert.family
        self.register_buffer("mean", torch.tensor(expert.data_config["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(expert.data_config["std"]).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding, fake_logit = self.family.embed(self.model, (pixels - self.mean) / self.std)
        return embedding.float(), fake_logit.float()


def export_expert(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False
                  ) -> dict[str, Any]:
    """Write the formats above for a trainer checkpoint (or an official GenConViT file); returns export.json."""
    out = Path(out_dir)
    expert = load_expert(checkpoint)
    files = ["model.onnx", "export.json", *expert.family.native_files]
    existing = [name for name in files if (out / name).exists()]
    if existing and not overwrite:
        raise ConfigError(f"--export {out}: already holds {', '.join(existing)}; pass --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    data_config = expert.data_config
    written = expert.family.export_native(expert.model, out, data_config)
    wrapper = ExportedExpert(expert).eval()
    size = int(data_config["input_size"][-1])
    external = sum(p.numel() * p.element_size() for p in wrapper.parameters()) > EXTERNAL_DATA_BYTES
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(wrapper, (torch.rand(2, 3, size, size),), str(out / "model.onnx"), dynamo=True,
                          input_names=["pixels"], output_names=["embedding", "fake_logit"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=external)
    written.append("model.onnx")
    check = check_onnx(wrapper, out / "model.onnx", size)
    report = {"checkpoint": os.path.abspath(checkpoint), "model_name": expert.model_name,
              "family": expert.family.name, "input_size": [3, size, size], "mean": list(data_config["mean"]),
              "std": list(data_config["std"]), "temperature": expert.temperature, "files": written,
              "onnx": {"inputs": {"pixels": "float32 RGB in [0, 1], [batch, 3, S, S]"},
                       "outputs": {"embedding": "[batch, D]", "fake_logit": "[batch]"}, "check": check}}
    write_json_atomic(out / "export.json", report)
    log.info("exported %s to %s: %s (ONNX vs PyTorch max |diff| %.2e)", expert.model_name, out, ", ".join(written),
             check["max_abs_diff"])
    return report


def check_onnx(wrapper: nn.Module, path: Path, size: int) -> dict[str, Any]:
    """onnxruntime against PyTorch on random pixels at batch sizes 1 and 3; raises if any output differs by more
    than ONNX_TOLERANCE."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch in (1, 3):
        pixels = torch.rand(batch, 3, size, size, generator=generator)
        with torch.no_grad():
            expected = [t.numpy() for t in wrapper(pixels)]
        got = session.run(["embedding", "fake_logit"], {"pixels": pixels.numpy()})
        for want, have in zip(expected, got):
            if want.shape != have.shape:
                raise RuntimeError(f"{path}: ONNX output of shape {have.shape}, PyTorch {want.shape}")
            worst = max(worst, float(np.abs(want - have).max()))
    if worst > ONNX_TOLERANCE:
        raise RuntimeError(f"{path}: ONNX and PyTorch differ by {worst:.2e} > {ONNX_TOLERANCE:g}")
    return {"batch_sizes": [1, 3], "max_abs_diff": worst, "tolerance": ONNX_TOLERANCE}

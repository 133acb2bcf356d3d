"""Calibrated P(fake) of every PNG/JPEG below a folder, from a `feature_extractor.py --export` folder, with
onnxruntime, numpy and PIL only (no torch, no repository):

    python examples/onnx_predict.py exported/effnet crops/ > scores.csv
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image, ImageOps

export, folder = Path(sys.argv[1]), Path(sys.argv[2])
meta = json.loads((export / "export.json").read_text())  # input_size, temperature, ...
size = meta["input_size"][-1]
session = onnxruntime.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
print("path,p_fake")
for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")):
    # The input contract: upright by EXIF, RGB, the whole image squashed to S x S (no crop), antialiased bilinear
    # (PIL's bilinear antialiases when it shrinks), float32 in [0, 1]; mean/std normalisation is inside the graph.
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)[None] / 255
    _, fake_logit = session.run(["embedding", "fake_logit"], {"pixels": pixels})
    print(f"{path},{1 / (1 + np.exp(-fake_logit[0] / meta['temperature'])):.6f}")

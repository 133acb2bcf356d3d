"""The README as a newcomer uses it: its Python snippet runs verbatim after the demo chain."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
from conftest import ROOT

import train_stage2_effnet


def readme_snippet() -> str:
    """The README's one Python block that uses FeatureExtractor, as written there."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    found = [block for block in blocks if "FeatureExtractor" in block]
    assert len(found) == 1, f"expected one Python block using FeatureExtractor in README.md, found {len(found)}"
    return found[0]


def test_the_readme_snippet_runs_verbatim_on_the_demo_outputs(tiny_data, tmp_path, monkeypatch):
    # The demo chain's outputs where the README's paths expect them (data/demo/, output/stage2_effnet_demo/best.pt),
    # at tiny size: the tiny synthetic set stands in for the demo's, timm's test model for EfficientNetV2-B3.
    shutil.copytree(tiny_data[0].parent, tmp_path / "data" / "demo")
    monkeypatch.chdir(tmp_path)
    train_stage2_effnet.main(["--train-manifest", "data/demo/train.csv", "--val-manifest", "data/demo/val.csv",
                              "--model", "test_efficientnet", "--no-pretrained", "--img-size", "32", "--batch-size",
                              "8", "--workers", "0", "--epochs", "1", "--amp", "off", "--output-dir",
                              "output/stage2_effnet_demo"])
    names: dict = {}
    exec(compile(readme_snippet(), "README.md", "exec"), names)  # noqa: S102 - the README's own code, on purpose

    val = pd.read_csv("data/demo/val.csv")
    embeddings, labels, scores = names["embeddings"], names["labels"], names["scores"]
    assert embeddings.dtype == np.float32 and embeddings.ndim == 2
    assert len(names["paths"]) == len(embeddings) == len(scores) > 0
    assert (scores["label"] == -1).all() and scores["p_fake"].between(0, 1).all()  # a folder: unlabeled
    assert np.asarray(labels).tolist() == val["label"].tolist()  # the val manifest's, in its order


def test_the_cpu_only_install_pins_the_torch_that_requirements_pin():
    # The CPU wheels installed first must be the versions requirements.txt asks for, or pip replaces them with the
    # CUDA build (the 6 GB environment the README's note avoids).
    readme = (ROOT / "README.md").read_text()
    line = next(line for line in readme.splitlines() if "download.pytorch.org/whl/cpu" in line)
    pins = {req.split("==")[0]: req for req in (ROOT / "requirements.txt").read_text().split()
            if req.startswith(("torch==", "torchvision=="))}
    assert set(pins) == {"torch", "torchvision"}
    assert line.split()[:2] == ["pip", "install"] and set(pins.values()) <= set(line.split())
    assert "requirements-dev.txt" in readme.split(line, 1)[1].split("```")[0]  # then the rest, which keeps them

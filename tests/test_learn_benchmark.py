"""The learnability benchmark on a tiny plan: its data, both trainers, and the robustness figures it reports."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from benchmarks.learn import PLAIN, LearnPlan, artefact_dataset, markdown, run_learn


def test_artefact_fakes_carry_a_smoothed_patch(tmp_path):
    train, val = artefact_dataset(tmp_path, n_train=40, n_val=20, size=48)
    rows = pd.concat([pd.read_csv(train), pd.read_csv(val)])
    assert len(rows) == 60 and rows["label"].tolist() == [0, 1] * 30

    def roughness(path):  # mean absolute difference of neighbouring pixels: the fine grain resampling removes
        image = np.asarray(Image.open(tmp_path / path), dtype=np.float32)
        return np.abs(np.diff(image, axis=1)).mean()

    rough = rows.assign(r=rows["path"].map(roughness)).groupby("label")["r"].mean()
    assert rough[1] < 0.9 * rough[0]


def test_a_tiny_run_trains_both_sides_and_scores_every_perturbation(tmp_path):
    plan = LearnPlan(img_size=32, n_train=48, n_val=24, epochs=1, batch=8, workers=0, seeds=(0,), levels=("light",))
    result = run_learn(plan, tmp_path)
    cases = [r["case"] for r in result["summary"]]
    assert cases == [PLAIN, "ours --aug light"]
    for r in result["runs"]:
        for key in ("clean", "perturbed", "jpeg:50-70", "down:0.5", "blur:1", "noise:0.02"):
            assert 0 <= r[key] <= 1, key
        perturbed = [r[k] for k in ("jpeg:50-70", "down:0.5", "blur:1", "noise:0.02")]
        assert r["perturbed"] == pytest.approx(np.mean(perturbed))
    table = markdown(result)
    assert "| ours --aug light |" in table and "1.000x" in table  # the plain loop against itself

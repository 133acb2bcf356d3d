"""Atomic writes (stage2.atomic): JSON with NaN as null, written whole or not at all."""

import json
import math
import os

import numpy as np

from stage2.atomic import write_json_atomic


def test_write_json_atomic_nan_to_null(tmp_path):
    path = tmp_path / "out" / "metrics.json"
    write_json_atomic(
        path, {"auc": np.float32(0.5), "eer": math.nan, "n": np.int64(3), "curve": np.array([1.0, np.inf])}
    )
    assert json.loads(path.read_text()) == {"auc": 0.5, "eer": None, "n": 3, "curve": [1.0, None]}
    assert "\n  " in path.read_text()  # indent=2
    assert os.listdir(path.parent) == ["metrics.json"]

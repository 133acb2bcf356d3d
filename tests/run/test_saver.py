"""The checkpoint saver (src/stage2/run/saver.py) builds best.pt and last.pt from the run's state, and never writes a
non-finite one."""

import functools

import pytest
import torch
from timm.utils import ModelEmaV3

from stage2.errors import TrainingDiverged
from stage2.experts.timm_classifier import TimmExpert
from stage2.run.checkpoint import read_best, read_last
from stage2.run.config import TrainConfig
from stage2.run.saver import CheckpointSaver
from stage2.scoring.metrics import is_better

MANIFESTS = {"train": {"rows": 36, "sha256": "9f"}, "val": {"rows": 12, "sha256": "e3"}}


def _saver(tmp_path, ema: bool) -> CheckpointSaver:
    torch.manual_seed(0)
    expert = TimmExpert("test_efficientnet", img_size=32, pretrained=False)
    model = expert.build_model()
    return CheckpointSaver(tmp_path, functools.partial(is_better, "auc"), model=model,
                           ema=ModelEmaV3(model) if ema else None, scaler=torch.amp.GradScaler("cpu", enabled=False),
                           expert=expert, data_config=expert.data_config(model), cfg=TrainConfig(lr=0.01),
                           manifests=MANIFESTS, device=torch.device("cpu"), is_main=True)


def test_best_and_last_hold_the_runs_state(tmp_path):
    saver = _saver(tmp_path, ema=True)
    optimizer = torch.optim.SGD(saver.model.parameters(), lr=0.01)
    assert saver.select(0.7, 1)
    saver.save_best(saver.ema.module, 1, {"auc": 0.7})
    saver.save_last(optimizer, 0, 1, 0, None)
    best, last = read_best(saver.best), read_last(saver.last)
    assert (best.epoch, best.metrics, best.args["lr"], best.meta) == (1, {"auc": 0.7}, 0.01,
                                                                      saver.expert.checkpoint_meta())
    assert best.data_config == saver.data_config and last.data_config == saver.data_config
    assert (last.next_epoch, last.best_value, last.best_epoch, last.manifests) == (1, 0.7, 1, MANIFESTS)
    assert last.recipe == saver.expert.recipe() and last.ema is not None
    saver.save_calibrated(best, 1.7)
    assert read_best(saver.best).temperature == pytest.approx(1.7) and read_best(saver.best).temperature_fitted


def test_a_non_finite_ema_stops_before_last_pt_is_replaced(tmp_path):
    saver = _saver(tmp_path, ema=True)
    optimizer = torch.optim.SGD(saver.model.parameters(), lr=0.01)
    saver.save_last(optimizer, 0, 1, 0, None)
    written = saver.last.read_bytes()
    name, buffer = next((n, b) for n, b in saver.ema.module.named_buffers() if b.is_floating_point())
    buffer.fill_(float("inf"))
    with pytest.raises(TrainingDiverged) as err:
        saver.save_last(optimizer, 0, 1, 5, None)
    assert str(err.value) == (f"non-finite values in {name} at epoch 2 step 5: stopped; the last good checkpoint is "
                              f"{saver.last}")
    assert saver.last.read_bytes() == written

"""`--amp auto` picks bf16 only where the hardware computes in bf16."""

import platform
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stage2.run import device as precision
from stage2.run.device import autocast_dtype, cpu_has_native_bf16, cpu_threads


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(platform.machine() != "x86_64" or not Path("/proc/cpuinfo").exists(), reason="x86 Linux")
def test_native_bf16_follows_the_cpu_flags_not_avx512_alone():
    flags = _cpu_flags()
    assert cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_amp_auto_on_cpu_is_bf16_only_with_native_bf16_and_explicit_choices_win():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) == (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    assert autocast_dtype("fp16", cpu) == torch.float16
    assert autocast_dtype("off", cpu) is None
    assert autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16


@pytest.fixture
def fresh_threads(monkeypatch):
    """cpu_threads decides once per process: forget that decision, and put torch's threads back afterwards."""
    threads = torch.get_num_threads()
    cpu_threads.cache_clear()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(precision, "usable_cores", lambda: 2)
    yield
    cpu_threads.cache_clear()
    torch.set_num_threads(threads)


def test_a_busy_cpu_gets_one_torch_thread_and_the_settings_say_why(fresh_threads, monkeypatch):
    torch.set_num_threads(2)
    monkeypatch.setattr(precision.os, "getloadavg", lambda: (6.0, 5.0, 4.0))
    note = cpu_threads("cpu")
    assert torch.get_num_threads() == 1
    assert note.startswith("torch threads 1 (busy machine, load 6.0 on 2 cores") and "OMP_NUM_THREADS" in note
    monkeypatch.setattr(precision.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert cpu_threads("cpu") == note  # decided once: a later run in the process would see its own load


def test_an_idle_cpu_a_gpu_and_omp_num_threads_keep_torchs_threads(fresh_threads, monkeypatch):
    torch.set_num_threads(2)
    monkeypatch.setattr(precision.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    assert cpu_threads("cpu") == "torch threads 2" and torch.get_num_threads() == 2
    monkeypatch.setattr(precision.os, "getloadavg", lambda: (6.0, 5.0, 4.0))
    assert cpu_threads("cuda") == "" and torch.get_num_threads() == 2
    cpu_threads.cache_clear()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads("cpu") == "torch threads 2 (OMP_NUM_THREADS)" and torch.get_num_threads() == 2


def test_evaluate_scores_as_the_extractor_does_on_a_cpu_with_native_bf16(trained_run, tiny_data, tmp_path,
                                                                        monkeypatch):
    """--amp auto trains in bf16 on such a CPU; --evaluate and val_predictions.csv (one Evaluator) scored in bf16
    too, up to 0.0125 P(fake) from the extractor's fp32. Scoring is fp32 on any CPU."""
    import train_stage2_effnet
    from stage2.embeddings import FeatureExtractor
    from stage2.run.checkpoint import load_checkpoint, save_checkpoint

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    checkpoint = tmp_path / "best.pt"  # at temperature 1: the fitted one puts every calibrated score at 0 or 1
    save_checkpoint({**load_checkpoint(trained_run / "best.pt"), "temperature": 1.0}, checkpoint)
    train_stage2_effnet.main(["--evaluate", str(checkpoint), "--val-manifest", str(tiny_data[1]), "--model",
                              "test_efficientnet", "--workers", "0", "--amp", "auto", "--output-dir",
                              str(tmp_path / "eval")])
    evaluated = pd.read_csv(tmp_path / "eval" / "predictions_val.csv")
    extracted = FeatureExtractor(checkpoint_path=checkpoint, workers=0, progress=False).predict(tiny_data[1])
    assert evaluated["path"].tolist() == extracted["path"].tolist()
    np.testing.assert_allclose(evaluated["p_fake"], extracted["p_fake"], rtol=0, atol=1e-6)

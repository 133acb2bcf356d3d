"""train_stage2_genconvit.py end to end (tiny ConvNeXt, 64px PNGs) and its stage parsing."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import train_stage2_genconvit
from src.experts.genconvit import parse_stages
from src.stage2.genconvit import GenConViTED

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gc_args(tiny_data, tmp_path) -> list[str]:
    train, val = tiny_data
    return ["--train-manifest", str(train), "--val-manifest", str(val), "--init", "scratch", "--backbone",
            "test_convnext", "--img-size", "64", "--latent-channels", "4", "--epochs", "2", "--stages",
            "frozen:1,full:rest:0.5", "--batch-size", "8", "--workers", "0", "--amp", "off", "--output-dir",
            str(tmp_path / "gc")]


def test_stage_spec_parsing():
    stages = parse_stages("frozen:2,full:rest:0.1", epochs=10, lr=1e-3)
    assert [(s.name, s.epochs) for s in stages] == [("frozen", 2), ("full", 8)]
    assert stages[1].lr == pytest.approx(1e-4)
    assert not stages[0].trainable("backbone.stem.0.weight") and stages[0].trainable("decoder.features.0.weight")
    assert stages[1].trainable is None
    assert [s.name for s in parse_stages("frozen:1,full:rest", epochs=1, lr=1.0)] == ["frozen"]
    for bad in ("frozen:3,full:rest", "thaw:1", "full:x", "full:1", "full:rest,frozen:rest"):
        with pytest.raises(ValueError, match="--stages"):
            parse_stages(bad, epochs=2, lr=1.0)


def test_both_variants_write_every_output(gc_args):
    train_stage2_genconvit.main([*gc_args, "--variant", "both"])
    out = Path(gc_args[-1])
    for variant in ("ed", "vae"):
        run = out / variant
        for name in ("best.pt", "last.pt", "metrics.csv", "summary.json", "roc.png", "curves.png", "train.log",
                     "args.json", "val_predictions.csv", "recon_samples/epoch_001.png",
                     "recon_samples/epoch_002.png"):
            assert (run / name).is_file(), f"{variant}/{name}"
        history = pd.read_csv(run / "metrics.csv")
        assert history["stage"].tolist() == ["frozen", "full"]
        for column in ("train_cls", "train_recon", "train_kl", "val_recon_real", "val_recon_fake", "auc"):
            assert history[column].notna().all(), column
        summary = json.loads((run / "summary.json").read_text())
        cal = summary["calibration"]
        assert cal["nll_after"] <= cal["nll_before"] + 1e-9
        best = torch.load(run / "best.pt", weights_only=True)
        assert best["model_name"] == f"genconvit_{variant}" and best["temperature"] == pytest.approx(
            cal["temperature"])
        assert best["model_kwargs"]["convnext_name"] == "test_convnext"
    vae_history = pd.read_csv(out / "vae" / "metrics.csv")
    assert (vae_history["train_kl"] > 0).all()
    assert (pd.read_csv(out / "ed" / "metrics.csv")["train_kl"] == 0).all()


def test_official_weights_file_initialises_the_model(gc_args, tmp_path):
    reference = GenConViTED(convnext_name="test_convnext")
    weights = tmp_path / "genconvit_ed_inference.pth"
    torch.save({"state_dict": reference.state_dict(), "epoch": 3}, weights)
    args = [a if a != "scratch" else "official" for a in gc_args]
    args[args.index("--epochs") + 1] = "1"
    train_stage2_genconvit.main([*args, "--variant", "ed", "--weights", str(weights), "--lr", "0"])
    best = torch.load(Path(gc_args[-1]) / "ed" / "best.pt", weights_only=True)
    # lr 0 (and frozen backbone): the trained weights are still the official ones.
    for key, value in reference.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(best["model"][key], value, msg=key)


def test_official_init_offline_without_weights_is_one_line(gc_args, capsys):
    args = [a if a != "scratch" else "official" for a in gc_args]
    with pytest.raises(SystemExit) as exit_info:
        train_stage2_genconvit.exit_on_error(lambda: train_stage2_genconvit.main([*args, "--variant", "ed"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--weights" in err and len(err.splitlines()) == 1


def test_killed_across_the_stage_boundary_resumes_bit_identically(gc_args, tmp_path):
    flags = [*gc_args, "--variant", "ed", "--deterministic", "--save-every-minutes", "1e-9", "--log-every", "1"]
    straight = tmp_path / "straight"
    torch.set_num_threads(1)
    train_stage2_genconvit.main([*flags, "--output-dir", str(straight)])

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "train_stage2_genconvit.py"), *flags, "--output-dir", str(killed)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    for line in proc.stdout:
        if line.startswith("epoch 2/2 step 2/"):  # in the second stage, after its first checkpoints
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(killed / "ed" / "last.pt", weights_only=True)
    assert state["stage"] == 1 and state["step"] >= 1

    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    a = torch.load(straight / "ed" / "last.pt", weights_only=True)["model"]
    b = torch.load(killed / "ed" / "last.pt", weights_only=True)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key

"""CUDA code paths: bf16 steps of both experts, --compile, the official-size VAE, resume, extraction, NCCL.

Marked `cuda` and skipped without a CUDA device; `python -m benchmarks.gpu_check` runs them on a GPU machine and
puts the figures they record (peak memory, agreement) into its report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, subprocess_env

import train_stage2_effnet
import train_stage2_genconvit
from stage2.embeddings import FeatureExtractor
from stage2.models.genconvit import GenConViTLoss, GenConViTVAE

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def record(name: str, **figures: object) -> None:
    """Append figures to the file benchmarks/gpu_check.py names in GPU_CHECK_FIGURES (a no-op elsewhere)."""
    path = os.environ.get("GPU_CHECK_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, **figures}) + "\n")


def _cuda_flags(args: list[str]) -> list[str]:
    return [*[a for a in args if a not in ("--amp", "off")], "--device", "cuda", "--amp", "bf16"]


def test_bf16_train_step_effnet(effnet_args):
    args = _cuda_flags(effnet_args)
    train_stage2_effnet.main(args)
    history = pd.read_csv(Path(args[args.index("--output-dir") + 1]) / "metrics.csv")
    assert np.isfinite(history["train_loss"]).all() and history["auc"].notna().all()
    record("bf16_train_step_effnet", images_per_s=float(history["images_per_s"].iloc[-1]))


def test_bf16_train_step_genconvit(tiny_data, tmp_path):
    train, val = tiny_data
    args = ["--train-manifest", str(train), "--val-manifest", str(val), "--init", "scratch", "--backbone",
            "test_convnext", "--img-size", "64", "--latent-channels", "4", "--epochs", "1", "--batch-size", "8",
            "--workers", "0", "--output-dir", str(tmp_path / "gc"), "--device", "cuda", "--amp", "bf16"]
    train_stage2_genconvit.main(args)
    for variant in ("ed", "vae"):
        history = pd.read_csv(tmp_path / "gc" / variant / "metrics.csv")
        assert np.isfinite(history[["train_loss", "train_recon", "train_kl"]].to_numpy()).all(), variant


def test_compile_train_step(effnet_args):
    args = [*_cuda_flags(effnet_args), "--compile"]
    train_stage2_effnet.main(args)
    history = pd.read_csv(Path(args[args.index("--output-dir") + 1]) / "metrics.csv")
    assert np.isfinite(history["train_loss"]).all()


def test_official_size_vae_bf16_step_at_batch_16():
    torch.cuda.reset_peak_memory_stats()
    model = GenConViTVAE().cuda().train()  # the official sizes: ~695M parameters
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)
    criterion = GenConViTLoss(1.0, 0.5)
    images = torch.randn(16, 3, 224, 224, device="cuda")
    labels = torch.arange(16, device="cuda") % 2
    for _ in range(2):  # the second step runs with Adam's state allocated
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = criterion(model(images), images, labels)["loss"].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    assert torch.isfinite(loss)
    record("official_size_vae_bf16_b16", peak_gib=round(peak, 2), loss=float(loss))


def test_resume_on_cuda_is_bit_identical(effnet_args, tmp_path):
    def flags(out: Path) -> list[str]:
        args = _cuda_flags(effnet_args)
        args[args.index("--output-dir") + 1] = str(out)
        args[args.index("--epochs") + 1] = "3"
        return [*args, "--deterministic", "--save-every-minutes", "1e-9", "--log-every", "1"]

    train_stage2_effnet.main(flags(tmp_path / "straight"))
    cmd = [sys.executable, str(ROOT / "train_stage2_effnet.py"), *flags(tmp_path / "killed")]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    for line in proc.stdout:
        if line.startswith("epoch 2/3 step 2/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    resumed = subprocess.run([*cmd, "--resume"], env=subprocess_env(), capture_output=True, text=True, cwd=ROOT,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True)["model"] for d in ("straight", "killed"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_extraction_bf16_agrees_with_fp32(effnet_args, tiny_data):
    args = _cuda_flags(effnet_args)
    train_stage2_effnet.main(args)
    checkpoint = Path(args[args.index("--output-dir") + 1]) / "best.pt"
    outputs = {}
    for amp in (True, False):
        fx = FeatureExtractor(checkpoint_path=checkpoint, device="cuda", amp=amp, workers=0, progress=False)
        outputs[amp] = fx.extract(fx.make_loader(tiny_data[1]))[0]
    bf16, fp32 = outputs[True], outputs[False]
    cosine = (bf16 * fp32).sum(1) / (np.linalg.norm(bf16, axis=1) * np.linalg.norm(fp32, axis=1))
    record("extraction_bf16_vs_fp32", min_cosine=float(cosine.min()), max_abs=float(np.abs(bf16 - fp32).max()))
    assert cosine.min() > 0.99


def test_torchrun_one_process_initialises_nccl(effnet_args):
    args = _cuda_flags(effnet_args)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    ran = subprocess.run([*torchrun, str(ROOT / "train_stage2_effnet.py"), *args], env=subprocess_env(),
                         capture_output=True,
                         text=True, cwd=ROOT, timeout=600)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "process group nccl" in ran.stdout

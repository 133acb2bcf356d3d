"""Test-wide settings and shared fixtures: a tiny real PNG dataset and the trainer's base flags."""

import os

# A stray hub call must fail fast instead of hanging on a closed network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from src.data.demo import make_demo_dataset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    """(train.csv, val.csv): 36 + 12 synthetic 64x64 PNG face crops with video_id and method columns."""
    return make_demo_dataset(tmp_path_factory.mktemp("tiny_data"), n_videos=16, frames_per_video=3, size=64)


@pytest.fixture
def effnet_args(tiny_data, tmp_path) -> list[str]:
    """Flags for a seconds-long CPU run of train_stage2_effnet.py with timm's tiny test model."""
    train, val = tiny_data
    return ["--train-manifest", str(train), "--val-manifest", str(val), "--model", "test_efficientnet",
            "--no-pretrained", "--img-size", "32", "--batch-size", "8", "--workers", "0", "--epochs", "2",
            "--amp", "off", "--output-dir", str(tmp_path / "run")]

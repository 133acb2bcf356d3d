"""Entry-script parsing: --demo settings become defaults, so any flag given on the command line wins."""

import pytest

import train_stage2_effnet
from src.engine import cli


@pytest.fixture
def demo_root(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "DEMO_ROOT", tmp_path / "demo")
    return tmp_path / "demo"


def test_demo_settings_are_defaults_that_flags_override(demo_root):
    args = cli.parse_args(train_stage2_effnet.build_parser(), ["--demo"], aug="light", epochs=3)
    assert (args.aug, args.epochs, args.overwrite) == ("light", 3, True)
    assert args.train_manifest == str(demo_root / "train.csv") and (demo_root / "train.csv").is_file()
    assert args.output_dir == "output/stage2_effnet_demo"
    # A flag given at its usual default still wins over the demo's setting.
    args = cli.parse_args(train_stage2_effnet.build_parser(), ["--demo", "--aug", "standard", "--output-dir", "x"],
                          aug="light")
    assert (args.aug, args.output_dir) == ("standard", "x")


def test_without_demo_nothing_changes(demo_root):
    args = cli.parse_args(train_stage2_effnet.build_parser(), ["--epochs", "4"], aug="light")
    assert (args.aug, args.epochs, args.train_manifest) == ("standard", 4, "train_manifest.csv")
    assert not demo_root.exists()

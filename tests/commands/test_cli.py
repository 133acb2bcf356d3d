"""Entry-script parsing: --demo settings become defaults, so any flag given on the command line wins."""

import json
import runpy
import sys
from functools import partial

import pytest

import train_stage2_effnet
import train_stage2_genconvit
from stage2.commands import cli
from stage2.errors import ConfigError


@pytest.fixture
def demo_root(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "DEMO_ROOT", tmp_path / "demo")
    return tmp_path / "demo"


def test_demo_settings_are_defaults_that_flags_override(demo_root, capsys, monkeypatch):
    from stage2.data import demo

    # The demo's own numbers of videos and frames, drawn at 16px instead of its 256px (the same code; 9 CPU s less).
    monkeypatch.setattr(demo, "make_demo_dataset", partial(demo.make_demo_dataset, size=16))
    args = cli.parse_args(train_stage2_effnet.build_parser(), ["--demo"], aug="light", epochs=3)
    assert not demo_root.exists()  # made once the command has checked its output folder
    cli.make_demo_data(args)
    # It says what it does while it generates the data (a minute on a busy box), and how long it took.
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"demo: generating 588 synthetic 16x16 face crops (196 videos) in {demo_root}")
    assert printed[1].startswith("demo: 420 train + 168 val images written in ")
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


def test_demo_says_when_it_reuses_its_data_and_replaces_an_earlier_run(demo_root, tmp_path, capsys, monkeypatch):
    from stage2.data import demo

    monkeypatch.setattr(demo, "make_demo_dataset", partial(demo.make_demo_dataset, n_videos=4, frames_per_video=1,
                                                           size=16))
    run = tmp_path / "run"
    cli.make_demo_data(cli.parse_args(train_stage2_effnet.build_parser(), ["--demo", "--output-dir", str(run)]))
    assert "replacing" not in capsys.readouterr().out
    run.mkdir()
    (run / "best.pt").write_bytes(b"an earlier run")
    (run / "args.json").write_text(json.dumps({"train_manifest": str(demo_root / "train.csv")}))  # the demo's run
    cli.make_demo_data(cli.parse_args(train_stage2_effnet.build_parser(), ["--demo", "--output-dir", str(run)]))
    assert capsys.readouterr().out.splitlines() == [
        f"demo: replacing the earlier run in {run} (--demo overwrites its output folder)",
        f"demo: reusing the synthetic dataset in {demo_root}",
    ]
    cli.parse_args(train_stage2_effnet.build_parser(), ["--demo", "--output-dir", str(run), "--resume"])
    assert "replacing" not in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:'stage2.commands.* found in sys.modules")  # imported by other tests first
@pytest.mark.parametrize(("module", "flag"), [("train_effnet", "--pos-weight"), ("train_genconvit", "--variant"),
                                              ("extract_features", "--export")])
def test_python_dash_m_runs_each_command(module, flag, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [f"{module}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(f"stage2.commands.{module}", run_name="__main__")
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage: ") and flag in out
def test_demo_replaces_a_run_that_is_not_a_demo_only_with_overwrite(demo_root, tmp_path, capsys, monkeypatch):
    from stage2.data import demo

    monkeypatch.setattr(demo, "make_demo_dataset", partial(demo.make_demo_dataset, n_videos=4, frames_per_video=1,
                                                           size=16))
    run = tmp_path / "run" / "ed"  # GenConViT's demo folder holds ed/ and vae/
    run.mkdir(parents=True)
    (run / "best.pt").write_bytes(b"a week on the GPUs")
    (run / "args.json").write_text(json.dumps({"train_manifest": str(tmp_path / "train.csv")}))
    with pytest.raises(ConfigError, match=rf"--demo: --output-dir {run} holds a run that is not a demo \(trained on "
                                          rf"{tmp_path / 'train.csv'}\): pass --overwrite"):
        cli.parse_args(train_stage2_effnet.build_parser(), ["--demo", "--output-dir", str(run.parent)])
    assert (run / "best.pt").read_bytes() == b"a week on the GPUs"
    assert not demo_root.exists()  # refused before a single image was made
    (tmp_path / "a_file").write_text("x")  # an --output-dir the command refuses after parsing
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        train_stage2_effnet.main(["--demo", "--output-dir", str(tmp_path / "a_file")])
    assert not demo_root.exists()
    cli.parse_args(train_stage2_effnet.build_parser(), ["--demo", "--output-dir", str(run.parent), "--overwrite"])
    assert "demo: replacing the earlier run" in capsys.readouterr().out


@pytest.mark.parametrize("main", [train_stage2_effnet.main, train_stage2_genconvit.main])
def test_demo_in_a_fresh_folder_makes_its_data_before_the_inputs_are_checked(main, demo_root, tmp_path, monkeypatch):
    # The newcomer's first command: no data/demo yet. The input check (manifests exist) once ran before the demo's
    # data was made, and the README's demo stopped at "data/demo/train.csv: manifest file not found".
    from stage2.data import demo

    monkeypatch.setattr(demo, "make_demo_dataset", partial(demo.make_demo_dataset, n_videos=4, frames_per_video=2,
                                                           size=16))
    assert not demo_root.exists()
    main(["--demo", "--audit-only", "--output-dir", str(tmp_path / "audit")])
    assert (demo_root / "train.csv").is_file() and any((tmp_path / "audit").rglob("shortcut_audit.csv"))

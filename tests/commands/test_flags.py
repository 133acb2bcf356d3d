"""Flags and config values: every flag documented with its default, every value checked for type and range before
anything runs (one line naming the flag, exit code 2), --config values read with the flag's own type and choices,
and the checks that need the data (--select-metric, a val set left with one class, --perturb, several manifests)
answered before the first step or the first report."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fails, output_dir, set_flag

import feature_extractor
import train_stage2_effnet
import train_stage2_genconvit
from stage2.atomic import write_json_atomic
from stage2.commands import cli, extract_features
from stage2.commands.train_args import NOT_REPLAYED, SEED_MAX, config_from_args
from stage2.data.dataset import ManifestDataset
from stage2.data.manifest import read_manifest
from stage2.data.perturb import check_image_size, parse_perturbations
from stage2.data.transforms import build_cpu_transform
from stage2.engine.trainer import Trainer
from stage2.errors import ConfigError, ManifestError
from stage2.experts.genconvit import parse_stages
from stage2.experts.timm_classifier import TimmExpert
from stage2.run.checkpoint import BestCheckpoint, save_checkpoint
from stage2.run.device import pick_device

SCRIPTS = (train_stage2_effnet, train_stage2_genconvit, feature_extractor)


def _parse(script, argv: list[str]):
    if script is feature_extractor:
        return extract_features.parse_args(argv)
    return cli.parse_args(script.build_parser(), argv)


# ---------------------------------------------------------------- help
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.__name__)
def test_every_flag_has_a_help_text_and_shows_its_default(script, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a help text
    parser = script.build_parser()
    entries = re.split(r"\n(?=  -)", parser.format_help())  # one per flag: its invocation, then its help
    for action in parser._actions:
        if action.dest == "help":
            continue
        flag = action.option_strings[0]
        assert action.help, f"{flag} has no help text"
        entry = next(e for e in entries if re.match(rf"  {re.escape(flag)}[ ,\n]", e))
        plain_switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if action.default is not None and not plain_switch:  # None: the help says what happens without it
            assert f"(default: {action.default})" in entry, entry


def _sections(text: str) -> dict[str, str]:
    blocks = text.split("\n\n")
    return {block.splitlines()[0]: block for block in blocks if block.splitlines()[0].endswith(":")}


def test_the_extractor_help_is_grouped_like_the_trainers(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    sections = _sections(feature_extractor.build_parser().format_help())
    assert {"model:", "data:", "outputs:", "execution:"} <= set(sections)
    assert "--batch-size" in sections["execution:"] and "--manifest" in sections["data:"]
    assert [line.split()[0] for line in sections["options:"].splitlines()[1:]] == ["-h,"]  # nothing else ungrouped
    trainer = _sections(train_stage2_effnet.build_parser().format_help())
    assert {"model:", "data:", "execution:"} <= set(trainer)


def test_the_installed_commands_help_names_the_command(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/stage2-extract"])
    text = feature_extractor.build_parser().format_help()
    assert text.startswith("usage: stage2-extract") and "\n    stage2-extract --checkpoint " in text
    assert "python feature_extractor.py" not in text
    monkeypatch.setattr(sys, "argv", ["/venv/bin/stage2-train-effnet"])
    text = train_stage2_effnet.build_parser().format_help()
    assert "torchrun --nproc_per_node=8 --no-python stage2-train-effnet" in text and ".py" not in text
    monkeypatch.setattr(sys, "argv", ["train_stage2_genconvit.py"])  # from a checkout: the docstring as written
    assert "python train_stage2_genconvit.py --demo" in train_stage2_genconvit.build_parser().format_help()


# ---------------------------------------------------------------- ranges
RANGE_CASES = [
    (train_stage2_effnet, ["--clip-grad", "-1"], "--clip-grad -1.0: expected a number >= 0"),
    (train_stage2_effnet, ["--label-smoothing", "1.5"], "--label-smoothing 1.5: expected a number >= 0 and < 1"),
    (train_stage2_effnet, ["--weight-decay", "-1"], "--weight-decay -1.0: expected a number >= 0"),
    (train_stage2_effnet, ["--lr", "0.001", "--min-lr", "0.01"], "--min-lr 0.01: expected at most --lr (0.001)"),
    (train_stage2_effnet, ["--lr", "nan"], "--lr nan: expected a number >= 0"),
    (train_stage2_effnet, ["--lr", "0"], "--min-lr 1e-06: expected at most --lr (0.0)"),
    (train_stage2_effnet, ["--drop-path", "2"], "--drop-path 2.0: expected a number >= 0 and < 1"),
    (train_stage2_effnet, ["--ema-decay", "2"], "--ema-decay 2.0: expected a number >= 0 and < 1"),
    (train_stage2_effnet, ["--grad-accum", "0"], "--grad-accum 0: expected an integer >= 1"),
    (train_stage2_effnet, ["--log-every", "0"], "--log-every 0: expected an integer >= 1"),
    (train_stage2_effnet, ["--img-size", "0"], "--img-size 0: expected an integer >= 1"),
    (train_stage2_effnet, ["--seed", str(2**63)], f"--seed {2**63}: expected an integer >= 0 and <= 4294967295"),
    (train_stage2_effnet, ["--epochs", "0"], "--epochs 0: expected an integer >= 1"),
    (train_stage2_effnet, ["--batch-size", "0"], "--batch-size 0: expected an integer >= 1"),
    (train_stage2_effnet, ["--workers", "-1"], "--workers -1: expected an integer >= 0"),
    (train_stage2_effnet, ["--warmup-epochs", "-0.5"], "--warmup-epochs -0.5: expected a number >= 0"),
    (train_stage2_effnet, ["--save-every-minutes", "inf"], "--save-every-minutes inf: expected a number >= 0"),
    (train_stage2_effnet, ["--max-bad-images", "-1"], "--max-bad-images -1: expected an integer >= 0"),
    (train_stage2_effnet, ["--self-blend", "1.5"], "--self-blend 1.5: expected a number >= 0 and < 1, or paired"),
    (train_stage2_genconvit, ["--recon-weight", "-1"], "--recon-weight -1.0: expected a number >= 0"),
    (train_stage2_genconvit, ["--kl-weight", "-5"], "--kl-weight -5.0: expected a number >= 0"),
    (train_stage2_genconvit, ["--latent-channels", "0"], "--latent-channels 0: expected an integer >= 1"),
    (train_stage2_genconvit, ["--img-size", "100"], "--img-size 100: expected a multiple of 32 >= 32"),
    (feature_extractor, ["--batch-size", "0"], "--batch-size 0: expected an integer >= 1"),
    (feature_extractor, ["--workers", "-2"], "--workers -2: expected an integer >= 0"),
]


@pytest.mark.parametrize(("script", "argv", "message"), RANGE_CASES,
                         ids=[f"{s.__name__}{' '.join(a)}" for s, a, _ in RANGE_CASES])
def test_a_value_out_of_range_names_the_flag_the_value_and_the_range(script, argv, message):
    with pytest.raises(ConfigError) as err:
        _parse(script, argv)
    assert str(err.value) == message


def test_values_at_the_edges_of_their_ranges_are_taken():
    args = _parse(train_stage2_effnet, [
        "--clip-grad", "0", "--label-smoothing", "0", "--weight-decay", "0", "--lr", "0.01", "--min-lr", "0.01",
        "--drop-path", "0", "--ema-decay", "0.9999", "--seed", str(SEED_MAX), "--epochs", "1", "--workers", "0",
        "--warmup-epochs", "0", "--save-every-minutes", "0", "--max-bad-images", "0", "--img-size", "1"])
    assert (args.clip_grad, args.seed, args.min_lr) == (0.0, SEED_MAX, 0.01)
    assert config_from_args(args).clip_grad is None  # 0 disables clipping, as before
    assert _parse(train_stage2_genconvit, ["--img-size", "96", "--latent-channels", "1"]).img_size == 96


def test_self_blend_takes_a_chance_or_paired(capsys):
    assert _parse(train_stage2_effnet, ["--self-blend", "paired"]).self_blend == "paired"
    assert _parse(train_stage2_effnet, ["--self-blend", "0.25"]).self_blend == 0.25
    args = _parse(train_stage2_effnet, ["--self-blend", "paired", "--blend-mask", "ellipse"])
    assert (config_from_args(args).self_blend, config_from_args(args).blend_mask) == ("paired", "ellipse")
    with pytest.raises(SystemExit):
        _parse(train_stage2_effnet, ["--self-blend", "twice"])
    assert "argument --self-blend: invalid float or paired value: 'twice'" in capsys.readouterr().err


def test_a_bad_value_stops_the_command_before_anything_is_written(effnet_args, capsys):
    err = fails(train_stage2_effnet.main, [*effnet_args, "--clip-grad", "-1"], capsys)
    assert err == "error: --clip-grad -1.0: expected a number >= 0"
    assert not output_dir(effnet_args).exists()


def test_log_every_counts_optimizer_updates_not_micro_batches(effnet_args, capsys):
    # 36 images, 4 a step: 9 steps, an update every 2 and one at the end (5); every 2nd update is at steps 4 and 8.
    args = [*set_flag(set_flag(effnet_args, "--epochs", "1"), "--batch-size", "4"), "--grad-accum", "2",
            "--log-every", "2"]
    train_stage2_effnet.main(args)
    steps = re.findall(r"^epoch 1/1 step (\d+)/9 ", capsys.readouterr().out, flags=re.MULTILINE)
    assert steps == ["4", "8"]


def test_the_largest_seed_seeds_every_augmented_sample(tiny_data):
    frame = read_manifest(tiny_data[0])
    for seed in (SEED_MAX, 2_000_000):  # (seed, epoch, index) mixed beyond torch's 64 bits before
        dataset = ManifestDataset(frame, 32, transform=build_cpu_transform("strong"), seed=seed)
        dataset.set_epoch(3)
        assert torch.equal(dataset[5][0], dataset[5][0])


def test_stage_specs_need_whole_epochs_and_a_positive_lr_scale(tiny_data, tmp_path):
    for spec in ("frozen:-2,full:rest", "full:rest:-1", "full:rest:0", "full:rest:nan"):
        with pytest.raises(ValueError, match="EPOCHS >= 0"):
            parse_stages(spec, 4, 1e-3)
    train, val = tiny_data
    args = ["--train-manifest", str(train), "--val-manifest", str(val), "--init", "scratch", "--backbone",
            "test_convnext", "--img-size", "64", "--workers", "0", "--variant", "vae", "--stages", "full:rest:-1",
            "--output-dir", str(tmp_path / "gc")]
    with pytest.raises(ValueError, match="--stages"):
        train_stage2_genconvit.main(args)
    assert not (tmp_path / "gc").exists()  # refused before the run folder, not by the optimizer


def test_a_pos_weight_must_be_a_finite_positive_number():
    for value in ("nan", "inf", "0", "-1"):
        with pytest.raises(ValueError, match="--pos-weight"):
            TimmExpert("test_efficientnet", img_size=32, pretrained=False, pos_weight=value)
    assert TimmExpert("test_efficientnet", img_size=32, pretrained=False, pos_weight="2.5").pos_weight == 2.5


# ---------------------------------------------------------------- --config
CONFIG_CASES = [
    ('skip_bad_images: "false"', 'skip_bad_images "false": expected true or false'),
    ('ema: "false"', 'ema "false": expected true or false'),
    ('calibrate: "false"', 'calibrate "false": expected true or false'),
    ('channels_last: "no"', 'channels_last "no": expected true or false'),
    ("amp: turbo", 'amp "turbo": expected one of auto, bf16, fp16, off'),
    ("amp: off", "amp false: expected one of auto, bf16, fp16, off (YAML reads yes/no/on/off as true/false: "
                 "quote it)"),
    ("epochs: 1.5", "epochs 1.5: expected an integer >= 1"),
    ("epochs: [1, 2]", "epochs [1, 2]: expected an integer >= 1"),
    ("epochs: null", "epochs null: expected an integer >= 1"),
    ("model: null", "model null: expected a string"),
    ("clip-grad: -1", "clip-grad -1: expected a number >= 0"),
    ("log_to: wandb", 'log_to "wandb": expected one of tensorboard or null'),
    ("val-manifest: []", "val-manifest []: expected a string or a list of them"),
    ("self-blend: twice", 'self-blend "twice": expected a number >= 0 and < 1, or paired'),
    ("self-blend: 1", "self-blend 1: expected a number >= 0 and < 1, or paired"),
    ("blend-mask: hull", 'blend-mask "hull": expected one of auto, landmarks, ellipse'),
]


@pytest.mark.parametrize(("line", "message"), CONFIG_CASES, ids=[line for line, _ in CONFIG_CASES])
def test_config_values_are_read_with_the_flags_own_type_and_choices(tmp_path, line, message):
    config = tmp_path / "run.yaml"
    config.write_text(line + "\n")
    with pytest.raises(ConfigError) as err:
        cli.parse_args(train_stage2_effnet.build_parser(), ["--config", str(config)])
    assert str(err.value) == f"--config {config}: {message}"


def test_config_values_convert_as_on_the_command_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text('epochs: "3"\nlr: 1\nval-manifest: v.csv\nema: true\namp: "off"\ndata_root: null\n'
                      "pos-weight: 2.5\nskip-bad-images: false\n")
    args = cli.parse_args(train_stage2_effnet.build_parser(), ["--config", str(config)])
    assert (args.epochs, args.lr, args.val_manifest, args.ema, args.amp, args.data_root, args.pos_weight,
            args.skip_bad_images) == (3, 1.0, ["v.csv"], True, "off", None, "2.5", False)
    config.write_text("self-blend: paired\n")
    assert cli.parse_args(train_stage2_effnet.build_parser(), ["--config", str(config)]).self_blend == "paired"
    config.write_text('channels_last: "no"\n')  # as a command: one line, exit code 2
    err = fails(train_stage2_effnet.main, ["--config", str(config)], capsys)
    assert err.startswith("error: --config") and "channels_last" in err


REFUSED_CONFIGS = [  # (file name, contents, the message after "--config FILE: ")
    *((name, f"{key}: {value}\n", f"{key!r} describes a command, not a run's settings: give --{key} on the command "
                                  "line") for name, key, value in (("a.yaml", "evaluate", "best.pt"),
                                                                   ("a.yaml", "resume", "auto"),
                                                                   ("a.yaml", "demo", "true"),
                                                                   ("a.yaml", "overwrite", "true"),
                                                                   ("a.yaml", "config", "other.yaml"))),
    ("a.yaml", "lr: 0.1\nepochs: 2\nlr: 0.2\n", "'lr' given twice (lines 1 and 3)"),
    ("a.json", '{"lr": 0.1, "epochs": 2, "lr": 0.2}', "'lr' given twice"),
    ("a.yaml", "batch-size: 8\nbatch_size: 16\n", "'batch_size' sets --batch-size a second time"),
    ("a.yaml", "no_pretrained: true\n", "unknown setting 'no_pretrained' (--no-pretrained is `pretrained: false`)"),
]


@pytest.mark.parametrize(("name", "text", "message"), REFUSED_CONFIGS, ids=[t.split(":")[0] + "-" + n
                                                                            for n, t, _ in REFUSED_CONFIGS])
def test_config_settings_are_taken_or_refused_never_dropped(tmp_path, name, text, message):
    config = tmp_path / name
    config.write_text(text)
    with pytest.raises(ValueError) as err:
        cli.parse_args(train_stage2_effnet.build_parser(), ["--config", str(config)])
    assert str(err.value) == f"--config {config}: {message}"


def test_config_keys_of_a_command_are_no_setting_when_unset_and_refused_when_set(tmp_path, capsys):
    config = tmp_path / "old_args.json"  # as an args.json of an earlier version could hold them
    config.write_text('{"evaluate": null, "resume": null, "overwrite": false, "demo": false, "epochs": 3}')
    args = cli.parse_args(train_stage2_effnet.build_parser(), ["--config", str(config)])
    assert (args.evaluate_checkpoint, args.resume, args.overwrite, args.epochs) == (None, None, False, 3)
    config.write_text('{"evaluate": "best.pt", "epochs": 3}')  # was dropped: the command trained a model
    err = fails(train_stage2_effnet.main, ["--config", str(config), "--output-dir", str(tmp_path / "run")], capsys)
    assert "'evaluate' describes a command" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("script", [train_stage2_effnet, train_stage2_genconvit], ids=lambda s: s.__name__)
def test_args_json_of_a_run_replays_to_the_same_flags(script, tmp_path):
    """What a run records (every flag, JSON-typed: bools, a list of manifests, null for unset) reads back as is."""
    argv = ["--val-manifest", "a.csv", "--no-channels-last", "--ema", "--skip-bad-images", "--lr", "0.002", "--seed",
            "7", "--amp", "bf16", "--clip-grad", "0", "--log-to", "tensorboard"]
    argv += ["--no-pretrained", "--pos-weight", "auto"] if script is train_stage2_effnet else ["--variant", "ed"]
    flags = {k: v for k, v in vars(cli.parse_args(script.build_parser(), argv)).items() if k not in NOT_REPLAYED}
    recorded = tmp_path / "args.json"
    write_json_atomic(recorded, {**flags, "expert": {"model": "x"}})  # as Trainer.fit writes it
    replay = cli.parse_args(script.build_parser(), ["--config", str(recorded)])
    assert {k: v for k, v in vars(replay).items() if k not in NOT_REPLAYED} == flags


# ---------------------------------------------------------------- repeated flags
REPEATED = [
    (train_stage2_effnet, ["--config", "a.yaml", "--config", "b.yaml"], "--config given twice (a.yaml, then b.yaml)"),
    (train_stage2_effnet, ["--lr", "0.1", "--lr", "0.2"], "--lr given twice (0.1, then 0.2): it takes one value"),
    (train_stage2_effnet, ["--evaluate", "a.pt", "--evaluate", "b.pt"], "--evaluate given twice (a.pt, then b.pt)"),
    (train_stage2_genconvit, ["--weights", "a", "--weights", "b"], "--weights given twice (a, then b)"),
    (feature_extractor, ["--images", "a", "--images", "b"], "--images given twice (a, then b)"),
    (feature_extractor, ["--manifest", "a.csv", "--manifest", "b.csv"], "--manifest given twice (a.csv, then b.csv)"),
]


@pytest.mark.parametrize(("script", "argv", "message"), REPEATED, ids=[m.split(" ")[0] for _, _, m in REPEATED])
def test_a_flag_of_one_value_given_twice_is_refused_in_one_line(script, argv, message, capsys):
    assert fails(script.main, argv, capsys).startswith(f"error: {message}")


def test_list_flags_given_twice_add_up_and_replace_the_config_value(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("val-manifest: from_config.csv\nperturb: blur:1\n")
    argv = ["--evaluate", "best.pt", "--val-manifest", "a.csv", "--perturb", "jpeg:50", "--val-manifest", "b.csv",
            "c.csv", "--perturb", "down:0.5,noise:0.02"]
    cfg = config_from_args(_parse(train_stage2_effnet, [*argv, "--config", str(config)]))
    assert cfg.eval_manifests == ["a.csv", "b.csv", "c.csv"] and cfg.perturb == "jpeg:50,down:0.5,noise:0.02"
    cfg = config_from_args(_parse(train_stage2_effnet, ["--evaluate", "best.pt", "--config", str(config)]))
    assert cfg.eval_manifests == ["from_config.csv"] and cfg.perturb == "blur:1"


# ---------------------------------------------------------------- user errors
def test_a_library_valueerror_is_a_bug_shown_whole_not_a_user_error(capsys):
    with pytest.raises(ValueError, match="cannot reshape"):  # it printed "error: cannot reshape ..." and exit 2
        cli.exit_on_error(lambda: np.zeros(2).reshape(3))
    assert capsys.readouterr().err == ""


USER_CASES = [  # the project's own checks, each raised as one of its own error classes: still one line
    (train_stage2_effnet, ["--pos-weight", "-1", "--no-pretrained"],
     "--pos-weight '-1': expected auto, none or a positive number"),
    (train_stage2_effnet, ["--model", "no_such_net", "--no-pretrained"],
     "--model 'no_such_net': timm has no such model"),
    (train_stage2_effnet, ["--config", "{tmp}/run.yaml"], "unknown setting 'learning_rate'"),
    (train_stage2_genconvit, ["--stages", "full:x", "--init", "scratch"], "item 'full:x' has a bad number"),
    (train_stage2_genconvit, ["--weights", "w.pth"], "--weights names one file"),
    (feature_extractor, ["--checkpoint", __file__, "--manifest", "m.csv", "--out", "{tmp}"], "a folder; give the"),
]


@pytest.mark.parametrize(("script", "argv", "message"), USER_CASES, ids=[m.split(":")[0] for _, _, m in USER_CASES])
def test_the_projects_own_checks_are_one_line_user_errors(script, argv, message, tiny_data, tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("learning_rate: 1\n")
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    if script is not feature_extractor:  # manifests that exist: those are checked first
        argv += ["--train-manifest", str(tiny_data[0]), "--val-manifest", str(tiny_data[1]), "--output-dir",
                 str(tmp_path / "out")]
    assert message in fails(script.main, argv, capsys)


# ---------------------------------------------------------------- --device
def test_a_device_this_machine_lacks_is_one_line(monkeypatch, effnet_args, capsys):
    with pytest.raises(ConfigError, match=r"^--device tpu: expected cpu, cuda or cuda:N$"):
        pick_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^--device cuda: no CUDA device is available here .*use --device cpu$"):
        pick_device("cuda")
    assert pick_device(None) == torch.device("cpu")
    err = fails(train_stage2_effnet.main, [*effnet_args, "--device", "tpu"], capsys)
    assert err == "error: --device tpu: expected cpu, cuda or cuda:N"
    assert not output_dir(effnet_args).exists()  # not trained on the CPU instead


# ---------------------------------------------------------------- checks that need the data, before training
class _Trained(Exception):
    pass


@pytest.fixture
def no_training(monkeypatch):
    """Training stops at its first epoch with _Trained: what a check refuses never gets that far."""

    def train_epoch(*args, **kwargs):
        raise _Trained

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)


@pytest.mark.parametrize(("epochs", "said"), [("1", None), ("2", "degradations from epoch 2")])
def test_the_settings_name_when_degradations_begin_only_when_the_run_gets_there(effnet_args, no_training, capsys,
                                                                                epochs, said):
    with pytest.raises(_Trained):
        train_stage2_effnet.main([*set_flag(effnet_args, "--epochs", epochs), "--aug", "standard"])
    settings = capsys.readouterr().out
    assert "aug standard" in settings and ("degradations from" not in settings if said is None else said in settings)


@pytest.mark.parametrize(("metric", "words"), [("auc/nosuch", "auc/sharpen_blend"), ("train_loss", "val_loss")])
def test_a_select_metric_the_val_set_does_not_give_is_refused_before_training(effnet_args, no_training, capsys,
                                                                             metric, words):
    err = fails(train_stage2_effnet.main, [*effnet_args, "--select-metric", metric], capsys)
    assert err.startswith(f"error: --select-metric {metric}: not a metric of ") and words in err
    with pytest.raises(_Trained):  # what the val set gives is taken
        train_stage2_effnet.main([*effnet_args, "--select-metric", "auc/sharpen_blend", "--overwrite"])


@pytest.mark.filterwarnings("ignore:skipping cannot decode image")
def test_a_val_set_whose_fakes_are_all_undecodable_is_refused_before_training(effnet_args, tiny_data, tmp_path,
                                                                            no_training, capsys):
    frame = read_manifest(tiny_data[1])
    for row in frame.index[frame["label"] == 1]:  # every fake: a PNG with a broken header
        broken = tmp_path / f"broken_{row}.png"
        broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
        frame.loc[row, "path"] = str(broken)
    val = tmp_path / "val_broken_fakes.csv"
    frame.to_csv(val, index=False)
    args = [*effnet_args, "--skip-bad-images"]
    args[args.index("--val-manifest") + 1] = str(val)
    err = fails(train_stage2_effnet.main, args, capsys)
    assert err == f"error: {val}: none of its fake images could be decoded (skipped with --skip-bad-images): " \
                  "validation needs both classes"


# ---------------------------------------------------------------- --evaluate and --perturb
@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """An untrained test_efficientnet checkpoint at 32px, as the trainer writes one."""
    expert = TimmExpert("test_efficientnet", img_size=32, pretrained=False)
    model = expert.build_model()
    path = tmp_path / "best.pt"
    best = BestCheckpoint(model=model.state_dict(), meta=expert.checkpoint_meta(),
                          data_config=expert.data_config(model))
    save_checkpoint(best.to_dict(), path)
    return path


def _evaluate(checkpoint: Path, manifests: list[str], out: Path, *flags: str) -> list[str]:
    return ["--evaluate", str(checkpoint), "--val-manifest", *manifests, "--model", "test_efficientnet", "--workers",
            "0", "--amp", "off", "--output-dir", str(out), *flags]


def _no_report(out: Path) -> bool:
    """Nothing in the output folder but the run-folder lock (taken before any check)."""
    return not out.exists() or [p.name for p in out.iterdir()] == [".lock"]


def test_evaluate_checks_every_manifest_before_writing_any_report(checkpoint, tiny_data, tmp_path, capsys):
    frame = read_manifest(tiny_data[1])
    only_real = tmp_path / "only_real.csv"
    frame[frame["label"] == 0].to_csv(only_real, index=False)
    out = tmp_path / "eval"
    with pytest.raises(ManifestError, match="only_real.csv"):
        train_stage2_effnet.main(_evaluate(checkpoint, [str(tiny_data[1]), str(only_real)], out))
    assert _no_report(out)


def test_perturbations_are_checked_against_the_input_size_before_the_clean_pass(checkpoint, tiny_data, tmp_path,
                                                                               capsys):
    out = tmp_path / "eval"
    err = fails(train_stage2_effnet.main, _evaluate(checkpoint, [str(tiny_data[1])], out, "--perturb", "blur:20"),
                 capsys)
    assert err == ("error: --perturb blur:20: a blur of sigma 20 needs a crop of more than 60 pixels; the model's "
                   "input is 32px (at most blur:10.33)")
    assert _no_report(out)
    err = fails(train_stage2_effnet.main, _evaluate(checkpoint, [str(tiny_data[1])], out, "--perturb", ""), capsys)
    assert "no perturbation given" in err


def test_perturb_specs_take_exponents_and_refuse_fractional_jpeg_qualities():
    (noise,) = parse_perturbations("noise:1e-3")
    assert (noise.low, noise.high, noise.name) == (0.001, 0.001, "noise:0.001")
    (ranged,) = parse_perturbations("noise:1e-3-2e-2")
    assert (ranged.low, ranged.high) == (0.001, 0.02)
    for spec in ("jpeg:50.5", "jpeg:50-70.5"):
        with pytest.raises(ValueError, match="whole quality"):
            parse_perturbations(spec)
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    (largest,) = parse_perturbations("blur:10.33")
    check_image_size([largest], 32)
    assert largest(image).shape == image.shape  # the largest blur allowed at 32px runs
    (wider,) = parse_perturbations("blur:10.34")
    with pytest.raises(ValueError, match="at most blur:10.33"):
        check_image_size([wider], 32)
    with pytest.raises(RuntimeError):  # where torch itself would fail, after the clean pass
        wider(image)

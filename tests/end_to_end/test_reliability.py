"""What an overnight run must survive: changed flags on resume, broken statistics, bad data found early, signals,
full disks, and the smaller ways a run or an export could go quietly wrong."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import ROOT, TRAINED_LR, fails, output_dir, set_flag, subprocess_env
from PIL import Image

import feature_extractor
import train_stage2_effnet
import train_stage2_genconvit
from stage2.atomic import FILE_MODE
from stage2.commands.cli import exit_on_error
from stage2.commands.train_args import config_from_args
from stage2.data.manifest import read_manifest
from stage2.engine.modes import run
from stage2.errors import CheckpointError, TrainingDiverged
from stage2.experts.timm_classifier import TimmExpert
from stage2.run.checkpoint import load_checkpoint, read_last, save_checkpoint
from stage2.run.distributed import ShardedSampler
from stage2.run.logs import setup_logging
from stage2.scoring.plots import plot_roc


# ---------------------------------------------------------------- 1. resume with changed flags
def test_resume_with_more_epochs_replans_the_schedule_and_records_what_it_used(effnet_args):
    train_stage2_effnet.main(effnet_args)  # 2 epochs
    before = pd.read_csv(output_dir(effnet_args) / "metrics.csv")["lr_last_step"].tolist()
    longer = [*set_flag(effnet_args, "--epochs", "4"), "--resume"]
    train_stage2_effnet.main(longer)
    history = pd.read_csv(output_dir(effnet_args) / "metrics.csv")
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    lrs = history["lr_last_step"].tolist()
    assert lrs[:2] == pytest.approx(before)
    # Epoch 2 ended on the 2-epoch cosine's floor; the re-planned 4-epoch cosine continues from its middle.
    assert lrs[2] > 10 * lrs[1] and lrs[3] < lrs[2]
    assert json.loads((output_dir(effnet_args) / "args.json").read_text())["epochs"] == 4


def test_resume_with_a_new_lr_uses_it(effnet_args):
    args = set_flag(effnet_args, "--epochs", "3")
    train_stage2_effnet.main(set_flag(args, "--epochs", "1"))
    train_stage2_effnet.main([*set_flag(args, "--lr", "1e-2"), "--resume"])
    lrs = pd.read_csv(output_dir(args) / "metrics.csv")["lr_last_step"].tolist()
    assert lrs[0] < 3e-4 < lrs[1]  # the default 3e-4 plan, then the 1e-2 one
    assert json.loads((output_dir(args) / "args.json").read_text())["lr"] == 1e-2


@pytest.mark.parametrize(("flag", "value"), [("--batch-size", "4"), ("--img-size", "48"), ("--seed", "7"),
                                             ("--aug", "strong"), ("--label-smoothing", "0.1"),
                                             ("--model", "resnet10t")])
def test_resume_refuses_a_change_that_would_mix_two_runs(finished_run, capsys, flag, value):
    last = (output_dir(finished_run) / "last.pt").read_bytes()
    err = fails(train_stage2_effnet.main, [*set_flag(finished_run, flag, value), "--resume"], capsys)
    assert "--resume" in err and (flag in err or flag.removeprefix("--").replace("-", "_") in err)
    assert (output_dir(finished_run) / "last.pt").read_bytes() == last


def test_resume_refuses_fewer_epochs_than_already_trained(finished_run, capsys):
    err = fails(train_stage2_effnet.main, [*set_flag(finished_run, "--epochs", "1"), "--resume"], capsys)
    assert "--epochs 1" in err and "epoch 2" in err


def test_resume_of_a_finished_run_says_so_and_changes_nothing(finished_run, capsys):
    run_dir = output_dir(finished_run)
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.name != "train.log"}
    best = json.loads((run_dir / "summary.json").read_text())
    train_stage2_effnet.main([*finished_run, "--resume"])
    out = capsys.readouterr().out
    assert re.search(rf"--resume: the run in {re.escape(str(run_dir))} is finished \(2 of 2 epochs; best auc "
                     rf"\d\.\d{{4}} at epoch {best['best_epoch']}\): nothing to do", out), out
    assert "resuming" not in out and "epoch 3" not in out
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.name != "train.log"} == before
    train_stage2_effnet.main([*set_flag(finished_run, "--epochs", "3"), "--resume"])
    assert re.search(r"resuming from .* at epoch 3 \(best auc so far: \d\.\d{4}\)\n", capsys.readouterr().out)


# ---------------------------------------------------------------- 2. non-finite statistics never reach a checkpoint
class _InfStatisticMidEpoch2(TimmExpert):
    """Overflows one BatchNorm running_var (the loss stays finite) in the second epoch."""

    def build_model(self):
        self.model = super().build_model()
        self.calls = 0
        return self.model

    def loss(self, outputs, images, labels):
        if outputs.requires_grad:
            self.calls += 1
            if self.calls == 6:  # 4 steps per epoch: epoch 2, step 2
                self.model.bn1.running_var.data.fill_(float("inf"))  # .data: autograd must not notice
        return super().loss(outputs, images, labels)


def test_a_broken_statistic_stops_the_run_and_never_replaces_the_good_last_pt(effnet_args):
    args = [*effnet_args, "--save-every-minutes", "1e-9"]
    cfg = config_from_args(train_stage2_effnet.build_parser().parse_args(args))
    expert = _InfStatisticMidEpoch2("test_efficientnet", img_size=32, pretrained=False)
    with pytest.raises(TrainingDiverged, match=r"non-finite values in bn1\.running_var .*the last good checkpoint"):
        run(cfg, expert)
    last = load_checkpoint(output_dir(args) / "last.pt")
    assert (last["next_epoch"], last["step"]) == (1, 1)  # the mid-epoch save just before it broke
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_divergence_before_any_checkpoint_says_so(effnet_args, capsys):
    args = [*effnet_args, "--opt", "sgd", "--clip-grad", "0", "--lr", "1e4", "--warmup-epochs", "0"]
    err = fails(train_stage2_effnet.main, args, capsys, code=3)
    assert "no checkpoint was written yet" in err and not (output_dir(args) / "last.pt").exists()


# ---------------------------------------------------------------- 4. data problems before the first epoch
def test_a_video_with_real_and_fake_frames_is_refused_at_start(effnet_args, tiny_data, tmp_path, capsys):
    val = pd.read_csv(tiny_data[1])
    fake_video = val.loc[val["label"] == 1, "video_id"].iloc[0]
    val.loc[val.index[val["label"] == 0][0], "video_id"] = fake_video
    mixed = tiny_data[1].parent / "val_mixed.csv"
    val.to_csv(mixed, index=False)
    err = fails(train_stage2_effnet.main, set_flag(effnet_args, "--val-manifest", str(mixed)), capsys)
    assert "val_mixed.csv" in err and fake_video in err and "lines" in err
    assert not (output_dir(effnet_args) / "metrics.csv").exists()


def _with_corrupt_images(manifest: Path, tmp_path: Path, rows: tuple[int, ...] = (0,)) -> tuple[Path, list[str]]:
    """A copy of `manifest` whose `rows` each point at a PNG with a broken header: (the copy, the broken files)."""
    frame = read_manifest(manifest)
    bad = []
    for row in rows:
        path = tmp_path / f"broken_{row}.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
        frame.loc[row, "path"] = str(path)
        bad.append(str(path))
    corrupt = tmp_path / f"{manifest.stem}_corrupt.csv"
    frame.to_csv(corrupt, index=False)
    return corrupt, bad


def test_a_corrupt_val_image_stops_the_run_before_training(effnet_args, tiny_data, tmp_path, capsys):
    manifest, (bad,) = _with_corrupt_images(tiny_data[1], tmp_path)
    err = fails(train_stage2_effnet.main, set_flag(effnet_args, "--val-manifest", str(manifest)), capsys)
    assert bad in err
    assert not (output_dir(effnet_args) / "metrics.csv").exists() and not (output_dir(effnet_args) / "last.pt").exists()


def test_skipped_images_are_listed_in_the_run_folder_and_warned_about_in_one_line(effnet_args, tiny_data, tmp_path,
                                                                                  capsys):
    manifest, (bad,) = _with_corrupt_images(tiny_data[1], tmp_path)
    args = [*set_flag(effnet_args, "--val-manifest", str(manifest)), "--skip-bad-images"]
    logging.captureWarnings(False)  # as in a new process: the run's own capture of warnings into its log applies
    train_stage2_effnet.main(args)
    assert (output_dir(args) / "bad_images.txt").read_text().splitlines() == [f"val\t{bad}"]
    assert (pd.read_csv(output_dir(args) / "metrics.csv")["val_skipped"] == 1).all()
    # Python's format adds the file and line that raised it, a line of torch's DataLoader, and its source line.
    skipped = f"warning: skipping cannot decode image {bad}: "
    for text in (capsys.readouterr().out, (output_dir(args) / "train.log").read_text()):
        warned = [line for line in text.splitlines() if "skipping" in line or "warnings.warn" in line]
        assert warned and all(skipped in line for line in warned), warned


@pytest.mark.filterwarnings("ignore:skipping cannot decode image")
def test_more_bad_images_than_the_budget_stop_the_run(effnet_args, tiny_data, tmp_path, capsys):
    val, _ = _with_corrupt_images(tiny_data[1], tmp_path)
    args = [*set_flag(effnet_args, "--val-manifest", str(val)), "--skip-bad-images", "--max-bad-images", "0"]
    err = fails(train_stage2_effnet.main, args, capsys)
    assert "1 undecodable val images, more than --max-bad-images 0" in err
    assert not (output_dir(args) / "last.pt").exists()  # val is checked before the first step

    train, _ = _with_corrupt_images(tiny_data[0], tmp_path, rows=(1, 3))
    args = [*set_flag(effnet_args, "--train-manifest", str(train)), "--skip-bad-images", "--max-bad-images", "1",
            "--overwrite"]
    err = fails(train_stage2_effnet.main, args, capsys)
    assert "2 undecodable train images, more than --max-bad-images 1" in err and "bad_images.txt" in err
    assert len((output_dir(args) / "bad_images.txt").read_text().splitlines()) == 2
    assert not (output_dir(args) / "metrics.csv").exists()  # stopped before the epoch was validated


@pytest.mark.filterwarnings("ignore:skipping cannot decode image")
def test_batches_left_empty_or_with_one_image_are_skipped_and_counted(effnet_args, tiny_data, tmp_path, capsys):
    # Epoch 1's order, as the trainer's sampler draws it at --seed 42: its first batch of 8 wholly undecodable
    # (a crash in the device transforms, "[0, 3, 0, 0]"), its second down to one image (BatchNorm's "Expected more
    # than 1 value per channel", printed as a user error).
    order = list(ShardedSampler(36, shuffle=True, seed=42))
    train, _ = _with_corrupt_images(tiny_data[0], tmp_path, rows=tuple(order[:15]))
    args = [*set_flag(set_flag(effnet_args, "--train-manifest", str(train)), "--epochs", "1"), "--skip-bad-images"]
    train_stage2_effnet.main(args)
    metrics = pd.read_csv(output_dir(args) / "metrics.csv")
    assert metrics[["train_skipped", "train_skipped_steps"]].values.tolist() == [[15, 2]]
    assert "2 training steps skipped: --skip-bad-images left their batches fewer than two images" in (
        output_dir(args) / "train.log").read_text()
    err = fails(train_stage2_effnet.main, [*args, "--max-bad-images", "10", "--overwrite"], capsys)
    assert "15 undecodable train images, more than --max-bad-images 10" in err  # the limit acts at the epoch's end


# ---------------------------------------------------------------- 5. a worker's decode error is one line
def test_corrupt_image_with_workers_is_one_line_in_both_trainers_and_the_extractor(effnet_args, tiny_data,
                                                                                   tmp_path, capfd):
    manifest, (bad,) = _with_corrupt_images(tiny_data[0], tmp_path, rows=(3,))
    effnet = [*set_flag(set_flag(effnet_args, "--train-manifest", str(manifest)), "--workers", "2")]
    genconvit = ["--train-manifest", str(manifest), "--val-manifest", str(tiny_data[1]), "--init", "scratch",
                 "--backbone", "test_convnext", "--img-size", "64", "--latent-channels", "4", "--epochs", "1",
                 "--batch-size", "8", "--workers", "2", "--variant", "ed", "--output-dir", str(tmp_path / "gc")]
    extractor = ["--checkpoint", str(tmp_path / "best.pt"), "--manifest", str(manifest), "--out",
                 str(tmp_path / "f.npz"), "--workers", "2"]
    train_stage2_effnet.main(set_flag(set_flag(effnet_args, "--epochs", "1"), "--output-dir", str(tmp_path / "ok")))
    (tmp_path / "ok" / "best.pt").rename(tmp_path / "best.pt")
    for main, args in ((train_stage2_effnet.main, effnet), (train_stage2_genconvit.main, genconvit),
                       (feature_extractor.main, extractor)):
        capfd.readouterr()
        # capfd reads file descriptor 2 itself, which the loader's worker processes write to as well: a traceback
        # from a worker would be a second line.
        err = fails(main, args, capfd)
        assert err.startswith("error: cannot decode image") and str(bad) in err, main.__module__


# ---------------------------------------------------------------- 6. clean stops
@pytest.mark.slow
@pytest.mark.parametrize(("signum", "group"), [(signal.SIGTERM, False), (signal.SIGTERM, True), (signal.SIGINT, True)])
def test_a_signal_stops_at_a_step_writes_last_pt_and_resumes(effnet_args, signum, group):
    args = [*set_flag(set_flag(effnet_args, "--epochs", "3"), "--workers", "2"), "--log-every", "1"]
    cmd = [sys.executable, str(ROOT / "train_stage2_effnet.py"), *args]
    # Ctrl-C reaches the terminal's whole process group (the loader's workers too); so does the SIGTERM of GNU
    # `timeout`, systemd and Slurm, while `docker stop` and `kill PID` signal the main process only.
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT,
                            start_new_session=True)
    for line in proc.stdout:
        if line.startswith("epoch 2/3 step 2/"):
            os.killpg(proc.pid, signum) if group else proc.send_signal(signum)
            break
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr[-2000:]
    err = stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stopped: stopped by SIG") and "--resume" in err[0], stderr[-2000:]
    last = load_checkpoint(output_dir(args) / "last.pt")
    assert last["next_epoch"] == 1 and last["step"] >= 2
    # The resume runs in this process: what is under test is the stop; a second interpreter would only add the
    # import of torch and timm (~10 CPU s).
    train_stage2_effnet.main([*args, "--resume"])
    assert pd.read_csv(output_dir(args) / "metrics.csv")["epoch"].tolist() == [1, 2, 3]


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_every_rank_together(effnet_args, capsys):
    args = [*set_flag(effnet_args, "--epochs", "3"), "--log-every", "1"]
    # torch's own torchrun exits 1 whatever the ranks did; this one passes their clean stop on (143)
    torchrun = [sys.executable, "-m", "stage2.commands.torchrun", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen([*torchrun, str(ROOT / "train_stage2_effnet.py"), *args], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("epoch 2/3 step 1/"):
            # Rank 0 holds the run folder: a second run there is refused, naming it.
            err = fails(train_stage2_effnet.main, [*args, "--resume"], capsys)
            holder = int(re.search(r"in use by another run \(process (\d+)\)", err).group(1))
            assert b"RANK=0\0" in Path(f"/proc/{holder}/environ").read_bytes()
            proc.send_signal(signal.SIGTERM)  # torchrun passes it on to every rank
            break
    seen += proc.stdout.readlines()
    proc.wait(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, "".join(seen[-30:])
    # Where the stop lands depends on when the signal arrives (after step 1's stop check: at the end of epoch 2;
    # before it: at epoch 2 step 1); every rank must stop at the same place, which last.pt holds. A rank may not
    # get to say so: torchrun's agent SIGKILLs the ranks still running 30 s after it passed the signal on, which a
    # loaded box can reach after last.pt is written; what they do say must agree.
    stops = [m.group(1) for line in seen if (m := re.search(r"stopped: stopped by SIGTERM at (.+?);", line))]
    assert 1 <= len(stops) <= 2 and len(set(stops)) == 1, "".join(seen[-30:])
    last = load_checkpoint(output_dir(args) / "last.pt")
    where = f"epoch {last['next_epoch'] + 1} step {last['step']}" if last["step"] else \
        f"the end of epoch {last['next_epoch']}"
    assert stops[0] == where and stops[0] in ("epoch 2 step 1", "the end of epoch 2"), "".join(seen[-30:])


@pytest.mark.slow
def test_a_user_error_under_torchrun_is_the_ranks_one_line_and_exit_code(effnet_args, tmp_path):
    args = set_flag(effnet_args, "--train-manifest", str(tmp_path / "missing.csv"))
    torchrun = [sys.executable, "-m", "stage2.commands.torchrun", "--standalone", "--nproc_per_node=1"]
    ran = subprocess.run([*torchrun, str(ROOT / "train_stage2_effnet.py"), *args], env=subprocess_env(),
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert ran.returncode == 2, ran.stderr
    assert f"error: {tmp_path / 'missing.csv'}: manifest file not found" in ran.stderr
    assert "ChildFailedError" not in ran.stderr and "Traceback" not in ran.stderr


def test_a_second_run_in_the_same_folder_is_refused_and_a_killed_ones_lock_is_no_obstacle(effnet_args, capsys):
    first = [*set_flag(set_flag(effnet_args, "--epochs", "50"), "--workers", "2"), "--log-every", "1"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_stage2_effnet.py"), *first], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        for line in proc.stdout:
            if line.startswith("epoch 2/50 step 1/"):  # epoch 1's last.pt is written, loader workers are running
                break
        for extra in (["--resume"], ["--overwrite"]):
            err = fails(train_stage2_effnet.main, [*effnet_args, *extra], capsys)
            assert f"--output-dir {output_dir(first)} is in use by another run (process {proc.pid})" in err
        assert proc.poll() is None  # refused while the first run was alive, and its files are its own
        assert json.loads((output_dir(first) / "args.json").read_text())["epochs"] == 50
        assert load_checkpoint(output_dir(first) / "last.pt")["args"]["epochs"] == 50
    finally:
        proc.kill()  # SIGKILL: no clean-up runs, the kernel alone releases the lock (its loader workers hold none)
        proc.wait(timeout=60)
    train_stage2_effnet.main([*set_flag(effnet_args, "--epochs", "1"), "--overwrite"])
    assert pd.read_csv(output_dir(first) / "metrics.csv")["epoch"].tolist() == [1]


# ---------------------------------------------------------------- 7. the smaller ones
def test_extractor_never_replaces_an_existing_file_or_writes_onto_a_folder(effnet_args, tiny_data, tmp_path, capsys):
    train_stage2_effnet.main(set_flag(effnet_args, "--epochs", "1"))
    manifest_copy = tmp_path / "keep.csv"
    manifest_copy.write_text("path,label\n")
    base = ["--checkpoint", str(output_dir(effnet_args) / "best.pt"), "--manifest", str(tiny_data[1]), "--workers", "0"]
    for out, words in ((manifest_copy, "--overwrite"), (tmp_path, "a folder")):
        with pytest.raises(SystemExit) as exit_info:
            exit_on_error(lambda o=out: feature_extractor.main([*base, "--out", str(o)]))
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and words in err and len(err.splitlines()) == 1
    # --overwrite replaces only what the extractor wrote: a CSV that is no scores table of its own stays
    err = fails(feature_extractor.main, [*base, "--out", str(manifest_copy), "--overwrite"], capsys)
    assert "exists and is not a scores table the extractor wrote" in err
    assert manifest_copy.read_text() == "path,label\n"


def test_evaluate_with_the_other_familys_checkpoint_is_one_line(trained_run, tiny_data, tmp_path, capsys):
    args = ["--val-manifest", str(tiny_data[1]), "--evaluate", str(trained_run / "best.pt"), "--variant", "ed",
            "--output-dir", str(tmp_path / "gc"), "--workers", "0"]
    err = fails(train_stage2_genconvit.main, args, capsys)
    assert "--evaluate" in err and "timm" in err and "genconvit" in err


def test_genconvit_evaluate_of_one_checkpoint_writes_one_folder_and_says_which(tiny_data, tmp_path, capsys):
    train, val = tiny_data
    common = ["--val-manifest", str(val), "--img-size", "64", "--workers", "0", "--amp", "off"]
    train_stage2_genconvit.main([*common, "--train-manifest", str(train), "--init", "scratch", "--backbone",
                                 "test_convnext", "--latent-channels", "4", "--epochs", "1", "--batch-size", "8",
                                 "--variant", "vae", "--output-dir", str(tmp_path / "run")])
    out = tmp_path / "eval"
    train_stage2_genconvit.main([*common, "--evaluate", str(tmp_path / "run" / "vae" / "best.pt"), "--output-dir",
                                 str(out)])  # --variant left at "both"
    assert (out / "vae" / "eval_val.json").is_file() and not (out / "ed").exists()
    assert (f"--evaluate: reports in {out / 'vae'}: eval_val.json, predictions_val.csv, eval_summary.csv, "
            "shortcut_audit.csv") in capsys.readouterr().out


def test_an_output_folder_we_may_not_write_is_one_line(effnet_args, capsys):
    err = fails(train_stage2_effnet.main, set_flag(effnet_args, "--output-dir", "/sys/stage2_run"), capsys)
    assert "/sys/stage2_run" in err


def test_an_output_dir_that_is_a_file_or_cannot_be_made_is_one_line(effnet_args, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    for out, message in ((tmp_path / "a_file", f"{tmp_path / 'a_file'} is a file, not a folder"),
                         (tmp_path / "a_file" / "run", f"{tmp_path / 'a_file'} is a file, not a folder"),
                         (Path("/proc/stage2_run"), "cannot create it (No such file or directory)")):
        err = fails(train_stage2_effnet.main, set_flag(effnet_args, "--output-dir", str(out)), capsys)
        assert err == f"error: --output-dir {out}: {message}"


def test_a_full_disk_is_one_line_and_keeps_the_previous_file(effnet_args, capsys, monkeypatch):
    train_stage2_effnet.main(set_flag(effnet_args, "--epochs", "1"))
    best = output_dir(effnet_args) / "best.pt"
    before = best.read_bytes()

    def full(_fd: int) -> None:  # what fsync reports when the disk filled up during the write
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    err = fails(train_stage2_effnet.main, [*set_flag(effnet_args, "--epochs", "2"), "--resume"], capsys)
    assert "No space left on device" in err and str(output_dir(effnet_args)) in err
    monkeypatch.undo()
    assert best.read_bytes() == before
    assert not [p for p in output_dir(effnet_args).iterdir() if p.name.endswith(".tmp")]


@contextmanager
def _files_end_at(limit: int) -> Iterator[None]:
    """Every write past `limit` bytes of a file fails, in this process, whichever library writes it: the file size
    limit (EFBIG) stands in for a full disk (ENOSPC) and reaches the same code (torch's zip writer, safetensors'
    Rust writer, fallocate, numpy, the lock file)."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


# (command, where files end, the file named): 0 fails the first write, the run folder's lock file
@pytest.mark.parametrize(("command", "limit", "named"), [
    ("resume", 0, ".lock"), ("evaluate", 0, ".lock"), ("audit", 0, ".lock"), ("resume", 100_000, "best.pt|last.pt"),
    ("export", 100_000, "export"), ("cache", 16_000, "images.u8"), ("npz", 1_000, "f.npz")])
def test_a_full_disk_ends_every_command_in_one_line_naming_the_file(finished_run, trained_run, tiny_data, tmp_path,
                                                                    capsys, command, limit, named):
    run_dir = output_dir(finished_run)
    before = {name: (run_dir / name).read_bytes() for name in ("best.pt", "last.pt")}
    val, best = str(tiny_data[1]), str(trained_run / "best.pt")
    extract = ["--checkpoint", best, "--manifest", val, "--out", str(tmp_path / "f.npz"), "--workers", "0"]
    main, args = {
        "resume": (train_stage2_effnet.main, [*set_flag(finished_run, "--epochs", "3"), "--resume"]),
        "evaluate": (train_stage2_effnet.main, ["--evaluate", best, "--val-manifest", val, "--workers", "0",
                                                "--output-dir", str(tmp_path / "eval")]),
        "audit": (train_stage2_effnet.main, ["--audit-only", "--train-manifest", str(tiny_data[0]), "--val-manifest",
                                             val, "--workers", "0", "--output-dir", str(tmp_path / "audit")]),
        "export": (feature_extractor.main, ["--checkpoint", best, "--export", str(tmp_path / "export")]),
        "cache": (feature_extractor.main, [*extract, "--cache-dir", str(tmp_path / "cache")]),
        "npz": (feature_extractor.main, [*extract, "--batch-size", "4"]),
    }[command]
    with _files_end_at(limit):
        err = fails(main, args, capsys)
    assert re.fullmatch(rf"error: cannot write {re.escape(str(tmp_path))}/\S*({named}): File too large", err), err
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or ".partial-" in p.name]


def test_checkpoint_errors_say_what_is_wrong_in_one_whole_line(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"model": Path("not a tensor")}, path)  # a class weights_only refuses to unpickle
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "Unsupported global: GLOBAL pathlib.PosixPath was not an allowed global by default" in message
    assert "\n" not in message and message.endswith(")")


def test_run_files_get_the_normal_umask_mode(trained_run):
    for name in ("best.pt", "last.pt", "metrics.csv", "summary.json", "args.json", "roc.png", "curves.png",
                 "val_predictions.csv"):
        assert (trained_run / name).stat().st_mode & 0o777 == FILE_MODE, name


def test_plots_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "roc.png"
    plot_roc([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], path, title="first")
    first = path.read_bytes()
    from matplotlib.figure import Figure

    def crash(self, target, **kwargs):
        target.write(b"half a png")
        raise RuntimeError("crashed mid-write")

    monkeypatch.setattr(Figure, "savefig", crash)
    with pytest.raises(RuntimeError, match="mid-write"):
        plot_roc([0, 1, 0, 1], [0.9, 0.1, 0.8, 0.2], path, title="second")
    assert path.read_bytes() == first and [p.name for p in tmp_path.iterdir()] == ["roc.png"]


def test_workers_are_capped_by_the_cores_and_the_settings_say_so(effnet_args, recwarn):
    args = set_flag(set_flag(effnet_args, "--workers", "64"), "--epochs", "1")
    train_stage2_effnet.main(args)
    log_text = (output_dir(args) / "train.log").read_text()
    assert "--workers 64 capped to the" in log_text
    assert not [w for w in recwarn if "worker processes in total" in str(w.message)]


def test_a_video_id_shared_by_real_and_fake_train_frames_names_the_lines(tmp_path):
    from stage2.errors import ManifestError

    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "m.csv").write_text("path,label,video_id\na.png,0,v1\nb.png,1,v1\n")
    with pytest.raises(ManifestError, match=r"m\.csv lines 2 and 3: video 'v1' has both real and fake frames"):
        read_manifest(tmp_path / "m.csv")


def test_a_train_manifest_with_one_class_is_refused_at_start(effnet_args, tiny_data, tmp_path, capsys):
    train = pd.read_csv(tiny_data[0])
    only_real = tiny_data[0].parent / "train_only_real.csv"
    train[train["label"] == 0].to_csv(only_real, index=False)
    err = fails(train_stage2_effnet.main, set_flag(effnet_args, "--train-manifest", str(only_real)), capsys)
    assert "train_only_real.csv" in err and "only 'real' rows" in err
    assert not (output_dir(effnet_args) / "last.pt").exists()


def _flip_middle(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + n] = bytes(b ^ 0xFF for b in data[middle:middle + n])
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_refused_in_one_line_naming_it(effnet_args, tiny_data, tmp_path, capsys):
    train_stage2_effnet.main(set_flag(effnet_args, "--epochs", "1"))
    best, last = output_dir(effnet_args) / "best.pt", output_dir(effnet_args) / "last.pt"
    assert load_checkpoint(best)["tensors_sha256"] and load_checkpoint(last)["tensors_sha256"]
    for path in (best, last):
        _flip_middle(path)
    with pytest.raises(CheckpointError, match=rf"checkpoint {re.escape(str(best))}: damaged"):
        load_checkpoint(best)
    with pytest.raises(SystemExit) as exit_info:
        exit_on_error(lambda: feature_extractor.main(
            ["--checkpoint", str(best), "--manifest", str(tiny_data[1]), "--out", str(tmp_path / "f.npz"),
             "--workers", "0"]))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and f"{best}: damaged" in err
    assert not (tmp_path / "f.npz").exists()
    err = fails(train_stage2_effnet.main, [*set_flag(effnet_args, "--epochs", "2"), "--resume"], capsys)
    assert f"{last}: damaged" in err


def test_an_image_over_the_pixel_limit_is_one_line_or_skipped(effnet_args, tiny_data, tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.new("RGB", (100, 80)).save(big)  # 8,000 pixels; the others have 64x64 = 4,096
    val = read_manifest(tiny_data[1])
    val.loc[0, "path"] = str(big)
    manifest = tmp_path / "val_big.csv"
    val.to_csv(manifest, index=False)
    args = [*set_flag(effnet_args, "--val-manifest", str(manifest)), "--max-image-pixels", "5000"]
    err = fails(train_stage2_effnet.main, args, capsys)
    assert f"cannot decode image {big}: 100x80 pixels, over the limit of 5000" in err
    with pytest.warns(UserWarning, match="over the limit"):
        train_stage2_effnet.main([*set_flag(args, "--epochs", "1"), "--skip-bad-images", "--overwrite"])
    assert (output_dir(args) / "bad_images.txt").read_text().splitlines() == [f"val\t{big}"]


def test_console_messages_follow_sys_stdout_when_it_is_swapped_and_closed(monkeypatch):
    # A notebook cell or a test's captured output swaps sys.stdout and closes the old one: the console handler of a
    # finished run must not answer every later message with "--- Logging error ---".
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", first)
    setup_logging(None, is_main=True)
    first.close()
    monkeypatch.setattr(sys, "stdout", second)
    logging.getLogger("stage2").info("still heard")
    assert second.getvalue() == "still heard\n"


# ---------------------------------------------------------------- 8. a run owns its folder, a folder holds one run
def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}


def test_a_resume_continues_its_own_run_in_its_own_folder_or_is_refused(finished_run, trained_run, tmp_path,
                                                                          capsys):
    run_dir, other = output_dir(finished_run), trained_run / "last.pt"
    before = _files(run_dir)
    for out in (run_dir, tmp_path / "new"):  # a folder with another run, or none
        args = [*set_flag(set_flag(finished_run, "--epochs", "3"), "--output-dir", str(out)), "--resume", str(other)]
        err = fails(train_stage2_effnet.main, args, capsys)
        assert f"--resume {other}: that run's folder is {trained_run}, not --output-dir {out}" in err
    assert _files(run_dir) == before and not (tmp_path / "new").exists()


def test_resume_in_a_folder_without_a_run_says_it_starts_a_new_one(effnet_args, capsys):
    args = [*set_flag(effnet_args, "--epochs", "1"), "--resume"]
    train_stage2_effnet.main(args)
    note = f"--resume: {output_dir(args)} holds no last.pt yet: starting a new run"
    assert note in capsys.readouterr().out and note in (output_dir(args) / "train.log").read_text()


DIVERGES = ["--opt", "sgd", "--clip-grad", "0", "--lr", "1e4", "--warmup-epochs", "0"]  # non-finite in epoch 1


def test_an_overwrite_that_fails_before_its_first_checkpoint_leaves_the_previous_run_whole(finished_run, capsys):
    run_dir = output_dir(finished_run)
    before = _files(run_dir)
    diverging = [*[a for a in finished_run if a not in TRAINED_LR], *DIVERGES, "--overwrite"]
    fails(train_stage2_effnet.main, diverging, capsys, code=3)
    assert _files(run_dir) == before and not (run_dir / ".replaced").exists()
    # Refused once the val set is decoded, after the folder was prepared.
    fails(train_stage2_effnet.main, [*finished_run, "--overwrite", "--select-metric", "train_loss"], capsys)
    assert _files(run_dir) == before
    # Killed before its first checkpoint (-9: nothing restored it), the next run in the folder puts it back first.
    (run_dir / ".replaced").mkdir()
    for name in before:
        (run_dir / name).rename(run_dir / ".replaced" / name)
    (run_dir / "args.json").write_text("{}")
    err = fails(train_stage2_effnet.main, finished_run, capsys)
    assert f"--output-dir {run_dir} already holds a run" in err
    assert _files(run_dir) == before and not (run_dir / ".replaced").exists()


def test_a_run_that_failed_before_its_first_checkpoint_is_no_run_to_resume_or_keep(effnet_args, capsys):
    fails(train_stage2_effnet.main, [*effnet_args, *DIVERGES], capsys, code=3)
    assert (output_dir(effnet_args) / "args.json").exists() and not (output_dir(effnet_args) / "last.pt").exists()
    train_stage2_effnet.main([*set_flag(effnet_args, "--epochs", "1"), "--resume"])
    assert "holds no last.pt yet: starting a new run" in capsys.readouterr().out
    assert pd.read_csv(output_dir(effnet_args) / "metrics.csv")["epoch"].tolist() == [1]
    args = set_flag(effnet_args, "--output-dir", str(output_dir(effnet_args).with_name("again")))
    fails(train_stage2_effnet.main, [*args, *DIVERGES], capsys, code=3)
    train_stage2_effnet.main(set_flag(args, "--epochs", "1"))  # the rerun, as it was
    assert pd.read_csv(output_dir(args) / "metrics.csv")["epoch"].tolist() == [1]


def test_a_folder_holds_one_kind_of_output_overwrite_or_not(finished_run, trained_run, tiny_data, tmp_path, capsys):
    run_dir, val = output_dir(finished_run), str(tiny_data[1])
    evaluate = ["--evaluate", str(trained_run / "best.pt"), "--val-manifest", val, "--workers", "0"]
    audit = ["--audit-only", "--train-manifest", str(tiny_data[0]), "--val-manifest", val, "--workers", "0"]
    before = _files(run_dir)
    for args, kind in ((evaluate, "--evaluate reports"), (audit, "an --audit-only report")):
        err = fails(train_stage2_effnet.main, [*args, "--output-dir", str(run_dir), "--overwrite"], capsys)
        assert f"--output-dir {run_dir} holds a training run; {kind} goes in a folder of its own" in err
    assert _files(run_dir) == before
    reports = tmp_path / "eval"
    train_stage2_effnet.main([*evaluate, "--output-dir", str(reports)])
    written = _files(reports)
    for args in (set_flag(finished_run, "--output-dir", str(reports)), [*audit, "--output-dir", str(reports)]):
        err = fails(train_stage2_effnet.main, [*args, "--overwrite"], capsys)
        assert f"--output-dir {reports} holds --evaluate reports" in err
    assert _files(reports) == written


def test_resume_refuses_changed_val_rows_and_replans_changed_train_rows(effnet_args, tiny_data, tmp_path, capsys):
    # Copies of the manifests, absolute paths: the run's files keep their names while their rows change.
    train, val = (read_manifest(m) for m in tiny_data)
    copies = {name: tmp_path / f"{name}.csv" for name in ("train", "val")}
    train.to_csv(copies["train"], index=False)
    val.to_csv(copies["val"], index=False)
    args = set_flag(set_flag(set_flag(effnet_args, "--train-manifest", str(copies["train"])), "--val-manifest",
                             str(copies["val"])), "--epochs", "1")
    train_stage2_effnet.main(args)
    last_pt = output_dir(args) / "last.pt"
    resume = [*set_flag(args, "--epochs", "2"), "--resume", "--log-every", "1"]

    val.drop(index=0).to_csv(copies["val"], index=False)  # one real fewer: the best epoch's AUC was on 12 rows
    before = last_pt.read_bytes()
    err = fails(train_stage2_effnet.main, resume, capsys)
    assert f"the val manifest {copies['val']} changed since the run started (12 rows, now 11)" in err
    assert last_pt.read_bytes() == before
    val.to_csv(copies["val"], index=False)

    # Stopped 2 steps into epoch 2, when 4 train rows are removed: epoch 2 runs whole on the 32 rows left.
    last = read_last(last_pt)
    last.step, last.train_sums = 2, {k: torch.tensor(v) for k, v in (("loss", 11.0), ("n", 16.0), ("skipped", 0.0))}
    save_checkpoint(last.to_dict(), last_pt)
    train.drop(index=[0, 1, 34, 35]).to_csv(copies["train"], index=False)
    capsys.readouterr()
    train_stage2_effnet.main(resume)
    out = capsys.readouterr().out
    assert (f"resume: the train manifest {copies['train']} changed since the run started (36 rows, now 32): the "
            "schedule is re-planned from here on the new rows; epoch 2 restarts from its first step") in out
    assert "epoch 2/2 step 1/4 " in out and "epoch 2/2 step 4/4 " in out  # 32 rows, 8 a step: from the first
    assert pd.read_csv(output_dir(args) / "metrics.csv")["epoch"].tolist() == [1, 2]
    assert read_last(last_pt).manifests["train"]["rows"] == 32


def test_a_missing_manifest_is_named_before_any_weights_are_downloaded(tmp_path, capsys):
    # Offline (HF_HUB_OFFLINE=1), the hub weights of both defaults fail to download: a minute of retries before.
    missing = ["--train-manifest", str(tmp_path / "train.csv"), "--val-manifest", str(tmp_path / "val.csv")]
    for main, args in ((train_stage2_effnet.main, []), (train_stage2_genconvit.main, ["--variant", "ed"])):
        err = fails(main, [*missing, *args, "--output-dir", str(tmp_path / "run")], capsys)
        assert err == f"error: {tmp_path / 'train.csv'}: manifest file not found"


def test_evaluate_says_which_model_it_scores_and_where_its_reports_went(trained_run, tiny_data, tmp_path, capsys):
    best = trained_run / "best.pt"
    base = ["--evaluate", str(best), "--val-manifest", str(tiny_data[1]), "--workers", "0", "--overwrite",
            "--output-dir", str(tmp_path / "eval")]
    train_stage2_effnet.main(base)  # --model and --img-size not given: nothing to say about them
    printed = capsys.readouterr().out
    assert "do not apply" not in printed
    assert f"--evaluate: reports in {tmp_path / 'eval'}: eval_val.json, predictions_val.csv" in printed
    train_stage2_effnet.main([*base, "--model", "test_efficientnet", "--img-size", "64", "--label-smoothing", "0.1"])
    printed = capsys.readouterr().out
    assert (f"--evaluate {best}: scoring the model it holds, test_efficientnet at 32px, with its run's loss; this "
            "command's --img-size, --label-smoothing (test_efficientnet at 64px) do not apply") in printed


def test_evaluate_calls_operating_points_calibrated_only_with_a_fitted_temperature(trained_run, tiny_data, tmp_path,
                                                                                    capsys):
    for name, fitted in (("last.pt", False), ("best.pt", True)):  # last.pt never holds the fitted temperature
        out = tmp_path / name
        train_stage2_effnet.main(["--evaluate", str(trained_run / name), "--val-manifest", str(tiny_data[1]),
                                  "--workers", "0", "--output-dir", str(out)])
        printed = capsys.readouterr().out
        report = json.loads((out / "eval_val.json").read_text())
        assert report["temperature_fitted"] is fitted and (report["temperature"] == 1.0) is not fitted
        assert ("operating points on calibrated P(fake)" in printed) is fitted
        assert ("operating points on uncalibrated P(fake) (no fitted temperature)" in printed) is not fitted


def test_extraction_says_when_a_checkpoint_has_no_fitted_temperature_yet(trained_run, caplog):
    from stage2.embeddings import FeatureExtractor

    for name, uncalibrated in (("last.pt", True), ("best.pt", False)):  # last.pt: as best.pt is during the run
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="stage2"):
            FeatureExtractor(checkpoint_path=trained_run / name, device="cpu")
        said = f"{trained_run / name} has no fitted temperature yet (a run fits it when it ends): P(fake) uses " \
               "temperature 1.0, uncalibrated"
        assert (said in caplog.text) == uncalibrated, name


def test_an_extractor_output_is_never_one_of_its_inputs(trained_run, tiny_data, tmp_path, capsys):
    checkpoint, manifest = tmp_path / "best.pt", tmp_path / "val.csv"
    checkpoint.write_bytes((trained_run / "best.pt").read_bytes())
    read_manifest(tiny_data[1]).to_csv(manifest, index=False)
    before = {path: path.read_bytes() for path in (checkpoint, manifest)}
    base = ["--checkpoint", str(checkpoint), "--workers", "0", "--overwrite"]
    for flag, target, source in (("--out", checkpoint, "--checkpoint"), ("--out", manifest, "--manifest"),
                                 ("--export", tmp_path, "--checkpoint")):
        features = ["--manifest", str(manifest)] if flag == "--out" else []  # --manifest needs --out
        err = fails(feature_extractor.main, [*base, *features, flag, str(target)], capsys)
        assert err.startswith(f"error: {flag} {target}: ") and f" the {source} " in err and "never replaces" in err
    assert {path: path.read_bytes() for path in before} == before


def test_feature_extractor_takes_the_checkpoint_as_its_one_positional_argument(trained_run):
    from stage2.embeddings import FeatureExtractor

    fx = FeatureExtractor(str(trained_run / "best.pt"), device="cpu")  # as a notebook writes it
    assert fx.model_name == "test_efficientnet" and fx.checkpoint_path == trained_run / "best.pt"
    with pytest.raises(CheckpointError, match=r"^checkpoint tf_efficientnetv2_b3: no such file$"):
        FeatureExtractor("tf_efficientnetv2_b3")
    with pytest.raises(TypeError, match=r"needs a checkpoint: FeatureExtractor\('output/stage2_effnet/best.pt'\)"):
        FeatureExtractor()


def test_a_run_that_fails_before_training_leaves_no_folder_and_a_finished_one_no_lock(effnet_args, tmp_path,
                                                                                      capsys):
    missing = set_flag(effnet_args, "--train-manifest", str(tmp_path / "missing.csv"))
    fails(train_stage2_effnet.main, missing, capsys)
    assert not output_dir(missing).exists()  # was: an empty train.log and a .lock
    (tmp_path / "w.safetensors").write_bytes(b"not weights")  # found unreadable once the run's log was set up
    broken = [a for a in set_flag(effnet_args, "--pretrained-file", str(tmp_path / "w.safetensors"))
              if a != "--no-pretrained"]
    assert "neither a safetensors file nor a PyTorch checkpoint" in fails(train_stage2_effnet.main, broken, capsys)
    assert not output_dir(broken).exists()
    logging.getLogger("stage2").info("the next command in this process")  # not into the removed run's train.log
    train_stage2_effnet.main(set_flag(effnet_args, "--epochs", "1"))
    assert not (output_dir(effnet_args) / ".lock").exists()
    fails(train_stage2_effnet.main, [*missing, "--overwrite"], capsys)  # into a run's folder: its files stay
    assert not (output_dir(effnet_args) / ".lock").exists() and (output_dir(effnet_args) / "best.pt").is_file()


def test_weights_dir_errors_name_weights_dir(tiny_data, tmp_path, capsys):
    args = ["--train-manifest", str(tiny_data[0]), "--val-manifest", str(tiny_data[1]), "--init", "official",
            "--weights-dir", str(tmp_path), "--output-dir", str(tmp_path / "run")]
    err = fails(train_stage2_genconvit.main, args, capsys)
    assert err == (f"error: --weights-dir {tmp_path}: no genconvit_ed_inference.pth in it (the official "
                   "GenConViT-ED weights)")


def test_images_extraction_counts_images_not_manifest_rows(trained_run, tiny_data, tmp_path, capsys):
    images = tiny_data[1].parent / "images"
    feature_extractor.main(["--checkpoint", str(trained_run / "best.pt"), "--images", str(images), "--out",
                            str(tmp_path / "f.npz"), "--workers", "0"])
    wrote = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote")]
    assert len(wrote) == 1 and wrote[0].endswith("(48 of 48 images)"), wrote

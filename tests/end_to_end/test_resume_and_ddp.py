"""A run killed mid-epoch resumes bit-identically; two DDP ranks score the val set exactly like one; two torchrun
nodes train one run into one shared folder."""

import json
import signal
import socket
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import ROOT, set_flag, subprocess_env

import train_stage2_effnet
from stage2.run.config import TrainConfig
from stage2.run.resume import POLICIES, resume_policy

TIME_COLUMNS = ["epoch_time", "images_per_s"]


def _flags(effnet_args: list[str], out: Path, blend: str = "0.5") -> list[str]:
    args = list(effnet_args)
    args[args.index("--output-dir") + 1] = str(out)
    args[args.index("--epochs") + 1] = "3"
    # --self-blend: its fakes, like every augmentation, are a function of (seed, epoch, index): a resume repeats them
    return [*args, "--deterministic", "--save-every-minutes", "1e-9", "--log-every", "1", "--self-blend", blend]


@pytest.mark.slow
@pytest.mark.parametrize("blend", ["0.5", "paired"])  # paired: a step samples half the rows, the resume skips those
def test_kill_mid_epoch_and_resume_is_bit_identical(effnet_args, tmp_path, capsys, blend):
    torch.set_num_threads(1)
    straight = tmp_path / "straight"
    train_stage2_effnet.main(_flags(effnet_args, straight, blend))

    killed = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "train_stage2_effnet.py"), *_flags(effnet_args, killed, blend)]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("epoch 2/3 step 2/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
    interrupted = torch.load(killed / "last.pt", weights_only=True)
    assert interrupted["next_epoch"] == 1 and interrupted["step"] >= 1, "expected a mid-epoch checkpoint"

    # Resumed in this process (one torch thread, like the killed one): the kill is what needs a process of its own.
    train_stage2_effnet.main([*_flags(effnet_args, killed, blend), "--resume"])
    assert "resuming from" in capsys.readouterr().out

    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (straight, killed))
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    history_a = pd.read_csv(straight / "metrics.csv").drop(columns=TIME_COLUMNS)
    history_b = pd.read_csv(killed / "metrics.csv").drop(columns=TIME_COLUMNS)
    pd.testing.assert_frame_equal(history_a, history_b)


@pytest.mark.slow
def test_two_ddp_ranks_give_exactly_the_single_process_metrics(effnet_args, tiny_data, tmp_path):
    # 11 val images: two ranks get a padded duplicate that the gather must drop.
    val = pd.read_csv(tiny_data[1])
    odd_val = tiny_data[1].parent / "val_odd.csv"
    val.iloc[:-1].to_csv(odd_val, index=False)
    args = list(effnet_args)
    args[args.index("--val-manifest") + 1] = str(odd_val)
    args[args.index("--epochs") + 1] = "1"
    args += ["--self-blend", "0.5"]  # self-blended fakes are made per sample: each rank makes its shard's
    out = Path(args[args.index("--output-dir") + 1])

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    script = str(ROOT / "train_stage2_effnet.py")
    trained = subprocess.run([*torchrun, script, *args], env=subprocess_env(), capture_output=True, text=True, cwd=ROOT,
                             timeout=300)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert "x 2 rank(s)" in trained.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["n"] == 11

    evaluate = [*args, "--evaluate", str(out / "best.pt")]
    one = tmp_path / "eval1"
    train_stage2_effnet.main(set_flag(evaluate, "--output-dir", str(one)))
    two = tmp_path / "eval2"
    ran = subprocess.run([*torchrun, script, *set_flag(evaluate, "--output-dir", str(two))], env=subprocess_env(),
                         capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    m1 = json.loads((one / "eval_val_odd.json").read_text())["metrics"]
    m2 = json.loads((two / "eval_val_odd.json").read_text())["metrics"]
    assert m1["n"] == m2["n"] == 11
    assert m1["auc"] == m2["auc"] == summary["metrics"]["auc"]
    for key in ("ap", "eer", "acc", "video_auc"):
        assert m1[key] == m2[key], key
    # What the 2-rank run recorded in best.pt is what a single process measures on that same best.pt: every
    # rank validated rank 0's weights and BatchNorm statistics.
    stored = torch.load(out / "best.pt", weights_only=True)["metrics"]
    for key in ("auc", "ap", "eer", "acc", "val_loss", "log_loss"):
        assert stored[key] == pytest.approx(m1[key], abs=1e-6), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_one_run_into_the_shared_output_folder(effnet_args, tmp_path):
    # The README's multi-node recipe on one host: two torchrun agents of one process each, joined by the c10d
    # rendezvous (no --node-rank: the first to arrive hosts the store), both given the same --output-dir.
    out = tmp_path / "shared" / "run"
    args = set_flag(effnet_args, "--output-dir", str(out))
    epochs = int(args[args.index("--epochs") + 1])
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "two-nodes"]
    nodes = [subprocess.Popen([*node, str(ROOT / "train_stage2_effnet.py"), *args], env=subprocess_env(), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        logs = [proc.communicate(timeout=300)[0] for proc in nodes]
    finally:
        for proc in nodes:
            proc.kill()
    assert [proc.returncode for proc in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert sum("x 2 rank(s)" in log for log in logs) == 1  # rank 0 alone prints the settings line

    assert [p.name for p in (tmp_path / "shared").iterdir()] == ["run"]  # one run, nothing beside it
    assert {"best.pt", "last.pt", "metrics.csv", "summary.json", "train.log", "args.json"} <= {
        p.name for p in out.iterdir()}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file, the lock let go
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == list(range(1, epochs + 1))
    assert torch.load(out / "last.pt", weights_only=True)["next_epoch"] == epochs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["n"] == len(pd.read_csv(args[args.index("--val-manifest") + 1]))
    assert "x 2 rank(s)" in (out / "train.log").read_text()


def test_every_train_config_field_says_what_a_resume_may_do_with_it():
    """A field added to TrainConfig without `metadata=REFUSE/REPLAN/FREE/INVOCATION` fails here, not on a resume."""
    missing = [f.name for f in fields(TrainConfig) if f.metadata.get("resume") not in POLICIES]
    assert not missing, f"TrainConfig fields without a resume policy: {missing}"
    assert {name for name in TrainConfig().to_dict() if resume_policy(name) == "replan"} == {
        "epochs", "lr", "min_lr", "warmup_epochs"}
    assert {resume_policy(name) for name in ("seed", "batch_size", "img_size", "train_manifest", "grad_accum")} == {
        "refuse"}
    assert {resume_policy(name) for name in ("resume", "overwrite", "output_dir", "cli_args")} == {"invocation"}

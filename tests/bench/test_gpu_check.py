"""The prepared GPU check without a GPU: it says it needs CUDA, runs what is safe, writes its report, exits 0."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_it_runs_the_cpu_safe_parts_and_exits_0(tmp_path):
    ran = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    assert "needs a CUDA device" in ran.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["environment"]["cuda"] is False and report["environment"]["packages"]["timm"]
    cases = report["tests"]["cases"]
    assert len(cases) >= 7 and {c["outcome"] for c in cases} == {"skipped"}  # collected, then skipped
    # In one process: the suite's xdist workers would share the GPU and the speed figures the CUDA tests record.
    assert "bringing up nodes" not in (tmp_path / "tests.log").read_text()
    assert "trainings" not in report and "bench" not in report
    md = (tmp_path / "report.md").read_text()
    assert "No CUDA device" in md and "test_official_size_vae_bf16_step_at_batch_16" in md


def test_the_real_set_runs_only_when_present_with_every_cross_set(tmp_path):
    from benchmarks.gpu_check import real_set_command

    assert real_set_command(tmp_path, tmp_path / "out") is None
    for name in ("train.csv", "val.csv", "cross_rfff.csv", "cross_b.csv"):
        (tmp_path / name).write_text("path,label\n")
    command = real_set_command(tmp_path, tmp_path / "out")
    assert command[1:3] == ["-m", "benchmarks.learn"] and command[command.index("--device") + 1] == "cuda"
    crosses = [command[i + 1] for i, arg in enumerate(command) if arg == "--cross"]
    assert crosses == [f"b={tmp_path / 'cross_b.csv'}", f"rfff={tmp_path / 'cross_rfff.csv'}"]
    from benchmarks import learn  # the command parses, up to the files it names

    args = learn.parse_args(command[3:])
    assert args.train_manifest == tmp_path / "train.csv" and dict(args.cross)["rfff"] == tmp_path / "cross_rfff.csv"

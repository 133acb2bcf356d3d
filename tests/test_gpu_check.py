"""The prepared GPU check without a GPU: it says it needs CUDA, runs what is safe, writes its report, exits 0."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT


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
    assert "trainings" not in report and "bench" not in report
    md = (tmp_path / "report.md").read_text()
    assert "No CUDA device" in md and "test_official_size_vae_bf16_step_at_batch_16" in md

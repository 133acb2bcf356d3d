"""The benchmark suite writes its JSON after every section, so a run stopped by a time limit keeps its figures."""

import json

import pytest
import torch

from benchmarks import bench
from benchmarks.timing import row

# main() sets torch's thread count: keep the one the rest of the test session runs with
THREADS = ["--threads", str(torch.get_num_threads())]


def test_a_run_stopped_in_a_later_section_keeps_the_figures_of_the_earlier_ones(tmp_path, monkeypatch):
    def training(*args, **kwargs):
        return [row("3 train", "plain", [2.0, 2.0, 2.0]), row("3 train", "ours", [3.0, 3.0, 3.0], baseline="plain")]

    def extraction(*args, **kwargs):
        raise KeyboardInterrupt  # what a time limit's signal does to the run

    monkeypatch.setattr(bench, "cpu_training", training)
    monkeypatch.setattr(bench, "cpu_extraction", extraction)
    monkeypatch.setattr(bench, "QUICK", bench.Plan(images=4))
    out = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--quick", "--sections", "train,extract", "--json", str(out), "--work-dir", str(tmp_path),
                    *THREADS])
    result = json.loads(out.read_text())
    assert [r["case"] for r in result["rows"]] == ["plain", "ours"]
    assert result["rows"][1]["ratio"] == pytest.approx(1.5)
    assert "3 CPU training" in result["seconds"] and "4 CPU extraction" not in result["seconds"]
    assert "| ours |" in out.with_suffix(".md").read_text()


def test_a_failing_section_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    def training(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory\nsecond line")

    def extraction(*args, **kwargs):
        return [row("4 extract", "bare forward", [8.0, 8.2])]

    monkeypatch.setattr(bench, "cpu_training", training)
    monkeypatch.setattr(bench, "cpu_extraction", extraction)
    monkeypatch.setattr(bench, "QUICK", bench.Plan(images=4))
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--sections", "train,extract", "--json", str(out), "--work-dir", str(tmp_path), *THREADS])
    result = json.loads(out.read_text())
    assert result["errors"] == [{"section": "3 CPU training", "error": "RuntimeError: CUDA error: out of memory"}]
    assert [r["case"] for r in result["rows"]] == ["bare forward"]

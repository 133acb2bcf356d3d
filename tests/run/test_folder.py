"""The run folder's lock: what killed writes left is removed under it, and what a failed run created goes."""

from __future__ import annotations

import pytest
import torch

from stage2.atomic import write_text_atomic
from stage2.run.distributed import DistInfo
from stage2.run.folder import run_dir_lock

SINGLE = DistInfo(rank=0, world_size=1, device=torch.device("cpu"))


def test_a_run_removes_the_temporary_files_of_writes_killed_mid_way(tmp_path):
    out = tmp_path / "run"
    (out / "recon_samples").mkdir(parents=True)
    killed = [out / ".curves.png.k3j_h5g6.tmp", out / ".best.pt.abcdefgh.tmp",
              out / "recon_samples" / ".epoch_001.png.0a1b2c3d.tmp"]
    kept = [out / "notes.tmp", out / ".notes.tmp", out / "curves.png"]
    for path in [*killed, *kept]:
        path.write_text("x")
    with run_dir_lock(out, SINGLE):
        write_text_atomic(out / "metrics.csv", "epoch\n1\n")
    assert not any(path.exists() for path in killed)
    assert all(path.exists() for path in kept)


def test_a_run_that_fails_before_writing_removes_the_folders_it_created(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError), run_dir_lock(tmp_path / "kept" / "a" / "b", SINGLE):
        raise RuntimeError("set-up failed")
    assert [path.name for path in tmp_path.rglob("*")] == ["kept"]
    with pytest.raises(RuntimeError), run_dir_lock(tmp_path / "kept" / "a" / "b", SINGLE):
        write_text_atomic(tmp_path / "kept" / "a" / "b" / "train.log", "started\n")
        raise RuntimeError("failed after writing")
    assert (tmp_path / "kept" / "a" / "b" / "train.log").is_file()

"""A run whose train manifest holds reals only, its fakes self-blended (--self-blend paired): it trains, with the
masks the log names, batches of a real beside its fake, and the manifest checks that still hold."""

import pandas as pd
import pytest
from conftest import fails, output_dir, set_flag

import train_stage2_effnet
from stage2.data.landmarks import missing_extra
from stage2.engine import loop


@pytest.fixture
def reals_only(tiny_data, tmp_path):
    """The tiny train set's 18 real rows (absolute paths), and its 18 fake rows, as two manifests."""
    frame = pd.read_csv(tiny_data[0])
    frame["path"] = [str(tiny_data[0].parent / p) for p in frame["path"]]
    reals, fakes = tmp_path / "reals.csv", tmp_path / "fakes.csv"
    frame[frame["label"] == 0].to_csv(reals, index=False)
    frame[frame["label"] == 1].to_csv(fakes, index=False)
    return reals, fakes


def test_a_reals_only_manifest_trains_with_paired_self_blends(effnet_args, reals_only, monkeypatch, tmp_path):
    batches = []
    step = loop._step

    def recording_step(lp, stage, batch, seed, update):
        batches.append(batch)
        return step(lp, stage, batch, seed, update)

    monkeypatch.setattr(loop, "_step", recording_step)
    args = [*set_flag(effnet_args, "--train-manifest", str(reals_only[0])), "--self-blend", "paired",
            "--cache-dir", str(tmp_path / "cache")]
    train_stage2_effnet.main(args)
    out = output_dir(effnet_args)
    log = (out / "train.log").read_text()
    assert "train 18 images (18 real / 0 fake)" in log
    assert "trained per epoch, expected after --self-blend paired: 18 real / 18 fake" in log
    if missing_extra() is None:  # landmarks, cached beside the decoded images; the log counts the faces found
        assert "self-blend masks: landmarks (--blend-mask auto): " in log and "of 18 images have a face" in log
        assert any((tmp_path / "cache" / "landmarks").rglob("*.npy"))
    else:
        assert "self-blend masks: the ellipse (--blend-mask auto: " in log
    # 2 epochs of 18 reals, 4 a step (--batch-size 8 images): each batch 4 reals beside their own fakes
    assert len(batches) == 2 * 4
    for batch in batches:
        assert batch.labels.tolist() == [0, 1] * 4 and batch.indices[::2].tolist() == batch.indices[1::2].tolist()
        assert batch.draws.tolist() == [0, 0, 2, 2, 4, 4, 6, 6]
        assert all(not (batch.images[k] == batch.images[k + 1]).all() for k in range(0, 8, 2))
    assert (out / "best.pt").is_file()


def test_the_manifest_checks_that_still_hold(effnet_args, reals_only, capsys):
    reals, fakes = (str(p) for p in reals_only)
    err = fails(train_stage2_effnet.main, set_flag(effnet_args, "--train-manifest", reals), capsys)
    assert err == (f"error: {reals}: manifest has only 'real' rows: training and AUC need real and fake images")
    err = fails(train_stage2_effnet.main, [*set_flag(effnet_args, "--train-manifest", fakes), "--self-blend", "0.3"],
                capsys)
    assert err == f"error: {fakes}: manifest has only 'fake' rows: --self-blend makes its fakes from real images"
    err = fails(train_stage2_effnet.main, [*set_flag(effnet_args, "--val-manifest", reals), "--self-blend", "paired"],
                capsys)
    assert err.startswith(f"error: {reals}: manifest has only 'real' rows")  # val still needs both classes
    err = fails(train_stage2_effnet.main, [*set_flag(effnet_args, "--train-manifest", reals), "--self-blend", "0.3",
                                           "--balanced-sampler"], capsys)
    assert err == (f"error: --balanced-sampler: {reals} has no fake rows to balance (--self-blend makes every "
                   "fake); leave --balanced-sampler out")

"""The checkpoint schema (src/stage2/run/checkpoint.py): one builder and one reader per file kind, versioned."""

import re
from pathlib import Path

import pytest
import torch
from conftest import fails, output_dir, set_flag

import feature_extractor
import train_stage2_effnet
from stage2.data.preprocessing import DataConfig
from stage2.errors import CheckpointError
from stage2.run.checkpoint import (
    CHECKSUM_KEY,
    CONFIG_CHECKSUM_KEY,
    SCHEMA_KEY,
    SCHEMA_VERSION,
    TEMPERATURE_CHECKSUM_KEY,
    BestCheckpoint,
    LastCheckpoint,
    data_config_sha256,
    load_checkpoint,
    read_best,
    read_last,
    rng_state,
    save_checkpoint,
    tensors_sha256,
)

META = {"family": "timm", "model_name": "test_efficientnet", "num_classes": 1}
DATA_CONFIG = DataConfig.of(32, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])


def _best(**changes) -> BestCheckpoint:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    return BestCheckpoint(**{"model": model.state_dict(), "meta": META, "data_config": DATA_CONFIG, "args": {"lr": 0.1},
                             "epoch": 3, "metrics": {"auc": 0.75}, "temperature": 1.5, "temperature_fitted": True,
                             **changes})


def _last() -> LastCheckpoint:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return LastCheckpoint(**vars(_best(model=model.state_dict(), metrics={})), optimizer=optimizer.state_dict(),
                          scaler={}, ema={k: v + 1 for k, v in model.state_dict().items()}, recipe={"drop_path": 0.2},
                          stage=1, next_epoch=2, step=5, train_sums={"loss": torch.tensor(3.0)}, best_value=0.75,
                          best_epoch=2, rng=rng_state(),
                          manifests={"train": {"rows": 36, "sha256": "9f"}, "val": {"rows": 12, "sha256": "e3"}})


def _assert_same(read: BestCheckpoint, written: BestCheckpoint) -> None:
    assert type(read) is type(written)
    for name, value in vars(written).items():
        got = getattr(read, name)
        if name in ("model", "ema", "train_sums"):
            assert got.keys() == value.keys() and all(torch.equal(got[k], value[k]) for k in value), name
        elif name == "optimizer":
            assert got["param_groups"] == value["param_groups"]
            assert all(torch.equal(got["state"][0][k], value["state"][0][k]) for k in ("exp_avg", "exp_avg_sq"))
        elif name == "rng":
            assert torch.equal(got["torch"], value["torch"]) and tuple(got["python"][1]) == tuple(value["python"][1])
        else:
            assert got == value, name


def test_best_and_last_round_trip_with_the_schema_version(tmp_path):
    best, last = _best(), _last()
    save_checkpoint(best.to_dict(), tmp_path / "best.pt")
    save_checkpoint(last.to_dict(), tmp_path / "last.pt")
    for name in ("best.pt", "last.pt"):
        raw = load_checkpoint(tmp_path / name)  # the flat file: schema fields, the family's meta, version, checksum
        assert raw[SCHEMA_KEY] == SCHEMA_VERSION == 3 and raw[CHECKSUM_KEY] and raw["family"] == "timm"
    _assert_same(read_best(tmp_path / "best.pt"), best)
    _assert_same(read_last(tmp_path / "last.pt"), last)
    # A last.pt is a best.pt and more: the extractor and --evaluate read it as one.
    as_best = read_best(tmp_path / "last.pt")
    assert type(as_best) is BestCheckpoint and as_best.meta == META and as_best.epoch == last.epoch


def test_a_trained_run_writes_both_kinds_at_the_current_version(trained_run):
    best, last = read_best(trained_run / "best.pt"), read_last(trained_run / "last.pt")
    assert load_checkpoint(trained_run / "best.pt")[SCHEMA_KEY] == SCHEMA_VERSION
    assert load_checkpoint(trained_run / "last.pt")[SCHEMA_KEY] == SCHEMA_VERSION
    assert best.meta == last.meta == META  # no schema field, version or checksum leaks into the family's meta
    assert best.epoch >= 1 and "auc" in best.metrics and best.args["img_size"] == 32
    assert last.next_epoch == 2 and last.step == 0 and last.optimizer["state"] and last.rng


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, -1, "1"])
def test_a_checkpoint_of_another_schema_version_is_refused_in_one_line(tmp_path, version):
    path = tmp_path / "best.pt"
    save_checkpoint({**_best().to_dict(), SCHEMA_KEY: version}, path)
    with pytest.raises(CheckpointError) as err:
        read_best(path)
    who = "a newer" if version == SCHEMA_VERSION + 1 else "another"
    assert str(err.value) == (f"checkpoint {path}: schema version {version!r} (written by {who} version of this "
                              f"code), this code reads version {SCHEMA_VERSION}")


def test_a_file_from_before_versions_reads_as_version_1_when_its_keys_match(tmp_path):
    """Version 0 (no schema_version key) is what the trainers wrote before the schema had a version."""
    best, path = _best(), tmp_path / "old.pt"
    old = best.to_dict()
    del old[SCHEMA_KEY]
    save_checkpoint(old, path)
    _assert_same(read_best(path), best)
    del old["data_config"]
    save_checkpoint(old, path)
    with pytest.raises(CheckpointError, match=rf"^checkpoint {re.escape(str(path))}: lacks 'data_config' "):
        read_best(path)


def test_the_data_config_has_a_checksum_and_a_version_1_file_without_one_still_reads(tmp_path):
    best, path = _best(), tmp_path / "best.pt"
    save_checkpoint(best.to_dict(), path)
    assert load_checkpoint(path)[CONFIG_CHECKSUM_KEY] == data_config_sha256(DATA_CONFIG.to_dict())
    old = {**best.to_dict(), SCHEMA_KEY: 1}
    torch.save({**old, CHECKSUM_KEY: tensors_sha256(old)}, path)  # as version 1 wrote it: tensors only
    _assert_same(read_best(path), best)


def test_an_edited_temperature_is_refused(tmp_path):
    # P(fake) = sigmoid(logit / temperature): editing it changed every score without a word.
    path = tmp_path / "best.pt"
    save_checkpoint(_best(temperature=0.049).to_dict(), path)
    torch.save({**load_checkpoint(path), "temperature": 5.0}, path)
    with pytest.raises(CheckpointError) as err:
        read_best(path)
    assert str(err.value) == (f"checkpoint {path}: damaged or edited (its temperature, which turns its logits into "
                              "P(fake), does not match the checksum written with it); use another copy or an earlier "
                              "checkpoint")


@pytest.mark.parametrize(("version", "deleted"), [(2, CONFIG_CHECKSUM_KEY), (2, CHECKSUM_KEY),
                                                  (3, TEMPERATURE_CHECKSUM_KEY), (3, CONFIG_CHECKSUM_KEY)])
def test_a_file_without_a_checksum_its_version_is_written_with_is_refused(tmp_path, version, deleted):
    path = tmp_path / "best.pt"
    save_checkpoint({**_best().to_dict(), SCHEMA_KEY: version}, path)
    state = load_checkpoint(path)
    del state[deleted]
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        read_best(path)
    assert str(err.value) == (f"checkpoint {path}: damaged or edited (schema version {version} is written with "
                              f"{deleted!r}, which it lacks); use another copy or an earlier checkpoint")


def test_before_version_3_a_temperature_other_than_1_counts_as_fitted(tmp_path):
    path = tmp_path / "best.pt"
    for temperature, fitted in ((1.5, True), (1.0, False)):
        old = {**_best(temperature=temperature).to_dict(), SCHEMA_KEY: 2}
        del old["temperature_fitted"]
        save_checkpoint(old, path)
        assert read_best(path).temperature_fitted is fitted
    save_checkpoint(_best(temperature=1.5, temperature_fitted=False).to_dict(), path)  # version 3 says so itself
    assert read_best(path).temperature_fitted is False


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("std", [1e-30, 1e-30, 1e-30], "3 numbers from 0.01 to 10.0"),  # re-checksummed: embeddings of 3e29
    ("std", [0.25, 0.25], "3 numbers from 0.01 to 10.0"),
    ("mean", [0.5, 0.5, 2.0], "3 numbers in [0, 1]"),
    ("mean", [0.5, 0.5, float("nan")], "3 numbers in [0, 1]"),
    ("mean", "0.5", "3 numbers in [0, 1]"),
    ("input_size", [3, 32.5, 32.5], "[3, S, S] with S an integer from 1 to 8192"),
    ("input_size", [3, 0, 0], "[3, S, S] with S an integer from 1 to 8192"),
    ("input_size", [3, 32, 64], "[3, S, S] with S an integer from 1 to 8192"),
    ("input_size", None, "[3, S, S] with S an integer from 1 to 8192"),
])
def test_a_data_config_no_model_normalises_with_is_refused_naming_the_field(tmp_path, field, value, expected):
    path = tmp_path / "best.pt"
    state = _best().to_dict()
    save_checkpoint({**state, "data_config": {**state["data_config"], field: value}}, path)
    with pytest.raises(CheckpointError) as err:
        read_best(path)
    assert str(err.value) == f"checkpoint {path}: data_config {field} {value!r}: expected {expected}"


@pytest.mark.parametrize(("meta", "said"), [
    ({**META, "family": "genconvit"}, "model family 'genconvit' without 'variant' ('ed' or 'vae')"),
    ({"family": "genconvit", "model_name": "genconvit_ed", "variant": "ed", "arch": "swin"},
     "model family 'genconvit' with arch 'swin': expected 'official' or 'hybrid'"),
    ({**META, "num_classes": "1"}, "model family 'timm' with num_classes '1': expected a positive integer (1: one "
                                   "logit)"),
    ({**META, "family": "vit"}, "unknown model family 'vit' (known: timm, genconvit)"),
])
def test_a_checkpoint_whose_family_meta_was_edited_names_the_key(tmp_path, meta, said):
    # Before: "KeyError: 'variant'" from deep in the model's constructor.
    path = tmp_path / "best.pt"
    save_checkpoint(_best(meta=meta).to_dict(), path)
    with pytest.raises(CheckpointError) as err:
        read_best(path)
    assert str(err.value) == f"checkpoint {path}: {said}"


def test_a_best_pt_is_not_a_last_pt(tmp_path):
    save_checkpoint(_best().to_dict(), tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match="not a last.pt"):
        read_last(tmp_path / "best.pt")


def _bump_version(path: Path) -> None:
    save_checkpoint({**load_checkpoint(path), SCHEMA_KEY: SCHEMA_VERSION + 1}, path)


def test_resume_and_extraction_refuse_a_newer_schema_in_one_line(finished_run, capsys, tmp_path):
    last = output_dir(finished_run) / "last.pt"
    _bump_version(last)
    err = fails(train_stage2_effnet.main, [*finished_run, "--resume"], capsys)
    assert err == (f"error: checkpoint {last}: schema version {SCHEMA_VERSION + 1} (written by a newer version of "
                   f"this code), this code reads version {SCHEMA_VERSION}")
    best = output_dir(finished_run) / "best.pt"
    _bump_version(best)
    val = finished_run[finished_run.index("--val-manifest") + 1]
    features = tmp_path / "f.npz"
    err = fails(feature_extractor.main, ["--checkpoint", str(best), "--manifest", val, "--out", str(features)], capsys)
    assert f"checkpoint {best}: schema version {SCHEMA_VERSION + 1}" in err
    assert not features.exists()


def test_a_last_pt_whose_optimizer_groups_no_longer_fit_is_refused_in_one_line(finished_run, capsys):
    # What resuming a GenConViT last.pt written before its autoencoder got its own (undecayed) group gives: the
    # optimizer state has groups of other sizes. torch's message spans the state's internals; ours is one line.
    last = output_dir(finished_run) / "last.pt"
    state = load_checkpoint(last)
    groups = state["optimizer"]["param_groups"]
    groups[0]["params"].append(groups[1]["params"].pop())
    save_checkpoint(state, last)
    before = last.read_bytes()
    err = fails(train_stage2_effnet.main, [*set_flag(finished_run, "--epochs", "3"), "--resume"], capsys)
    assert err.startswith(f"error: --resume {last}: its optimizer state does not fit this version's parameter groups")
    assert last.read_bytes() == before

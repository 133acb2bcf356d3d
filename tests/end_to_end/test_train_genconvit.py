"""train_stage2_genconvit.py end to end (tiny ConvNeXt, 64px PNGs) and its stage parsing."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from conftest import ROOT, fails, set_flag, subprocess_env
from safetensors.torch import save_file

import train_stage2_genconvit
from stage2.commands.cli import exit_on_error
from stage2.commands.train_args import config_from_args
from stage2.engine.trainer import Trainer
from stage2.errors import PretrainedWeightsError
from stage2.experts import genconvit
from stage2.experts.genconvit import GenConViTExpert, parse_stages, plot_recon_samples
from stage2.models.families import FAMILIES
from stage2.models.genconvit import GenConViTED, GenConViTVAE
from stage2.run.distributed import setup_distributed


@pytest.fixture
def gc_args(tiny_data, tmp_path) -> list[str]:
    train, val = tiny_data
    return ["--train-manifest", str(train), "--val-manifest", str(val), "--init", "scratch", "--backbone",
            "test_convnext", "--img-size", "64", "--latent-channels", "4", "--epochs", "2", "--stages",
            "frozen:1,full:rest:0.5", "--batch-size", "8", "--workers", "0", "--amp", "off", "--output-dir",
            str(tmp_path / "gc")]


def test_stage_spec_parsing():
    stages = parse_stages("frozen:2,full:rest:0.1", epochs=10, lr=1e-3)
    assert [(s.name, s.epochs) for s in stages] == [("frozen", 2), ("full", 8)]
    assert stages[1].lr == pytest.approx(1e-4)
    assert not stages[0].trainable("backbone.stem.0.weight") and stages[0].trainable("decoder.features.0.weight")
    assert stages[1].trainable is None
    assert [s.name for s in parse_stages("frozen:1,full:rest", epochs=1, lr=1.0)] == ["frozen"]
    for bad in ("frozen:3,full:rest", "thaw:1", "full:x", "full:1", "full:rest,frozen:rest"):
        with pytest.raises(ValueError, match="--stages"):
            parse_stages(bad, epochs=2, lr=1.0)


@pytest.mark.slow
def test_both_variants_write_every_output(gc_args, monkeypatch):
    grids = []  # the recon-sample figures, as drawn

    def plot_and_keep(*args, **kwargs):
        grids.append(plot_recon_samples(*args, **kwargs))
        return grids[-1]

    monkeypatch.setattr(genconvit, "plot_recon_samples", plot_and_keep)
    train_stage2_genconvit.main([*gc_args, "--variant", "both"])
    out = Path(gc_args[-1])
    for variant in ("ed", "vae"):
        run = out / variant
        for name in ("best.pt", "last.pt", "metrics.csv", "summary.json", "roc.png", "curves.png", "train.log",
                     "args.json", "val_predictions.csv", "recon_samples/epoch_001.png",
                     "recon_samples/epoch_002.png"):
            assert (run / name).is_file(), f"{variant}/{name}"
        history = pd.read_csv(run / "metrics.csv")
        assert history["stage"].tolist() == ["frozen", "full"]
        for column in ("train_cls", "train_recon", "train_kl", "val_recon_real", "val_recon_fake", "auc",
                       "val_recon_psnr", "val_mean_colour_psnr"):
            assert history[column].notna().all(), column
        assert history["val_mean_colour_psnr"].between(5, 60).all()  # the same val images every epoch: one value
        assert history["val_mean_colour_psnr"].nunique() == 1
        summary = json.loads((run / "summary.json").read_text())
        cal = summary["calibration"]
        assert cal["nll_after"] <= cal["nll_before"] + 1e-9
        best = torch.load(run / "best.pt", weights_only=True)
        assert best["model_name"] == f"genconvit_{variant}" and best["temperature"] == pytest.approx(
            cal["temperature"])
        assert best["model_kwargs"]["convnext_name"] == "test_convnext"
    # Every epoch's grid of each variant says which column is which and which rows are real or fake.
    assert len(grids) == 4
    for grid in grids:
        ax = grid.axes[0]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["input", "reconstruction", "difference x4"]
        assert [t.get_text().split("\n")[0] for t in ax.get_yticklabels()] == ["real"] * 4 + ["fake"] * 4
    vae_history = pd.read_csv(out / "vae" / "metrics.csv")
    assert (vae_history["train_kl"] > 0).all()
    assert (pd.read_csv(out / "ed" / "metrics.csv")["train_kl"] == 0).all()


def test_evaluate_scores_with_the_loss_and_normalisation_the_checkpoint_records(gc_args, tmp_path, capsys):
    # test_convnext normalises with 0.5, not ConvNeXt-Tiny's ImageNet mean: an --evaluate without --backbone used to
    # un-normalise the reconstruction target with ImageNet's, and its val_recon and PSNR were off.
    args = set_flag(set_flag(gc_args, "--epochs", "1"), "--stages", "full:rest")
    train_stage2_genconvit.main([*args, "--variant", "ed", "--recon-weight", "2"])
    run = Path(gc_args[-1]) / "ed"
    trained = pd.read_csv(run / "metrics.csv").iloc[0]
    evaluated = tmp_path / "eval"
    val = gc_args[gc_args.index("--val-manifest") + 1]
    capsys.readouterr()
    train_stage2_genconvit.main(["--evaluate", str(run / "best.pt"), "--val-manifest", val, "--workers", "0",
                                 "--amp", "off", "--output-dir", str(evaluated)])
    assert "do not apply" not in capsys.readouterr().out  # no model flag was given
    metrics = json.loads((evaluated / "ed" / "eval_val.json").read_text())["metrics"]
    for column in ("val_recon", "val_recon_psnr", "val_recon_real", "val_loss"):  # val_loss: --recon-weight 2 too
        assert metrics[column] == pytest.approx(trained[column], rel=1e-4), column


def test_both_variants_show_the_audit_once_and_a_resume_goes_on_to_the_vae(gc_args, capsys):
    args = [*set_flag(set_flag(gc_args, "--epochs", "1"), "--stages", "full:rest"), "--variant", "both"]
    train_stage2_genconvit.main(args)
    assert capsys.readouterr().out.count("shortcut audit (file headers only") == 1
    # The VAE stopped before its first checkpoint (the ED had finished): a resume finishes nothing, trains the VAE.
    vae = Path(gc_args[-1]) / "vae"
    for name in ("best.pt", "last.pt", "summary.json", "metrics.csv"):
        (vae / name).unlink()
    train_stage2_genconvit.main([*args, "--resume"])
    out = capsys.readouterr().out
    assert "/ed is finished (1 of 1 epochs" in out
    assert f"--resume: {vae} holds no last.pt yet: starting a new run" in out
    assert pd.read_csv(vae / "metrics.csv")["epoch"].tolist() == [1] and (vae / "last.pt").is_file()


def test_official_weights_file_initialises_the_model(gc_args, tmp_path):
    reference = GenConViTED(convnext_name="test_convnext")
    weights = tmp_path / "genconvit_ed_inference.pth"
    torch.save({"state_dict": reference.state_dict(), "epoch": 3}, weights)
    args = [a if a != "scratch" else "official" for a in gc_args]
    args[args.index("--epochs") + 1] = "1"
    train_stage2_genconvit.main([*args, "--variant", "ed", "--weights", str(weights), "--lr", "0", "--min-lr", "0"])
    best = torch.load(Path(gc_args[-1]) / "ed" / "best.pt", weights_only=True)
    # lr 0 (and frozen backbone): the trained weights are still the official ones.
    for key, value in reference.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(best["model"][key], value, msg=key)


def test_official_init_offline_without_weights_is_one_line(gc_args, capsys):
    args = [a if a != "scratch" else "official" for a in gc_args]
    with pytest.raises(SystemExit) as exit_info:
        exit_on_error(lambda: train_stage2_genconvit.main([*args, "--variant", "ed"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--weights" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_killed_across_the_stage_boundary_resumes_bit_identically(gc_args, tmp_path):
    flags = [*gc_args, "--variant", "ed", "--deterministic", "--save-every-minutes", "1e-9", "--log-every", "1"]
    straight = tmp_path / "straight"
    torch.set_num_threads(1)
    train_stage2_genconvit.main(set_flag(flags, "--output-dir", str(straight)))

    killed = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "train_stage2_genconvit.py"), *set_flag(flags, "--output-dir", str(killed))]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    for line in proc.stdout:
        if line.startswith("epoch 2/2 step 2/"):  # in the second stage, after its first checkpoints
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(killed / "ed" / "last.pt", weights_only=True)
    assert state["stage"] == 1 and state["step"] >= 1

    # In this process: one thread too.
    train_stage2_genconvit.main([*set_flag(flags, "--output-dir", str(killed)), "--resume"])
    a = torch.load(straight / "ed" / "last.pt", weights_only=True)["model"]
    b = torch.load(killed / "ed" / "last.pt", weights_only=True)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(("init", "ae_lr"), [("scratch", 1e-3), ("official", None), ("imagenet", 1e-3)])
def test_default_stages_train_every_epoch_at_the_recipe_lr(init, ae_lr):
    parser = train_stage2_genconvit.build_parser()
    args = parser.parse_args(["--init", init])
    assert (args.lr, args.opt, args.weight_decay, args.batch_size) == (1e-4, "adam", 1e-4, 32)  # upstream's recipe
    expert = GenConViTExpert("ed", init=init)
    stages = expert.stages(args.epochs, args.lr)
    assert [s.name for s in stages] == ["full"] and stages[0].epochs == args.epochs and stages[0].lr == args.lr
    # a new autoencoder learns at 1e-3 (at 1e-4 it stays a flat tile for a real set's few hundred steps); the
    # official one, trained, at --lr
    assert expert.ae_lr == ae_lr


def test_official_vae_starts_with_var_equal_to_mu(tmp_path):
    reference = GenConViTVAE(img_size=64, latent_channels=4, convnext_name="test_convnext")
    weights = tmp_path / "genconvit_vae_inference.pth"
    torch.save(reference.state_dict(), weights)
    expert = GenConViTExpert("vae", img_size=64, init="official", weights=weights,
                             model_kwargs={"img_size": 64, "latent_channels": 4, "convnext_name": "test_convnext"})
    model = expert.build_model()
    assert not torch.equal(reference.encoder.var.weight, reference.encoder.mu.weight)
    assert torch.equal(model.encoder.var.weight, reference.encoder.mu.weight)
    assert torch.equal(model.encoder.var.bias, reference.encoder.mu.bias)
    assert torch.equal(model.encoder.mu.weight, reference.encoder.mu.weight)


def test_hybrid_swin_loads_from_a_local_file_and_offline_errors_name_the_flags(tmp_path):
    tiny_swin = {"embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2), "window_size": 4}
    kwargs = {"img_size": 64, "convnext_name": "test_convnext", "swin_kwargs": tiny_swin}
    convnext, swin = tmp_path / "convnext.safetensors", tmp_path / "swin.safetensors"
    save_file(timm.create_model("test_convnext").state_dict(), str(convnext))
    swin_state = timm.create_model("swin_tiny_patch4_window7_224", img_size=64, **tiny_swin).state_dict()
    save_file(swin_state, str(swin))

    def build(**files):
        return GenConViTExpert("ed", img_size=64, arch="hybrid", init="imagenet", model_kwargs=kwargs,
                               **files).build_model()

    with pytest.raises(PretrainedWeightsError) as err:
        build(backbone_file=convnext)  # the Swin would have to come from the hub
    assert str(err.value).endswith("; offline, pass --swin-file (Swin), or use --init scratch")  # not the given one
    assert "--pretrained-file" not in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(PretrainedWeightsError) as err:
        build()
    assert "offline, pass --backbone-file (test_convnext) and --swin-file (Swin), or use" in str(err.value)
    model = build(backbone_file=convnext, swin_file=swin)
    assert torch.equal(model.swin.state_dict()["layers.0.blocks.0.attn.qkv.weight"],
                       swin_state["layers.0.blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match="--swin-file"):
        GenConViTExpert("ed", arch="official", init="scratch", swin_file=swin)


def test_a_new_head_reads_pooled_features_starts_at_zero_and_rebuilds_from_its_meta():
    expert = GenConViTExpert("vae", img_size=64, init="scratch", backbone="test_convnext", latent_channels=4)
    model = expert.build_model().eval()
    width = model.convnext_backbone.num_features
    assert model.convnext_backbone.num_classes == 0 and model.fc.in_features == 2 * width
    with torch.no_grad():
        assert torch.equal(model(torch.rand(2, 3, 64, 64)).logits, torch.zeros(2, 2))  # P(fake) 0.5 for every image
    rebuilt = FAMILIES["genconvit"].build(expert.checkpoint_meta())
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    # the official weights' head reads ImageNet logits: their layout stays, and nothing else loads them
    assert "head_input" not in GenConViTExpert("ed", init="official").model_kwargs
    with pytest.raises(ValueError, match="--head features: the official weights"):
        GenConViTExpert("ed", init="official", head_input="features")


def test_the_autoencoder_learns_at_its_own_lr_in_every_stage_without_decay(gc_args):
    args = train_stage2_genconvit.build_parser().parse_args([*gc_args, "--ae-lr", "3e-3"])
    cfg = config_from_args(args)
    expert = GenConViTExpert("ed", img_size=64, init="scratch", backbone="test_convnext", ae_lr=args.ae_lr,
                             stages=args.stages)
    trainer = Trainer(cfg, expert, setup_distributed("cpu"))
    autoencoder = {id(p) for p in trainer.model.autoencoder_parameters()}
    for index, stage in enumerate(expert.stages(cfg.epochs, cfg.lr)):  # frozen:1 at 1e-4, full:rest at 0.5e-4
        ctx = trainer.start_stage(index, stage)
        for group in ctx.optimizer.param_groups:
            own = {id(p) in autoencoder for p in group["params"]}
            assert len(own) == 1  # a group is all autoencoder or none of it
            # no warmup: the first update is at the peak, --ae-lr for the autoencoder, the stage's lr for the rest
            assert group["lr"] == pytest.approx(3e-3 if own == {True} else stage.lr)
            assert own == {False} or group["weight_decay"] == 0.0
    assert expert.describe()["ae_lr"] == 3e-3


@pytest.mark.parametrize("content", [b"", b"hello", b"not a checkpoint"])  # "hello": a KeyError in the unpickler
def test_official_weights_that_are_no_checkpoint_are_one_line_naming_the_file(gc_args, tmp_path, capsys, content):
    weights = tmp_path / "junk.pth"
    weights.write_bytes(content)
    args = [a if a != "scratch" else "official" for a in gc_args]
    err = fails(train_stage2_genconvit.main, [*args, "--variant", "ed", "--weights", str(weights)], capsys)
    assert err == f"error: {weights}: not a PyTorch checkpoint (what torch.save writes)"  # not "KeyError: 101"


@pytest.mark.parametrize("init", ["scratch", "official"])
def test_a_backbone_file_without_init_imagenet_is_refused_not_loaded(gc_args, tmp_path, capsys, init):
    # timm loaded the file whatever --init said: "--init scratch" runs started from ImageNet weights.
    weights = tmp_path / "convnext.safetensors"
    save_file(timm.create_model("test_convnext").state_dict(), str(weights))
    args = [a if a != "scratch" else init for a in gc_args]
    err = fails(train_stage2_genconvit.main, [*args, "--variant", "ed", "--backbone-file", str(weights)], capsys)
    start = "the official weights" if init == "official" else "random weights"
    assert err == f"error: --backbone-file: only with --init imagenet (--init {init} starts from {start})"
    assert not (Path(gc_args[-1]) / "ed" / "best.pt").exists()


@pytest.mark.parametrize("init", ["scratch", "imagenet"])
def test_weights_without_init_official_are_refused_not_ignored(gc_args, tmp_path, capsys, init):
    args = [a if a != "scratch" else init for a in gc_args]
    err = fails(train_stage2_genconvit.main, [*args, "--variant", "ed", "--weights", "w.pth"], capsys)
    assert err == (f"error: --weights: the official weights are read only with --init official; --init {init} does "
                   "not use them")
    err = fails(train_stage2_genconvit.main, [*args, "--weights-dir", str(tmp_path)], capsys)
    assert err.startswith("error: --weights-dir: the official weights are read only with --init official")
    assert not Path(gc_args[-1]).exists()


def test_imagenet_init_trains_at_3e_4_with_warmup_unless_told_otherwise(tmp_path):
    from stage2.commands.train_genconvit import parse

    imagenet, official = parse(["--init", "imagenet"]), parse(["--init", "official"])
    assert (imagenet.lr, imagenet.warmup_epochs, official.lr, official.warmup_epochs) == (3e-4, 0.3, 1e-4, 0.0)
    assert parse(["--init", "imagenet", "--lr", "1e-4"]).lr == 1e-4  # the command line wins
    config = tmp_path / "run.yaml"
    config.write_text("init: imagenet\n")
    assert parse(["--config", str(config)]).lr == 3e-4  # --init from a config file counts too
    config.write_text("init: imagenet\nlr: 2.0e-4\n")
    assert parse(["--config", str(config)]).lr == 2e-4  # and so does its lr

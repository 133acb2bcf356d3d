"""Train GenConViT (ED, VAE or both) as stage two's generative-discriminative expert.

Why a generative part: an autoencoder that learnt to rebuild faces reproduces what it models well (the
natural structure of a face) and smooths away what it does not: blending seams, warped or resampled
regions, GAN and diffusion upsampling fingerprints. GenConViT feeds the input *and* its reconstruction
through the same ConvNeXt, so the classifier sees where the two disagree, and the reconstruction error itself
is higher on manipulated regions. That makes it catch forgeries by what does not fit a model of real faces,
which complements the EfficientNet expert's purely discriminative reading of local artefacts; the VAE's
KL-regularised latent adds a compact, smooth description of the face that stage three can stack.

    python train_stage2_genconvit.py --variant both --init official --weights-dir weights/
    python train_stage2_genconvit.py --variant ed --init imagenet --backbone-file convnext_tiny.safetensors
    python train_stage2_genconvit.py --demo                      # built-in synthetic data, CPU minutes

Each variant gets its own folder, OUTPUT_DIR/ed and OUTPUT_DIR/vae, with best.pt (best validation
AUC, with a fitted temperature), last.pt, metrics.csv, plots and recon_samples/.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stage2.commands.cli import HelpFormatter, command_help, exit_on_error, make_demo_data, parse_args
from stage2.commands.flags import FlagParser, Float, Int, given_flags
from stage2.commands.train_args import add_train_args, check_run_inputs, config_from_args
from stage2.errors import ConfigError, check_checkpoint_exists
from stage2.models.hub import check_hub, timm_repo
from stage2.models.names import (
    GENCONVIT_HF_FILES,
    GENCONVIT_HF_REPO,
    GENCONVIT_INIT_MODES,
    HEAD_INPUTS,
    RECON_ON,
    SWIN_NAME,
)
from stage2.models.recipes import GENCONVIT, check_genconvit_start
from stage2.run.files import check_output_dir, command_kind

COMMAND = "stage2-train-genconvit"  # the installed command (pyproject.toml)
# What a checkpoint records of its model and loss: --evaluate scores as it says, whatever these flags say.
MODEL_FLAGS = ("arch", "init", "weights", "weights_dir", "backbone_file", "swin_file", "recon_weight", "kl_weight",
               "label_smoothing", "stages", "backbone", "latent_channels", "head", "ae_lr", "img_size")


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(description=command_help(__doc__, "train_stage2_genconvit.py", COMMAND),
                        formatter_class=HelpFormatter)
    # Both autoencoders halve the input five times and double it back: sides must be multiples of 32.
    add_train_args(parser, img_size_multiple_of=32, **GENCONVIT.train)
    d, by_init = GENCONVIT.model, GENCONVIT.init_model
    imagenet = GENCONVIT.init_flags["imagenet"]
    model = parser.add_argument_group("GenConViT")
    model.add_argument("--variant", choices=("ed", "vae", "both"), default=d["variant"],
                       help="which autoencoder: ed, vae, or both (one after the other, each in its own folder)")
    model.add_argument("--arch", choices=("official", "hybrid"), default=d["arch"],
                       help="official: weight-compatible (Swin inert); hybrid: ConvNeXt + Swin features")
    model.add_argument("--init", choices=GENCONVIT_INIT_MODES, default=d["init"],
                       help=f"official weights, ImageNet backbones (then --lr and --warmup-epochs default to "
                            f"{_number(imagenet['lr'])} and {_number(imagenet['warmup_epochs'])}), or random")
    model.add_argument("--weights", help="official checkpoint file (one variant; default: the hub's)")
    model.add_argument("--weights-dir",
                       help=f"folder holding {' and '.join(GENCONVIT_HF_FILES.values())} (--variant both)")
    model.add_argument("--backbone-file",
                       help="local ImageNet ConvNeXt weights for --init imagenet (default: the hub's)")
    model.add_argument("--swin-file",
                       help="local ImageNet Swin weights for --arch hybrid --init imagenet (default: the hub's)")
    model.add_argument("--recon-weight", type=Float(min=0), default=d["recon_weight"],
                       help="weight of the reconstruction MSE")
    model.add_argument("--kl-weight", type=Float(min=0), default=d["kl_weight"], help="weight of the VAE's KL term")
    model.add_argument("--label-smoothing", type=Float(min=0, below=1), default=d["label_smoothing"],
                       help="label smoothing of the classification loss")
    model.add_argument("--stages",
                       help="NAME:EPOCHS[:LR_SCALE],... with NAME frozen (backbones frozen) or full; EPOCHS may be "
                            f"'rest' (default: {_by_init(by_init, 'stages')})")
    model.add_argument("--backbone", default=d["backbone"],
                       help="timm model of the classifier (any, e.g. tf_efficientnet_lite0); the official weights "
                            f"need {d['backbone']}")
    model.add_argument("--latent-channels", type=Int(min=1), default=d["latent_channels"],
                       help=f"VAE latent size / 49; {d['latent_channels']} gives the official "
                            f"{d['latent_channels'] * 49}-d latent")
    model.add_argument("--head", choices=HEAD_INPUTS,
                       help="what the head reads of the input and of its reconstruction: the backbone's ImageNet "
                            "logits (the official layout) or its pooled features (default: "
                            f"{_by_init(by_init, 'head')})")
    model.add_argument("--ae-lr", type=Float(above=0),
                       help="peak learning rate of the autoencoder, in every stage (default: "
                            f"{_by_init(by_init, 'ae_lr', none='--lr')})")
    model.add_argument("--recon-on", choices=RECON_ON, default=d["recon_on"],
                       help="the images the autoencoder learns to rebuild (reconstruction and KL losses): all, or "
                            "the reals alone, so that a fake's reconstruction error is an anomaly score")
    return parser


def parse(argv: list[str] | None = None, parser: FlagParser | None = None) -> argparse.Namespace:
    """The command line with its defaults: the parser's, the demo's, those that follow --init, --config's. `parser`:
    build_parser()'s, to ask afterwards which flags were given."""
    return parse_args(parser or build_parser(), argv,
                      lambda settled: GENCONVIT.init_flags.get(settled.init, {}), **GENCONVIT.demo)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parse(argv, parser)
    if args.variant == "both" and args.weights:
        raise ConfigError("--weights names one file; with --variant both use --weights-dir")
    given = [flag for flag, value in (("--weights", args.weights), ("--weights-dir", args.weights_dir)) if value]
    if given and args.init != "official":
        raise ConfigError(f"{given[0]}: the official weights are read only with --init official; --init {args.init} "
                          "does not use them")
    variants = ("ed", "vae") if args.variant == "both" else (args.variant,)
    if args.evaluate_checkpoint and args.variant == "both":  # one checkpoint holds one variant: evaluate that one
        from stage2.run.checkpoint import load_checkpoint

        check_checkpoint_exists(args.evaluate_checkpoint)  # before torch loads

        variants = (load_checkpoint(args.evaluate_checkpoint, mmap=True).get("variant", "ed"),)
    configs = {}
    for variant in variants:
        if args.weights_dir and args.init == "official" and not (args.evaluate_checkpoint or args.audit_only):
            weights = Path(args.weights_dir) / GENCONVIT_HF_FILES[variant]
            if not weights.is_file():
                raise ConfigError(f"--weights-dir {args.weights_dir}: no {weights.name} in it (the official "
                                  f"GenConViT-{variant.upper()} weights)")
        cfg = config_from_args(argparse.Namespace(**{**vars(args), "variant": variant}))
        cfg.output_dir = str(Path(args.output_dir) / variant)
        cfg.model_flags = given_flags(parser, MODEL_FLAGS)
        check_output_dir(cfg)  # every variant's folder, before the first one trains
        configs[variant] = cfg
    make_demo_data(args)  # the manifests it writes are what the input check reads
    check_run_inputs(cfg)
    if command_kind(cfg) == "training":
        check_genconvit_start(args.init, args.arch, args.backbone_file, args.swin_file)
        _check_hub(args, variants)
    # Imported after parsing and checking, so that --help and bad input answer before torch and timm load.
    from stage2.engine.modes import run
    from stage2.experts.genconvit import GenConViTExpert

    runs = []  # every variant's settings are checked before the first one trains
    for variant, cfg in configs.items():
        weights = args.weights
        if args.weights_dir:
            weights = str(Path(args.weights_dir) / GENCONVIT_HF_FILES[variant])
        expert = GenConViTExpert(
            variant, img_size=args.img_size, arch=args.arch, init=args.init, weights=weights,
            backbone_file=args.backbone_file, swin_file=args.swin_file,
            recon_weight=args.recon_weight, kl_weight=args.kl_weight, label_smoothing=args.label_smoothing,
            stages=args.stages, backbone=args.backbone, latent_channels=args.latent_channels, head_input=args.head,
            ae_lr=args.ae_lr, recon_on=args.recon_on)
        if not args.evaluate_checkpoint:
            expert.stages(args.epochs, args.lr)  # a bad --stages answers now, not once the data is read
        runs.append((cfg, expert))
    for index, (cfg, expert) in enumerate(runs):
        run(cfg, expert, show_audit=index == 0)  # the variants train on the same sets: their audit is shown once


def _number(value: float) -> str:
    """A default as --help writes it: 3e-4, 0.3."""
    return f"{value:.0e}".replace("e-0", "e-") if 0 < value < 0.01 else f"{value:g}"


def _by_init(table: Mapping[str, Mapping[str, Any]], key: str, none: str = "") -> str:
    """A default that follows --init, as --help writes it: one value, or the most common and each other init's
    (`none` stands for None)."""
    values = {init: none if row[key] is None else _number(row[key]) if isinstance(row[key], float) else row[key]
              for init, row in table.items()}
    common = max(values.values(), key=list(values.values()).count)
    others = [f"with --init {init}, {value}" for init, value in values.items() if value != common]
    return "; ".join([common, *others])


def _check_hub(args: argparse.Namespace, variants: tuple[str, ...]) -> None:
    """The hub weights --init needs (the official files, or the ImageNet backbones), cached or reachable."""
    if args.init == "official" and not (args.weights or args.weights_dir):
        check_hub([(GENCONVIT_HF_REPO, GENCONVIT_HF_FILES[variant]) for variant in variants],
                  "--weights PATH (or --weights-dir) to the official file, or use --init imagenet|scratch")
    elif args.init == "imagenet":
        needed = [] if args.backbone_file else [(timm_repo(args.backbone), None)]
        if args.arch == "hybrid" and not args.swin_file:
            needed.append((timm_repo(SWIN_NAME), None))
        swin = " and --swin-file (Swin)" if args.arch == "hybrid" else ""
        check_hub(needed, f"--backbone-file (ConvNeXt){swin}, or use --init scratch")


def cli() -> None:
    """The `stage2-train-genconvit` command."""
    exit_on_error(main)


if __name__ == "__main__":
    cli()

"""Fine-tune EfficientNetV2-B3 (or any timm classifier) as stage two's local-artefact expert.

    python train_stage2_effnet.py --train-manifest train.csv --val-manifest val.csv
    torchrun --nproc_per_node=8 train_stage2_effnet.py ...      # several GPUs
    python train_stage2_effnet.py --demo                         # built-in synthetic data, CPU minutes

Keeps the best epoch by validation AUC in OUTPUT_DIR/best.pt; see README.md for every output.
"""

from __future__ import annotations

import argparse

from stage2.commands.cli import HelpFormatter, command_help, exit_on_error, make_demo_data, parse_args
from stage2.commands.flags import FlagParser, Float, given_flags
from stage2.commands.train_args import add_train_args, check_run_inputs, config_from_args
from stage2.errors import ConfigError
from stage2.models.hub import check_hub, timm_repo
from stage2.models.names import TUNE_MODES
from stage2.models.recipes import EFFNET
from stage2.run.files import check_output_dir, command_kind

COMMAND = "stage2-train-effnet"  # the installed command (pyproject.toml)
# What a checkpoint records of its model and loss: --evaluate scores as it says, whatever these flags say.
MODEL_FLAGS = ("model", "pretrained_file", "pretrained", "drop_path", "pos_weight", "label_smoothing", "img_size")


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(description=command_help(__doc__, "train_stage2_effnet.py", COMMAND),
                        formatter_class=HelpFormatter)
    add_train_args(parser, **EFFNET.train)
    d = EFFNET.model
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=d["model"], help="any timm model name")
    model.add_argument("--pretrained-file",
                       help="local pretrained weights (safetensors or .pth), for offline use (default: the hub's)")
    model.add_argument("--no-pretrained", dest="pretrained", action="store_false", default=d["pretrained"],
                       help="random initialisation")
    model.add_argument("--drop-path", type=Float(min=0, below=1), default=d["drop_path"], help="stochastic depth rate")
    model.add_argument("--pos-weight", default=d["pos_weight"],
                       help="BCE weight of fake samples: auto (= n_real / n_fake), none, or a positive number")
    model.add_argument("--label-smoothing", type=Float(min=0, below=1), default=d["label_smoothing"],
                       help="pull the BCE targets towards 0.5 by this much")
    model.add_argument("--tune", choices=TUNE_MODES, default=d["tune"],
                       help="what trains: all, norm (the normalisation layers' affine parameters and the head; "
                            "BatchNorm statistics update) or head (the head alone; the backbone frozen in eval mode)")
    return parser


def parse(argv: list[str] | None = None, parser: FlagParser | None = None) -> argparse.Namespace:
    """The command line with its defaults: the parser's, the demo's, --config's. `parser`: build_parser()'s, to ask
    afterwards which flags were given."""
    return parse_args(parser or build_parser(), argv, **EFFNET.demo)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parse(argv, parser)
    if args.pretrained_file and not args.pretrained:
        if "pretrained" in parser.given or not args.demo:  # --demo's random start gives way to a file
            raise ConfigError(f"--pretrained-file {args.pretrained_file} with --no-pretrained: the one starts from "
                              "its weights, the other from random ones; pass one of them")
        args.pretrained = True  # as the run starts: args.json says so
    cfg = config_from_args(args)
    cfg.model_flags = given_flags(parser, MODEL_FLAGS)
    check_output_dir(cfg)
    make_demo_data(args)  # the manifests it writes are what the input check reads
    check_run_inputs(cfg)
    if args.pretrained and not args.pretrained_file and command_kind(cfg) == "training":
        check_hub([(timm_repo(args.model), None)], "--pretrained-file PATH (safetensors or .pth) or --no-pretrained")
    # Imported after parsing and checking, so that --help and bad input answer before torch and timm load.
    from stage2.engine.modes import run
    from stage2.experts.timm_classifier import TimmExpert
    from stage2.models.timm_models import resolve_model_name

    expert = TimmExpert(
        resolve_model_name(args.model),
        img_size=cfg.img_size,
        pretrained=args.pretrained,
        pretrained_file=args.pretrained_file,
        drop_path_rate=args.drop_path,
        pos_weight=args.pos_weight,
        label_smoothing=args.label_smoothing,
        tune=args.tune,
    )
    run(cfg, expert)


def cli() -> None:
    """The `stage2-train-effnet` command."""
    exit_on_error(main)


if __name__ == "__main__":
    cli()

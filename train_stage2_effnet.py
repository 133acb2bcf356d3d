"""Fine-tune EfficientNetV2-B3 (or any timm classifier) as stage two's local-artefact expert.

    python train_stage2_effnet.py --train-manifest train.csv --val-manifest val.csv
    torchrun --nproc_per_node=8 train_stage2_effnet.py ...      # several GPUs
    python train_stage2_effnet.py --demo                         # built-in synthetic data, CPU minutes

Keeps the best epoch by validation AUC in OUTPUT_DIR/best.pt; see README.md for every output.
"""

from __future__ import annotations

import argparse

from src.engine.cli import apply_demo, exit_on_error
from src.engine.config import add_train_args, config_from_args
from src.engine.trainer import run
from src.experts.effnet import TimmExpert
from src.models.factory import DEFAULT_EFFNET, resolve_model_name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser, output_dir="output/stage2_effnet")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_EFFNET, help="any timm model name")
    model.add_argument("--pretrained-file", help="local pretrained weights (safetensors or .pth), for offline use")
    model.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="random initialisation")
    model.add_argument("--drop-path", type=float, default=0.2, help="stochastic depth rate")
    model.add_argument("--pos-weight", default="none",
                       help="BCE weight of fake samples: auto (= n_real / n_fake), none, or a number")
    model.add_argument("--label-smoothing", type=float, default=0.0)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:
        # Offline, the demo trains from scratch unless --pretrained-file is given; small and short for a CPU.
        apply_demo(args, parser, model="tf_efficientnetv2_b3", pretrained=args.pretrained_file is not None,
                   img_size=128, epochs=5, batch_size=32, lr=5e-4, warmup_epochs=0.5, workers=2, aug="light")
    cfg = config_from_args(args)
    expert = TimmExpert(
        resolve_model_name(args.model),
        img_size=cfg.img_size,
        pretrained=args.pretrained,
        pretrained_file=args.pretrained_file,
        drop_path_rate=args.drop_path,
        pos_weight=args.pos_weight,
        label_smoothing=args.label_smoothing,
    )
    run(cfg, expert)


if __name__ == "__main__":
    exit_on_error(main)

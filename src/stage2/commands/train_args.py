"""The command-line flags both trainers share, and the `TrainConfig` (stage2.run.config) they make.

Each training command calls `add_train_args(parser, **its_defaults)`, adds its model-specific flags, and turns
the parsed namespace into a `TrainConfig` with `config_from_args`. Torch-free, like every parser: the commands
answer --help and bad flags before importing torch.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from stage2.commands.flags import Extend, Float, Int
from stage2.data.landmarks import missing_extra
from stage2.data.levels import AUG_LEVELS, BLEND_MASKS, BLEND_PARTS, PAIRED
from stage2.errors import ConfigError, ManifestError, check_checkpoint_exists
from stage2.run.config import TRACKERS, TrainConfig

# The largest --seed: every seed derived from it (per step, per sample, per epoch) stays within torch's range.
SEED_MAX = 2**32 - 1
# Flags that describe an invocation rather than a run: a replay (--config args.json) starts a fresh run.
NOT_REPLAYED = ("config", "demo", "resume", "overwrite", "evaluate_checkpoint")


def add_train_args(parser: argparse.ArgumentParser, *, img_size_multiple_of: int | None = None,
                   **defaults: Any) -> None:
    """The flags every trainer has; `defaults` overrides TrainConfig's defaults for this trainer, and
    `img_size_multiple_of` is what its model needs of --img-size. Each numeric flag declares its range
    (stage2.commands.flags), checked before anything runs."""
    d = {**TrainConfig().to_dict(), **defaults}
    _add_data_flags(parser.add_argument_group("data"), d, img_size_multiple_of)
    _add_optimisation_flags(parser.add_argument_group("optimisation"), d)
    _add_execution_flags(parser.add_argument_group("execution"), d)
    _add_output_flags(parser.add_argument_group("selection and outputs"), d)
    parser.add_argument("--config", metavar="FILE",
                        help="YAML or JSON (a run's args.json) whose values become the defaults; flags given on the "
                             "command line win")
    parser.add_argument("--demo", action="store_true",
                        help="train briefly on the built-in synthetic dataset (generated under data/demo)")


def _add_data_flags(data: argparse._ArgumentGroup, d: dict[str, Any], img_size_multiple_of: int | None) -> None:
    """What a run reads and how: manifests, bad images, input size, augmentation, self-blending, loaders, cache."""
    data.add_argument("--train-manifest", default=d["train_manifest"], help="CSV with path,label[,video_id,method]")
    data.add_argument("--val-manifest", nargs="+", action=Extend, default=d["val_manifest"], metavar="CSV",
                      help="validation CSV (selects the best epoch); with --evaluate one or more test manifests "
                           "(listed, or the flag repeated)")
    data.add_argument("--data-root", default=d["data_root"],
                      help="base folder for relative image paths (default: each manifest's folder)")
    data.add_argument("--skip-bad-images", action="store_true",
                      help="skip undecodable images with a warning and a count instead of stopping; they are "
                      "listed in OUTPUT_DIR/bad_images.txt")
    data.add_argument("--max-bad-images", type=Int(min=0), default=d["max_bad_images"], metavar="N",
                      help="with --skip-bad-images: stop once more than N images of the train or val set are "
                      "undecodable: a lost mount or a broken export, not a few bad files")
    data.add_argument("--max-image-pixels", type=Int(min=1), default=d["max_image_pixels"], metavar="N",
                      help="an image of more pixels than this (read from its header, before decoding) is "
                      "undecodable: a small file can hold a huge image (the default is PIL's limit)")
    multiple = f", a multiple of {img_size_multiple_of}" if img_size_multiple_of else ""
    data.add_argument("--img-size", type=Int(min=img_size_multiple_of or 1, multiple_of=img_size_multiple_of),
                      default=d["img_size"], help=f"square input size in pixels{multiple}")
    data.add_argument("--aug", choices=AUG_LEVELS, default=d["aug"], help="training augmentation level")
    data.add_argument("--self-blend", type=Float(min=0, below=1, words=(PAIRED,)), default=d["self_blend"],
                      metavar="P|paired",
                      help="self-blended images (SBI): turn each real training image into its self-blended fake "
                           "with chance P (0: off; below 1, which would leave no real to train on), or 'paired': "
                           "every real beside its own fake in the same batch, one augmentation draw for both "
                           "(--batch-size still counts images: a step samples BATCH/2 rows; a fake row of the "
                           "manifest is one image). Either way a train manifest of reals only will do")
    data.add_argument("--blend-mask", choices=BLEND_MASKS, default=d["blend_mask"],
                      help="the self-blend's face mask: the convex hull of 68 dlib landmarks (the optional extra: "
                           "pip install -r requirements-landmarks.txt), or an ellipse around the crop's centre; "
                           "auto: landmarks where the extra is installed and finds a face, else the ellipse")
    data.add_argument("--blend-without", nargs="+", action=Extend, choices=BLEND_PARTS, metavar="PART",
                      help="for ablations, leave parts of the self-blend recipe out: transforms (source and target "
                           "the same crop, no colour or frequency change), shapes (the plain landmark hull only, not "
                           "its four variants), crop-size (blend after the resize to --img-size, not on the crop)")
    data.add_argument("--workers", type=Int(min=0), default=d["workers"],
                      help="DataLoader worker processes per rank, capped to the cores this process may use")
    data.add_argument("--cache-dir", default=d["cache_dir"],
                      help="decode every image once into a memory-mapped uint8 cache here, then train from it "
                           "(default: decode from the files every epoch)")
    data.add_argument("--balanced-sampler", action="store_true",
                      help="sample real and fake images equally often (alternative to --pos-weight)")


def _add_optimisation_flags(opt: argparse._ArgumentGroup, d: dict[str, Any]) -> None:
    """Epochs, batch, learning-rate schedule, optimizer, accumulation, clipping, EMA."""
    opt.add_argument("--epochs", type=Int(min=1), default=d["epochs"], help="length of the run, all stages together")
    opt.add_argument("--batch-size", type=Int(min=1), default=d["batch_size"], help="per-GPU (per-rank) batch size")
    opt.add_argument("--lr", type=Float(min=0), default=d["lr"], help="peak learning rate")
    opt.add_argument("--min-lr", type=Float(min=0), default=d["min_lr"], help="cosine floor, at most --lr")
    opt.add_argument("--warmup-epochs", type=Float(min=0), default=d["warmup_epochs"],
                     help="linear warmup length in epochs, fractions allowed")
    opt.add_argument("--weight-decay", type=Float(min=0), default=d["weight_decay"],
                     help="weight decay, never applied to norms and biases: decoupled with adamw (and lamb, "
                          "lion...), an L2 term added to the gradient with adam and sgd")
    opt.add_argument("--opt", default=d["opt"], help="timm optimizer name (adamw, adam, sgd, lamb, ...)")
    opt.add_argument("--grad-accum", type=Int(min=1), default=d["grad_accum"],
                     help="micro-batches per optimizer step")
    opt.add_argument("--clip-grad", type=Float(min=0), default=d["clip_grad"],
                     help="max gradient norm; 0 disables")
    opt.add_argument("--ema", action=argparse.BooleanOptionalAction, default=d["ema"],
                     help="keep an EMA of the weights and select/save it")
    opt.add_argument("--ema-decay", type=Float(min=0, below=1), default=d["ema_decay"],
                     help="EMA weight of the past per optimizer step (with --ema)")


def _add_execution_flags(ex: argparse._ArgumentGroup, d: dict[str, Any]) -> None:
    """Precision, memory format, compilation, device, seed, determinism."""
    ex.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default=d["amp"],
                    help="mixed precision: auto = bf16 on CUDA, and on CPUs with native bf16")
    ex.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=d["channels_last"],
                    help="NHWC memory format (faster convolutions on GPUs with tensor cores)")
    ex.add_argument("--compile", action="store_true", help="torch.compile the model")
    ex.add_argument("--device", default=d["device"],
                    help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    ex.add_argument("--seed", type=Int(min=0, max=SEED_MAX), default=d["seed"],
                    help="seeds initialisation, sampling and augmentation")
    ex.add_argument("--deterministic", action="store_true",
                    help="deterministic kernels (bit-identical reruns and resumes; slower on GPU)")


def _add_output_flags(out: argparse._ArgumentGroup, d: dict[str, Any]) -> None:
    """Model selection, the run folder and resume, and the two other modes (--evaluate, --audit-only)."""
    out.add_argument("--select-metric", default=d["select_metric"],
                     help="validation metric that picks best.pt (auc, ap, eer, log_loss, video_auc, ...)")
    out.add_argument("--output-dir", default=d["output_dir"], help="the run folder")
    out.add_argument("--resume", nargs="?", const="auto", default=d["resume"], metavar="PATH|auto",
                     help="continue from a last.pt (auto: OUTPUT_DIR/last.pt)")
    out.add_argument("--overwrite", action="store_true", help="replace a previous run in --output-dir")
    out.add_argument("--save-every-minutes", type=Float(min=0), default=d["save_every_minutes"],
                     help="also write last.pt mid-epoch this often (0: only at epoch ends)")
    out.add_argument("--evaluate", metavar="CHECKPOINT", dest="evaluate_checkpoint",
                     default=d["evaluate_checkpoint"],
                     help="only evaluate this checkpoint on each --val-manifest (eval_NAME.json, predictions_NAME.csv)")
    out.add_argument("--audit-only", action="store_true",
                     help="only run the shortcut audit (file headers of the train and val manifests, or with "
                          "--evaluate of its manifests): OUTPUT_DIR/shortcut_audit.csv and summary.json")
    out.add_argument("--perturb", nargs="+", action=Extend, metavar="SPEC",
                     help="with --evaluate: also score each manifest under these perturbations, e.g. "
                          "jpeg:50,jpeg:30,down:0.5,blur:1.0,noise:0.02 (a table and a plot per manifest; "
                          "several SPECs, or the flag repeated, add up)")
    out.add_argument("--log-every", type=Int(min=1), default=d["log_every"],
                     help="optimizer updates (of --grad-accum micro-batches each) between progress lines when stdout "
                          "is not a terminal, and between checks for a non-finite loss")
    out.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=d["calibrate"],
                     help="fit a temperature on the validation logits of the best epoch")
    out.add_argument("--log-to", choices=TRACKERS, default=d["log_to"],
                     help="also log per-step loss and lr, per-epoch metrics and images to a tracker "
                          "(OUTPUT_DIR/tensorboard); metrics.csv stays the record")


def check_run_inputs(cfg: TrainConfig) -> None:
    """What the run reads, checked before torch loads (seconds on a busy machine): its manifests are files, the
    --evaluate checkpoint is one, and a training run's --select-metric is a metric a run can report."""
    manifests = cfg.eval_manifests if cfg.evaluate_checkpoint else [cfg.train_manifest, cfg.val_manifest]
    for manifest in manifests:
        if not Path(manifest).is_file():
            raise ManifestError(f"{manifest}: manifest file not found")
    if cfg.evaluate_checkpoint:
        check_checkpoint_exists(cfg.evaluate_checkpoint)
    elif not cfg.audit_only:
        from stage2.scoring.metrics import metric_direction  # numpy and scikit-learn, not torch

        try:  # whether this val set gives it is checked once it is decoded
            metric_direction(cfg.select_metric)
        except ValueError as err:
            raise ConfigError(f"--select-metric {cfg.select_metric}: {err}") from None


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values["cli_args"] = {k: v for k, v in vars(args).items() if k not in NOT_REPLAYED}
    manifests = [args.val_manifest] if isinstance(args.val_manifest, str) else list(args.val_manifest)
    if not args.evaluate_checkpoint:
        if len(manifests) > 1:
            raise ConfigError("--val-manifest: a training run validates on one manifest; several are for --evaluate")
        if args.perturb is not None:
            raise ConfigError("--perturb: only with --evaluate CHECKPOINT")
    values["val_manifest"], values["eval_manifests"] = manifests[0], manifests
    if args.perturb is not None:  # one spec, in the order given
        values["perturb"] = ",".join([args.perturb] if isinstance(args.perturb, str) else args.perturb)
    if args.self_blend == PAIRED and args.balanced_sampler:
        raise ConfigError("--balanced-sampler with --self-blend paired: paired batches hold a fake beside every real "
                          "already; leave --balanced-sampler out")
    if args.self_blend == PAIRED and args.batch_size % 2:
        raise ConfigError(f"--batch-size {args.batch_size} with --self-blend paired: every real comes with its fake, "
                          "so a batch holds an even number of images")
    parts = args.blend_without or []
    if parts and not args.self_blend:
        raise ConfigError(f"--blend-without {' '.join(parts)}: only with --self-blend")
    values["blend_without"] = ",".join(part for part in BLEND_PARTS if part in parts)
    if args.self_blend and args.blend_mask == "landmarks" and (reason := missing_extra()):
        raise ConfigError(f"--blend-mask landmarks: {reason}; or use --blend-mask ellipse")
    if args.balanced_sampler and args.self_blend >= 0.5:
        raise ConfigError(f"--balanced-sampler with --self-blend {args.self_blend:g}: from 0.5 on, self-blending "
                          "leaves fewer reals than fakes however the images are drawn; lower --self-blend or use "
                          "--pos-weight auto")
    if not values.get("clip_grad"):
        values["clip_grad"] = None
    return TrainConfig(**values)

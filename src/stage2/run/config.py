"""A training run's settings (`TrainConfig`), and what a resume may change of each.

Torch-free, like the parsers that build it (stage2.commands.train_args): the commands parse their flags, and answer
--help, before importing torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# The trackers --log-to offers (stage2.run.tracking).
TRACKERS = ("tensorboard",)

# What a resumed run may change, on each field below (stage2.run.resume applies it; README, "Resuming and
# stopping"). REPLAN: the schedule is a function of these and of where the run stands, so a change re-plans it
# from there (a longer --epochs continues on the cosine of the new length, a new --lr scales the rest of it).
# FREE: how the run executes, not what it learns; a change applies from the resume on. INVOCATION: describes this
# command, not the run; never reported. REFUSE: the model, data and optimisation as the run started; a different
# batch size, seed, image size or data would silently mix two runs.
REFUSE, REPLAN, FREE, INVOCATION = ({"resume": policy} for policy in ("refuse", "replan", "free", "invocation"))


@dataclass
class TrainConfig:
    """Every setting of a training run, an --evaluate or an --audit-only; each field's `resume` metadata says
    what a resume may do with it."""

    # data
    train_manifest: str = field(default="train_manifest.csv", metadata=REFUSE)
    val_manifest: str = field(default="val_manifest.csv", metadata=REFUSE)
    data_root: str | None = field(default=None, metadata=REFUSE)
    skip_bad_images: bool = field(default=False, metadata=FREE)
    max_bad_images: int = field(default=100, metadata=FREE)
    # PIL's Image.MAX_IMAGE_PIXELS, as stage2.data.decode.MAX_IMAGE_PIXELS
    max_image_pixels: int = field(default=89_478_485, metadata=FREE)
    img_size: int = field(default=256, metadata=REFUSE)
    aug: str = field(default="standard", metadata=REFUSE)
    # a chance in [0, 1), or "paired" (stage2.data.levels.PAIRED)
    self_blend: float | str = field(default=0.0, metadata=REFUSE)
    blend_mask: str = field(default="auto", metadata=REFUSE)
    # the parts of the self-blend recipe left out (--blend-without), comma-separated in BLEND_PARTS' order
    blend_without: str = field(default="", metadata=REFUSE)
    workers: int = field(default=8, metadata=FREE)
    balanced_sampler: bool = field(default=False, metadata=REFUSE)
    cache_dir: str | None = field(default=None, metadata=FREE)
    # optimisation
    epochs: int = field(default=20, metadata=REPLAN)
    batch_size: int = field(default=128, metadata=REFUSE)
    lr: float = field(default=3e-4, metadata=REPLAN)
    min_lr: float = field(default=1e-6, metadata=REPLAN)
    # 0.3, not 1: a warmup epoch is a third of a short run. On the hard-edged splice trace at 3 epochs (3 seeds)
    # it left ours at 0.976x the plain loop's AUC, 0.999x with 0.3; no other trace type gained from it
    # (BENCHMARKS.md, "Warmup").
    warmup_epochs: float = field(default=0.3, metadata=REPLAN)
    weight_decay: float = field(default=0.05, metadata=REFUSE)
    opt: str = field(default="adamw", metadata=REFUSE)
    grad_accum: int = field(default=1, metadata=REFUSE)
    clip_grad: float | None = field(default=1.0, metadata=FREE)
    ema: bool = field(default=False, metadata=REFUSE)
    ema_decay: float = field(default=0.999, metadata=FREE)
    # execution
    amp: str = field(default="auto", metadata=FREE)
    channels_last: bool = field(default=True, metadata=FREE)
    compile: bool = field(default=False, metadata=FREE)
    device: str | None = field(default=None, metadata=FREE)
    seed: int = field(default=42, metadata=REFUSE)
    deterministic: bool = field(default=False, metadata=FREE)
    # selection, outputs, resume
    select_metric: str = field(default="auc", metadata=REFUSE)
    output_dir: str = field(default="output/stage2_effnet", metadata=INVOCATION)
    resume: str | None = field(default=None, metadata=INVOCATION)
    overwrite: bool = field(default=False, metadata=INVOCATION)
    save_every_minutes: float = field(default=20.0, metadata=FREE)
    evaluate_checkpoint: str | None = field(default=None, metadata=FREE)
    audit_only: bool = field(default=False, metadata=REFUSE)
    # with --evaluate: every --val-manifest given
    eval_manifests: list[str] = field(default_factory=list, metadata=FREE)
    perturb: str | None = field(default=None, metadata=FREE)
    log_every: int = field(default=50, metadata=FREE)
    calibrate: bool = field(default=True, metadata=FREE)
    log_to: str | None = field(default=None, metadata=FREE)
    # Every flag of the command line as parsed (replayable with --config); written to args.json.
    cli_args: dict[str, Any] = field(default_factory=dict, metadata=INVOCATION)
    # The model and loss flags given on the command line, {dest: flag}: --evaluate names those it does not apply.
    model_flags: dict[str, str] = field(default_factory=dict, metadata=INVOCATION)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

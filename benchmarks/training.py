"""Sections 3 and 4: training steps through our Trainer vs a plain fp32 loop, and extraction vs a bare forward.

"Ours" is the trainer's own step code: `Trainer.train_epoch` run on a Trainer built from a TrainConfig, so
the figure includes everything the real loop does per step (device-side augmentation and normalisation,
channels_last, autocast as `--amp` resolves it, per-sample loss, gradient clipping, the timm optimizer and
schedule, per-step reseeding). Only the loader is swapped for one resident batch when a figure is meant to
be model-only; the plain loop gets a ready float batch, so every extra the trainer does counts against it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from benchmarks.data import write_manifests
from benchmarks.timing import Row, interleaved, row
from stage2.data.dataset import Batch, ManifestDataset, collate
from stage2.data.preprocessing import DataConfig
from stage2.data.transforms import DeviceTransform
from stage2.embeddings import FeatureExtractor
from stage2.engine.trainer import Trainer
from stage2.experts.base import Expert
from stage2.experts.genconvit import GenConViTExpert
from stage2.experts.timm_classifier import TimmExpert
from stage2.models.timm_models import timm_data_config
from stage2.run.checkpoint import BestCheckpoint, save_checkpoint
from stage2.run.config import TrainConfig
from stage2.run.distributed import setup_distributed

EFFNET = "tf_efficientnetv2_b3"


def effnet_expert(img_size: int = 256, model: str = EFFNET) -> TimmExpert:
    # drop_path 0.2 is train_stage2_effnet.py's default.
    return TimmExpert(model, img_size=img_size, pretrained=False, drop_path_rate=0.2)


def genconvit_expert(variant: str = "ed", img_size: int = 224) -> GenConViTExpert:
    # One stage with every parameter learning, like the plain loop it is compared with.
    return GenConViTExpert(variant, img_size=img_size, init="scratch", stages="full:rest")


def build_trainer(
    expert: Expert,
    train_csv: Path,
    val_csv: Path,
    out: Path,
    *,
    batch: int,
    device: str,
    amp: str = "auto",
    compile: bool = False,
    workers: int = 0,
    cache_dir: Path | None = None,
) -> Trainer:
    cfg = TrainConfig(
        train_manifest=str(train_csv),
        val_manifest=str(val_csv),
        img_size=expert.img_size,
        aug="standard",
        workers=workers,
        cache_dir=None if cache_dir is None else str(cache_dir),
        epochs=1,
        batch_size=batch,
        amp=amp,
        compile=compile,
        device=device,
        output_dir=str(out),
        overwrite=True,
        save_every_minutes=0,
        log_every=10**9,
        calibrate=False,
    )
    trainer = Trainer(cfg, expert, setup_distributed(device))
    logging.getLogger("stage2").setLevel(logging.WARNING)  # the Trainer logs its set-up to stdout
    return trainer


class TrainerSteps:
    """Epochs of `Trainer.train_epoch` in the first stage `Trainer.start_stage` sets up, as training runs them."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        stage = trainer.expert.stages(trainer.cfg.epochs, trainer.cfg.lr)[0]
        self.ctx = trainer.start_stage(0, stage)
        self.epoch = 0

    @property
    def amp(self) -> str:
        return "fp32" if self.trainer.amp_dtype is None else str(self.trainer.amp_dtype).removeprefix("torch.")

    def model_only(self, batch: Batch, steps: int) -> Callable[[], int]:
        """Runs of `steps` steps on one batch already on the device (uint8, as the loader delivers it)."""
        return lambda: self._epoch([batch] * steps, steps)

    def real_loader(self) -> Callable[[], int]:
        """Whole epochs through the trainer's own DataLoader (workers restart each epoch, as in training)."""
        return lambda: self._epoch(None, self.trainer.steps_per_epoch)

    def _epoch(self, batches: Iterable[Batch] | None, steps: int) -> int:
        self.trainer.train_epoch(self.epoch, self.ctx, batches=batches, steps=steps)
        self.epoch += 1
        return steps * self.trainer.cfg.batch_size


def plain_steps(
    model: nn.Module, loss: Callable, x: torch.Tensor, labels: torch.Tensor, steps: int
) -> Callable[[], int]:
    """The baseline loop: fp32, NCHW, torch AdamW, on a ready normalised batch (no augmentation, no clipping)."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)

    def run() -> int:
        for _ in range(steps):
            loss(model(x), x, labels)["loss"].mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        synchronize(x.device)
        return steps * len(x)

    return run


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resident_batch(frame: pd.DataFrame, img_size: int, batch: int, device: torch.device | str) -> Batch:
    """`batch` decoded crops (cycling through `frame`) at `img_size`, uint8, already on `device`."""
    dataset = ManifestDataset(frame, img_size)
    out = collate([dataset[i % len(frame)] for i in range(batch)])
    return Batch(out.images.to(device), out.labels.to(device), out.indices, out.skipped)


def normalised(batch: Batch, data_config: DataConfig) -> torch.Tensor:
    return DeviceTransform(data_config.mean, data_config.std).to(batch.images.device).eval()(batch.images)


def cpu_training(
    frame: pd.DataFrame, work: Path, *, steps: int, warmup: int, repeats: int, genconvit_repeats: int, bf16_repeats: int
) -> list[Row]:
    """Section 3 on the CPU: EfficientNetV2-B3 at 256px and GenConViT-ED at 224px, batch 16.

    With `bf16_repeats` > 0 and a CPU without native bf16 (where --amp auto picks fp32), EfficientNetV2-B3 is
    also run with bf16 forced, after the others: emulated bf16 is several times slower, hence fewer runs.
    """
    train_csv, val_csv = write_manifests(frame, work / "manifests", len(frame))
    rows = []
    for label, make, repeats_here in (
        ("EffNetV2-B3 256px", effnet_expert, repeats),
        ("GenConViT-ED 224px", genconvit_expert, genconvit_repeats),
    ):
        section = f"3 train CPU {label} b16"
        note = f"{steps} step(s) per run, {torch.get_num_threads()} thread(s)"
        ours = TrainerSteps(build_trainer(make(), train_csv, val_csv, work / "runs" / "ours", batch=16, device="cpu"))
        batch = resident_batch(frame, ours.trainer.data_config.size, 16, "cpu")
        torch.manual_seed(0)
        plain = plain_steps(
            make().build_model(),
            ours.trainer.expert.loss,
            normalised(batch, ours.trainer.data_config),
            batch.labels,
            steps,
        )
        rates = interleaved(
            {"plain": plain, "ours": ours.model_only(batch, steps)}, warmup=warmup, repeats=repeats_here
        )
        rows += [
            row(section, "plain fp32 NCHW", rates["plain"], group=section, note=f"{note}; ready float batch"),
            row(
                section,
                f"ours (--amp auto: {ours.amp})",
                rates["ours"],
                baseline="plain fp32 NCHW",
                group=section,
                note=f"{note}; the Trainer's step incl. device aug",
            ),
        ]
        if make is effnet_expert and ours.trainer.amp_dtype is None and bf16_repeats > 0:
            del ours
            forced = TrainerSteps(
                build_trainer(make(), train_csv, val_csv, work / "runs" / "bf16", batch=16, device="cpu", amp="bf16")
            )
            runs = interleaved({"bf16": forced.model_only(batch, steps)}, warmup=warmup, repeats=bf16_repeats)
            rows.append(
                row(
                    section,
                    "ours (--amp bf16 forced)",
                    runs["bf16"],
                    baseline="plain fp32 NCHW",
                    note=f"{note}; no native bf16 here: emulated",
                )
            )
    return rows


def effnet_checkpoint(work: Path, img_size: int = 256, model_name: str = EFFNET) -> Path:
    """A trainer-format best.pt of a randomly initialised model, for the FeatureExtractor to load."""
    expert = effnet_expert(img_size, model_name)
    model = expert.build_model()
    path = work / f"{model_name}_{img_size}.pt"
    best = BestCheckpoint(model=model.state_dict(), meta=expert.checkpoint_meta(),
                          data_config=timm_data_config(model, img_size))
    save_checkpoint(best.to_dict(), path)
    return path


def extraction_cases(
    frame: pd.DataFrame, checkpoint: Path, *, batch: int, n_batches: int, device: str
) -> dict[str, Callable[[], int]]:
    """FeatureExtractor.extract over uint8 batches as a loader yields them, vs the model's bare forward on the
    same images already normalised on the device, at the extractor's precision and memory format."""
    fx = FeatureExtractor(checkpoint_path=checkpoint, device=device, batch_size=batch, workers=0, progress=False)
    dataset = ManifestDataset(frame, fx.img_size)
    batches = [collate([dataset[(i * batch + j) % len(frame)] for j in range(batch)]) for i in range(n_batches)]
    memory_format = torch.channels_last if fx.channels_last else torch.contiguous_format
    inputs = [fx.normalise(b.images.to(fx.device)).contiguous(memory_format=memory_format) for b in batches]
    n = batch * n_batches

    def extract() -> int:
        fx.extract(batches)
        return n

    def bare() -> int:
        with (
            torch.inference_mode(),
            torch.autocast(fx.device.type, dtype=fx.amp_dtype, enabled=fx.amp_dtype is not None),
        ):
            for x in inputs:
                fx.model(x)
        synchronize(fx.device)
        return n

    return {"bare forward": bare, "FeatureExtractor.extract": extract}


def cpu_extraction(frame: pd.DataFrame, work: Path, *, n_batches: int, warmup: int, repeats: int) -> list[Row]:
    """Section 4 on the CPU: EfficientNetV2-B3 embeddings at 256px, batch 16."""
    cases = extraction_cases(frame, effnet_checkpoint(work), batch=16, n_batches=n_batches, device="cpu")
    rates = interleaved(cases, warmup=warmup, repeats=repeats)
    section = "4 extract CPU EffNetV2-B3 256px b16"
    return [
        row(section, "bare forward", rates["bare forward"], group=section, note="model(x) on normalised inputs"),
        row(
            section,
            "FeatureExtractor.extract",
            rates["FeatureExtractor.extract"],
            baseline="bare forward",
            group=section,
            note="uint8 batches in; normalise, embeddings + P(fake) out as numpy",
        ),
    ]

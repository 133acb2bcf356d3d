"""Section 5, CUDA only: bf16 vs fp32, eager vs torch.compile, end-to-end vs model-only, and GPU memory.

Cases run one after the other (a GPU is not shared the way a CPU box is), each with its own peak-memory
reading. The end-to-end figures run whole epochs through the trainer's real DataLoader, from the decoded
cache and from the PNG files; the model-only figure runs the same trainer on one resident batch, so their
ratio is the share of the step the loader costs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from benchmarks.data import write_manifests
from benchmarks.timing import Row, interleaved, row
from benchmarks.training import (
    EFFNET,
    TrainerSteps,
    build_trainer,
    effnet_checkpoint,
    effnet_expert,
    extraction_cases,
    genconvit_expert,
    resident_batch,
)
from stage2.processes import usable_cores


@dataclass(frozen=True)
class GpuPlan:
    batch: int = 256
    steps: int = 20  # per model-only run
    e2e_steps: int = 60  # per end-to-end epoch: the train manifest holds e2e_steps * batch images
    warmup: int = 1
    repeats: int = 3
    workers: int = max(1, min(16, usable_cores() - 1))
    genconvit_batch: int = 128
    extract_batches: int = 8
    model: str = EFFNET
    img_size: int = 256


class _Section:
    """Measures cases of one table section one after the other, each with its own peak GPU memory."""

    def __init__(self, name: str, plan: GpuPlan, device: str):
        self.name, self.plan, self.device = name, plan, torch.device(device)
        self.rows: list[Row] = []

    def measure(self, case: str, run: Callable[[], int], **kwargs) -> None:
        on_cuda = self.device.type == "cuda"
        if on_cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        runs = interleaved({case: run}, warmup=self.plan.warmup, repeats=self.plan.repeats)[case]
        extra = {"gpu_peak_gib": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)} if on_cuda else {}
        self.rows.append(row(self.name, case, runs, extra=extra, **kwargs))


def _effnet_trainer(frame: pd.DataFrame, work: Path, plan: GpuPlan, device: str, **kwargs) -> TrainerSteps:
    train_csv, val_csv = write_manifests(frame, work / "gpu_manifests", plan.e2e_steps * plan.batch)
    expert = effnet_expert(plan.img_size, plan.model)
    out = work / "runs" / "gpu"
    return TrainerSteps(build_trainer(expert, train_csv, val_csv, out, batch=plan.batch, device=device, **kwargs))


def _effnet_section(plan: GpuPlan, device: str) -> _Section:
    return _Section(f"5 GPU train EffNetV2-B3 {plan.img_size}px b{plan.batch}", plan, device)


def gpu_effnet(frame: pd.DataFrame, work: Path, plan: GpuPlan, device: str = "cuda") -> list[Row]:
    """EfficientNetV2-B3 training: fp32 vs bf16 model-only, end-to-end from the cache and from PNG files."""
    section = _effnet_section(plan, device)
    batch = resident_batch(frame, plan.img_size, plan.batch, device)
    resident = "channels_last, resident batch"
    fp32 = _effnet_trainer(frame, work, plan, device, amp="off")
    section.measure("model-only fp32", fp32.model_only(batch, plan.steps), note=resident)
    del fp32
    bf16 = _effnet_trainer(frame, work, plan, device, amp="bf16", workers=plan.workers, cache_dir=work / "gpu_cache")
    section.measure("model-only bf16", bf16.model_only(batch, plan.steps), baseline="model-only fp32", note=resident)
    section.measure(
        f"end-to-end bf16, cache, {plan.workers} workers",
        bf16.real_loader(),
        baseline="model-only bf16",
        note=f"epochs of {plan.e2e_steps} steps, real DataLoader",
    )
    del bf16
    png = _effnet_trainer(frame, work, plan, device, amp="bf16", workers=plan.workers)
    section.measure(
        f"end-to-end bf16, PNG files, {plan.workers} workers",
        png.real_loader(),
        baseline="model-only bf16",
        note="no cache: decode + JPEG in the workers",
    )
    return section.rows


def gpu_compile(frame: pd.DataFrame, work: Path, plan: GpuPlan, device: str = "cuda") -> list[Row]:
    """The same model-only bf16 step with --compile (compilation happens in the warm-up run)."""
    section = _effnet_section(plan, device)
    compiled = _effnet_trainer(frame, work, plan, device, amp="bf16", compile=True)
    batch = resident_batch(frame, plan.img_size, plan.batch, device)
    section.measure(
        "model-only bf16 + torch.compile",
        compiled.model_only(batch, plan.steps),
        baseline="model-only bf16",
        note="--compile",
    )
    return section.rows


def gpu_genconvit(frame: pd.DataFrame, work: Path, plan: GpuPlan, device: str = "cuda") -> list[Row]:
    """GenConViT-ED and -VAE (ConvNeXt-Tiny, 224px) model-only steps, fp32 against bf16."""
    train_csv, val_csv = write_manifests(frame, work / "gpu_manifests", plan.e2e_steps * plan.batch)
    batch = resident_batch(frame, 224, plan.genconvit_batch, device)
    rows: list[Row] = []
    for variant in ("ed", "vae"):
        section = _Section(f"5 GPU train GenConViT-{variant.upper()} 224px b{plan.genconvit_batch}", plan, device)
        for amp, name, baseline in (("off", "model-only fp32", None), ("bf16", "model-only bf16", "model-only fp32")):
            steps = TrainerSteps(
                build_trainer(
                    genconvit_expert(variant),
                    train_csv,
                    val_csv,
                    work / "runs" / f"gpu_genconvit_{variant}",
                    batch=plan.genconvit_batch,
                    device=device,
                    amp=amp,
                )
            )
            section.measure(
                name, steps.model_only(batch, plan.steps), baseline=baseline, note="channels_last, resident batch"
            )
            del steps
        rows += section.rows
    return rows


def gpu_extraction(frame: pd.DataFrame, work: Path, plan: GpuPlan, device: str = "cuda") -> list[Row]:
    section = _Section(f"5 GPU extract EffNetV2-B3 {plan.img_size}px b{plan.batch}", plan, device)
    checkpoint = effnet_checkpoint(work, plan.img_size, plan.model)
    cases = extraction_cases(frame, checkpoint, batch=plan.batch, n_batches=plan.extract_batches, device=device)
    section.measure("bare forward", cases["bare forward"], note="bf16, channels_last")
    section.measure(
        "FeatureExtractor.extract",
        cases["FeatureExtractor.extract"],
        baseline="bare forward",
        note="uint8 batches from host memory in, numpy out",
    )
    return section.rows

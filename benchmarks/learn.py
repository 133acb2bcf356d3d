"""Learnability: does our trainer learn as well as the simplest loop a user would write, and what does each
--aug level buy in robustness?

    python -m benchmarks.learn                      # 3 seeds, ~10 CPU minutes on 2 cores
    python -m benchmarks.learn --seeds 0 --levels none,standard
    python -m benchmarks.bench --sections learn     # the same, inside the suite

On an artefact dataset generated here (every fake carries a patch that was down-scaled, up-scaled and blended
back: a resampling and blending trace, the kind of evidence a stage-two expert exists to find), with the same
model, budget and seed, it trains

- **plain loop**: 30 lines written below (PIL load, random h-flip, AdamW + one-cycle, BCE), the best epoch
  by clean val AUC kept;
- **ours --aug LEVEL**: ``train_stage2_effnet.py`` through its own ``main`` at every augmentation level, every
  other flag at its default.

Each run reports its best clean val AUC, and the AUC of that same best model on perturbed copies of val
(``src.data.perturb``: JPEG quality 50-70, down-scale x0.5 and back, Gaussian blur, noise), each perturbation
alone and their mean. The figure that matters: our default level against the plain loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import timm
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch import nn

import train_stage2_effnet
from benchmarks.timing import machine
from src.data.dataset import ManifestDataset, collate
from src.data.manifest import read_manifest
from src.data.perturb import Perturbation, parse_perturbations
from src.data.transforms import AUG_LEVELS, DeviceTransform
from src.engine.checkpoint import load_checkpoint
from src.engine.config import TrainConfig
from src.models.families import model_from_checkpoint

PERTURBATIONS = "jpeg:50-70,down:0.5,blur:1.0,noise:0.02"
PLAIN = "plain loop (flip only)"


@dataclass(frozen=True)
class LearnPlan:
    model: str = "resnet10t"
    img_size: int = 64
    n_train: int = 400
    n_val: int = 200
    epochs: int = 3
    batch: int = 32
    lr: float = 1e-3
    workers: int = 2
    seeds: tuple[int, ...] = (0, 1, 2)
    levels: tuple[str, ...] = AUG_LEVELS
    perturbations: str = PERTURBATIONS
    flags: tuple[str, ...] = ()  # extra flags for our trainer, e.g. ("--drop-path", "0")


# --------------------------------------------------------------------------- data
def _scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured scene, float32 [H, W, 3] in [0, 255]: colour gradient, a few sharp-edged shapes, fine grain."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b = rng.uniform(40, 215, (2, 3)).astype(np.float32)
    angle = rng.uniform(0, np.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    image = a * (1 - t) + b * t
    for _ in range(int(rng.integers(3, 7))):
        cx, cy, rx, ry = rng.uniform(0, 1, 2).tolist() + rng.uniform(0.08, 0.3, 2).tolist()
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        image[inside] = rng.uniform(20, 235, 3).astype(np.float32)
    return image + rng.normal(0, 24, image.shape).astype(np.float32)


def _resampled_patch(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blend in a patch of the image that was down-scaled by 2-3x and scaled back, through a soft ellipse."""
    size = image.shape[0]
    pil = Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8))
    low = max(4, round(size / rng.uniform(2.0, 3.0)))
    source = np.asarray(pil.resize((low, low), Image.BILINEAR).resize((size, size), Image.BILINEAR), np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx, cy = rng.uniform(0.3, 0.7, 2)
    rx, ry = rng.uniform(0.2, 0.32, 2)
    r = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    mask = np.clip((1 - r) / 0.15, 0, 1)[..., None]
    return image + (source - image) * mask


def artefact_dataset(root: Path, n_train: int = 400, n_val: int = 200, size: int = 64, seed: int = 0
                     ) -> tuple[Path, Path]:
    """Write ``n_train + n_val`` PNG crops (half fake, alternating) under ``root``; return (train.csv, val.csv)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_train + n_val):
        rng = np.random.default_rng([seed, i])
        label = i % 2
        image = _scene(rng, size)
        if label:
            image = _resampled_patch(image, rng)
        image += rng.normal(0, 1.0, image.shape)  # light sensor noise over everything, patch included
        name = f"img{i:04d}.png"
        Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8)).save(root / name, compress_level=1)
        rows.append((name, label, "train" if i < n_train else "val"))
    frame = pd.DataFrame(rows, columns=["path", "label", "split"])
    paths = []
    for split in ("train", "val"):
        path = root / f"{split}.csv"
        frame[frame["split"] == split].drop(columns="split").to_csv(path, index=False)
        paths.append(path)
    return paths[0], paths[1]


# --------------------------------------------------------------------------- scoring
def scores(model: nn.Module, frame: pd.DataFrame, data_config: dict[str, Any],
           perturbation: Perturbation | None = None) -> np.ndarray:
    """P(fake) logits of ``model`` (one logit per image) on ``frame``'s images, optionally perturbed (seed 0)."""
    size = data_config["input_size"][-1]
    dataset = ManifestDataset(frame, size, transform=perturbation, seed=0)
    normalise = DeviceTransform(tuple(data_config["mean"]), tuple(data_config["std"])).eval()
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(dataset), 100):
            batch = collate([dataset[i] for i in range(start, min(start + 100, len(dataset)))])
            out.append(model(normalise(batch.images)).squeeze(1).float())
    return torch.cat(out).numpy()


def robustness(model: nn.Module, frame: pd.DataFrame, data_config: dict[str, Any],
               perturbations: list[Perturbation]) -> dict[str, float]:
    labels = frame["label"].to_numpy()
    aucs = {p.name: float(roc_auc_score(labels, scores(model, frame, data_config, p))) for p in perturbations}
    return {**aucs, "perturbed": statistics.fmean(aucs.values())}


# --------------------------------------------------------------------------- the two trainers
def plain_loop(train_csv: Path, val_frame: pd.DataFrame, plan: LearnPlan, seed: int) -> tuple[nn.Module, dict]:
    """The loop a user writes first. Returns the best-epoch model (by clean val AUC) and its figures."""
    torch.manual_seed(seed)
    model = timm.create_model(plan.model, pretrained=False, num_classes=1)
    config = timm.data.resolve_data_config({}, model=model)
    mean, std = torch.tensor(config["mean"]).view(3, 1, 1), torch.tensor(config["std"]).view(3, 1, 1)
    train = pd.read_csv(train_csv)

    class Crops(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(train)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, float]:
            image = Image.open(train_csv.parent / train["path"].iloc[i]).convert("RGB")
            x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
            x = x.flip(-1) if torch.rand(()) < 0.5 else x
            return (x - mean) / std, float(train["label"].iloc[i])

    loader = torch.utils.data.DataLoader(Crops(), batch_size=plan.batch, shuffle=True, num_workers=plan.workers,
                                         drop_last=True, persistent_workers=plan.workers > 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, plan.lr, total_steps=plan.epochs * len(loader))
    data_config = {"input_size": [3, plan.img_size, plan.img_size], "mean": config["mean"], "std": config["std"]}
    best, best_state, losses = -1.0, None, []
    for _ in range(plan.epochs):
        model.train()
        total = 0.0
        for x, y in loader:
            loss = nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach())
        losses.append(total / len(loader))
        auc = float(roc_auc_score(val_frame["label"], scores(model, val_frame, data_config)))
        if auc > best:
            best, best_state = auc, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model, {"clean": best, "final_train_loss": losses[-1], "data_config": data_config}


def ours(train_csv: Path, val_csv: Path, out: Path, plan: LearnPlan, seed: int, level: str
         ) -> tuple[nn.Module, dict]:
    """train_stage2_effnet.py as a user runs it: only the model, budget, data and --aug are set."""
    train_stage2_effnet.main([
        "--train-manifest", str(train_csv), "--val-manifest", str(val_csv), "--model", plan.model,
        "--no-pretrained", "--img-size", str(plan.img_size), "--epochs", str(plan.epochs),
        "--batch-size", str(plan.batch), "--lr", str(plan.lr), "--workers", str(plan.workers), "--aug", level,
        "--seed", str(seed), "--output-dir", str(out), "--overwrite", "--log-every", "1000000", *plan.flags,
    ])
    best = load_checkpoint(out / "best.pt")
    history = pd.read_csv(out / "metrics.csv")
    figures = {"clean": float(best["metrics"]["auc"]), "final_train_loss": float(history["train_loss"].iloc[-1]),
               "data_config": best["data_config"]}
    return model_from_checkpoint(best), figures


# --------------------------------------------------------------------------- the run
def run_learn(plan: LearnPlan, work: Path) -> dict[str, Any]:
    """Every run of the plan; returns per-run figures and the per-case summary over seeds."""
    train_csv, val_csv = artefact_dataset(work / "artefacts", plan.n_train, plan.n_val, plan.img_size)
    val_frame = read_manifest(val_csv)
    perturbations = parse_perturbations(plan.perturbations)
    runs = []
    for seed in plan.seeds:
        cases = [(PLAIN, lambda s=seed: plain_loop(train_csv, val_frame, plan, s))]
        cases += [(f"ours --aug {level}", lambda s=seed, lv=level: ours(
            train_csv, val_csv, work / "runs" / f"{lv}_{s}", plan, s, lv)) for level in plan.levels]
        for case, train in cases:
            t0 = time.perf_counter()
            model, figures = train()
            figures.update(robustness(model, val_frame, figures.pop("data_config"), perturbations))
            runs.append({"case": case, "seed": seed, "seconds": round(time.perf_counter() - t0, 1), **figures})
            print(f"  {case:<28} seed {seed}: clean AUC {figures['clean']:.4f}, perturbed {figures['perturbed']:.4f}"
                  f" ({runs[-1]['seconds']:.0f} s)", flush=True)
    return {"plan": asdict(plan), "runs": runs, "summary": summarise(runs, [p.name for p in perturbations])}


def summarise(runs: list[dict[str, Any]], perturbation_names: list[str]) -> list[dict[str, Any]]:
    frame = pd.DataFrame(runs)
    columns = ["clean", "perturbed", *perturbation_names, "final_train_loss"]
    plain_clean = frame.loc[frame["case"] == PLAIN, "clean"].mean()
    out = []
    for case, group in frame.groupby("case", sort=False):
        row = {"case": case, "seeds": len(group)}
        for column in columns:
            row[column] = float(group[column].mean())
            row[f"{column}_sd"] = float(group[column].std(ddof=0))
        row["clean_vs_plain"] = row["clean"] / plain_clean
        out.append(row)
    return out


def markdown(result: dict[str, Any]) -> str:
    plan, summary = result["plan"], result["summary"]
    names = [p.name for p in parse_perturbations(plan["perturbations"])]
    lines = [
        f"{plan['model']} (random init), {plan['img_size']}px, {plan['n_train']} train / {plan['n_val']} val "
        f"artefact crops, {plan['epochs']} epochs, batch {plan['batch']}, lr {plan['lr']:g}, "
        f"{plan['workers']} workers; mean (sd) over seeds {', '.join(map(str, plan['seeds']))}",
        "",
        f"| run | clean AUC | vs plain | perturbed AUC | {' | '.join(names)} | train loss, last epoch |",
        f"|---|---:|---:|---:|{'---:|' * len(names)}---:|",
    ]
    for r in summary:
        cells = [f"{r['clean']:.4f} ({r['clean_sd']:.3f})", f"{r['clean_vs_plain']:.3f}x",
                 f"{r['perturbed']:.4f} ({r['perturbed_sd']:.3f})", *(f"{r[n]:.3f}" for n in names),
                 f"{r['final_train_loss']:.3f}"]
        lines.append(f"| {r['case']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--levels", default=",".join(AUG_LEVELS), help="--aug levels of our trainer to run")
    parser.add_argument("--epochs", type=int, default=LearnPlan.epochs)
    parser.add_argument("--json", default="output/learn.json", help="results; a Markdown table beside it (.md)")
    parser.add_argument("--work-dir", help="keep data and runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    unknown = set(args.levels.split(",")) - set(AUG_LEVELS)
    if unknown:
        parser.error(f"--levels: unknown {', '.join(sorted(unknown))} (choose from {', '.join(AUG_LEVELS)})")
    return args


def plan_from_args(args: argparse.Namespace) -> LearnPlan:
    return LearnPlan(seeds=tuple(int(s) for s in args.seeds.split(",")), levels=tuple(args.levels.split(",")),
                     epochs=args.epochs)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    plan = plan_from_args(args)
    default = TrainConfig().aug
    print(f"learnability: {plan}; the trainer's default --aug is {default}", flush=True)
    with tempfile.TemporaryDirectory(prefix="learn_") as tmp:
        work = Path(args.work_dir or tmp)
        result = run_learn(plan, work)
    # the machine decides what --amp auto means for our runs (bf16 only with native CPU bf16)
    result.update(default_aug=default, machine=machine())
    table = markdown(result)
    print(table)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()

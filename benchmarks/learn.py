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

Real mode (``--train-manifest``): the shortcut audit of every set first, then the plain loop against ours on any
labelled manifests, each best model scored on every ``--cross`` set. From scratch such sets need a GPU budget
(a plain loop on 2,000 LFW FaceSwap crops, 64px, 3 CPU epochs: AUC 0.50), so real mode runs with ``--device cuda``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
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

from benchmarks.timing import machine
from benchmarks.traces import TRACES, split_items, write_set
from stage2.commands import train_effnet
from stage2.data.audit import format_audit, shortcut_audit, warn_shortcuts
from stage2.data.dataset import ManifestDataset, collate
from stage2.data.levels import AUG_LEVELS
from stage2.data.manifest import read_manifest
from stage2.data.perturb import Perturbation, parse_perturbations
from stage2.data.transforms import DeviceTransform
from stage2.engine.checkpoint import read_best
from stage2.engine.config import TrainConfig
from stage2.models.families import model_from_checkpoint

PERTURBATIONS = "jpeg:50-70,down:0.5,blur:1.0,noise:0.02"
PLAIN = "plain loop (flip only)"
DEFAULT_AUG = TrainConfig().aug
PROTOCOLS = ("per-type", "held-out")
LEARNT = 0.65  # a type whose plain-loop clean AUC stays below this is not learnt at the budget: not judged
# Real mode's plan where its flags are not given (on a GPU: a larger model and input than the synthetic plan's).
REAL_DEFAULTS = {"model": "resnet18d", "img_size": 128, "batch": 64, "workers": 8}


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
    pretrained_file: str | None = None  # real mode: the same weights for both sides


@dataclass(frozen=True)
class Case:
    """One trainer setting: the plain loop (``flags`` None) or ours with these flags."""

    name: str
    flags: tuple[str, ...] | None


def cases(plan: LearnPlan) -> list[Case]:
    out = [Case(PLAIN, None)]
    out += [Case(f"ours --aug {level}", ("--aug", level)) for level in plan.levels]
    out += [Case(f"ours {name}", flags) for name, flags in plan.variants]
    return out


def default_case(plan: LearnPlan) -> str:
    return f"ours --aug {DEFAULT_AUG}"


# --------------------------------------------------------------------------- scoring
def scores(model: nn.Module, frame: pd.DataFrame, data_config: dict[str, Any],
           perturbation: Perturbation | None = None) -> np.ndarray:
    """Fake logits of ``model`` on ``frame``'s images (resized to its input), optionally perturbed (seed 0)."""
    size = data_config["input_size"][-1]
    device = next(model.parameters()).device
    dataset = ManifestDataset(frame, size, transform=perturbation, seed=0)
    normalise = DeviceTransform(tuple(data_config["mean"]), tuple(data_config["std"])).to(device).eval()
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(dataset), 100):
            batch = collate([dataset[i] for i in range(start, min(start + 100, len(dataset)))])
            out.append(model(normalise(batch.images.to(device))).squeeze(1).float().cpu())
    return torch.cat(out).numpy()


def auc(model: nn.Module, frame: pd.DataFrame, data_config: dict[str, Any],
        perturbation: Perturbation | None = None) -> float:
    return float(roc_auc_score(frame["label"], scores(model, frame, data_config, perturbation)))


def robustness(model: nn.Module, frame: pd.DataFrame, data_config: dict[str, Any],
               perturbations: list[Perturbation]) -> dict[str, float]:
    aucs = {p.name: auc(model, frame, data_config, p) for p in perturbations}
    return {**aucs, "perturbed": statistics.fmean(aucs.values())}


# --------------------------------------------------------------------------- the two trainers
def plain_loop(train: pd.DataFrame, val: pd.DataFrame, plan: LearnPlan, seed: int) -> tuple[nn.Module, dict]:
    """The loop a user writes first. Returns the best-epoch model (by clean val AUC) and its figures."""
    torch.manual_seed(seed)
    pretrained = {"pretrained": True, "pretrained_cfg_overlay": {"file": plan.pretrained_file}} \
        if plan.pretrained_file else {"pretrained": False}
    model = timm.create_model(plan.model, num_classes=1, **pretrained).to(plan.device)
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
    data_config = {"input_size": [3, size, size], "mean": config["mean"], "std": config["std"]}
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
        val_auc = auc(model, val, data_config)
        if val_auc > best:
            best, best_state = val_auc, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model, {"clean": best, "final_train_loss": losses[-1], "data_config": data_config}


def ours(train_csv: Path, val_csv: Path, out: Path, plan: LearnPlan, seed: int, flags: Sequence[str]
         ) -> tuple[nn.Module, dict]:
    """train_stage2_effnet.py as a user runs it: only the model, budget, data and ``flags`` are set."""
    weights = ["--pretrained-file", plan.pretrained_file] if plan.pretrained_file else ["--no-pretrained"]
    train_effnet.main([
        "--train-manifest", str(train_csv), "--val-manifest", str(val_csv), "--model", plan.model, *weights,
        "--img-size", str(plan.img_size), "--epochs", str(plan.epochs), "--batch-size", str(plan.batch),
        "--lr", str(plan.lr), "--workers", str(plan.workers), "--seed", str(seed), "--device", plan.device,
        "--output-dir", str(out), "--overwrite", "--log-every", "1000000", *flags,
    ])
    best = read_best(out / "best.pt")
    history = pd.read_csv(out / "metrics.csv")
    figures = {"clean": float(best.metrics["auc"]), "final_train_loss": float(history["train_loss"].iloc[-1]),
               "data_config": best.data_config}
    return model_from_checkpoint(best.to_dict()).to(plan.device), figures


Scorer = Callable[[nn.Module, dict[str, Any]], dict[str, float]]


def train_cases(plan: LearnPlan, train_csv: Path, val_csv: Path, work: Path, score: Scorer, **tags: str
                ) -> list[dict[str, Any]]:
    """Every case of the plan on every seed, each best model then scored by ``score``; one row per run."""
    train, val = read_manifest(train_csv), read_manifest(val_csv)
    runs = []
    for seed in plan.seeds:
        for case in cases(plan):
            t0 = time.perf_counter()
            if case.flags is None:
                model, figures = plain_loop(train, val, plan, seed)
            else:
                folder = work / "runs" / "_".join([*tags.values(), case.name.replace(" ", ""), str(seed)])
                model, figures = ours(train_csv, val_csv, folder, plan, seed, case.flags)
            figures.update(score(model, figures.pop("data_config")))
            row = {**tags, "case": case.name, "seed": seed, "seconds": round(time.perf_counter() - t0, 1), **figures}
            runs.append(row)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in figures.items() if k in ("clean", "perturbed", "held_out"))
            print(f"  {' '.join(tags.values())} {case.name:<28} seed {seed}: {shown} ({row['seconds']:.0f} s)",
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
                            lambda model, dc, v=val: robustness(model, v, dc, perturbations), type=trace)
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
                            lambda model, dc, t=test: {"held_out": auc(model, t, dc)}, type=held)
    summary = summarise(runs, ["clean", "held_out", "final_train_loss"])
    return {"protocol": "held-out", "plan": asdict(plan), "runs": runs, "summary": summary}


def run_real(plan: LearnPlan, train_csv: Path, val_csv: Path, crosses: dict[str, Path], work: Path
             ) -> dict[str, Any]:
    """The shortcut audit of every set, then every case of the plan, each best model scored on every cross set."""
    frames = {"train": read_manifest(train_csv, require_both_classes=True),
              "val": read_manifest(val_csv, require_both_classes=True),
              **{name: read_manifest(path, require_both_classes=True) for name, path in crosses.items()}}
    audit = shortcut_audit(frames, workers=max(plan.workers, 1))
    print("shortcut audit (file headers only; AUC of each feature alone, real vs fake):\n" + format_audit(audit))
    for line in warn_shortcuts(audit):
        print(f"warning: {line}")

    def score(model: nn.Module, dc: dict[str, Any]) -> dict[str, float]:
        return {f"cross:{name}": auc(model, frames[name], dc) for name in crosses}

    runs = train_cases(plan, train_csv, val_csv, work, score, type="real")
    summary = summarise(runs, ["clean", *(f"cross:{name}" for name in crosses), "final_train_loss"])
    return {"protocol": "real", "plan": asdict(plan), "sets": {k: str(v) for k, v in
                                                               {"train": train_csv, "val": val_csv, **crosses}.items()},
            "audit": audit.to_dict("records"), "runs": runs, "summary": summary}


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several of the same protocol and budget (e.g. types or seeds run in parallel)."""
    first = results[0]
    keep = {k: v for k, v in first["plan"].items() if k not in ("types", "seeds", "held_out")}
    for other in results[1:]:
        if other["protocol"] != first["protocol"] or {k: other["plan"][k] for k in keep} != keep:
            raise ValueError("--merge: the results differ in protocol or plan (beyond types and seeds)")
    runs = [run for result in results for run in result["runs"]]
    keys = [(r["type"], r["case"], r["seed"]) for r in runs]
    if len(set(keys)) < len(keys):
        raise ValueError("--merge: the results share runs (the same type, case and seed)")
    types = list(dict.fromkeys(r["type"] for r in runs))
    plan = {**first["plan"], "types": types if first["protocol"] == "per-type" else first["plan"]["types"],
            "held_out": types if first["protocol"] == "held-out" else [], "seeds": sorted({r["seed"] for r in runs})}
    columns = [k for k in first["summary"][0] if k not in ("type", "case", "seeds")
               and not k.endswith(("_sd", "_vs_plain"))]
    summary = summarise(runs, columns)
    merged = {**first, "plan": plan, "runs": runs, "summary": summary}
    if first["protocol"] == "per-type":
        merged["verdict"] = verdict(summary, f"ours --aug {first.get('default_aug', DEFAULT_AUG)}")
    return merged


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
            row[column] = float(group[column].mean())
            row[f"{column}_sd"] = float(group[column].std(ddof=0))
        for column in ratios:
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
        crosses = [k for k in summary[0] if k.startswith("cross:") and not k.endswith("_sd")]
        lines += ["| run | val AUC | " + " | ".join(c.removeprefix("cross:") + " AUC" for c in crosses) + " |",
                  f"|---|---:|{'---:|' * len(crosses)}"]
        lines += [f"| {r['case']} | {r['clean']:.4f} ±{r['clean_sd']:.3f} | "
                  + " | ".join(f"{r[c]:.4f} ±{r[c + '_sd']:.3f}" for c in crosses) + " |" for r in summary]
    return "\n".join(lines) + "\n"


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


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="per-type", help="synthetic protocol")
    parser.add_argument("--types", type=_names(TRACES), default=TRACES,
                        help=f"comma-separated trace types (default: all of {', '.join(TRACES)})")
    parser.add_argument("--hold-out", type=_names(TRACES), default=(),
                        help="held-out protocol: hold out only these types, in turn (default: each of --types)")
    parser.add_argument("--seeds", type=_seeds, default=(0, 1, 2), help="comma-separated seeds")
    parser.add_argument("--levels", type=_names(AUG_LEVELS),
                        help="--aug levels of our trainer (default: every level per type; the default level in "
                             "the held-out protocol and real mode)")
    parser.add_argument("--variant", type=_variant, action="append", default=[], metavar="NAME=FLAGS",
                        help="also run ours with these extra flags, e.g. 'no drop-path=--drop-path 0' (repeatable)")
    parser.add_argument("--epochs", type=int, default=LearnPlan.epochs)
    parser.add_argument("--n-train", type=int, default=LearnPlan.n_train, help="synthetic train crops per set")
    parser.add_argument("--n-val", type=int, default=LearnPlan.n_val, help="synthetic val crops per set")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--json", default="output/learn.json", help="results; a Markdown table beside it (.md)")
    parser.add_argument("--work-dir", help="keep data and runs here (default: a temporary folder)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="only combine these results (same protocol and budget) into --json and its table")
    real = parser.add_argument_group("real mode: labelled manifests instead of the synthetic traces")
    real.add_argument("--train-manifest", type=Path, help="train on this manifest (path,label[,...])")
    real.add_argument("--val-manifest", type=Path, help="select the best epoch on this one")
    real.add_argument("--cross", type=_cross, action="append", default=[], metavar="NAME=MANIFEST",
                      help="also score each best model on this set (repeatable)")
    real.add_argument("--device", default="cpu", help="cpu or cuda; real mode needs cuda")
    real.add_argument("--model", default=None, help="timm model (synthetic: resnet10t; real: resnet18d)")
    real.add_argument("--img-size", type=int, help="input size (synthetic: 64; real: 128)")
    real.add_argument("--batch", type=int, help="batch size (synthetic: 32; real: 64)")
    real.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    real.add_argument("--workers", type=int, help="loader workers (synthetic: 0; real: 8)")
    real.add_argument("--pretrained-file", help="real mode: start both sides from these timm weights")
    args = parser.parse_args(argv)
    if (args.train_manifest is None) != (args.val_manifest is None):
        parser.error("real mode needs both --train-manifest and --val-manifest")
    if args.train_manifest is None and args.cross:
        parser.error("--cross: only in real mode (with --train-manifest and --val-manifest)")
    if args.train_manifest is not None and not args.device.startswith("cuda"):
        parser.error("real mode needs --device cuda: from scratch on a CPU a real set stays at chance for any budget "
                     "that fits here (BENCHMARKS.md, Learnability on real data)")
    if min(args.epochs, args.n_train, args.n_val, args.threads or 1) < 1:
        parser.error("--epochs, --n-train, --n-val and --threads take a positive integer")
    return args


def plan_from_args(args: argparse.Namespace) -> LearnPlan:
    real = args.train_manifest is not None
    per_type = args.protocol == "per-type" and not real
    given = {"model": args.model, "img_size": args.img_size, "batch": args.batch, "lr": args.lr,
             "workers": args.workers, "pretrained_file": args.pretrained_file}
    defaults = REAL_DEFAULTS if real else {}
    chosen = {k: v if v is not None else defaults.get(k) for k, v in given.items()}
    levels = args.levels or (AUG_LEVELS if per_type else (DEFAULT_AUG,))
    return LearnPlan(seeds=args.seeds, epochs=args.epochs, n_train=args.n_train, n_val=args.n_val, levels=levels,
                     types=args.types, held_out=args.hold_out, variants=tuple(args.variant), device=args.device,
                     **{k: v for k, v in chosen.items() if v is not None})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.merge:
        return write_result(merge([json.loads(p.read_text()) for p in args.merge]), Path(args.json))
    plan = plan_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = "real" if args.train_manifest else args.protocol
    print(f"learnability ({mode}): {plan}; the trainer's default --aug is {DEFAULT_AUG}", flush=True)
    with tempfile.TemporaryDirectory(prefix="learn_") as tmp:
        work = Path(args.work_dir or tmp)
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

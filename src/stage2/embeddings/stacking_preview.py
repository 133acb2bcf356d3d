"""A preview of stage three (``feature_extractor.py --example``, ``example()`` at the end): does stacking the experts
beat the better one alone?

The stacker is a logistic regression on a few standardised scores per image: each expert's fake logit (the logit of
its calibrated P(fake)) and, for a generative expert, its reconstruction error. It is scored out of fold: the val
images are split into up to five folds, grouped by ``source_id`` (else ``video_id``) so that frames of one face or
video never sit on both sides, and each fold is predicted by a stacker fitted on the others. Each expert's own
P(fake) is scored on the same images, so the two compare directly. Raw embeddings (1,280-d and up, from a few
hundred val images) are shown for reference: a logistic regression on them fits noise (on a real set: 0.66 against
the expert's own 0.76), which is why the stacker reads scores.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import logit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from stage2.embeddings.extract import FeatureExtractor
from stage2.embeddings.outputs import check_target
from stage2.embeddings.store import FeatureSet, join_features, load_features
from stage2.errors import CheckpointError, FeatureFileError
from stage2.run.files import BEST

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertRun:
    name: str
    folders: tuple[str, ...]  # run folders under the output root, full run first, then the demo's
    command: str  # what writes the demo checkpoint


EFFNET = ExpertRun(
    "effnet", ("stage2_effnet", "stage2_effnet_demo"), "python train_stage2_effnet.py --demo"
)
GENCONVIT = (
    ExpertRun(
        "genconvit_ed",
        ("stage2_genconvit/ed", "stage2_genconvit_demo/ed"),
        "python train_stage2_genconvit.py --demo",
    ),
    ExpertRun(
        "genconvit_vae",
        ("stage2_genconvit/vae", "stage2_genconvit_demo/vae"),
        "python train_stage2_genconvit.py --demo --variant vae",
    ),
)


def find_checkpoints(output_root: Path) -> dict[str, Path]:
    """The EfficientNet checkpoint and every GenConViT one found; a one-line error says what to run if not."""
    found = {run.name: path for run in (EFFNET, *GENCONVIT) if (path := _first_existing(output_root, run))}
    missing = []
    if EFFNET.name not in found:
        missing.append(_missing(output_root, [EFFNET]))
    if not any(run.name in found for run in GENCONVIT):
        missing.append(_missing(output_root, GENCONVIT))
    if missing:
        raise CheckpointError("--example needs both experts: " + "; ".join(missing))
    return found


def _first_existing(root: Path, run: ExpertRun) -> Path | None:
    return next((path for folder in run.folders if (path := root / folder / BEST).is_file()), None)


def _missing(root: Path, runs: tuple[ExpertRun, ...] | list[ExpertRun]) -> str:
    paths = " or ".join(str(root / folder / BEST) for run in runs for folder in run.folders)
    return f"no {paths} (make one with `{runs[0].command}`)"


def out_of_fold(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Out-of-fold P(fake) of a standardised logistic regression on `x`: up to 5 folds, grouped when `groups`."""
    per_class = [len(np.unique(groups[y == c])) if groups is not None else int((y == c).sum()) for c in (0, 1)]
    n_splits = min(5, *per_class)
    if n_splits < 2:
        raise FeatureFileError(
            f"cross-validation needs 2+ {'groups' if groups is not None else 'images'} per class, got {per_class}"
        )
    cv = (
        StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)
        if groups is not None
        else StratifiedKFold(n_splits, shuffle=True, random_state=seed)
    )
    return cross_val_predict(stacker(), x, y, groups=groups, cv=cv, method="predict_proba")[:, 1]


def stacker() -> Pipeline:
    """The preview's stacking model: a logistic regression on standardised inputs."""
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))


def cross_validated_auc(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, seed: int = 0) -> float:
    """AUC of :func:`out_of_fold`'s predictions."""
    return float(roc_auc_score(y, out_of_fold(x, y, groups, seed)))


def fold_groups(source_id: np.ndarray | None, video_id: np.ndarray | None) -> tuple[np.ndarray | None, str | None]:
    """The folds' groups and their column: source_id when every row has one (a fake and the real it was made from
    stay together), else video_id when every row has one, else None (stratified folds)."""
    for name, ids in (("source_id", source_id), ("video_id", video_id)):
        if ids is not None and (ids != "").all():
            return ids, name
    return None, None


def expert_scores(sets: dict[str, FeatureSet]) -> dict[str, np.ndarray]:
    """The stacker's inputs: each expert's fake logit (``NAME``) and a generative one's reconstruction error
    (``NAME recon``)."""
    scores = {}
    for name, s in sets.items():
        # float32 P(fake) is exact to ~6e-8 of 0 or 1: the clip only keeps the logit finite
        scores[name] = logit(np.clip(s.p_fake.astype(np.float64), 1e-7, 1 - 1e-7))
        if s.recon_error is not None:
            scores[f"{name} recon"] = s.recon_error.astype(np.float64)
    return scores


@dataclass(frozen=True)
class PreviewRow:
    name: str
    dims: int
    auc: float
    kind: str  # "expert" (its own P(fake), no fitting), "stack" (out of fold) or "reference" (embeddings)


def stacking_preview(sets: dict[str, FeatureSet], seed: int = 0) -> list[PreviewRow]:
    """Each expert's own AUC, then the out-of-fold AUC of stackers on their scores, then on raw embeddings."""
    joined = join_features(list(sets.values()))
    labels = joined.labels
    groups, _ = fold_groups(joined.source_id, joined.video_id)
    scores = expert_scores(sets)
    rows = [PreviewRow(name, 1, float(roc_auc_score(labels, s.p_fake)), "expert") for name, s in sets.items()]
    stacks = {"stack: " + " + ".join(sets): list(sets)}
    if len(scores) > len(sets):
        stacks["stack: " + " + ".join(scores)] = list(scores)
    for name, columns in stacks.items():
        x = np.stack([scores[c] for c in columns], axis=1)
        rows.append(PreviewRow(name, x.shape[1], cross_validated_auc(x, labels, groups, seed), "stack"))
    rows.append(PreviewRow("embeddings: " + " + ".join(sets), joined.embeddings.shape[1],
                           cross_validated_auc(joined.embeddings, labels, groups, seed), "reference"))
    return rows


def print_preview(sets: dict[str, FeatureSet]) -> list[PreviewRow]:
    """Print (and return) :func:`stacking_preview` of the experts' feature files, as `--example` shows it."""
    rows = stacking_preview(sets)
    first = next(iter(sets.values()))
    _, grouped_by = fold_groups(first.source_id, first.video_id)
    folds = f"folds grouped by {grouped_by}" if grouped_by else "stratified folds: no source_id/video_id on every row"
    best = max((r for r in rows if r.kind == "expert"), key=lambda r: r.auc)
    stack = max((r for r in rows if r.kind == "stack"), key=lambda r: r.auc)
    print(
        f"\nstacking preview on the {len(first.labels)} validation images of {_shown(first.manifest)}:\n"
        f"  expert rows: each expert's own P(fake) (no fitting); stack rows: a logistic regression on the experts'\n"
        f"  scores, out-of-fold ({folds}), on the same images. These images also picked each expert's\n"
        "  checkpoint, so every figure reads a little high: stage three needs a held-out set."
    )
    print(f"{'features':<58} {'dims':>6} {'AUC':>8}")
    for row in rows:
        print(f"{row.name:<58} {row.dims:>6} {row.auc:>8.4f}")
    # The better of the stacks printed above (chosen on these images too: one more reason the figure reads high).
    print(f"best stack ({stack.name.removeprefix('stack: ')}) - best expert ({best.name}): "
          f"{stack.auc - best.auc:+.4f} AUC")
    return rows


def _shown(path: str) -> str:
    """`path` relative to the working folder when it lies below it (feature files record absolute paths)."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def example(output_root: str | Path = "output", features_dir: str | Path = "features", *, overwrite: bool = False,
            **options: Any) -> list[PreviewRow]:
    """Stage three's input, end to end: the validation features of both experts (the EfficientNetV2-B3 run and
    the GenConViT ones found under `output_root`), one feature file each (``NAME_val.npz`` in `features_dir`), then
    a stacking preview. An existing file there is replaced only with `overwrite`, and only a feature file: each
    is checked before the first is written.

    `options` go to FeatureExtractor (device, batch_size, workers, amp).
    """
    checkpoints = find_checkpoints(Path(output_root))  # effnet, genconvit_ed, genconvit_vae
    targets = {name: Path(features_dir) / f"{name}_val.npz" for name in checkpoints}
    for target in targets.values():
        check_target(target, f"--example's feature file {target}", overwrite)
    features = {}
    for name, checkpoint in checkpoints.items():
        fx = FeatureExtractor(checkpoint_path=checkpoint, **options)
        # Each checkpoint records the val manifest it was selected on; all experts' rows are the same images.
        val_manifest, data_root = fx.train_args["val_manifest"], fx.train_args.get("data_root")
        path = fx.extract_to_file(val_manifest, targets[name], data_root)
        features[name] = load_features(path)  # embeddings [N, D], labels, p_fake, paths, video_id, method
        del fx
        gc.collect()  # one expert in memory at a time (the official VAE alone is 2.8 GB)
    return print_preview(features)  # joins the files row for row, checked, and cross-validates a stacker

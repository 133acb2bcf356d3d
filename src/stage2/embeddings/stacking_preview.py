"""A preview of stage three (``feature_extractor.py --example``, ``example()`` at the end): how well the experts'
embeddings separate real from fake, alone and stacked.

The preview fits a logistic regression on standardised embeddings with cross-validation (folds grouped by
video when the manifest has ``video_id``, so frames of one video never sit on both sides of a split) on each
expert alone and on all of them side by side, and prints the out-of-fold AUC of each.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from stage2.embeddings.extract import FeatureExtractor
from stage2.embeddings.store import FeatureSet, join_features, load_features
from stage2.errors import CheckpointError, FeatureFileError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertRun:
    name: str
    candidates: tuple[str, ...]  # best.pt locations under the output root, full run first, then the demo's
    command: str  # what writes the demo checkpoint


EFFNET = ExpertRun(
    "effnet", ("stage2_effnet/best.pt", "stage2_effnet_demo/best.pt"), "python train_stage2_effnet.py --demo"
)
GENCONVIT = (
    ExpertRun(
        "genconvit_ed",
        ("stage2_genconvit/ed/best.pt", "stage2_genconvit_demo/ed/best.pt"),
        "python train_stage2_genconvit.py --demo",
    ),
    ExpertRun(
        "genconvit_vae",
        ("stage2_genconvit/vae/best.pt", "stage2_genconvit_demo/vae/best.pt"),
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
    return next((root / c for c in run.candidates if (root / c).is_file()), None)


def _missing(root: Path, runs: tuple[ExpertRun, ...] | list[ExpertRun]) -> str:
    paths = " or ".join(str(root / c) for run in runs for c in run.candidates)
    return f"no {paths} (make one with `{runs[0].command}`)"


def cross_validated_auc(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, seed: int = 0) -> float:
    """Out-of-fold AUC of a standardised logistic regression; up to 5 folds, grouped when ``groups`` given."""
    per_class = [len(np.unique(groups[y == c])) if groups is not None else int((y == c).sum()) for c in (0, 1)]
    n_splits = min(5, *per_class)
    if n_splits < 2:
        raise FeatureFileError(
            f"cross-validation needs 2+ {'videos' if groups is not None else 'images'} per class, got {per_class}"
        )
    cv = (
        StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)
        if groups is not None
        else StratifiedKFold(n_splits, shuffle=True, random_state=seed)
    )
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    scores = cross_val_predict(model, x, y, groups=groups, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, scores))


def video_groups(video_id: np.ndarray | None) -> np.ndarray | None:
    """The cross-validation groups: the video ids when every row has one, else None (plain stratified folds)."""
    return video_id if video_id is not None and (video_id != "").all() else None


def stacking_preview(sets: dict[str, FeatureSet]) -> list[tuple[str, int, float, float | None]]:
    """Rows ``(name, dims, CV AUC, the expert's own P(fake) AUC or None)`` per expert, then all combined."""
    joined = join_features(list(sets.values()))
    labels = joined.labels
    groups = video_groups(joined.video_id)
    rows = [
        (
            name,
            s.embeddings.shape[1],
            cross_validated_auc(s.embeddings, labels, groups),
            float(roc_auc_score(labels, s.p_fake)),
        )
        for name, s in sets.items()
    ]
    rows.append(
        (" + ".join(sets), joined.embeddings.shape[1], cross_validated_auc(joined.embeddings, labels, groups), None)
    )
    return rows


def print_preview(sets: dict[str, FeatureSet]) -> list[tuple[str, int, float, float | None]]:
    """Print (and return) :func:`stacking_preview` of the experts' feature files, as `--example` shows it."""
    rows = stacking_preview(sets)
    first = next(iter(sets.values()))
    grouped = video_groups(first.video_id) is not None
    folds = "folds grouped by video_id" if grouped else "stratified folds: no video_id on every row"
    print(
        f"\nstacking preview on the {len(first.labels)} validation images of {first.manifest}, the set that picked "
        "each expert's checkpoint:\n"
        f"  CV AUC: a logistic regression on standardised embeddings, out-of-fold ({folds}): cross-validated\n"
        "  expert AUC: the expert's own P(fake) on the same images: in-sample, it selected the checkpoint, so it "
        "reads high\n"
        "  Both use the images that chose the checkpoints: a stage-three estimate needs a held-out set."
    )
    print(f"{'features':<40} {'dims':>6} {'CV AUC (cross-validated)':>25} {'expert AUC (in-sample)':>23}")
    for name, dims, auc, own in rows:
        print(f"{name:<40} {dims:>6} {auc:>25.4f} {'' if own is None else f'{own:.4f}':>23}")
    return rows


def example(output_root: str | Path = "output", features_dir: str | Path = "features", **options: Any) -> list:
    """Stage three's input, end to end: the validation features of both experts (the EfficientNetV2-B3 run and
    the GenConViT ones found under `output_root`), one feature file each, then a stacking preview.

    `options` go to FeatureExtractor (device, batch_size, workers, amp).
    """
    features = {}
    for name, checkpoint in find_checkpoints(Path(output_root)).items():  # effnet, genconvit_ed, genconvit_vae
        fx = FeatureExtractor(checkpoint_path=checkpoint, **options)
        # Each checkpoint records the val manifest it was selected on; all experts' rows are the same images.
        val_manifest, data_root = fx.train_args["val_manifest"], fx.train_args.get("data_root")
        path = fx.extract_to_file(val_manifest, Path(features_dir) / f"{name}_val.npz", data_root)
        features[name] = load_features(path)  # embeddings [N, D], labels, p_fake, paths, video_id, method
        del fx
        gc.collect()  # one expert in memory at a time (the official VAE alone is 2.8 GB)
    return print_preview(features)  # joins the files row for row, checked, and cross-validates a stacker

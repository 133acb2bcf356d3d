"""Scoring a model on a labelled set (a run's val set, or an --evaluate manifest): sharded over ranks, gathered in
dataset order, the same for any number of ranks; and the report a run and each --evaluate manifest end with."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from stage2.atomic import write_text_atomic
from stage2.data.dataset import collate
from stage2.data.manifest import LABEL_NAMES, read_manifest
from stage2.data.perturb import Perturbation
from stage2.data.preprocessing import DataConfig
from stage2.data.transforms import DeviceTransform
from stage2.errors import ConfigError, TrainingDiverged
from stage2.experts.base import Expert
from stage2.processes import usable_cores
from stage2.run.checkpoint import last_good_note
from stage2.run.config import TrainConfig
from stage2.run.device import autocast, memory_format, scoring_dtype
from stage2.run.distributed import DistInfo, broadcast_buffers, gather_by_index, gather_objects
from stage2.run.folder import BadImages
from stage2.run.loaders import val_loader
from stage2.scoring.metrics import binary_metrics, metric_direction, operating_points, unresolved_targets, video_scores
from stage2.scoring.tables import format_report

log = logging.getLogger("stage2")


@dataclass
class EvalResult:
    """Validation outputs in dataset order; `seen` is False for images skipped as undecodable."""

    seen: np.ndarray
    labels: np.ndarray
    logits: np.ndarray
    terms: dict[str, np.ndarray]


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


class Evaluator:
    """A labelled set (a run's val manifest by default; checked and decoded once up front) and how a model is
    scored on it.

    `frame` is the manifest as read already, if it was. `perturbation` (stage2.data.perturb) scores perturbed
    copies of the images instead. `last` is the run's last.pt, named in the message if the model turns out to give
    non-finite scores.
    """

    def __init__(self, cfg: TrainConfig, expert: Expert, dist: DistInfo, data_config: DataConfig, *,
                 bad_images: BadImages, manifest: str | None = None, frame: pd.DataFrame | None = None,
                 perturbation: Perturbation | None = None, last: Path | None = None) -> None:
        self.cfg, self.expert, self.dist, self.last = cfg, expert, dist, last
        self.device = dist.device
        self.manifest = manifest or cfg.val_manifest
        self.frame = read_manifest(self.manifest, cfg.data_root, require_both_classes=True) if frame is None else frame
        self.normalise = DeviceTransform(data_config.mean, data_config.std).to(self.device).eval()
        self.loader = val_loader(cfg, self.frame, data_config.size, dist, min(cfg.workers, usable_cores()),
                                 perturbation)
        self.amp_dtype = scoring_dtype(self.device, cfg.amp != "off")
        self.bad_images = bad_images
        self.decoded = self.frame  # the rows whose images decode: all of them, or what _check_images finds
        if perturbation is None:
            self._check_images()

    def _check_images(self) -> None:
        """Decode every val image once (a cache build has already), so that a corrupt one stops the run now
        (naming it) rather than after a whole training epoch; with --skip-bad-images they are listed instead, and
        what is left must still hold both classes."""
        cache = self.loader.dataset.cache
        if cache is not None:
            decodable = cache.slots >= 0
        else:
            rows = [i for batch in self.loader for i in batch.skipped.tolist()]
            skipped = gather_objects(rows)  # every rank's, so that every rank takes the same decisions below
            if skipped:
                self.bad_images.note("val", self.frame, rows)
            decodable = np.ones(len(self.frame), dtype=bool)
            decodable[skipped] = False
        self.decoded = self.frame[decodable]
        for label, name in LABEL_NAMES.items():
            if not (self.decoded["label"] == label).any():
                raise ConfigError(f"{self.manifest}: none of its {name} images could be decoded (skipped with "
                                  "--skip-bad-images): validation needs both classes")

    def check_select_metric(self, name: str) -> None:
        """Refuse, before training, a --select-metric this val set does not give: `auc/<method>` for a method
        without a decodable fake, video_* without video ids, a train-side name."""
        # The names binary_metrics gives for these rows (whatever the scores: these are placeholders).
        available = {*_frame_metrics(self.decoded, self.decoded["label"].to_numpy(),
                                     np.full(len(self.decoded), 0.5)), "val_loss"}
        if name not in available:
            selectable = sorted(m for m in available if _has_direction(m))
            raise ConfigError(f"--select-metric {name}: not a metric of {self.manifest} (choose from "
                              f"{', '.join(selectable)})")

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the normalised batch the model takes, on the device."""
        x = self.normalise(images.to(self.device, non_blocking=True))
        return memory_format(x, self.cfg.channels_last)

    def evaluate(self, model: nn.Module, when: str = "") -> EvalResult:
        """Run the whole val set (sharded over ranks) and gather it in dataset order on every rank.

        Every rank scores rank 0's weights *and* buffers (BatchNorm statistics drift apart between DDP ranks
        during an epoch), so the metrics describe exactly the model rank 0 saves. `when` names the moment in
        a divergence message.
        """
        broadcast_buffers(model)
        model.eval()
        names: list[str] = []
        indices, rows = [], []
        with torch.inference_mode(), autocast(self.device, self.amp_dtype):
            for batch in self.loader:
                if batch.labels.numel() == 0:
                    continue
                labels = batch.labels.to(self.device, non_blocking=True)
                x = self.prepare(batch.images)
                outputs = model(x)
                terms = {**self.expert.loss(outputs, x, labels), **self.expert.sample_metrics(outputs, x)}
                names = list(terms)
                logit = self.expert.family.fake_logit(outputs)
                columns = [labels.float(), logit.float(), *(terms[k].float() for k in names)]
                indices.append(batch.indices.to(self.device))
                rows.append(torch.stack(columns, dim=1))
        if not rows:
            raise ConfigError(f"{self.manifest}: no validation image could be decoded")
        seen, gathered = gather_by_index(torch.cat(indices), torch.cat(rows), len(self.frame))
        seen_np, values = seen.cpu().numpy(), gathered.cpu().numpy()
        if not np.isfinite(values[seen_np, 1]).all():
            note = f"; {last_good_note(self.last)}" if self.last else ""
            raise TrainingDiverged(f"non-finite validation scores {when}: stopped{note}")
        return EvalResult(seen=seen_np, labels=values[:, 0].astype(np.int64), logits=values[:, 1],
                          terms={k: values[:, 2 + i] for i, k in enumerate(names)})

    def metrics(self, result: EvalResult) -> dict[str, float]:
        s = result.seen
        labels = result.labels[s]
        metrics = _frame_metrics(self.frame[s], labels, sigmoid(result.logits[s]))
        for name, values in result.terms.items():
            metrics[f"val_{name}"] = float(values[s].mean())
        for name in self.expert.per_class_terms:
            values = result.terms[name][s]
            metrics[f"val_{name}_real"] = float(values[labels == 0].mean())
            metrics[f"val_{name}_fake"] = float(values[labels == 1].mean())
        metrics["val_skipped"] = float((~s).sum())
        return metrics

    @functools.cached_property
    def fixed_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same four val images of each class every epoch (grid_rows: different videos), normalised, for visual
        artefacts."""
        batch = collate([self.loader.dataset[i] for i in grid_rows(self.frame)])
        return self.prepare(batch.images), batch.labels


def grid_rows(frame: pd.DataFrame, per_class: int = 4) -> list[int]:
    """Rows of `frame` for a grid of `per_class` reals then `per_class` fakes that shows different faces: one per
    video (`video_id`, else `source_id`, where a row has one), spread over the set; a second frame of a video only
    when the class has fewer videos. The first rows of a manifest are often frames of one video."""
    column = "video_id" if "video_id" in frame else "source_id" if "source_id" in frame else None
    ids = frame[column].to_numpy(dtype=str) if column else np.full(len(frame), "")
    rows = []
    for label in (0, 1):
        members = np.flatnonzero(frame["label"].to_numpy() == label)
        keys = [key or f"row {row}" for key, row in zip(ids[members], members)]  # no id: a face of its own
        nth = pd.Series(keys).groupby(keys, sort=False).cumcount().to_numpy()  # 0: a video's first row here
        order = np.lexsort((np.arange(len(members)), nth))  # every video's first row in set order, then seconds...
        firsts = int((nth == 0).sum())
        picked = order[np.linspace(0, firsts - 1, per_class).round().astype(int)] if firsts >= per_class \
            else order[:per_class]
        rows += members[picked].tolist()
    return rows


def final_report(frame: pd.DataFrame, result: EvalResult, metrics: dict[str, float], temperature: float,
                 predictions: Path, *, title: str, calibrated: bool) -> dict[str, Any]:
    """The end of a training run and of each --evaluate manifest: write `predictions` (the decoded rows of `frame`
    with P(fake) raw and calibrated), print the metrics table, and return the operating points on calibrated
    P(fake) (`calibrated`: whether `temperature` was fitted; the table says which P(fake) they are on)."""
    seen = result.seen
    p_fake = sigmoid(result.logits / temperature)
    points = calibrated_operating_points(result.labels[seen], p_fake[seen], frame[seen])
    rows = frame.assign(p_fake=sigmoid(result.logits), p_fake_calibrated=p_fake)[seen]
    write_text_atomic(predictions, rows.to_csv(index=False))
    log.info("\n%s", format_report(metrics, points, title=title, calibrated=calibrated))
    return points


def video_level(labels: np.ndarray, p_fake: np.ndarray, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    """(video labels, mean P(fake) per video) when every row of `frame` has a video_id, else None."""
    if "video_id" not in frame or not (frame["video_id"] != "").all():
        return None
    _, v_labels, v_probs = video_scores(labels, p_fake, frame["video_id"].to_numpy())
    return v_labels, v_probs


def _frame_metrics(frame: pd.DataFrame, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """binary_metrics with the video ids and methods of the manifest rows, where it has them."""
    return binary_metrics(labels, probs, video_ids=frame["video_id"].tolist() if "video_id" in frame else None,
                          methods=frame["method"].tolist() if "method" in frame else None)


def _has_direction(name: str) -> bool:
    try:
        metric_direction(name)
    except ValueError:
        return False
    return True


def calibrated_operating_points(labels: np.ndarray, p_fake: np.ndarray, frame: pd.DataFrame) -> dict[str, Any]:
    """Frame- and video-level operating points on calibrated P(fake): the thresholds a cascade applies.

    Each level also holds `n_real` and `below_resolution`: the FPR targets finer than one of its reals
    (84 reals: 1% and 0.1% are both the 0% FPR point), whose TPR and threshold say nothing about that rate.
    """
    levels = {"frame": (labels, p_fake)}
    if (video := video_level(labels, p_fake, frame)) is not None:
        levels["video"] = video
    points: dict[str, Any] = {}
    for level, (y, p) in levels.items():
        n_real = int((y == 0).sum())
        points[level] = {**operating_points(y, p), "n_real": n_real, "below_resolution": unresolved_targets(n_real)}
    return points

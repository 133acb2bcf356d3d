"""``--evaluate``: a checkpoint scored on every --val-manifest (and under each --perturb perturbation); nothing is
trained. The third run mode, beside training (stage2.engine.trainer) and --audit-only (stage2.engine.audit_only).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from stage2.atomic import staging_dir, write_json_atomic, write_text_atomic
from stage2.data.audit import run_audit
from stage2.data.perturb import check_image_size, parse_perturbations
from stage2.errors import ConfigError
from stage2.experts.base import Expert
from stage2.models.families import model_from_checkpoint
from stage2.processes import usable_cores
from stage2.run.checkpoint import BestCheckpoint, read_best
from stage2.run.config import TrainConfig
from stage2.run.distributed import DistInfo
from stage2.run.files import BAD_IMAGES, EVAL_SUMMARY, check_output_dir, eval_outputs, evaluation_files_in, report_names
from stage2.run.folder import BadImages
from stage2.run.logs import setup_logging
from stage2.scoring.evaluator import EvalResult, Evaluator, final_report
from stage2.scoring.plots import plot_robustness
from stage2.scoring.tables import tpr_footnote

log = logging.getLogger("stage2")

HEADLINE = ("n", "auc", "ap", "eer", "tpr_at_fpr_1pct", "tpr_at_fpr_0.1pct", "log_loss", "video_auc", "video_eer")


def evaluate_checkpoint(cfg: TrainConfig, expert: Expert, dist: DistInfo, *, threads: str = ""
                        ) -> dict[str, Any] | None:
    """--evaluate: a checkpoint on every --val-manifest (and under each --perturb perturbation).

    The model and its loss are the checkpoint's (its family's meta, data config and its run's loss flags), not the
    command's. Per manifest NAME: eval_NAME.json (metrics; operating points on calibrated P(fake), or raw where the
    checkpoint holds no fitted temperature, `temperature_fitted`; its shortcut audit),
    predictions_NAME.csv (path, label, video_id, method, P(fake) raw and calibrated) and, with --perturb,
    robustness_NAME.csv and .png; then eval_summary.csv across manifests and shortcut_audit.csv. Existing files
    are never replaced without --overwrite; with it, the previous evaluation's files are all replaced, once this
    one's are written.
    Returns {name: metrics} on rank 0. `threads`: what `cpu_threads` chose, said first.
    """
    out = Path(cfg.output_dir)
    setup_logging(None, dist.is_main)
    if threads:
        log.info("device %s, %s", dist.device, threads)
    path = Path(cfg.evaluate_checkpoint)
    manifests = cfg.eval_manifests or [cfg.val_manifest]
    names = report_names(manifests)
    check_output_dir(cfg)  # the commands checked already, before importing torch; this is for callers of run()
    perturbations = parse_perturbations(cfg.perturb) if cfg.perturb is not None else []
    checkpoint = read_best(path)
    data_config = checkpoint.data_config
    _check_model(checkpoint, path, cfg, expert)
    expert = expert.for_checkpoint(data_config, checkpoint.args.get("cli_args", {}))
    if not checkpoint.temperature_fitted:
        log.warning("--evaluate %s: no fitted temperature (a run fits best.pt's when it ends; last.pt's never is): "
                    "P(fake) and its operating points are uncalibrated", path)
    check_image_size(perturbations, data_config.size)
    bad_images = BadImages(out, dist.is_main, cfg.max_bad_images)
    # Every manifest is read and decoded before the first report is written: a bad second one costs nothing.
    evaluators = [Evaluator(cfg, expert, dist, data_config, bad_images=bad_images, manifest=manifest)
                  for manifest in manifests]
    model = model_from_checkpoint(checkpoint.to_dict()).to(dist.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    # The reports are written into a folder of their own, then moved in place of the previous evaluation's (an
    # --overwrite): the folder holds one evaluation, whole, and a failed one leaves the previous one as it was.
    work = staging_dir(out / "reports") if dist.is_main else out
    try:
        if dist.is_main:  # what the file headers alone give away about each set's labels
            audit = run_audit({name: e.frame for name, e in zip(names, evaluators)}, work,
                              min(cfg.workers, usable_cores()))
        results, rows, notes = {}, [], []
        for manifest, name, evaluator in zip(manifests, names, evaluators):
            result = evaluator.evaluate(model)
            metrics = evaluator.metrics(result)
            robustness = [{"perturbation": "none", **_headline(metrics)}]
            for perturbation in perturbations:
                perturbed = Evaluator(cfg, expert, dist, data_config, bad_images=bad_images, manifest=manifest,
                                      perturbation=perturbation)
                robustness.append({"perturbation": perturbation.name,
                                   **_headline(perturbed.metrics(perturbed.evaluate(model)))})
            if not dist.is_main:
                continue
            points = _write_reports(work, name, manifest, checkpoint, path, evaluator, result, metrics,
                                    audit[audit["set"] == name], robustness if perturbations else None)
            results[name] = metrics
            rows.append({"manifest": name, **_headline(metrics)})
            notes.append(tpr_footnote(points, f"{name}: "))
        if not dist.is_main:
            return None
        _write_summary(cfg, work, pd.DataFrame(rows), notes)
        _replace_reports(out, work, keep_bad_images=any(bad_images.found.values()))
    finally:
        if dist.is_main:
            shutil.rmtree(work, ignore_errors=True)
    # GenConViT's go into OUTPUT_DIR/<variant>, as its training runs do: say where.
    written = [name for name in eval_outputs(cfg) if (out / name).exists()]
    log.info("--evaluate: reports in %s: %s", out, ", ".join(written))
    return results


def _replace_reports(out: Path, work: Path, *, keep_bad_images: bool) -> None:
    """The reports built in `work` in place of any earlier evaluation's in `out` (which only --overwrite allows):
    the earlier files this one does not write are removed, then each new one is renamed over its namesake.
    bad_images.txt, which the evaluation writes in `out` as it finds them, stays when it found some."""
    new = {path.name for path in work.iterdir()}
    for old in evaluation_files_in(out):
        if old.name not in new and not (old.name == BAD_IMAGES and keep_bad_images):
            old.unlink()
    for name in sorted(new):
        os.replace(work / name, out / name)


def _check_model(checkpoint: BestCheckpoint, path: Path, cfg: TrainConfig, expert: Expert) -> None:
    """Refuse a checkpoint of another family or variant than the command evaluates; the model flags given
    (`cfg.model_flags`) that ask for another model, input size or loss than its run's are said not to apply."""
    meta = expert.checkpoint_meta()
    for key in ("family", "variant"):
        if checkpoint.meta.get(key) != meta.get(key):
            raise ConfigError(f"--evaluate {path}: holds {checkpoint.meta.get('model_name', 'no model')} "
                              f"({key} {checkpoint.meta.get(key)!r}); this run evaluates {key} {meta.get(key)!r}")
    recorded = checkpoint.args.get("cli_args", {})
    ignored = [flag for dest, flag in cfg.model_flags.items() if recorded.get(dest) != cfg.cli_args.get(dest)]
    if ignored:
        log.info("--evaluate %s: scoring the model it holds, %s, with its run's loss; this command's %s (%s) do not "
                 "apply", path, _model_words(checkpoint.meta, checkpoint.data_config.size), ", ".join(ignored),
                 _model_words(meta, cfg.img_size))


def _write_reports(out: Path, name: str, manifest: str, checkpoint: BestCheckpoint, path: Path, evaluator: Evaluator,
                   result: EvalResult, metrics: dict[str, float], audit: pd.DataFrame,
                   robustness: list[dict[str, Any]] | None) -> dict[str, Any]:
    """One manifest's predictions_NAME.csv, eval_NAME.json and, with `robustness` (--perturb), its table and plot;
    returns its frame-level operating points."""
    out.mkdir(parents=True, exist_ok=True)
    temperature, fitted = checkpoint.temperature, checkpoint.temperature_fitted
    points = final_report(evaluator.frame, result, metrics, temperature, out / f"predictions_{name}.csv",
                          title=f"{path} on {manifest}", calibrated=fitted)
    report = {"checkpoint": str(path), "manifest": str(manifest), "temperature": temperature,
              "temperature_fitted": fitted, "metrics": metrics, "operating_points": points,
              "shortcut_audit": audit.to_dict("records")}
    write_json_atomic(out / f"eval_{name}.json", report)
    frame_points = points["frame"]
    if robustness is not None:
        table = pd.DataFrame(robustness)
        write_text_atomic(out / f"robustness_{name}.csv", table.to_csv(index=False))
        plot_robustness(table, out / f"robustness_{name}.png", title=f"{checkpoint.meta.get('model_name')} on {name}",
                        n_real=frame_points["n_real"])
        log.info("\nrobustness on %s:\n%s%s", name, table.to_string(index=False, float_format="%.4f"),
                 tpr_footnote(frame_points))
    return frame_points


def _write_summary(cfg: TrainConfig, work: Path, summary: pd.DataFrame, notes: list[str]) -> None:
    """eval_summary.csv (into `work`), the table across manifests, with the footnotes of each."""
    write_text_atomic(work / EVAL_SUMMARY, summary.to_csv(index=False))
    log.info("\n%s across manifests:\n%s%s", cfg.evaluate_checkpoint,
             summary.to_string(index=False, float_format="%.4f"), "".join(notes))


def _model_words(meta: dict[str, Any], size: int) -> str:
    kwargs = f" {meta['model_kwargs']}" if meta.get("model_kwargs") else ""
    return f"{meta.get('model_name')}{kwargs} at {size}px"


def _headline(metrics: dict[str, float]) -> dict[str, float]:
    return {key: metrics[key] for key in HEADLINE if key in metrics}

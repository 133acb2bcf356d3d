"""The names of what a training run, an --evaluate and an --audit-only write into their folder, one kind per
folder, and the refusal to replace it without --overwrite. The one place that spells a run's file names; the
checkpoints themselves are written by stage2.run.saver.

Torch-free, like the parsers: the commands check the output folder right after parsing, so a folder that is
already taken is refused at once, not after the half minute that importing torch and building the model take.
"""

from __future__ import annotations

import os
from pathlib import Path

from stage2.errors import ConfigError
from stage2.run.config import TrainConfig

BEST = "best.pt"  # the best epoch's weights (by --select-metric), calibrated: what scoring and extraction read
LAST = "last.pt"  # everything a resume needs
METRICS = "metrics.csv"
SUMMARY = "summary.json"
ARGS = "args.json"  # the run's flags, replayable with --config
TRAIN_LOG = "train.log"
ROC, CURVES, PREDICTIONS = "roc.png", "curves.png", "val_predictions.csv"
BAD_IMAGES = "bad_images.txt"
TENSORBOARD = "tensorboard"
# The shortcut audit's table: stage2.data.audit.AUDIT_FILE, named here too because that module loads pandas, PIL
# and scikit-learn, which the commands do not import before they have parsed their flags and checked this folder.
AUDIT_FILE = "shortcut_audit.csv"
# GenConViT's per-epoch reconstruction grids (stage2.experts.genconvit writes them).
RECON_SAMPLES = "recon_samples"
EVAL_SUMMARY = "eval_summary.csv"  # --evaluate's table across its manifests

# The files of a run; a folder holds one (that --overwrite must be asked to replace) once it holds a checkpoint:
# what a run that failed before its first one left (args.json, train.log) is replaced by the next run as it starts.
RUN_FILES = (BEST, LAST, METRICS, SUMMARY, ARGS)
CHECKPOINTS = (BEST, LAST)
# Where a run starting in a folder sets aside what was there (an --overwrite's previous run): put back if the new
# run fails before writing its last.pt (or is killed: the next run in the folder puts it back), removed once it has.
REPLACED = ".replaced"
# Everything a run writes into its folder; --overwrite removes exactly these.
RUN_OUTPUTS = (*RUN_FILES, TRAIN_LOG, ROC, CURVES, PREDICTIONS, BAD_IMAGES, RECON_SAMPLES, TENSORBOARD, AUDIT_FILE)


# What a folder holds, told by its files; checked in this order (a training run writes a summary.json too). A folder
# holds one kind: another command's files beside a run's would mix two things in one folder (an --audit-only
# replaced a run's summary.json, an --evaluate its shortcut_audit.csv), so another kind is refused, --overwrite
# or not.
KINDS = {"training": (BEST, LAST, METRICS, ARGS),
         "evaluate": (EVAL_SUMMARY, "eval_*.json", "predictions_*.csv"),
         "audit": (SUMMARY,)}
KIND_NAMES = {"training": "a training run", "evaluate": "--evaluate reports", "audit": "an --audit-only report"}
# Every file an --evaluate writes (eval_outputs names one evaluation's): what its --overwrite replaces, whole.
EVAL_PATTERNS = (*KINDS["evaluate"], "robustness_*.csv", "robustness_*.png", AUDIT_FILE, BAD_IMAGES)


def run_files_in(out: Path) -> list[str]:
    """The RUN_FILES present in `out` when it holds a run (a checkpoint); else none."""
    if not any((out / name).exists() for name in CHECKPOINTS):
        return []
    return [name for name in RUN_FILES if (out / name).exists()]


def folder_kind(out: Path) -> str | None:
    """What `out` holds (a KINDS key), or None for a folder that holds none of their files."""
    return next((kind for kind, patterns in KINDS.items() if any(next(out.glob(p), None) for p in patterns)), None)


def evaluation_files_in(out: Path) -> list[Path]:
    """The files of an --evaluate (EVAL_PATTERNS) in `out`."""
    return sorted({path for pattern in EVAL_PATTERNS for path in out.glob(pattern) if path.is_file()})


def command_kind(cfg: TrainConfig) -> str:
    """What this command writes (a KINDS key)."""
    return "audit" if cfg.audit_only else "evaluate" if cfg.evaluate_checkpoint else "training"


def existing_run_error(out: Path, existing: list[str]) -> ConfigError:
    return ConfigError(f"--output-dir {out} already holds a run ({', '.join(existing)}): pass --resume to continue "
                       "it, --overwrite to replace it, or choose another --output-dir")


def resume_checkpoint(out: Path, resume: str) -> Path:
    """The last.pt `--resume` continues: OUTPUT_DIR/last.pt ("auto"), or PATH, which must lie in --output-dir. A
    run continues in the folder it owns: another run's last.pt continued here would leave this folder's best.pt,
    summary and metrics.csv rows beside the other run's, or no best.pt at all."""
    path = out / LAST if resume == "auto" else Path(resume)
    if path.resolve().parent != out.resolve():
        raise ConfigError(f"--resume {resume}: that run's folder is {path.parent}, not --output-dir {out}; a run "
                          "continues in the folder that holds its last.pt (give that --output-dir)")
    return path


def report_names(manifests: list[str]) -> list[str]:
    """A file-name part per --evaluate manifest: its stem, with its folder's name where two stems are alike."""
    stems = [Path(m).stem for m in manifests]
    names = [f"{Path(m).parent.name}_{s}" if stems.count(s) > 1 else s for m, s in zip(manifests, stems)]
    if len(set(names)) < len(names):
        raise ConfigError(f"--val-manifest: manifests {', '.join(manifests)} would write over each other's reports")
    return names


def eval_outputs(cfg: TrainConfig) -> list[str]:
    """The files --evaluate writes into --output-dir."""
    names = report_names(cfg.eval_manifests or [cfg.val_manifest])
    files = [f"{kind}_{name}.{ext}" for name in names for kind, ext in (("eval", "json"), ("predictions", "csv"))]
    if cfg.perturb:
        files += [f"robustness_{name}.{ext}" for name in names for ext in ("csv", "png")]
    return [*files, EVAL_SUMMARY, AUDIT_FILE]


def check_writable_folder(out: Path) -> None:
    """Refuse (ConfigError) an --output-dir that is a file, lies under one, or is in a folder we may not write."""
    existing = next(folder for folder in (out, *out.parents, Path(".")) if folder.exists())
    if not existing.is_dir():
        raise ConfigError(f"--output-dir {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir {out}: cannot write in {existing} (permission denied)")


def check_output_dir(cfg: TrainConfig) -> None:
    """Refuse (ConfigError) an output folder that holds another kind of output than this command writes, what this
    command would replace without --overwrite, or a --resume of a last.pt in another folder."""
    out = Path(cfg.output_dir)
    check_writable_folder(out)
    kind, held = command_kind(cfg), folder_kind(out)
    if held not in (None, kind):
        raise ConfigError(f"--output-dir {out} holds {KIND_NAMES[held]}; {KIND_NAMES[kind]} goes in a folder of its "
                          "own (--overwrite or not): choose another --output-dir")
    if cfg.resume and kind == "training":
        resume_checkpoint(out, cfg.resume)
    if cfg.overwrite:
        return
    if kind != "training":
        names = eval_outputs(cfg) if kind == "evaluate" else [AUDIT_FILE, SUMMARY]
        existing = [name for name in names if (out / name).exists()]
        if existing:
            raise ConfigError(f"--output-dir {out} already holds {', '.join(existing[:3])}"
                              f"{' and more' if len(existing) > 3 else ''}: pass --overwrite or choose another folder")
    elif not cfg.resume and (existing := run_files_in(out)):
        raise existing_run_error(out, existing)

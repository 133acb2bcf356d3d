"""What a training run and an --evaluate write into their folder, and the refusal to replace it without --overwrite.

Torch-free, like the parsers: the entry scripts check the output folder right after parsing, so a folder that is
already taken is refused at once, not after the half minute that importing torch and building the model take.
"""

from __future__ import annotations

from pathlib import Path

from stage2.engine.config import TrainConfig
from stage2.errors import ConfigError

# The files that make a folder hold a run (and that --overwrite must be asked for).
RUN_FILES = ("best.pt", "last.pt", "metrics.csv", "summary.json", "args.json")
# The shortcut audit's table: stage2.data.audit.AUDIT_FILE, named here too so that this module stays torch-free.
AUDIT_FILE = "shortcut_audit.csv"


def run_files_in(out: Path) -> list[str]:
    """The RUN_FILES present in `out`."""
    return [name for name in RUN_FILES if (out / name).exists()]


def existing_run_error(out: Path, existing: list[str]) -> ConfigError:
    return ConfigError(f"--output-dir {out} already holds a run ({', '.join(existing)}): pass --resume to continue "
                       "it, --overwrite to replace it, or choose another --output-dir")


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
    return [*files, "eval_summary.csv", AUDIT_FILE]


def check_output_dir(cfg: TrainConfig) -> None:
    """Refuse (ConfigError) an output folder that holds what this command would replace without --overwrite."""
    out = Path(cfg.output_dir)
    if cfg.overwrite:
        return
    if cfg.evaluate_checkpoint:
        existing = [name for name in eval_outputs(cfg) if (out / name).exists()]
        if existing:
            raise ConfigError(f"--output-dir {out} already holds {', '.join(existing[:3])}"
                              f"{' and more' if len(existing) > 3 else ''}: pass --overwrite or choose another folder")
    elif not cfg.resume and (existing := run_files_in(out)):
        raise existing_run_error(out, existing)

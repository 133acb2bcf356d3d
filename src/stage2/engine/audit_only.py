"""``--audit-only``: the shortcut audit of a command's manifests (``stage2.data.audit``), without training."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from stage2.atomic import write_json_atomic
from stage2.data.audit import AUDIT_FILE, run_audit
from stage2.data.manifest import check_source_leak, read_manifest
from stage2.processes import usable_cores
from stage2.run.config import TrainConfig
from stage2.run.distributed import DistInfo
from stage2.run.files import SUMMARY, check_output_dir, report_names
from stage2.run.logs import setup_logging


def audit_only(cfg: TrainConfig, dist: DistInfo) -> dict[str, Any] | None:
    """Audit the train and val manifests (with --evaluate: its manifests), checking them as training would;
    writes OUTPUT_DIR/shortcut_audit.csv and summary.json, and returns the summary on rank 0."""
    setup_logging(None, dist.is_main)
    if not dist.is_main:
        return None
    out = Path(cfg.output_dir)
    check_output_dir(cfg)  # the commands checked before torch loaded; this is for callers of run()
    if cfg.evaluate_checkpoint:
        manifests = cfg.eval_manifests or [cfg.val_manifest]
        frames = {name: read_manifest(m, cfg.data_root, require_both_classes=True)
                  for m, name in zip(manifests, report_names(manifests))}
    else:
        frames = {"train": read_manifest(cfg.train_manifest, cfg.data_root, require_both_classes=True),
                  "val": read_manifest(cfg.val_manifest, cfg.data_root, require_both_classes=True)}
        check_source_leak(frames["train"], frames["val"])
    table = run_audit(frames, out, min(cfg.workers, usable_cores()))
    summary = {"shortcut_audit": table.to_dict("records"), "shortcuts": int(table["shortcut"].sum())}
    write_json_atomic(out / SUMMARY, summary)
    logging.getLogger("stage2").info("wrote %s and %s", out / AUDIT_FILE, out / SUMMARY)
    return summary

"""Where a run's messages go (the console on rank 0 and OUTPUT_DIR/train.log, under the "stage2" logger), and the
settings banner a training run opens with."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from stage2.data.preprocessing import DataConfig
from stage2.experts.base import Stage
from stage2.run.config import TrainConfig
from stage2.run.distributed import DistInfo

log = logging.getLogger("stage2")


class _StdoutHandler(logging.StreamHandler):
    """Writes to the sys.stdout of the moment, not the one it was made with: a notebook or a test that swaps
    sys.stdout (and closes the old one) would otherwise get "--- Logging error ---" from every later message."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # noqa: ANN201 - the stream logging.StreamHandler reads
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ and setStream assign it; the property decides
        pass


class _RunLogHandler(logging.FileHandler):
    """OUTPUT_DIR/train.log. A write that fails (a full disk) stops the run with one line naming the file, as any
    other output's does, instead of printing a traceback on stderr for every later message."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        err = sys.exc_info()[1]
        if isinstance(err, OSError):
            raise OSError(err.errno, err.strerror, self.baseFilename) from err
        super().handleError(record)


def setup_logging(log_file: Path | None, is_main: bool) -> None:
    """Project messages to stdout (rank 0 only) and to OUTPUT_DIR/train.log; warnings from every rank."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.WARNING)
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    console = _StdoutHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file = _RunLogHandler(log_file, mode="a", delay=True)  # created by its first message
        file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        root.addHandler(file)
    logging.captureWarnings(True)
    warnings.formatwarning = _warning_line  # what captureWarnings formats each warning with


def close_run_log() -> None:
    """Detach the run's train.log as the run ends: what this process logs next (a notebook's next command, the
    next test) is not the run's, and its folder may be gone (a run that wrote nothing removes it)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _RunLogHandler)]:
        root.removeHandler(handler)
        handler.close()


def _warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  line: str | None = None) -> str:
    """A warning as one log line: its message, without the file, line and source of the code that raised it (for
    a skipped image, a line of torch's DataLoader, on a second line)."""
    kind = "" if category is UserWarning else f"{category.__name__}: "
    return f"warning: {kind}{message}"


def log_settings(cfg: TrainConfig, stages: Sequence[Stage], *, dist: DistInfo, amp_dtype: torch.dtype | None,
                 threads: str, train_frame: pd.DataFrame, label_mix: tuple[float, float], n_val: int,
                 data_config: DataConfig,
                 degrade_start: int | None, workers: int, n_params: int, model: dict[str, Any]) -> None:
    """What a training run is about to do, in one block: device, data, recipe, stages and model.

    `label_mix` is the expected (real, fake) images an epoch trains on (stage2.run.loaders.trained_label_mix);
    `degrade_start` the 0-based epoch the CPU degradations begin at (None: the level has none; not said when the
    run ends before it); `workers` the loader workers after the cap to usable cores; `model` the expert's
    description."""
    n_fake = int(train_frame["label"].sum())
    blend = cfg.self_blend if isinstance(cfg.self_blend, str) else f"{cfg.self_blend:.10g}"  # 0.999999 stays so
    how = [what for what, on in (("--balanced-sampler", cfg.balanced_sampler),
                                 (f"--self-blend {blend}", cfg.self_blend)) if on]
    lines = [
        f"device {dist.device} x {dist.world_size} rank(s)"
        f"{f' (process group {dist.backend})' if dist.backend else ''}, amp {amp_dtype or 'off'}, "
        f"channels_last {cfg.channels_last}, compile {cfg.compile}, deterministic {cfg.deterministic}"
        + (f", {threads}" if threads else ""),
        f"train {len(train_frame)} images ({len(train_frame) - n_fake} real / {n_fake} fake) from "
        f"{cfg.train_manifest}; val {n_val} from {cfg.val_manifest}"
        + (f"; trained per epoch, expected after {' and '.join(how)}: {label_mix[0]:.6g} real / "
           f"{label_mix[1]:.6g} fake" if how else ""),
        f"input {data_config.size}px, mean {list(data_config.mean)}, std {list(data_config.std)}, aug {cfg.aug}"
        + (f" (degradations from epoch {degrade_start + 1})"
           if degrade_start is not None and degrade_start < cfg.epochs else "")
        + f", self-blend {blend}" + (f" (--blend-mask {cfg.blend_mask}"
                                     + (f", without {cfg.blend_without}" if cfg.blend_without else "") + ")"
                                     if cfg.self_blend else "")
        + f", workers {workers}"
        + (f" (--workers {cfg.workers} capped to the {workers} cores this process may use)"
           if workers < cfg.workers else ""),
        f"epochs {cfg.epochs}, batch {cfg.batch_size}/rank x accum {cfg.grad_accum}, {cfg.opt} lr {cfg.lr:g} "
        f"(warmup {cfg.warmup_epochs:g} ep, cosine to {cfg.min_lr:g}), wd {cfg.weight_decay:g}, "
        f"clip {cfg.clip_grad}, ema {cfg.ema_decay if cfg.ema else 'off'}",
        f"stages: {', '.join(f'{s.name} ({s.epochs} ep, lr {s.lr:g})' for s in stages)}",
        f"{n_params / 1e6:.1f}M parameters; " + ", ".join(f"{k} {v}" for k, v in model.items()),
        f"best checkpoint by val {cfg.select_metric}; outputs in {cfg.output_dir}"
        + (f"; tracking: {cfg.log_to}" if cfg.log_to else ""),
    ]
    log.info("settings:\n  %s", "\n  ".join(lines))

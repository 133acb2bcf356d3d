"""The run folder: one run at a time in it (its lock), the fresh / resume / overwrite decision, and the list of
images skipped as undecodable. What a run writes there is named in stage2.run.files."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pandas as pd

from stage2.atomic import remove_killed_writes, write_text_atomic
from stage2.errors import ConfigError
from stage2.processes import LockBusy, exclusive_lock
from stage2.run.config import TrainConfig
from stage2.run.distributed import DistInfo, barrier, gather_objects
from stage2.run.files import (
    BAD_IMAGES,
    LAST,
    RECON_SAMPLES,
    REPLACED,
    RUN_OUTPUTS,
    check_output_dir,
    resume_checkpoint,
    run_files_in,
)

log = logging.getLogger("stage2")

@contextmanager
def run_dir_lock(out: Path, dist: DistInfo) -> Iterator[None]:
    """One run at a time per folder: rank 0 holds OUTPUT_DIR/.lock for the whole run (and lets go on any exit,
    removing it; a crashed or killed holder is no obstacle); while another process holds it, every rank refuses
    with one line. Once it holds the lock, it removes what killed writes left (their temporary files). The folders
    the run created and left empty (it failed before writing anything) are removed, parents included."""
    created = _missing_folders(out) if dist.is_main else []
    try:
        with ExitStack() as stack:
            holder = None
            if dist.is_main:
                try:
                    out.mkdir(parents=True, exist_ok=True)
                except OSError as err:  # /proc, a read-only mount, or a file that appeared since the check
                    raise ConfigError(f"--output-dir {out}: cannot create it ({err.strerror})") from None
                try:
                    stack.enter_context(exclusive_lock(out / ".lock"))
                except LockBusy as busy:
                    holder = busy.holder
                else:
                    for folder in (out, out / RECON_SAMPLES):
                        remove_killed_writes(folder)
            holder = gather_objects([holder] if dist.is_main else [])[0]
            if holder is not None:
                raise ConfigError(f"--output-dir {out} is in use by another run (process {holder}): wait for it to "
                                  "end, or choose another --output-dir")
            yield
    finally:
        for folder in created:  # innermost first
            if not folder.is_dir() or any(folder.iterdir()):
                break
            folder.rmdir()


def _missing_folders(out: Path) -> list[Path]:
    """`out` and those of its parents that do not exist yet, innermost first."""
    return [folder for folder in (out, *out.parents) if not folder.exists()]


def prepare_run_dir(cfg: TrainConfig, is_main: bool) -> Path | None:
    """Decide between a fresh run, a resume and an overwrite; never lose a previous best.pt silently.

    Returns the checkpoint to resume from, if any. `cfg.resume` is a path or "auto" (OUTPUT_DIR/last.pt, or a fresh
    run when the folder holds no run yet: the trainer says so). A fresh run sets the folder's previous run aside (an
    --overwrite) in OUTPUT_DIR/.replaced: `restore_replaced` puts it back if this run fails before writing last.pt,
    `discard_replaced` removes it once it has. What a run that failed before its first checkpoint left is removed.
    """
    out = Path(cfg.output_dir)
    if is_main:
        restore_replaced(out)  # a run killed before its first last.pt left the previous one aside
    barrier()
    check_output_dir(cfg)  # the commands checked before torch loaded; now the folder is this run's (locked)
    existing = run_files_in(out)
    if cfg.resume:
        path = resume_checkpoint(out, cfg.resume)
        if path.is_file():
            return path
        if cfg.resume != "auto" or existing:
            raise ConfigError(f"--resume {cfg.resume}: no checkpoint at {path}")
    if is_main and existing:
        (out / REPLACED).mkdir()
        for name in RUN_OUTPUTS:
            if (out / name).exists():
                (out / name).rename(out / REPLACED / name)
    elif is_main:  # what a run that failed before its first checkpoint left: this run's own files replace it
        _remove_run_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    barrier()
    return None


def restore_replaced(out: Path) -> None:
    """Put back what a fresh run set aside in `out`, unless the run got as far as writing last.pt (then remove it)."""
    aside = out / REPLACED
    if not aside.is_dir():
        return
    if (out / LAST).exists():
        discard_replaced(out)
        return
    _remove_run_outputs(out)
    for path in aside.iterdir():
        path.rename(out / path.name)
    aside.rmdir()
    log.warning("%s: the run did not get as far as its first %s; what the folder held before it is back", out, LAST)


def _remove_run_outputs(out: Path) -> None:
    for name in RUN_OUTPUTS:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


def discard_replaced(out: Path) -> None:
    """Remove what a fresh run set aside in `out`: it has written its own last.pt."""
    shutil.rmtree(out / REPLACED, ignore_errors=True)


class BadImages:
    """Images skipped as undecodable (with --skip-bad-images), listed in OUTPUT_DIR/bad_images.txt; more than
    `limit` in one split stops the run."""

    def __init__(self, out: Path, is_main: bool, limit: int) -> None:
        self.path, self.is_main, self.limit = out / BAD_IMAGES, is_main, limit
        self.found: dict[str, set[str]] = {"train": set(), "val": set()}

    def note(self, split: str, frame: pd.DataFrame, rows: list[int]) -> None:
        """Add `frame`'s `rows` (this rank's; every rank must call) and rewrite the list if it grew."""
        found = {str(frame["path"].iloc[i]) for i in gather_objects(rows)}
        if not found - self.found[split]:
            return
        self.found[split] |= found
        if self.is_main:
            lines = [f"{kind}\t{path}" for kind in self.found for path in sorted(self.found[kind])]
            write_text_atomic(self.path, "\n".join(lines) + "\n")
            log.warning("%d undecodable %s images skipped so far, listed in %s", len(self.found[split]), split,
                        self.path)
        if len(self.found[split]) > self.limit:
            raise ConfigError(f"{len(self.found[split])} undecodable {split} images, more than --max-bad-images "
                              f"{self.limit}: stopped; they are listed in {self.path}")

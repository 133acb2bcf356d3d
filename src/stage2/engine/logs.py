"""Where a run's messages go: the console (rank 0) and OUTPUT_DIR/train.log, under the "stage2" logger."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

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
        file = logging.FileHandler(log_file, mode="a")
        file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        root.addHandler(file)
    logging.captureWarnings(True)

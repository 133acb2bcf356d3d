"""Optional experiment tracking (`--log-to tensorboard`): per-step loss and lr, per-epoch metrics, and the run's
images (ROC, reconstructions). metrics.csv stays the record; a tracker only mirrors it for browsing."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from stage2.errors import ConfigError
from stage2.run.config import TRACKERS
from stage2.run.files import TENSORBOARD


class Tracker:
    """Does nothing: what a run without --log-to (and every rank but 0) uses."""

    def scalars(self, step: int, **values: float) -> None:
        pass

    def epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        pass

    def image(self, tag: str, path: Path, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Event files in OUTPUT_DIR/tensorboard (`tensorboard --logdir OUTPUT_DIR`)."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch's writer needs the tensorboard package
            raise ConfigError(f"--log-to tensorboard: {err}; pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, step: int, **values: float) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"step/{name}", value, step)

    def epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"epoch/{name}", value, epoch)
        self.writer.flush()

    def image(self, tag: str, path: Path, step: int) -> None:
        from torchvision.io import ImageReadMode, decode_image

        self.writer.add_image(tag, decode_image(str(path), mode=ImageReadMode.RGB), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_tracker(log_to: str | None, out: Path, is_main: bool) -> Tracker:
    if not log_to or not is_main:
        return Tracker()
    if log_to not in TRACKERS:
        raise ConfigError(f"--log-to {log_to!r}: expected one of {', '.join(TRACKERS)}")
    return TensorBoardTracker(out / TENSORBOARD)

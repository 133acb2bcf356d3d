"""The errors a user can cause (and the commands turn into one line and an exit code), in one torch-free module:
the commands catch them without importing torch, and every layer raises them without importing another.

Exit codes (``stage2.commands.cli.exit_on_error``): 2 for bad input, 3 for a diverged run, 128 + the signal number for
a run stopped by SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import os


class ConfigError(ValueError):
    """A flag or the run folder is not usable as given."""


class ManifestError(ValueError):
    """A manifest that cannot be used; the message is one line naming the file (and CSV line)."""


class ImageDecodeError(RuntimeError):
    """An image file that cannot be decoded; the message names the file.

    A DataLoader worker's error reaches the main process re-raised as ``ImageDecodeError(text)``, ``text`` being
    the worker's whole traceback; the message is then the original one, taken from its last line, so that users
    get the same one line with ``--workers 0`` and ``--workers 8``.
    """

    def __init__(self, path: str, reason: str | None = None) -> None:
        if reason is None:  # re-raised from a worker: `path` holds the worker's traceback
            last = [line for line in path.strip().splitlines() if line.strip()][-1]
            message = last.split("ImageDecodeError: ", 1)[-1]
            self.path = message.removeprefix("cannot decode image ").rsplit(": ", 1)[0]
        else:
            message, self.path = f"cannot decode image {path}: {reason}", path
        super().__init__(message)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or lacks what the caller needs."""


class OfficialCheckpointError(CheckpointError):
    """An official GenConViT checkpoint that cannot be read or does not match the model."""


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be obtained (offline hub, missing or unreadable local file)."""


class FeatureFileError(ValueError):
    """A feature file that cannot be read, or feature files that do not describe the same images."""


class ExportCheckError(RuntimeError):
    """An exported model that does not give what PyTorch gives (see stage2.embeddings.export); nothing was written."""


class TrainingDiverged(RuntimeError):
    """The loss, a weight or a statistic became NaN or infinite; the last good checkpoint is left as it was."""


class StopRequested(RuntimeError):
    """SIGTERM or Ctrl-C: the run stopped at a step boundary after writing last.pt."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


# What exit_on_error reports in one line with exit code 2.
# The project's own classes only: a library's ValueError is a bug to see whole, not a user error.
USER_ERRORS = (ConfigError, ManifestError, ImageDecodeError, CheckpointError, PretrainedWeightsError,
               FeatureFileError, ExportCheckError)


def first_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message as one line for a one-line error: its first line (at most `limit` characters), or
    its type's name when it has no message. Libraries' messages run to paragraphs of advice."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:limit]


def check_checkpoint_exists(path: str | os.PathLike) -> None:
    """A checkpoint path that names no file is one line, and torch-free: a command says so before torch loads."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: no such file")

"""What both entry scripts do around `run`: parsing (with the --demo defaults) and one-line errors for bad input."""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from src.data.dataset import ImageDecodeError
from src.data.demo import make_demo_dataset
from src.data.manifest import ManifestError
from src.engine.checkpoint import CheckpointError
from src.engine.trainer import ConfigError, StopRequested, TrainingDiverged
from src.models.factory import PretrainedWeightsError

DEMO_ROOT = Path("data/demo")

# Bad input and a diverged run end with one line and a non-zero exit; anything else is a bug
# and keeps its traceback.
USER_ERRORS = (ManifestError, ImageDecodeError, CheckpointError, ConfigError, PretrainedWeightsError, ValueError)
# A full disk or an output folder we may not write to: one line naming the file; what was written stays intact.
OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None, **demo: Any) -> argparse.Namespace:
    """Parse the command line; with --demo, `demo` settings and the built-in dataset become the defaults first,
    so that a flag given on the command line still wins (even one given at its usual default)."""
    if parser.parse_known_args(argv)[0].demo:
        train, val = make_demo_dataset(DEMO_ROOT)
        output_dir = parser.get_default("output_dir") + "_demo"
        parser.set_defaults(train_manifest=str(train), val_manifest=str(val), data_root=None, output_dir=output_dir,
                            overwrite=True, **demo)
        logging.getLogger("src").info("demo: synthetic data in %s", DEMO_ROOT)
    return parser.parse_args(argv)


def exit_on_error(main: Callable[[], object]) -> None:
    """Run `main`; turn bad input into `error: ...` on stderr with exit code 2, a diverged run into exit code 3,
    and a stop by signal (after last.pt was written) into 128 + the signal number, as shells report it."""
    try:
        main()
    except StopRequested as err:
        print(f"stopped: {err}", file=sys.stderr)
        sys.exit(128 + err.signum)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno not in OUTPUT_ERRNOS:
            raise
        print(f"error: cannot write {err.filename}: {err.strerror}", file=sys.stderr)
        sys.exit(2)

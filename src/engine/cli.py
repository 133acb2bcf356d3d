"""What both entry scripts do around `run`: the --demo set-up and one-line errors for bad input."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from src.data.dataset import ImageDecodeError
from src.data.demo import make_demo_dataset
from src.data.manifest import ManifestError
from src.engine.checkpoint import CheckpointError
from src.engine.trainer import ConfigError, TrainingDiverged
from src.models.factory import PretrainedWeightsError

DEMO_ROOT = Path("data/demo")

# Bad input and a diverged run end with one line and a non-zero exit; anything else is a bug
# and keeps its traceback.
USER_ERRORS = (ManifestError, ImageDecodeError, CheckpointError, ConfigError, PretrainedWeightsError, ValueError)


def apply_demo(args: argparse.Namespace, parser: argparse.ArgumentParser, **overrides: Any) -> None:
    """Point `args` at the built-in synthetic dataset (generated on first use) with short-run settings.

    `overrides` replace the trainer's defaults only: a flag given on the command line still wins.
    """
    train, val = make_demo_dataset(DEMO_ROOT)
    args.train_manifest, args.val_manifest, args.data_root = str(train), str(val), None
    args.output_dir = str(Path(args.output_dir).with_name(Path(args.output_dir).name + "_demo"))
    args.overwrite = args.resume is None
    for name, value in overrides.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)
    logging.getLogger("src").info("demo: synthetic data in %s, outputs in %s", DEMO_ROOT, args.output_dir)


def exit_on_error(main: Callable[[], object]) -> None:
    """Run `main`; turn bad input into `error: ...` on stderr with exit code 2 (3 for a diverged run)."""
    try:
        main()
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

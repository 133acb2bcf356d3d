"""Fine-tune EfficientNetV2-B3 (or any timm classifier) as stage two's local-artefact expert.

    python train_stage2_effnet.py --help                         # every flag; the examples and the README say more

The command is src/stage2/commands/train_effnet.py (installed as stage2-train-effnet); this file runs it from a
checkout, uninstalled, and `main(argv)` runs it from Python.
"""

import sys
from pathlib import Path

# A checkout runs without `pip install -e .`: the package is src/stage2 (src-layout).
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from stage2.commands.train_effnet import build_parser, cli, main  # noqa: E402

__all__ = ["build_parser", "cli", "main"]

if __name__ == "__main__":
    cli()

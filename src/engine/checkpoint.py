"""Checkpoint files: what they hold, atomic writes, and safe loading.

Every checkpoint loads with `torch.load(weights_only=True)`: it holds tensors, numbers, strings,
lists and dicts only. `best.pt` is what downstream code needs (weights, model name, data config,
metrics, temperature); `last.pt` adds what a resume needs (optimizer, scheduler, scaler, EMA,
progress and RNG states).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src.engine.atomic import atomic_write

RUN_FILES = ("best.pt", "last.pt", "metrics.csv", "summary.json", "args.json")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or lacks what the caller needs."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """torch.save through a temporary file and a rename: a crash mid-write keeps the previous checkpoint."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False
                    ) -> dict[str, Any]:
    """Load a checkpoint written by this project (weights_only: no arbitrary code runs). `mmap` maps the
    tensors instead of reading them, for a cheap look at the metadata."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({type(err).__name__}: {_reason(err)})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, found {type(state).__name__}")
    return state


def _reason(err: Exception) -> str:
    """The sentence of a torch.load error that says what is wrong: for weights_only refusals that is the
    unpickler's, which torch puts after a paragraph of advice."""
    text = str(err).strip()
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n")[0].strip()
        return f"the file holds objects weights_only loading refuses: {detail.split('. ')[0].rstrip('.')}"
    return text.splitlines()[0] if text else type(err).__name__


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in weights_only-loadable form."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

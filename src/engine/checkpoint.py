"""Checkpoint files: what they hold, atomic writes, and safe loading.

Every checkpoint loads with `torch.load(weights_only=True)`: it holds tensors, numbers, strings,
lists and dicts only. `best.pt` is what downstream code needs (weights, model name, data config,
metrics, temperature); `last.pt` adds what a resume needs (optimizer, scheduler, scaler, EMA,
progress and RNG states). Every checkpoint the trainers write carries the SHA-256 of all its tensors
(`tensors_sha256`), checked on load: a damaged file is refused instead of giving other weights.
"""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src.atomic import atomic_write
from src.engine.distributed import broadcast_flag
from src.errors import CheckpointError, TrainingDiverged

CHECKSUM_KEY = "tensors_sha256"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """torch.save, with the checksum of every tensor in `state`, through a temporary file and a rename: a crash
    mid-write keeps the previous checkpoint."""
    state = {**state, CHECKSUM_KEY: tensors_sha256(state)}
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False
                    ) -> dict[str, Any]:
    """Load a checkpoint (weights_only: no arbitrary code runs) and check its tensors against the checksum it
    carries (files without one, such as the official GenConViT weights, load unchecked). `mmap` maps the tensors
    instead of reading them, for a cheap look at the metadata, and skips the check."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({type(err).__name__}: {_reason(err)})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, found {type(state).__name__}")
    if not mmap and CHECKSUM_KEY in state and tensors_sha256(state) != state[CHECKSUM_KEY]:
        raise CheckpointError(f"checkpoint {path}: damaged (its tensors do not match the checksum written with "
                              "them); use another copy or an earlier checkpoint")
    return state


def tensors_sha256(state: Any) -> str:
    """SHA-256 over every tensor in a (nested) checkpoint dict: where it sits, its dtype, shape and bytes."""
    digest = hashlib.sha256()

    def visit(value: Any, where: str) -> None:
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            digest.update(f"{where}:{value.dtype}:{tuple(value.shape)};".encode())
            digest.update(data.numpy().data)
        elif isinstance(value, dict):
            for key, item in value.items():
                if key != CHECKSUM_KEY:
                    visit(item, f"{where}/{key}")
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                visit(item, f"{where}/{i}")

    visit(state, "")
    return digest.hexdigest()


def _reason(err: Exception) -> str:
    """The sentence of a torch.load error that says what is wrong: for weights_only refusals that is the
    unpickler's, which torch puts after a paragraph of advice."""
    text = str(err).strip()
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n")[0].strip()
        return f"the file holds objects weights_only loading refuses: {detail.split('. ')[0].rstrip('.')}"
    return text.splitlines()[0] if text else type(err).__name__


def ensure_finite(model: torch.nn.Module, device: torch.device, when: str, last_good: Path) -> None:
    """Stop (on every rank) before a non-finite weight or statistic can reach a checkpoint or a metric.

    The loss can stay finite while, say, a BatchNorm running_var overflows to inf; that model must not replace
    the last good last.pt. Raises TrainingDiverged naming the tensor and the checkpoint left as it was.
    """
    bad = next((name for name, t in (*model.named_parameters(), *model.named_buffers())
                if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if broadcast_flag(bad is not None, device):
        raise TrainingDiverged(f"non-finite values in {bad or 'a tensor on another rank'} {when}: stopped; "
                               f"{last_good_note(last_good)}")


def last_good_note(last: Path) -> str:
    return f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"


def checkpoint_temperature(state: dict[str, Any], path: str | Path) -> float:
    """The fitted temperature a checkpoint records (1.0 when it has none). P(fake) = sigmoid(logit / T): a NaN
    would make every score NaN and a negative one would invert them, so only a positive finite T is accepted."""
    value = state.get("temperature", 1.0)
    try:
        temperature = float(value)
    except (TypeError, ValueError):
        temperature = math.nan
    if not (math.isfinite(temperature) and temperature > 0):
        raise CheckpointError(f"checkpoint {path}: temperature {value!r} is not a positive finite number "
                              "(P(fake) = sigmoid(logit / temperature)); set it to 1.0 or refit it")
    return temperature


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

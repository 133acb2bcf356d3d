"""Checkpoint files: what they hold (one versioned schema), atomic writes, and safe loading.

Every checkpoint loads with `torch.load(weights_only=True)`: it holds tensors, numbers, strings,
lists and dicts only. `best.pt` (`BestCheckpoint`) is what downstream code needs (weights, the model
family's meta, data config, metrics, temperature); `last.pt` (`LastCheckpoint`) adds what a resume needs
(optimizer, scaler, EMA, recipe, progress and RNG states; the schedule is re-planned, never stored). Each
is a flat dict on disk: the dataclass fields, the family's meta keys (`family`, `model_name`, ...) beside
them, and `schema_version`. Every checkpoint the trainers write carries the SHA-256 of all its tensors
(`tensors_sha256`), of its preprocessing (`data_config_sha256`: input size, mean, std, resize) and of its temperature
(`temperature_sha256`), checked on load: a damaged or edited file is refused instead of giving other scores. A
checkpoint is read only with finite weights, a positive finite temperature and a usable data_config (3 channels of a
square input, means in [0, 1], stds in STD_RANGE): else every P(fake) or embedding it gives would be NaN, infinite
or meaningless.

Schema versions: 1 is the first versioned schema; 2 adds `data_config_sha256` (the data config's checksum) and
`manifests` to last.pt (each manifest's row count and SHA-256, compared on resume); 3 adds `temperature_fitted`
(whether `temperature` was fitted on validation: best.pt's is once its run ends, last.pt's never) and
`temperature_sha256`. A file without `schema_version` was written before versions existed (version 0); its keys are
version 1's, so it is read as version 1 when it holds the keys version 1 requires. From version 2 on a file must
carry every checksum its version is written with (REQUIRED_CHECKSUMS): one that lacks one was edited. Versions 0 and
1 are read without the data config's checksum, and a resume from them skips the manifest comparison; before version
3 a temperature counts as fitted when it is not 1.0, the one value the trainers wrote unfitted. Any other version is
refused in one line (CheckpointError) naming the file and both versions. Official GenConViT weight files are not
ours: they carry no `family` key, are read by stage2.models.genconvit.official, and never pass through these readers.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
import torch

from stage2.atomic import atomic_write
from stage2.data.preprocessing import DataConfig
from stage2.errors import CheckpointError, TrainingDiverged, check_checkpoint_exists, first_line
from stage2.models.families import family_of
from stage2.run.distributed import broadcast_flag

CHECKSUM_KEY = "tensors_sha256"
CONFIG_CHECKSUM_KEY = "data_config_sha256"
TEMPERATURE_CHECKSUM_KEY = "temperature_sha256"
SCHEMA_KEY = "schema_version"
# Raise it (and say above what changed) whenever a key is added, removed or changes meaning.
SCHEMA_VERSION = 3
READABLE_VERSIONS = (0, 1, 2, SCHEMA_VERSION)  # 0: from before versions, the same keys as version 1
# The checksums each version must carry (from the version that introduced them on).
REQUIRED_CHECKSUMS = {CHECKSUM_KEY: 2, CONFIG_CHECKSUM_KEY: 2, TEMPERATURE_CHECKSUM_KEY: 3}
# A per-channel std of [0, 1] pixels that any model normalises with: ImageNet's 0.23, 0.5 for Inception's [-1, 1].
# Outside it the inputs are scaled absurdly (a std of 1e-30 gave embeddings of 3e29).
STD_RANGE = (0.01, 10.0)
MAX_INPUT_SIZE = 8192  # pixels a side


@dataclass(kw_only=True)
class BestCheckpoint:
    """best.pt: what scoring, extraction and export need. `meta` is the model family's (Expert.checkpoint_meta:
    `family`, `model_name`, ...), written as top-level keys so that the family can rebuild the model."""

    model: dict[str, torch.Tensor]
    meta: dict[str, Any]
    data_config: DataConfig  # written as timm's dict (DataConfig.to_dict)
    args: dict[str, Any] = field(default_factory=dict)  # the run's TrainConfig
    epoch: int = 0  # the epoch these weights are from (1-based; 0: not from a run)
    metrics: dict[str, float] = field(default_factory=dict)  # val metrics of that epoch
    temperature: float = 1.0  # P(fake) = sigmoid(logit / temperature)
    temperature_fitted: bool = False  # whether `temperature` was fitted on validation logits (else it is 1.0)

    def to_dict(self) -> dict[str, Any]:
        """The file's contents (save_checkpoint adds the checksum)."""
        state = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "meta"}
        state["data_config"] = self.data_config.to_dict()
        return {SCHEMA_KEY: SCHEMA_VERSION, "model": state.pop("model"), **self.meta, **state}


@dataclass(kw_only=True)
class LastCheckpoint(BestCheckpoint):
    """last.pt: the current (not the EMA) weights and everything a resume needs to continue bit for bit."""

    optimizer: dict[str, Any]
    scaler: dict[str, Any]
    ema: dict[str, torch.Tensor] | None = None  # the EMA weights, with --ema
    recipe: dict[str, Any] = field(default_factory=dict)  # Expert.recipe(): loss settings a resume must keep
    stage: int = 0  # index of the stage the run is in
    next_epoch: int = 0  # the epoch (0-based) the run continues with
    step: int = 0  # > 0: taken mid-epoch, after this many steps of `next_epoch`
    train_sums: dict[str, torch.Tensor] | None = None  # the mid-epoch running train statistics
    best_value: float | None = None  # --select-metric of best.pt so far
    best_epoch: int = 0
    # What each manifest held when the run started (or last re-planned): {"train"|"val": {"rows", "sha256"}}
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)  # rng_state()


Checkpoint = TypeVar("Checkpoint", BestCheckpoint, LastCheckpoint)
_FIELD_KEYS = {f.name for f in fields(LastCheckpoint)} - {"meta"}


def checkpoint_from_state(kind: type[Checkpoint], state: dict[str, Any], path: str | Path) -> Checkpoint:
    """The one reader: a loaded checkpoint dict as `kind`, after checking its schema version and required keys.
    A last.pt reads as a BestCheckpoint too (its extra fields are left out)."""
    version = state.get(SCHEMA_KEY, 0)
    if version not in READABLE_VERSIONS:
        age = "a newer" if isinstance(version, int) and version > SCHEMA_VERSION else "another"
        raise CheckpointError(f"checkpoint {path}: schema version {version!r} (written by {age} version of this "
                              f"code), this code reads version {SCHEMA_VERSION}")
    own = {f.name for f in fields(kind)} - {"meta"}
    required = [f.name for f in fields(kind) if f.name != "meta" and f.default is f.default_factory is MISSING]
    if kind is LastCheckpoint and "optimizer" not in state:
        raise CheckpointError(f"checkpoint {path}: not a last.pt (it holds no optimizer state)")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path}: lacks {', '.join(map(repr, missing))} (not written by the "
                              "trainers?)")
    deleted = [key for key, since in REQUIRED_CHECKSUMS.items() if version >= since and key not in state]
    if deleted:
        raise CheckpointError(f"checkpoint {path}: damaged or edited (schema version {version} is written with "
                              f"{deleted[0]!r}, which it lacks); use another copy or an earlier checkpoint")
    meta = {k: v for k, v in state.items() if k not in _FIELD_KEYS and k not in (SCHEMA_KEY, *REQUIRED_CHECKSUMS)}
    try:
        family_of(meta)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    values = {k: v for k, v in state.items() if k in own}
    values["temperature"] = _checked_temperature(state.get("temperature", 1.0), path)
    if version < 3:
        values["temperature_fitted"] = values["temperature"] != 1.0
    _check_data_config(state["data_config"], path)
    values["data_config"] = DataConfig.from_dict(state["data_config"])
    for key in ("model", "ema"):
        check_finite_weights(state.get(key) or {}, path)
    return kind(meta=meta, **values)


def read_best(path: str | Path) -> BestCheckpoint:
    return checkpoint_from_state(BestCheckpoint, load_checkpoint(path), path)


def read_last(path: str | Path) -> LastCheckpoint:
    return checkpoint_from_state(LastCheckpoint, load_checkpoint(path), path)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """torch.save, with the checksum of every tensor in `state`, through a temporary file and a rename: a crash
    mid-write keeps the previous checkpoint."""
    state = {**state, CHECKSUM_KEY: tensors_sha256(state)}
    if "data_config" in state:
        state[CONFIG_CHECKSUM_KEY] = data_config_sha256(state["data_config"])
    if "temperature" in state:
        state[TEMPERATURE_CHECKSUM_KEY] = temperature_sha256(state)
    atomic_write(path, lambda f: _torch_save(state, f))


def _torch_save(state: dict[str, Any], file: IO[bytes]) -> None:
    """torch.save, raising the OSError of a failed write (a full disk) itself: torch's zip writer reports it as
    `RuntimeError: [enforce fail at inline_container.cc] unexpected pos`, with the OSError as its context."""
    try:
        torch.save(state, file)
    except RuntimeError as err:
        if isinstance(err.__context__, OSError):
            raise err.__context__ from None
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False
                    ) -> dict[str, Any]:
    """Load a checkpoint (weights_only: no arbitrary code runs) and check its tensors against the checksum it
    carries (files without one, such as the official GenConViT weights, load unchecked). `mmap` maps the tensors
    instead of reading them, for a cheap look at the metadata, and skips the check."""
    path = Path(path)
    check_checkpoint_exists(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({type(err).__name__}: {_reason(err)})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, found {type(state).__name__}")
    if not mmap and CHECKSUM_KEY in state and tensors_sha256(state) != state[CHECKSUM_KEY]:
        raise CheckpointError(f"checkpoint {path}: damaged (its tensors do not match the checksum written with "
                              "them); use another copy or an earlier checkpoint")
    if not mmap and CONFIG_CHECKSUM_KEY in state and data_config_sha256(state.get("data_config")) != state[
            CONFIG_CHECKSUM_KEY]:
        raise CheckpointError(f"checkpoint {path}: damaged or edited (its data_config, the input size, mean and std "
                              "it scores with, does not match the checksum written with it); use another copy or an "
                              "earlier checkpoint")
    if not mmap and TEMPERATURE_CHECKSUM_KEY in state and temperature_sha256(state) != state[TEMPERATURE_CHECKSUM_KEY]:
        raise CheckpointError(f"checkpoint {path}: damaged or edited (its temperature, which turns its logits into "
                              "P(fake), does not match the checksum written with it); use another copy or an earlier "
                              "checkpoint")
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


def data_config_sha256(data_config: Any) -> str:
    """SHA-256 of a data_config (input size, mean, std, resize) as JSON: tuples and lists alike, keys sorted."""
    return hashlib.sha256(json.dumps(data_config, sort_keys=True, default=str).encode()).hexdigest()


def temperature_sha256(state: Mapping[str, Any]) -> str:
    """SHA-256 of a checkpoint's temperature and whether it was fitted, as JSON (repr keeps every float's digits)."""
    return hashlib.sha256(json.dumps([repr(state.get("temperature")), state.get("temperature_fitted")]).encode()
                          ).hexdigest()


def _reason(err: Exception) -> str:
    """The sentence of a torch.load error that says what is wrong: for weights_only refusals that is the
    unpickler's, which torch puts after a paragraph of advice."""
    text = str(err).strip()
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n")[0].strip()
        return f"the file holds objects weights_only loading refuses: {detail.split('. ')[0].rstrip('.')}"
    return first_line(err)


def ensure_finite(models: Iterable[torch.nn.Module], device: torch.device, when: str, last: Path) -> None:
    """Stop (on every rank) before a non-finite weight or statistic of `models` can reach a checkpoint or a metric.

    The loss can stay finite while, say, a BatchNorm running_var overflows to inf; that model must not replace
    the last good last.pt. Raises TrainingDiverged naming the tensor and the checkpoint `last` left as it was.
    """
    bad = first_non_finite(item for model in models for item in (*model.named_parameters(), *model.named_buffers()))
    if broadcast_flag(bad is not None, device):
        raise TrainingDiverged(f"non-finite values in {bad or 'a tensor on another rank'} {when}: stopped; "
                               f"{last_good_note(last)}")


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None."""
    return next((name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)


def check_finite_weights(weights: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """A checkpoint's weights, all finite: one NaN makes every P(fake) NaN, its checksum valid or not."""
    bad = first_non_finite(weights.items())
    if bad is not None:
        raise CheckpointError(f"checkpoint {path}: non-finite values in {bad} (NaN or inf weights): every score would "
                              "be NaN; use an earlier checkpoint")


def _check_data_config(config: Any, path: str | Path) -> None:
    """The preprocessing a checkpoint records, usable (CheckpointError naming the checkpoint and the field): an input
    of 3 channels, square, of a positive integer size (at most MAX_INPUT_SIZE); 3 means in [0, 1] and 3 stds in
    STD_RANGE, the pixel statistics of [0, 1] images."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"checkpoint {path}: data_config {config!r} is not a mapping")
    low, high = STD_RANGE
    checks = {
        "input_size": (lambda v: len(v) == 3 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
                       and v[0] == 3 and v[1] == v[2] and 1 <= v[2] <= MAX_INPUT_SIZE,
                       f"[3, S, S] with S an integer from 1 to {MAX_INPUT_SIZE}"),
        "mean": (lambda v: len(v) == 3 and all(0 <= float(x) <= 1 for x in v), "3 numbers in [0, 1]"),
        "std": (lambda v: len(v) == 3 and all(low <= float(x) <= high for x in v), f"3 numbers from {low} to {high}"),
    }
    for key, (usable, expected) in checks.items():
        value = config.get(key)
        try:
            ok = isinstance(value, list | tuple) and usable(value)
        except (TypeError, ValueError):  # an item that is no number
            ok = False
        if not ok:
            raise CheckpointError(f"checkpoint {path}: data_config {key} {value!r}: expected {expected}")


def last_good_note(last: Path) -> str:
    """What a message about a failed run says of last.pt: the checkpoint to go back to, if one was written."""
    return f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"


def _checked_temperature(value: Any, path: str | Path) -> float:
    """The fitted temperature a checkpoint records, checked. P(fake) = sigmoid(logit / T): a NaN would make
    every score NaN and a negative one would invert them, so only a positive finite T is accepted."""
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

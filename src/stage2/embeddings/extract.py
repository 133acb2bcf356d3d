"""Embeddings and P(fake) from a trained expert: the inputs of stage three's stacking model.

The embedding is what the expert's last linear layer reads: timm's pooled pre-logits features
(``forward_head(..., pre_logits=True)``, what ``num_classes=0`` would return; 1536-d for EfficientNetV2-B3) and
GenConViT's 500-d ``features``. The classifier is kept, so one forward pass also gives P(fake).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from stage2.data.cache import open_cache
from stage2.data.dataset import Batch, manifest_loader
from stage2.data.decode import RESIZE_CONFIG, pil_to_uint8, resize_uint8
from stage2.data.manifest import IMAGE_SUFFIXES, OPTIONAL_COLUMNS, UNLABELED, frame_from_images, read_manifest
from stage2.data.preprocessing import DataConfig
from stage2.data.transforms import DeviceTransform
from stage2.embeddings.outputs import scores_table, write_scores
from stage2.embeddings.store import NpzStreamWriter
from stage2.errors import CheckpointError, ManifestError, OfficialCheckpointError, first_line
from stage2.models.families import FAMILIES, ModelFamily, family_of, model_from_checkpoint
from stage2.models.genconvit import read_state_dict
from stage2.processes import usable_cores
from stage2.run.checkpoint import BestCheckpoint, check_finite_weights, checkpoint_from_state, load_checkpoint
from stage2.run.device import autocast, memory_format, pick_device, scoring_dtype

log = logging.getLogger(__name__)


class LoadedModel(NamedTuple):
    model: nn.Module
    family: ModelFamily
    model_name: str
    data_config: DataConfig  # input size, mean, std and the loaders' resize
    temperature: float
    train_args: dict[str, Any]  # the trainer's settings (val_manifest, data_root, ...); {} for official files


# What to extract: a manifest (labelled or not), a folder of images, a list of image paths, or a manifest frame.
Source = str | os.PathLike | list | pd.DataFrame


class FeatureBatch(NamedTuple):
    embeddings: np.ndarray  # float32 [B, D]
    labels: np.ndarray  # int64 [B]
    p_fake: np.ndarray  # float32 [B], temperature-scaled
    indices: np.ndarray  # int64 [B]: manifest rows (project batches) or positions in the loader's order
    recon_error: np.ndarray | None = None  # float32 [B]: a generative expert's reconstruction MSE in [0, 1] pixels


def check_model_name(requested: str | None, recorded: str, family: ModelFamily, where: str) -> None:
    """Reject a requested model name that is not the model the checkpoint holds (as its family compares names)."""
    if requested is None or family.same_model(requested, recorded):
        return
    raise CheckpointError(f"model name {requested!r} does not match {where}, which holds {recorded!r}")


def load_model(checkpoint_path: str | os.PathLike, model_name: str | None = None) -> LoadedModel:
    """A trainer checkpoint (best.pt / last.pt) or an official GenConViT file, as an eval-mode model on the CPU."""
    path = Path(checkpoint_path)
    state = load_checkpoint(path)
    if "family" in state:
        return _from_trainer_checkpoint(state, path, model_name)
    return _from_official_file(state, path, model_name)


def _from_trainer_checkpoint(state: dict[str, Any], path: Path, model_name: str | None) -> LoadedModel:
    best = checkpoint_from_state(BestCheckpoint, state, path)  # a last.pt reads as one too
    recorded = best.meta.get("model_name") or model_name
    if recorded is None:
        raise CheckpointError(f"checkpoint {path} records no model name: pass model_name / --model-name")
    try:
        family = family_of(best.meta)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    check_model_name(model_name, recorded, family, f"checkpoint {path}")
    try:
        model = model_from_checkpoint({**best.to_dict(), "model_name": recorded})
    except CheckpointError as err:  # weights of another model: the message names a few keys
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path}: cannot rebuild {recorded}: {first_line(err)}") from err
    if best.args and best.args.get("calibrate", True) and not best.temperature_fitted:
        log.warning("checkpoint %s has no fitted temperature yet (a run fits it when it ends): P(fake) uses "
                    "temperature 1.0, uncalibrated", path)
    return LoadedModel(model.eval(), family, recorded, best.data_config, best.temperature,
                       dict(best.args))


def _from_official_file(state: dict[str, Any], path: Path, model_name: str | None) -> LoadedModel:
    family = FAMILIES["genconvit"]
    try:
        weights = read_state_dict(state)
        meta = family.official_meta(weights)
    except OfficialCheckpointError as err:
        raise CheckpointError(
            f"checkpoint {path}: neither a trainer checkpoint (no 'family' key) nor an official GenConViT file ({err})"
        ) from None
    check_finite_weights(weights, path)
    check_model_name(model_name, meta["model_name"], family, f"official GenConViT file {path}")
    try:
        model = family.load_official(weights, meta)
    except OfficialCheckpointError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    return LoadedModel(model.eval(), family, meta["model_name"], family.official_data_config(meta), 1.0, {})


def _default_workers() -> int:
    return min(4, usable_cores())


class ImageTransform:
    """PIL image -> uint8 RGB ``[3, S, S]``, as the loaders turn an image file into a batch row: upright by its
    EXIF orientation, RGB, the whole image resized to S x S (see :mod:`stage2.data.decode`). Picklable, for
    DataLoader workers."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return resize_uint8(pil_to_uint8(image), self.size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, resize={RESIZE_CONFIG})"


class FeatureExtractor:
    """An expert with its last linear layer set aside: images in, embeddings (and P(fake)) out.

    Args:
        model_name: optional; checked against the name the checkpoint records (timm aliases and tags accepted).
            Given alone (``FeatureExtractor("output/stage2_effnet/best.pt")``) it is the checkpoint path.
        checkpoint_path: a trainer ``best.pt``/``last.pt`` or an official GenConViT ``.pth``.
        device: default ``cuda`` when available, else ``cpu``.
        batch_size, workers: for the loaders this class builds from manifests.
        amp: bf16 autocast on CUDA (ignored elsewhere); channels_last is used on CUDA too.
        progress: show a tqdm bar (only on a terminal).

    ``transform`` turns a PIL image into what the extractor's own loaders yield: uint8 RGB ``[3, S, S]``, the
    whole image resized to the checkpoint's input size as in training (antialiased bilinear, no crop). A Dataset
    of your own that returns ``(fx.transform(image), label)`` gives :meth:`extract` the same batches a manifest
    gives; it warns (once) about batches of another size, or float ones that do not look normalised.
    """

    def __init__(
        self,
        model_name: str | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        *,
        batch_size: int = 64,
        amp: bool = True,
        workers: int | None = None,
        progress: bool = True,
    ) -> None:
        if checkpoint_path is None:
            if model_name is None:
                raise TypeError("FeatureExtractor needs a checkpoint: FeatureExtractor('output/stage2_effnet/best.pt')")
            # FeatureExtractor("output/.../best.pt"), as a notebook writes it: the one argument is the checkpoint.
            model_name, checkpoint_path = None, model_name
        self.device = pick_device(device)  # before the checkpoint (gigabytes) is read
        self.checkpoint_path = Path(checkpoint_path)
        loaded = load_model(self.checkpoint_path, model_name)
        self.model_name, self.family = loaded.model_name, loaded.family
        self.temperature, self.train_args = loaded.temperature, loaded.train_args
        # timm's data-config dict, as the checkpoint records it (input_size, mean, std, resize)
        self.data_config = loaded.data_config.to_dict()
        self.img_size = loaded.data_config.size
        self.batch_size = batch_size
        self.workers = _default_workers() if workers is None else workers
        self.progress = progress
        self.amp_dtype = scoring_dtype(self.device, amp)
        self.channels_last = self.device.type == "cuda"
        self.model = loaded.model.to(self.device).eval()
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.embed_dim = self.family.classifier(self.model).in_features
        mean, std = loaded.data_config.mean, loaded.data_config.std
        self.normalise = DeviceTransform(mean, std).to(self.device).eval()  # uint8 batch -> model input
        self.transform = ImageTransform(self.img_size)
        # What mean/std normalisation of [0, 1] pixels can give, to tell preprocessed float batches from others.
        self._normalised_range = (min(-m / d for m, d in zip(mean, std)), max((1 - m) / d for m, d in zip(mean, std)))
        log.info(
            "%s from %s: %d-d embeddings, %dpx input, temperature %.3f, device %s",
            self.model_name,
            self.checkpoint_path,
            self.embed_dim,
            self.img_size,
            self.temperature,
            self.device,
        )

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float batch -> (embeddings [B, D], fake logits [B]), float32; call under inference_mode."""
        embeddings, logits, _ = self.read_out(x)
        return embeddings, logits

    def read_out(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Normalised float batch -> (embeddings [B, D], fake logits [B], reconstruction error [B] or None), float32;
        call under inference_mode. The error is a generative expert's (ReadOut.recon_error)."""
        with autocast(self.device, self.amp_dtype):
            out = self.family.embed(self.model, x)
        error = out.recon_error(self.normalise.normalise.pixels(x))
        return out.embeddings.float(), out.fake_logit.float(), error

    def p_fake(self, logits: torch.Tensor) -> torch.Tensor:
        """Temperature-scaled P(fake) from fake logits."""
        return torch.sigmoid(logits.float() / self.temperature)

    def iter_batches(self, dataloader: Iterable[Any]) -> Iterator[FeatureBatch]:
        """Features of each batch, in the loader's order, as numpy arrays on the CPU.

        Batches are the project's :class:`~stage2.data.dataset.Batch` (uint8 images, normalised here with the
        checkpoint's mean/std) or plain ``(images, labels)`` pairs: uint8 images (:attr:`transform`'s) are
        normalised the same way, float images are taken as already preprocessed (resized and normalised).
        """
        self.model.eval()
        total = len(dataloader) if hasattr(dataloader, "__len__") else None
        bar = tqdm(
            dataloader,
            total=total,
            desc=f"features {self.model_name}",
            unit="batch",
            disable=None if self.progress else True,  # None: on a terminal or in a notebook (tqdm.auto)
            dynamic_ncols=True,
        )
        position, warned = 0, False
        for batch in bar:
            if isinstance(batch, Batch):
                images, labels, indices = batch.images, batch.labels, batch.indices
            else:
                images, labels = _unpack_pair(batch)
                indices = torch.arange(position, position + len(labels))
            position += len(labels)
            if len(labels) == 0:  # every image of the batch was skipped as undecodable
                continue
            if not warned and (problem := self._unexpected(images)):
                warnings.warn(f"{self.model_name}: {problem}; fx.transform (PIL image -> uint8 [3, {self.img_size}, "
                              f"{self.img_size}]) preprocesses as training did", stacklevel=2)
                warned = True
            with torch.inference_mode():
                embeddings, logits, error = self.read_out(self._prepare(images))
                p_fake = self.p_fake(logits)
            yield FeatureBatch(
                embeddings.cpu().numpy(),
                labels.cpu().numpy().astype(np.int64),
                p_fake.cpu().numpy(),
                indices.cpu().numpy().astype(np.int64),
                None if error is None else error.cpu().numpy(),
            )

    def _unexpected(self, images: torch.Tensor) -> str | None:
        """How a batch differs from what the extractor's loaders (and :attr:`transform`) give, if it does."""
        size = self.img_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            return f"batch of shape {list(images.shape)}, but the model was trained on [B, 3, {size}, {size}]"
        if images.dtype == torch.uint8 or not images.is_floating_point():
            return None
        low, high = (float(v) for v in torch.aminmax(images.detach().float()))
        if low >= 0 and high <= 1:
            return (f"float batch in [{low:.3g}, {high:.3g}], like unnormalised [0, 1] pixels; float batches are "
                    "taken as normalised with the checkpoint's mean/std (uint8 ones are normalised here)")
        bottom, top = self._normalised_range
        if low < bottom - 0.01 or high > top + 0.01:
            return (f"float batch in [{low:.3g}, {high:.3g}], outside [{bottom:.3g}, {top:.3g}] that the checkpoint's "
                    "mean/std give [0, 1] pixels")
        return None

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = self.normalise(x)
        elif not x.is_floating_point():
            raise TypeError(f"images must be uint8 (raw) or float (preprocessed), got {x.dtype}")
        return memory_format(x, self.channels_last)

    def extract(
        self, dataloader: Iterable[Any], return_probs: bool = False
    ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(embeddings [N, D] float32, labels [N])`` in the loader's order, plus ``p_fake [N]`` if asked.

        Everything is held in memory; :meth:`extract_to_file` streams to disk instead.
        """
        batches = list(self.iter_batches(dataloader))
        if not batches:
            raise ValueError(f"{self.model_name}: the loader yielded no images")
        embeddings, labels, p_fake = (np.concatenate([getattr(b, f) for b in batches])
                                      for f in ("embeddings", "labels", "p_fake"))
        return (embeddings, labels, p_fake) if return_probs else (embeddings, labels)

    def make_loader(
        self,
        source: Source,
        data_root: str | os.PathLike | None = None,
        *,
        skip_bad_images: bool = False,
        cache_dir: str | os.PathLike | None = None,
    ) -> DataLoader:
        """A shuffle-free loader over `source` (see :func:`source_frame`: a manifest, labelled or not, a folder of
        images, a list of image paths or a frame) at the checkpoint's input size; :meth:`iter_batches` applies
        its mean/std on the device. With `cache_dir`, images come from the decoded cache (see
        :mod:`stage2.data.cache`), built first where needed."""
        frame = source_frame(source, data_root)
        cache = None
        if cache_dir is not None:
            cache = open_cache(cache_dir, self.img_size, frame["path"].tolist(), workers=max(self.workers, 1),
                               skip_bad_images=skip_bad_images)
        return manifest_loader(frame, self.img_size, batch_size=self.batch_size, workers=self.workers,
                               skip_bad_images=skip_bad_images, cache=cache, pin_memory=self.device.type == "cuda")

    def extract_to_file(
        self,
        source: str | os.PathLike,
        out: str | os.PathLike,
        data_root: str | os.PathLike | None = None,
        *,
        skip_bad_images: bool = False,
        cache_dir: str | os.PathLike | None = None,
    ) -> Path:
        """Stream the features of a manifest (labelled or not) or of a folder of images into a feature file (see
        :mod:`stage2.embeddings.store`) batch by batch, in bounded memory.

        Rows follow the manifest (a folder: its images sorted by path); with ``skip_bad_images`` undecodable
        images are left out (``index`` says which rows remain). Unlabeled rows have label -1.
        """
        frame = source_frame(source, data_root)
        # Fixed-width strings for the whole column, so every block is written with the same dtype.
        text = {
            ("paths" if c == "path" else c): frame[c].to_numpy(dtype=str)
            for c in ("path", *OPTIONAL_COLUMNS)
            if c in frame
        }
        with NpzStreamWriter(out, dtypes={name: values.dtype for name, values in text.items()}) as writer:
            loader = self.make_loader(frame, skip_bad_images=skip_bad_images, cache_dir=cache_dir)
            for batch in self.iter_batches(loader):
                writer.append(
                    embeddings=batch.embeddings,
                    labels=batch.labels,
                    p_fake=batch.p_fake,
                    index=batch.indices,
                    **({} if batch.recon_error is None else {"recon_error": batch.recon_error}),
                    **{name: values[batch.indices] for name, values in text.items()},
                )
            if not writer.rows:
                raise ManifestError(f"{source}: no image could be decoded")
            path = writer.close(
                {
                    "model_name": self.model_name,
                    "family": self.family.name,
                    "checkpoint": os.path.abspath(self.checkpoint_path),
                    "manifest": os.path.abspath(source),
                    "temperature": self.temperature,
                }
            )
            log.info(
                "wrote %s: %d x %d embeddings of %s (%d of %d %s)",
                path,
                writer.rows,
                self.embed_dim,
                self.model_name,
                writer.rows,
                len(frame),
                "images" if Path(source).is_dir() else "manifest rows",
            )
        return path

    def scores_to_file(
        self,
        source: Source,
        out: str | os.PathLike,
        data_root: str | os.PathLike | None = None,
        *,
        skip_bad_images: bool = False,
        cache_dir: str | os.PathLike | None = None,
    ) -> Path:
        """Write :meth:`predict`'s calibrated P(fake) of `source` as a scores table (.csv: path, p_fake, and label /
        video_id + video_p_fake where the source has them; see :mod:`stage2.embeddings.outputs`)."""
        predicted = self.predict(source, data_root, skip_bad_images=skip_bad_images, cache_dir=cache_dir)
        if predicted.empty:
            raise ManifestError(f"{source}: no image could be decoded")
        table = scores_table(predicted)
        write_scores(table, out)
        log.info("wrote %s: P(fake) of %d images by %s (columns: %s)", out, len(table), self.model_name,
                 ", ".join(table.columns))
        return Path(out)

    def predict(self, source: Source, data_root: str | os.PathLike | None = None, **loader: Any) -> pd.DataFrame:
        """Calibrated P(fake) per image of `source` (a folder, a list of paths, a manifest): a frame with the
        source's columns (path, label: -1 when unlabeled, video_id/method when known), ``p_fake`` and, for a
        generative expert, ``recon_error``."""
        frame = source_frame(source, data_root)
        batches = list(self.iter_batches(self.make_loader(frame, **loader)))
        kept = np.concatenate([b.indices for b in batches]) if batches else np.empty(0, dtype=np.int64)
        scores = {"p_fake": np.concatenate([b.p_fake for b in batches]) if batches else []}
        if batches and batches[0].recon_error is not None:
            scores["recon_error"] = np.concatenate([b.recon_error for b in batches])
        return frame.iloc[kept].assign(**scores).reset_index(drop=True)

    def extract_paths(self, source: Source, data_root: str | os.PathLike | None = None, **loader: Any
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(embeddings [N, D], calibrated p_fake [N], paths [N])`` of `source`, which needs no labels: a folder
        (every image below it, sorted), a list of image paths, or a manifest with or without labels."""
        frame = source_frame(source, data_root)
        batches = list(self.iter_batches(self.make_loader(frame, **loader)))
        if not batches:
            raise ManifestError(f"{self.model_name}: no image of {frame.attrs.get('manifest', 'the paths')} decoded")
        embeddings, p_fake, indices = (np.concatenate([getattr(b, f) for b in batches])
                                       for f in ("embeddings", "p_fake", "indices"))
        return embeddings, p_fake, frame["path"].to_numpy(dtype=str)[indices]


def source_frame(source: Source, data_root: str | os.PathLike | None = None) -> pd.DataFrame:
    """What to extract as a manifest frame: a frame as it is; a folder: its image files (IMAGE_SUFFIXES, sorted,
    recursive, unlabeled); a list: those image paths (unlabeled); else a CSV manifest, with or without a label
    column."""
    if isinstance(source, pd.DataFrame):
        return source
    if isinstance(source, list):
        frame = pd.DataFrame({"path": [os.path.abspath(p) for p in source], "label": UNLABELED})
        missing = [p for p in frame["path"] if not os.path.isfile(p)]
        if missing:
            raise ManifestError(f"{len(missing)} of {len(frame)} image paths not found (first: {missing[0]})")
        return frame
    path = Path(source)
    if path.is_dir():
        return frame_from_images(source)
    if not path.exists():
        raise ManifestError(f"{path}: no such manifest file or image folder")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise ManifestError(f"{path}: an image, not a manifest (CSV) or a folder; pass [path] for single images")
    return read_manifest(source, data_root, require_labels=False)


def _unpack_pair(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        images, labels = batch
    except (TypeError, ValueError):
        kind = type(batch).__name__
        raise TypeError(f"expected a Batch or an (images, labels) pair from the loader, got {kind}") from None
    return torch.as_tensor(images), torch.as_tensor(labels)


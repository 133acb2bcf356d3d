"""68-point face landmarks per image (dlib), computed once and cached by content: the face masks of --self-blend.

The optional extra (``pip install -r requirements-landmarks.txt``): ``dlib-bin`` (dlib's HOG face detector and
shape predictor) and ``face-recognition-models`` (which ships ``shape_predictor_68_face_landmarks.dat``). That
model was trained on iBUG 300-W, whose terms forbid commercial use: without the extra, self-blending uses its
ellipse mask instead.

Landmarks are in the decoded image's own pixels (x, y), as :func:`stage2.data.decode.decode_image` gives it: the
largest face the HOG detector finds (upsampling once for a crop under 160 px). They are cached per file content
(the SHA-1 of its bytes), one ``.npy`` a file in ``DIR/<2 hex>/<sha1>.npy`` ((68, 2) float32, or (0, 2): no face
found), so a moved or renamed file is not looked at again, an edited one is, and an interrupted pass keeps what
it did. ``python -m stage2.data.landmarks MANIFEST`` fills the cache ahead of a run.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stage2.atomic import atomic_write
from stage2.data.checks import user_cache_dir
from stage2.errors import USER_ERRORS, ConfigError, ImageDecodeError
from stage2.processes import init_worker

log = logging.getLogger(__name__)

N_POINTS = 68
INSTALL = "pip install -r requirements-landmarks.txt"
SMALL_CROP = 160  # below this side the HOG detector (80 px windows) looks at the crop upsampled twice
CHUNK = 64
_MODEL = "shape_predictor_68_face_landmarks.dat"
_models: tuple[Any, Any] | None = None  # (detector, predictor), loaded once per process


def missing_extra() -> str | None:
    """Why landmarks cannot be computed here (a one-line reason naming the install line), or None when they can."""
    if importlib.util.find_spec("dlib") is None:
        return f"dlib is not installed ({INSTALL})"
    if _model_path() is None:
        return f"face-recognition-models, which ships {_MODEL}, is not installed ({INSTALL})"
    return None


def _model_path() -> Path | None:
    # By path: the package's __init__ imports pkg_resources, which current setuptools no longer has.
    spec = importlib.util.find_spec("face_recognition_models")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "models" / _MODEL
        if path.is_file():
            return path
    return None


def _load_models() -> tuple[Any, Any]:
    global _models
    if _models is None:
        reason = missing_extra()
        if reason:
            raise ConfigError(f"face landmarks: {reason}")
        import dlib

        _models = dlib.get_frontal_face_detector(), dlib.shape_predictor(str(_model_path()))
    return _models


def detect(image: np.ndarray) -> np.ndarray | None:
    """The 68 landmarks (x, y) of the largest face in a uint8 RGB ``[H, W, 3]`` image, float32 [68, 2]; None when
    the detector finds no face."""
    detector, predictor = _load_models()
    image = np.ascontiguousarray(image)
    faces = detector(image, 1 if min(image.shape[:2]) < SMALL_CROP else 0)
    if not faces:
        return None
    face = max(faces, key=lambda rect: rect.area())
    shape = predictor(image, face)
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)


@dataclass(frozen=True)
class Landmarks:
    """Landmarks of a list of images: `points` float32 [N, 68, 2], NaN for an image without a face (or unreadable),
    and how many were computed now rather than read from the cache."""

    points: np.ndarray
    computed: int

    @property
    def found(self) -> np.ndarray:
        return ~np.isnan(self.points[:, 0, 0])

    def summary(self) -> str:
        n, found = len(self.points), int(self.found.sum())
        return (f"{found} of {n} images have a face ({n - found} without one take the ellipse mask); "
                f"{self.computed} computed now, {n - self.computed} from the cache")


def default_dir(cache_dir: str | Path | None) -> Path:
    """Where landmarks are cached: CACHE_DIR/landmarks with --cache-dir, else the user's stage2 cache folder's
    landmarks/ ($STAGE2_CACHE, else $XDG_CACHE_HOME/stage2, else ~/.cache/stage2)."""
    return Path(cache_dir) / "landmarks" if cache_dir else user_cache_dir() / "landmarks"


def image_landmarks(paths: Sequence[str], cache: str | Path, *, workers: int = 1) -> Landmarks:
    """The landmarks of every file of `paths`, from the cache folder `cache` where it holds them; the others are
    computed (in `workers` processes) and cached. An unreadable file gets NaN and is not cached: the loader names
    it when it reads it."""
    cache = Path(cache)
    points = np.full((len(paths), N_POINTS, 2), np.nan, dtype=np.float32)
    keys = [_content_key(path) for path in paths]
    todo: list[int] = []
    for i, key in enumerate(keys):
        stored = _read(cache, key) if key else None
        if stored is None and key:
            todo.append(i)
        elif stored is not None and len(stored):
            points[i] = stored
    if todo:
        started = time.perf_counter()
        jobs = [todo[i:i + CHUNK] for i in range(0, len(todo), CHUNK)]
        args = [([paths[i] for i in job], [keys[i] for i in job], str(cache)) for job in jobs]
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=workers, initializer=init_worker) as pool:
                results = list(pool.map(_landmark_chunk, *zip(*args)))
        else:
            results = [_landmark_chunk(*a) for a in args]
        for job, found in zip(jobs, results):
            for i, face in zip(job, found):
                if face is not None:
                    points[i] = face
        log.info("landmarks: %d images looked at in %.1f s (%s)", len(todo), time.perf_counter() - started, cache)
    return Landmarks(points, len(todo))


def _content_key(path: str) -> str | None:
    try:
        with open(path, "rb") as file:
            return hashlib.sha1(file.read()).hexdigest()
    except OSError:
        return None


def _entry(cache: Path, key: str) -> Path:
    return cache / key[:2] / f"{key}.npy"


def _read(cache: Path, key: str) -> np.ndarray | None:
    """A cached entry: [68, 2] landmarks, [0, 2] for no face; None when missing or damaged (computed again)."""
    try:
        points = np.load(_entry(cache, key), allow_pickle=False)
    except (OSError, ValueError):
        return None
    return points if points.dtype == np.float32 and points.shape in ((N_POINTS, 2), (0, 2)) else None


def _landmark_chunk(paths: list[str], keys: list[str], cache: str) -> list[np.ndarray | None]:
    """Worker: detect and cache the landmarks of these files; None for an unreadable file or no face."""
    from stage2.data.decode import decode_image  # torch loads in the worker only

    found: list[np.ndarray | None] = []
    for path, key in zip(paths, keys):
        try:
            image = decode_image(path).permute(1, 2, 0).numpy()
        except ImageDecodeError:
            found.append(None)
            continue
        points = detect(image)
        stored = np.zeros((0, 2), dtype=np.float32) if points is None else points
        atomic_write(_entry(Path(cache), key), lambda f, a=stored: np.save(f, a, allow_pickle=False))
        found.append(points)
    return found


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m stage2.data.landmarks MANIFEST [MANIFEST ...]``: fill the landmark cache ahead of a run."""
    parser = argparse.ArgumentParser(prog="python -m stage2.data.landmarks", description=main.__doc__)
    parser.add_argument("manifests", nargs="+", metavar="MANIFEST", help="CSVs with a path column (and label)")
    parser.add_argument("--data-root", help="base folder for relative paths (default: each manifest's folder)")
    parser.add_argument("--cache-dir", help="the run's --cache-dir: landmarks go to CACHE_DIR/landmarks "
                        "(default: ~/.cache/stage2/landmarks)")
    parser.add_argument("--workers", type=int, default=1, help="processes detecting faces")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from stage2.data.manifest import read_manifest

    try:
        reason = missing_extra()
        if reason:
            raise ConfigError(f"face landmarks: {reason}")
        paths = sorted({p for m in args.manifests
                        for p in read_manifest(m, args.data_root, require_labels=False)["path"]})
        result = image_landmarks(paths, default_dir(args.cache_dir), workers=max(args.workers, 1))
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"landmarks: {result.summary()}")


if __name__ == "__main__":
    main()

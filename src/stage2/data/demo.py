"""Built-in synthetic demo dataset: procedural face crops, half of them with a face-swap-like artefact.

Each "video" has its own identity (skin tone, face shape, features, lighting, background, texture) and its
frames jitter slightly around it. Fake videos replace an inner face region with a manipulated copy (resampled,
colour-shifted or over-sharpened) and blend it back through a soft elliptical mask, which leaves the two cues
real detectors learn: a texture/resampling mismatch and a blending boundary. The split is by video, so no
identity appears in both train and val.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter
from tqdm import tqdm

FAKE_METHODS = ("resample_blend", "color_blend", "sharpen_blend")
VAL_FRACTION = 2 / 7  # 5:2 train:val videos per class: 420 + 168 images with the defaults
_GENERATOR_VERSION = 1  # bump when the images change, so stale demo folders get regenerated
_STAMP = "demo_stamp.json"


def _ellipse(
    size: int, cx: float, cy: float, ax: float, ay: float, soft: float
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray, np.ndarray]:
    """A soft ellipse restricted to its bounding box, so small features cost little to paint.

    Returns ``(box, mask, nx, ny)``: the box as a pair of slices, the mask ``[h, w, 1]`` (1 inside, 0 outside,
    a linear ramp ``soft`` radius units wide at the edge) and the box's coordinates in ellipse units.
    """
    reach = 1 + soft / 2

    def span(center: float, axis: float) -> slice:
        lo, hi = ((center + sign * axis * reach + 1) / 2 * (size - 1) for sign in (-1, 1))
        return slice(max(int(lo), 0), min(int(np.ceil(hi)) + 1, size))

    box = (span(cy, ay), span(cx, ax))
    coords = np.linspace(-1, 1, size, dtype=np.float32)
    nx, ny = (coords[None, box[1]] - cx) / ax, (coords[box[0], None] - cy) / ay
    mask = np.clip((1 - np.sqrt(nx**2 + ny**2)) / soft + 0.5, 0, 1)[..., None]
    return box, mask, nx, ny


def _paint(image: np.ndarray, colour: np.ndarray, cx: float, cy: float, ax: float, ay: float, soft: float) -> None:
    """Alpha-blend a flat colour into ``image`` (in place) through a soft ellipse."""
    box, mask, _, _ = _ellipse(image.shape[0], cx, cy, ax, ay, soft)
    image[box] += (colour - image[box]) * mask


def _noise(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    # Uniform rather than Gaussian: several times cheaper to draw, and just as good as texture.
    return (rng.random(shape, dtype=np.float32) - 0.5) * np.float32(std * 12**0.5)


def _identity(rng: np.random.Generator) -> dict:
    """Per-video appearance parameters, in normalised [-1, 1] image coordinates and [0, 255] colours."""
    skin = np.array([205, 160, 130]) * rng.uniform(0.45, 1.1) + rng.normal(0, 12, 3)
    colours = {
        "skin": np.clip(skin, 30, 250),
        "bg_top": rng.uniform(40, 200) + rng.normal(0, 20, 3),
        "bg_bottom": rng.uniform(40, 200) + rng.normal(0, 20, 3),
        "hair": rng.uniform(10, 120) * np.array([1.0, 0.8, 0.6]),
        "iris": rng.uniform(20, 110, 3),
    }
    # Colours as float32 arrays and shapes as Python floats: numpy scalars would promote images to float64.
    return {name: colour.astype(np.float32) for name, colour in colours.items()} | {
        "bg_wave": rng.uniform(1.0, 4.0, 2).tolist(),
        "center": rng.normal(0, 0.05, 2).tolist(),
        "axes": [rng.uniform(0.48, 0.6), rng.uniform(0.62, 0.78)],
        "eye_dx": rng.uniform(0.36, 0.5),  # fraction of the face half-width
        "eye_y": rng.uniform(-0.22, -0.1),
        "eye_size": rng.uniform(0.05, 0.08),
        "mouth_y": rng.uniform(0.3, 0.42),
        "mouth_w": rng.uniform(0.14, 0.24),
        "light": rng.normal(0, 0.35, 2).tolist(),
        "texture": rng.uniform(4.0, 6.0),
    }


def _render_face(ident: dict, rng: np.random.Generator, size: int) -> np.ndarray:
    """One frame of an identity as float32 ``[H, W, 3]`` in [0, 255]; positions and lighting jitter a little."""
    cx, cy = (ident["center"] + rng.normal(0, 0.015, 2)).tolist()
    ax, ay = (np.array(ident["axes"]) * rng.uniform(0.97, 1.03)).tolist()
    lx, ly = (ident["light"] + rng.normal(0, 0.05, 2)).tolist()

    coords = np.linspace(-1, 1, size, dtype=np.float32)
    t = ((coords + 1) / 2)[:, None, None]
    wave = np.sin(coords[None, :] * ident["bg_wave"][0] + coords[:, None] * ident["bg_wave"][1])[..., None]
    image = ident["bg_top"] * (1 - t) + ident["bg_bottom"] * t + np.float32(12) * wave

    box, hair, _, ny = _ellipse(size, cx, cy - 0.08, ax * 1.08, ay * 1.02, 0.04)
    hair = hair * (ny < -0.3)[..., None]
    image[box] += (ident["hair"] - image[box]) * hair

    # Lambert shading of the face ellipse seen as a half ellipsoid.
    box, face, nx, ny = _ellipse(size, cx, cy, ax, ay, 0.03)
    nz = np.sqrt(np.clip(1 - nx**2 - ny**2, 0, 1))
    shade = np.clip(0.55 + 0.45 * (nz * 0.8 + nx * lx + ny * ly), 0.2, 1.15)[..., None]
    image[box] += (ident["skin"] * shade - image[box]) * face

    eye_r = ident["eye_size"] * rng.uniform(0.9, 1.1)
    for side in (-1, 1):
        ex, ey = cx + side * ident["eye_dx"] * ax, cy + ident["eye_y"]
        _paint(image, np.float32([235, 232, 225]), ex, ey, eye_r * 1.6, eye_r, 0.15)
        _paint(image, ident["iris"], ex + rng.normal(0, 0.01), ey, eye_r * 0.7, eye_r * 0.7, 0.2)
    lips = ident["skin"] * np.float32([0.75, 0.4, 0.4])
    _paint(image, lips, cx, cy + ident["mouth_y"], ident["mouth_w"], 0.035 * rng.uniform(0.8, 1.6), 0.3)

    image += _noise(rng, image.shape, ident["texture"])
    return np.clip(image, 0, 255)


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8))


def _manipulate(image: np.ndarray, ident: dict, method: str, strength: float, tint: np.ndarray) -> np.ndarray:
    """Replace the inner face with a manipulated copy of itself, blended through a soft elliptical mask.

    ``strength`` in (0, 1] scales the method's artefact; ``tint`` is the per-channel colour mismatch of the
    swapped-in face, present (if small) for every method as it is in real face swaps.
    """
    size = image.shape[0]
    if method == "resample_blend":
        low = max(8, round(size * (0.4 - 0.28 * strength)))
        source = np.asarray(_pil(image).resize((low, low), Image.BILINEAR).resize((size, size), Image.BILINEAR))
    elif method == "color_blend":
        source = image * np.float32(1 + 2 * strength * tint)
    elif method == "sharpen_blend":
        sharpen = ImageFilter.UnsharpMask(radius=size / 64, percent=int(100 + 200 * strength), threshold=0)
        source = np.asarray(_pil(image).filter(sharpen))
    else:
        raise ValueError(f"unknown demo manipulation '{method}' (expected one of {', '.join(FAKE_METHODS)})")
    source = source.astype(np.float32) * np.float32(1 + tint)

    (cx, cy), (ax, ay) = ident["center"], ident["axes"]
    box, mask, _, _ = _ellipse(size, cx, cy + 0.05, ax * 0.72, ay * 0.68, 0.3 - 0.2 * strength)
    image[box] += (source[box] - image[box]) * mask
    return image


def _write_video(folder: Path, ident: dict, method: str, frames: int, size: int, rng: np.random.Generator) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    # One swap per video: its strength and colour mismatch hold across frames (some videos are subtle).
    strength = rng.uniform(0.5, 1.0)
    tint = rng.choice([-1, 1], 3) * rng.uniform(0.05, 0.12, 3)
    names = []
    for frame in range(frames):
        image = _render_face(ident, rng, size)
        if method != "real":
            image = _manipulate(image, ident, method, strength, tint)
        # Light sensor noise after the manipulation, so fakes are not simply the noise-free images.
        image += _noise(rng, image.shape, 1.5)
        name = f"{frame:03d}.png"
        # Stored uncompressed: noisy images barely deflate, and deflating dominated the generation time.
        _pil(image).save(folder / name, compress_level=0)
        names.append(name)
    return names


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    # Write then rename, so a concurrent reader never sees half a manifest.
    tmp = path.with_suffix(".csv.tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def make_demo_dataset(
    root: str | Path,
    n_videos: int = 196,
    frames_per_video: int = 3,
    size: int = 256,
    seed: int = 0,
    *,
    progress: bool = False,
) -> tuple[Path, Path]:
    """Write the synthetic demo under ``root`` and return ``(train_manifest, val_manifest)``.

    ``n_videos`` is split evenly between real and fake (fakes cycle through :data:`FAKE_METHODS`), then
    ``VAL_FRACTION`` of each class goes to val. The defaults give 420 train + 168 val 256x256 PNGs (about
    110 MB, ~10 s on two CPU cores), small enough for a CPU smoke run yet hard enough that a small CNN needs a
    few epochs to get well above chance.
    Deterministic for a seed; when ``root`` already holds a demo made with the same parameters it is reused.
    Call it from one process only (e.g. rank 0 before a barrier): it writes files without locking.
    ``progress`` prints whether the demo is reused or generated, with a progress bar and the time it took.
    """
    if n_videos < 4 or frames_per_video < 1:
        raise ValueError(f"demo needs n_videos >= 4 and frames_per_video >= 1, got {n_videos} and {frames_per_video}")
    root = Path(root)
    train_csv, val_csv, stamp_path = root / "train.csv", root / "val.csv", root / _STAMP
    params = {
        "version": _GENERATOR_VERSION,
        "n_videos": n_videos,
        "frames_per_video": frames_per_video,
        "size": size,
        "seed": seed,
    }
    if train_csv.is_file() and val_csv.is_file() and stamp_path.is_file():
        try:
            if json.loads(stamp_path.read_text()) == params:
                if progress:
                    print(f"demo: reusing the synthetic dataset in {root}", flush=True)
                return train_csv, val_csv
        except json.JSONDecodeError:
            pass  # a damaged stamp just means "regenerate"
    started = time.monotonic()
    if progress:
        print(f"demo: generating {n_videos * frames_per_video} synthetic {size}x{size} face crops ({n_videos} videos) "
              f"in {root}, once (about 10 s on two idle cores, minutes on a busy machine)", flush=True)

    stamp_path.unlink(missing_ok=True)  # until the new stamp is written, a half-written demo is never reused
    n_real = n_videos // 2
    labels = [0] * n_real + [1] * (n_videos - n_real)
    split_rng = np.random.default_rng(seed)
    val_videos = set()
    for label in (0, 1):
        videos = [i for i, lab in enumerate(labels) if lab == label]
        n_val = max(1, round(len(videos) * VAL_FRACTION))
        val_videos.update(split_rng.permutation(videos)[:n_val].tolist())

    rows = {"train": [], "val": []}
    # disable=None: a bar on a terminal only, never carriage returns in a log file
    for video, label in enumerate(tqdm(labels, desc="demo videos", disable=None if progress else True, leave=False)):
        # One independent stream per video: a video's frames don't depend on how many others exist.
        rng = np.random.default_rng([seed, video])
        method = "real" if label == 0 else FAKE_METHODS[(video - n_real) % len(FAKE_METHODS)]
        video_id = f"vid{video:03d}"
        names = _write_video(root / "images" / video_id, _identity(rng), method, frames_per_video, size, rng)
        split = "val" if video in val_videos else "train"
        rows[split] += [(f"images/{video_id}/{name}", label, video_id, method) for name in names]

    columns = ["path", "label", "video_id", "method"]
    _write_csv(pd.DataFrame(rows["train"], columns=columns), train_csv)
    _write_csv(pd.DataFrame(rows["val"], columns=columns), val_csv)
    stamp_path.write_text(json.dumps(params))
    if progress:
        print(f"demo: {len(rows['train'])} train + {len(rows['val'])} val images written in "
              f"{time.monotonic() - started:.0f} s", flush=True)
    return train_csv, val_csv

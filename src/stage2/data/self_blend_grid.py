"""A picture of what --self-blend makes: real crops beside their self-blended fakes and masks, ellipse and landmarks.

``python -m stage2.data.self_blend_grid MANIFEST OUT.png [--n 4]``: one row per real image of the manifest (the
first N), columns real | fake through the ellipse mask | that mask | fake through the landmark hull | that mask
(the last two blank where no face is found, or without the optional extra). The real is the one trained beside its
fakes: the target copy, colour- or frequency-shifted in about half the rows. Each image is blended at its own
resolution, then shown at --size px.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from stage2.data.decode import decode_image, resize_uint8
from stage2.data.landmarks import detect, missing_extra
from stage2.data.self_blend import self_blended
from stage2.errors import USER_ERRORS, ConfigError

COLUMNS = ("real (as paired)", "fake (ellipse)", "mask (ellipse)", "fake (landmarks)", "mask (landmarks)")
_HEADER = 16  # px of the column titles


def blend_grid(paths: Sequence[str], *, size: int = 256, seed: int = 0) -> Image.Image:
    """The grid of the images at `paths` (see the module): RGB, len(paths) rows of COLUMNS, `size` px tiles."""
    landmarks = missing_extra() is None
    rows = []
    for i, path in enumerate(paths):
        crop = decode_image(path)
        points = detect(crop.permute(1, 2, 0).numpy()) if landmarks else None
        draws = seed * 1_000_003 + i  # the same draws for both masks: only the mask differs
        # the same draws give both the same target (the real): the masks are drawn after it
        hull = _blended(crop, points, draws)[1:] if points is not None else [torch.zeros_like(crop)] * 2
        tiles = [*_blended(crop, None, draws), *hull]
        rows.append(torch.cat([resize_uint8(t, size) for t in tiles], dim=-1))
    body = torch.cat(rows, dim=-2).permute(1, 2, 0).numpy()
    grid = Image.new("RGB", (body.shape[1], body.shape[0] + _HEADER), "white")
    grid.paste(Image.fromarray(np.ascontiguousarray(body)), (0, _HEADER))
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(COLUMNS):
        draw.text((c * size + 4, 2), title, fill="black")
    return grid


def _blended(crop: torch.Tensor, points: np.ndarray | None, seed: int) -> list[torch.Tensor]:
    """[real, fake, the fake's mask (grey, scaled to its maximum)] of a uint8 crop, through the landmark hull or the
    ellipse."""
    torch.manual_seed(seed)
    real, fake, mask = self_blended(crop, points)
    return [real, fake, (mask / mask.max().clamp_min(1e-6) * 255).round().to(torch.uint8).expand(3, -1, -1)]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stage2.data.self_blend_grid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", help="a CSV with path and label columns (its reals are shown)")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--n", type=int, default=4, help="rows: the first N real images")
    parser.add_argument("--size", type=int, default=256, help="the side of each tile, px")
    parser.add_argument("--seed", type=int, default=0, help="seeds the blends")
    parser.add_argument("--data-root", help="base folder for relative paths (default: the manifest's folder)")
    args = parser.parse_args(argv)
    from stage2.data.manifest import read_manifest

    try:
        frame = read_manifest(args.manifest, args.data_root)
        reals = frame.loc[frame["label"] == 0, "path"].head(args.n).tolist()
        if not reals:
            raise ConfigError(f"{args.manifest}: no real rows to blend")
        blend_grid(reals, size=args.size, seed=args.seed).save(args.out, format="PNG")
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.out}: {len(reals)} real images beside their self-blends ({', '.join(COLUMNS)})"
          + ("" if missing_extra() is None else f"; no landmark columns: {missing_extra()}"))


if __name__ == "__main__":
    main()

"""Speed of the shortcut audit (``stage2.data.audit``): file headers only, no pixel decoded.

    python -m benchmarks.audit_speed                          # 100,000 files in a temporary folder
    python -m benchmarks.audit_speed --files 20000 --dir /tmp/audit_files --workers 2

It writes the files once (64x64 crops: 90% JPEG at a quality from 70 to 95, 10% PNG; with ``--dir`` they are
kept and reused), then times the audit's header reads of all of them in one process and in ``--workers``
processes; for scale, it also reads the headers of, and fully decodes, 500 face-crop-sized files (256x256, JPEG
and PNG). Every figure is given per wall-clock second and per CPU second of the processes doing the work: on a
shared machine the second is what one core delivers. The files were just written, so they come from the page
cache: a cold network mount adds its latency per file.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.timing import load_average, machine
from stage2.atomic import write_json_atomic
from stage2.data.audit import audit_table, read_headers
from stage2.data.decode import decode_image
from stage2.processes import usable_cores


def write_files(folder: Path, n: int, size: int = 64) -> list[str]:
    """n crops of size x size under `folder` (made only where missing): 90% JPEG (quality 70-95), 10% PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    base = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    paths = []
    for i in range(n):
        path = folder / f"{i // 1000:03d}" / (f"{i:06d}.png" if i % 10 == 0 else f"{i:06d}.jpg")
        if not path.is_file():
            path.parent.mkdir(exist_ok=True)
            image = Image.fromarray(np.roll(base, i % size, axis=1))
            image.save(path, **({} if path.suffix == ".png" else {"quality": int(70 + i % 26)}))
        paths.append(str(path))
    return paths


def measured(fn: Callable[[], Any], n: int) -> dict[str, float]:
    """Files per wall-clock second and per CPU second (this process and the workers it waited for)."""
    def cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    wall, used = time.perf_counter(), cpu()
    fn()
    wall, used = time.perf_counter() - wall, cpu() - used
    return {"seconds": round(wall, 2), "files_per_s": round(n / wall), "cpu_seconds": round(used, 2),
            "files_per_cpu_s": round(n / used)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=usable_cores(), help="processes (default: cores)")
    parser.add_argument("--dir", help="keep the generated files here (default: a temporary folder)")
    parser.add_argument("--json", default="output/audit_speed.json")
    args = parser.parse_args(argv)
    load_start = load_average()[0]
    with tempfile.TemporaryDirectory(prefix="audit_speed_") as tmp:
        folder = Path(args.dir or tmp)
        t0 = time.perf_counter()
        paths = write_files(folder / "small", args.files)
        print(f"{len(paths)} files ready in {time.perf_counter() - t0:.0f} s under {folder}", flush=True)
        features: list[Any] = []
        one = measured(lambda: features.append(read_headers(paths, 1)), len(paths))
        many = measured(lambda: read_headers(paths, args.workers), len(paths))
        labels = np.arange(len(paths)) % 2
        table = measured(lambda: audit_table(features[0], labels, "bench"), len(paths))
        crops = write_files(folder / "crops", 500, size=256)
        crop_headers = measured(lambda: read_headers(crops, 1), len(crops))
        crop_decode = measured(lambda: [decode_image(p) for p in crops], len(crops))
    result = {"files": len(paths), "workers": args.workers, "machine": machine(),
              "load_average": {"start": load_start, "end": load_average()[0]},
              "headers_1_process": one, f"headers_{args.workers}_processes": many, "auc_table": table,
              "crops_256px_headers": crop_headers, "crops_256px_full_decode": crop_decode}
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    write_json_atomic(Path(args.json), result)
    return result


if __name__ == "__main__":
    main()

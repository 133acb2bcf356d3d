"""Speed of the shortcut audit (``src.data.audit``): file headers only, no pixel decoded.

    python -m benchmarks.audit_speed                          # 100,000 files in a temporary folder
    python -m benchmarks.audit_speed --files 20000 --dir /tmp/audit_files --workers 2

It writes the files once (64x64 crops: 90% JPEG at a quality drawn from 70-95, 10% PNG; with ``--dir`` they are
kept and reused), then times the audit's header reads of all of them in one process and in ``--workers``
processes, and, for scale, a full decode of the first 2,000 with the trainer's decoder. The files were just
written, so they are read from the page cache: the figures are the CPU cost; a cold network mount adds its
latency per file.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.timing import machine
from src.data.audit import audit_table, read_headers
from src.data.decode import decode_image


def write_files(folder: Path, n: int) -> list[str]:
    """n small crops under `folder` (made only where missing); returns their paths in order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    paths = []
    for i in range(n):
        path = folder / f"{i // 1000:03d}" / (f"{i:06d}.png" if i % 10 == 0 else f"{i:06d}.jpg")
        if not path.is_file():
            path.parent.mkdir(exist_ok=True)
            image = Image.fromarray(np.roll(base, i % 64, axis=1))
            image.save(path, **({} if path.suffix == ".png" else {"quality": int(70 + i % 26)}))
        paths.append(str(path))
    return paths


def timed(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes (default: cores)")
    parser.add_argument("--dir", help="keep the generated files here (default: a temporary folder)")
    parser.add_argument("--json", default="output/audit_speed.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="audit_speed_") as tmp:
        folder = Path(args.dir or tmp)
        write_s, paths = timed(write_files, folder, args.files)
        print(f"{len(paths)} files ready in {write_s:.0f} s under {folder}", flush=True)
        labels = np.arange(len(paths)) % 2
        one_s, features = timed(read_headers, paths, 1)
        many_s, _ = timed(read_headers, paths, args.workers)
        table_s, _ = timed(audit_table, features, labels, "bench")
        sample = paths[:2000]
        decode_s, _ = timed(lambda: [decode_image(p) for p in sample])
    result = {
        "files": len(paths), "workers": args.workers, "machine": machine(),
        "load_average_end": os.getloadavg()[0],
        "headers_1_process_s": round(one_s, 2), "headers_1_process_files_per_s": round(len(paths) / one_s),
        f"headers_{args.workers}_processes_s": round(many_s, 2),
        f"headers_{args.workers}_processes_files_per_s": round(len(paths) / many_s),
        "auc_table_s": round(table_s, 3),
        "full_decode_files_per_s": round(len(sample) / decode_s),
    }
    print(json.dumps(result, indent=2))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

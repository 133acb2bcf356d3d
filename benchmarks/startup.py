"""Start-up time of a training run on a large manifest: seconds from the command's start to its first step.

    python -m benchmarks.startup                                   # 1,000,000 train rows under a temporary folder
    python -m benchmarks.startup --rows 200000 --dir /tmp/scale_bench

It writes `--distinct` tiny images (8x8, half PNG, half JPEG) once, and gives each manifest row its own path to
one of them as a hard link (a row's own directory entry: what a start-up stats and opens per row, at the disk cost
of a few thousand files). Then it runs train_stage2_effnet.py (timm's tiny test model, CPU) three times and times
each to its first step's log line, stopping it there with SIGTERM (which writes a mid-epoch last.pt):

- first: a new run folder, with no start-up checks remembered (STAGE2_CACHE points to an empty folder);
- resume: `--resume` of that run;
- rerun: the same command in another new run folder.

The files were just written or read, so they come from the page cache (the issue's setting); a cold network
mount adds its latency per file to every uncached check. Each line of the run's log is timed as it arrives, so
the figures also say when the shortcut audit's table came (the last of the start-up checks).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.arguments import positive_int
from benchmarks.timing import load_average
from stage2.atomic import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
FIRST_STEP = re.compile(r"epoch \d+/\d+ step \d+/")  # this process's first step (a resume's is not 1)
AUDIT_LINE = "shortcut audit (file headers only"


def write_set(folder: Path, rows: int, val_rows: int, distinct: int) -> tuple[Path, Path]:
    """train.csv (`rows` rows) and val.csv under `folder`, made only where missing: each row a hard link of its own
    to one of `distinct` 8x8 images; a label per video of 10 rows; method and video_id columns."""
    source = folder / "source"
    source.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"{i:05d}.png" if i % 2 == 0 else f"{i:05d}.jpg" for i in range(distinct)]
    for name in names:
        if not (source / name).is_file():
            image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
            image.save(source / name, **({"quality": 90} if name.endswith(".jpg") else {}))
    manifests = []
    for split, n in (("train", rows), ("val", val_rows)):
        csv = folder / f"{split}.csv"
        manifests.append(csv)
        if csv.is_file() and sum(1 for _ in csv.open()) == n + 1:
            continue
        lines = ["path,label,video_id,method\n"]
        for i in range(n):
            name = names[i % distinct]
            relative = f"{split}/{i // 1000:04d}/{i:07d}{Path(name).suffix}"
            link = folder / relative
            if i % 1000 == 0:
                link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_file():
                os.link(source / name, link)
            lines.append(f"{relative},{(i // 10) % 2},{split}{i // 10},m{i % 3}\n")
        csv.write_text("".join(lines))
    return manifests[0], manifests[1]


def time_to_first_step(command: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run `command` until its first step's log line, then stop it (SIGTERM); the seconds at which its lines
    came, and the CPU seconds it and its processes used in all (to the end of the stop: a load-independent
    figure)."""
    def cpu() -> float:
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        return used.ru_utime + used.ru_stime

    cpu_start, started = cpu(), time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=ROOT)
    result: dict[str, Any] = {}
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        now = round(time.perf_counter() - started, 2)
        lines.append(f"{now:7.2f}  {line.rstrip()}")
        if AUDIT_LINE in line:
            result.setdefault("audit_done_s", now)
        if FIRST_STEP.search(line):
            result["first_step_s"] = now
            process.send_signal(signal.SIGTERM)
            break
        if now > timeout:
            process.kill()
            break
    process.communicate()
    result["cpu_s"] = round(cpu() - cpu_start, 2)
    if "first_step_s" not in result:
        raise RuntimeError("no first step; the run said:\n" + "\n".join(lines[-20:]))
    result["log"] = lines
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=positive_int, default=1_000_000, help="train manifest rows")
    parser.add_argument("--val-rows", type=positive_int, default=2000)
    parser.add_argument("--distinct", type=positive_int, default=4000, help="distinct image files behind the rows")
    parser.add_argument("--workers", type=positive_int, default=2, help="the run's --workers")
    parser.add_argument("--dir", help="keep the generated set here (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a run may take to its first step")
    parser.add_argument("--json", default="output/startup.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="startup_") as tmp:
        folder = Path(args.dir or tmp)
        t0 = time.perf_counter()
        train, val = write_set(folder, args.rows, args.val_rows, args.distinct)
        print(f"{args.rows} + {args.val_rows} rows ready in {time.perf_counter() - t0:.0f} s under {folder}",
              flush=True)
        runs = folder / "runs"
        shutil.rmtree(runs, ignore_errors=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")]), "HF_HUB_OFFLINE": "1",
               "PYTHONUNBUFFERED": "1", "STAGE2_CACHE": str(runs / "cache")}
        base = [sys.executable, str(ROOT / "train_stage2_effnet.py"), "--train-manifest", str(train),
                "--val-manifest", str(val), "--model", "test_efficientnet", "--no-pretrained", "--img-size", "32",
                "--batch-size", "8", "--epochs", "1", "--amp", "off", "--device", "cpu", "--log-every", "1",
                "--workers", str(args.workers)]
        cases = {"first": ["--output-dir", str(runs / "a")],
                 "resume": ["--output-dir", str(runs / "a"), "--resume"],
                 "rerun": ["--output-dir", str(runs / "b")]}
        result: dict[str, Any] = {"rows": args.rows, "val_rows": args.val_rows, "distinct_files": args.distinct,
                                  "workers": args.workers, "load_average_start": load_average()[0]}
        for case, flags in cases.items():
            timed = time_to_first_step([*base, *flags], env, args.timeout)
            result[case] = {k: v for k, v in timed.items() if k != "log"}
            print(f"{case}: first step at {timed['first_step_s']:.1f} s (audit table at "
                  f"{timed.get('audit_done_s', float('nan')):.1f} s; {timed['cpu_s']:.1f} CPU s to the stop)",
                  flush=True)
            print("\n".join(f"    {line[:160]}" for line in timed["log"]), flush=True)
        result["load_average_end"] = load_average()[0]
    print(json.dumps(result, indent=2))
    write_json_atomic(Path(args.json), result)
    return result


if __name__ == "__main__":
    main()

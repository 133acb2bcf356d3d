"""One command for every speed figure of the project: prints a table and writes JSON.

    python -m benchmarks.bench --quick                  # a few minutes on a 2-core CPU
    python -m benchmarks.bench --json output/bench.json # more runs per figure; adds section 5 on a CUDA box

Sections: 1 input pipeline per worker core (ours vs the classic PIL + transforms v1 recipe vs decode alone),
2 the same from the decoded cache, 3 CPU training steps through our Trainer vs a plain fp32 loop,
4 feature extraction vs a bare forward, 5 (CUDA only) bf16/fp32, eager/compile, end-to-end/model-only and
GPU memory; "learn" (benchmarks/learn.py): what the trainer learns at every --aug level against a plain loop.
Each speed figure is the median images/s of several timed runs after warm-up; the cases compared with each
other take turns run by run, so load from other processes hits them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.data import crop_pngs
from benchmarks.gpu import GpuPlan, gpu_compile, gpu_effnet, gpu_extraction, gpu_genconvit
from benchmarks.input_pipeline import input_pipeline
from benchmarks.learn import LearnPlan, run_learn
from benchmarks.learn import markdown as learn_markdown
from benchmarks.timing import Row, fill_ratios, load_average, machine
from benchmarks.traces import TRACES
from benchmarks.training import cpu_extraction, cpu_training
from stage2.run.device import busy_cpu_load

SECTIONS = ("input", "train", "extract", "gpu", "learn")


@dataclass(frozen=True)
class Plan:
    images: int = 240
    input_repeats: int = 7
    train_steps: int = 1
    train_repeats: int = 5
    genconvit_repeats: int = 3
    bf16_repeats: int = 2  # only where --amp auto picks fp32 (no native bf16): emulated bf16 is slow
    extract_batches: int = 4
    extract_repeats: int = 5
    warmup: int = 1
    gpu: GpuPlan = field(default_factory=GpuPlan)


QUICK = Plan(
    images=96,
    input_repeats=5,
    train_repeats=3,
    genconvit_repeats=2,
    bf16_repeats=0,
    extract_batches=2,
    extract_repeats=3,
    gpu=GpuPlan(steps=10, e2e_steps=30, repeats=2),
)


@dataclass(frozen=True)
class Goal:
    """What the issue asks of the first row in `section` whose case starts with `case`: a ratio to its baseline
    row, or with `absolute`, a number of images/s."""

    name: str
    section: str
    case: str
    target: float
    absolute: bool = False


GOALS = (
    Goal("input pipeline, full augmentation, per core: ours / classic", "1 input", "ours", 2.0),
    Goal("from the cache, augmentation included, per core: cache + ours / classic", "2 cache", "cache + ours", 5.0),
    Goal("EfficientNetV2-B3 CPU training step: ours / plain fp32", "3 train CPU EffNetV2", "ours (--amp auto", 1.6),
    Goal("extraction / bare forward (CPU)", "4 extract", "FeatureExtractor.extract", 0.9),
    Goal("H200: end-to-end (cache) / model-only", "5 GPU train EffNetV2", "end-to-end bf16, cache", 0.9),
    Goal(
        "H200: end-to-end EfficientNetV2-B3 images/s",
        "5 GPU train EffNetV2",
        "end-to-end bf16, cache",
        4000.0,
        absolute=True,
    ),
)


def evaluate_goals(rows: list[Row]) -> list[dict[str, Any]]:
    results = []
    for goal in GOALS:
        subject = next((r for r in rows if r.section.startswith(goal.section) and r.case.startswith(goal.case)), None)
        value = None if subject is None else subject.value if goal.absolute else subject.ratio
        results.append(
            {
                "goal": goal.name,
                "target": goal.target,
                "value": None if value is None else round(value, 3),
                "met": None if value is None else bool(value >= goal.target),
            }
        )
    return results


def _num(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def format_table(rows: list[Row]) -> str:
    lines, section = [], None
    header = f"{'case':<48} {'img/s':>9} {'runs min-max':>17} {'ratio':>7}  note"
    for r in rows:
        if r.section != section:
            section = r.section
            lines += ["", f"[{section}]", header]
        spread = f"{_num(min(r.runs))}-{_num(max(r.runs))}" if r.runs else "derived"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        note = "; ".join(filter(None, [r.note, *(f"{k} {v}" for k, v in r.extra.items())]))
        lines.append(f"{r.case:<48} {_num(r.value):>9} {spread:>17} {ratio:>7}  {note}")
    return "\n".join(lines)


def format_goals(goals: list[dict[str, Any]]) -> str:
    lines = ["", "[goals]"]
    for g in goals:
        if g["value"] is None:
            lines.append(f"  n/a   {g['goal']} (target {g['target']:g}; not measured here)")
        else:
            mark = "met " if g["met"] else "MISS"
            lines.append(f"  {mark}  {g['goal']}: {g['value']:g} (target {g['target']:g})")
    return "\n".join(lines)


def default_threads() -> int:
    """One thread per core, unless other processes already keep half the cores busy (the trainer's rule,
    stage2.run.device.busy_cpu_load): then one thread gives steadier, faster figures."""
    busy = busy_cpu_load()
    if busy:
        print(f"machine busy ({busy}): 1 torch thread; --threads overrides")
    return 1 if busy else torch.get_num_threads()


def _write(result: dict[str, Any], rows: list[Row], started: float, out: Path) -> None:
    """Bring `result` up to date with `rows` and write it as JSON plus its Markdown copy."""
    fill_ratios(rows)
    result.update(rows=[asdict(r) for r in rows], goals=evaluate_goals(rows))
    result["load_average"]["end"] = load_average()
    result["seconds"]["total"] = round(time.time() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    """The results as Markdown tables, ready to paste into BENCHMARKS.md."""
    info, load = result["machine"], result["load_average"]
    gpu = f", GPU {info['gpu']}" if info["gpu"] else ", no GPU"
    lines = [
        f"`{result['command']}`: {result['seconds']['total']:.0f} s",
        "",
        f"{info['cpu']}, {info['cpu_cores']} cores ({info['cpu_capability']}, native bf16: {info['native_cpu_bf16']}), "
        f"{info['memory_gib']} GiB{gpu}; torch {info['torch']}, torchvision {info['torchvision']}, timm {info['timm']}"
        f", Pillow {info['pillow']}, Python {info['python']}; {info['torch_threads']} torch thread(s) in sections 3-5; "
        f"load average {load['start'][0]} at start, {load['end'][0]} at end",
    ]
    section = None
    for r in result["rows"]:
        if r["section"] != section:
            section = r["section"]
            lines += [
                "",
                f"**{section}**",
                "",
                "| case | img/s | runs (min-max) | ratio | note |",
                "|---|---:|---:|---:|---|",
            ]
        spread = f"{_num(min(r['runs']))}-{_num(max(r['runs']))}" if r["runs"] else "derived"
        ratio = f"{r['ratio']:.2f}x vs {r['baseline']}" if r["ratio"] is not None else ""
        note = "; ".join(filter(None, [r["note"], *(f"{k} {v}" for k, v in r["extra"].items())]))
        lines.append(f"| {r['case']} | {_num(r['value'])} | {spread} | {ratio} | {note} |")
    lines += ["", "| goal | target | this run | |", "|---|---:|---:|---|"]
    for g in result["goals"]:
        value = "not measured" if g["value"] is None else f"{g['value']:g}"
        verdict = "" if g["met"] is None else "met" if g["met"] else "**missed**"
        lines.append(f"| {g['goal']} | {g['target']:g} | {value} | {verdict} |")
    if result.get("learn"):
        lines += ["", "**learn**", "", learn_markdown(result["learn"])]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images, steps and runs (CPU minutes)")
    parser.add_argument("--json", default="output/benchmarks.json", help="where to write the results")
    parser.add_argument("--work-dir", help="keep the generated images and caches here (default: a temporary folder)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads for sections 3-5 (default: one per core, or 1 when other processes already load the "
        "machine); sections 1-2 always use 1",
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}"
    )
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {', '.join(sorted(unknown))} (choose from {', '.join(SECTIONS)})")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.bench", *(sys.argv[1:] if argv is None else argv)])
    plan = QUICK if args.quick else Plan()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is built with random weights
    print(f"$ {command}")
    started, load_start, out = time.time(), load_average(), Path(args.json)
    print(f"load average at start {load_start} (other processes share this machine's cores)")
    torch.set_num_threads(args.threads or default_threads())
    info = machine()
    print(", ".join(f"{k} {v}" for k, v in info.items()), flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        frame = crop_pngs(work, plan.images)
        wanted = set(args.sections.split(","))
        parts: list[tuple[str, str, Callable[[], list[Row]]]] = [
            (
                "input",
                "1-2 input pipeline",
                lambda: input_pipeline(frame, work, warmup=plan.warmup, repeats=plan.input_repeats),
            ),
            (
                "train",
                "3 CPU training",
                lambda: cpu_training(
                    frame,
                    work,
                    steps=plan.train_steps,
                    warmup=plan.warmup,
                    repeats=plan.train_repeats,
                    genconvit_repeats=plan.genconvit_repeats,
                    bf16_repeats=plan.bf16_repeats,
                ),
            ),
            (
                "extract",
                "4 CPU extraction",
                lambda: cpu_extraction(
                    frame, work, n_batches=plan.extract_batches, warmup=plan.warmup, repeats=plan.extract_repeats
                ),
            ),
        ]
        if torch.cuda.is_available():
            parts += [
                ("gpu", f"5 GPU {name}", lambda fn=fn: fn(frame, work, plan.gpu))
                for name, fn in (
                    # compile last: it is the slowest to start, and a time limit then costs only its figures
                    ("training", gpu_effnet),
                    ("GenConViT", gpu_genconvit),
                    ("extraction", gpu_extraction),
                    ("compile", gpu_compile),
                )
            ]
        rows: list[Row] = []
        result: dict[str, Any] = {
            "command": command,
            "quick": args.quick,
            "machine": info,
            "load_average": {"start": load_start, "end": None},
            "seconds": {"total": None},
            "rows": [],
            "goals": [],
            "learn": None,
            "skipped": [] if torch.cuda.is_available() else ["5 GPU: no CUDA device on this machine"],
            "errors": [],
        }
        for key, name, fn in parts:
            if key not in wanted:
                continue
            t0 = time.perf_counter()
            print(f"running {name} ...", flush=True)
            try:
                rows += fn()
            except Exception as err:  # a failing section must not cost the figures of the others
                traceback.print_exc()
                result["errors"].append({"section": name, "error": f"{type(err).__name__}: {err}".splitlines()[0]})
            result["seconds"][name] = round(time.perf_counter() - t0, 1)
            # Written after every section: a run killed by a time limit (the GPU check) keeps what it measured.
            _write(result, rows, started, out)
        if "learn" in wanted:
            t0 = time.perf_counter()
            print("running learnability ...", flush=True)
            # One seed: the quick run on the first trace type only, the full run on every type (benchmarks.traces).
            plan = LearnPlan(seeds=(0,), types=TRACES[:1]) if args.quick else LearnPlan(seeds=(0,))
            result["learn"] = run_learn(plan, work)
            result["seconds"]["learn"] = round(time.perf_counter() - t0, 1)
    _write(result, rows, started, out)

    print(format_table(rows))
    if result["learn"] is not None:
        print("\n[learn]\n" + learn_markdown(result["learn"]))
    print(format_goals(result["goals"]))
    for message in result["skipped"] + [f"{e['section']} failed: {e['error']}" for e in result["errors"]]:
        print(f"note: {message}")
    seconds, load_end = result["seconds"]["total"], result["load_average"]["end"]
    print(f"wrote {out} and its .md ({seconds:.0f} s in all; load average at end {load_end})")
    return result


if __name__ == "__main__":
    main()

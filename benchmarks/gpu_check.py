"""One prepared GPU check: every CUDA code path and the H200 figures, in one command of under 8 minutes.

    python -m benchmarks.gpu_check [OUT_DIR]        # default output/gpu_check/: report.md + report.json

It uses the machine's own torch/timm (nothing is installed) and runs, each part under its own time limit so a
slow or failing part never costs the others:

1. environment: torch, CUDA, the GPU, and which packages are present (a missing one skips only what needs it);
2. the CUDA tests (``pytest -m cuda``, tests/end_to_end/test_cuda.py): bf16 steps of both experts, ``--compile``, the
   official-size GenConViT-VAE at batch 16 with its peak memory, resume bit-identical with ``--deterministic``,
   extraction bf16 vs fp32, ``torchrun --nproc_per_node=1`` over NCCL;
3. short real trainings through the real CLIs on generated data (bf16, channels_last, decoded cache; then once
   with ``--compile``), with images/s per epoch;
4. section 5 of the benchmark suite (``python -m benchmarks.bench --sections gpu --quick``);
5. when a real set is present (``--real-set``, default data/real_set/ with train.csv, val.csv and any
   cross_NAME.csv, as ``python -m benchmarks.real_set`` writes them): the learnability benchmark's real mode,
   plain loop vs ours, 90 s at most.

Without CUDA it says so, runs the CPU-safe parts (1, and the collection of 2, whose tests skip), writes the
report and exits 0. Paste report.md into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from stage2.processes import usable_cores
from stage2.run.files import METRICS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "torchvision", "timm", "pandas", "sklearn", "matplotlib", "tqdm", "safetensors", "pytest")
# Seconds per part; together under 8 minutes, under 10 with a real set.
LIMITS = {"tests": 150, "train": 180, "bench": 150, "real": 90}
REAL_SET = ROOT / "data" / "real_set"


def environment() -> dict[str, Any]:
    present = {name: importlib.util.find_spec(name) is not None for name in PACKAGES}
    info: dict[str, Any] = {"python": platform.python_version(), "packages": present, "cuda": False}
    if present["torch"]:
        import torch

        info.update(torch=torch.__version__, cuda=torch.cuda.is_available(), cuda_version=torch.version.cuda)
        if info["cuda"]:
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                        gpu_count=torch.cuda.device_count(), bf16=torch.cuda.is_bf16_supported())
    return info


def _run(cmd: list[str], limit: float, log: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a command with a time limit, its output to `log`; returns exit code and seconds."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=limit,
                                env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
                                ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return {"command": " ".join(cmd), "exit": rc, "seconds": round(time.perf_counter() - t0, 1), "log": log.name}


def cuda_tests(out: Path, limit: float) -> dict[str, Any]:
    figures = out / "test_figures.jsonl"
    figures.unlink(missing_ok=True)
    junit = out / "tests.xml"
    # One process (-n 0, not the suite's xdist workers): the tests share one GPU, and their speed figures are
    # only figures when nothing else runs on it.
    result = _run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-n", "0", "-p", "no:cacheprovider",
                   f"--junitxml={junit}", "tests/end_to_end/test_cuda.py"], limit, out / "tests.log",
                  env={"GPU_CHECK_FIGURES": str(figures)})
    cases = []
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
            message = next((child.get("message", "") for child in case if child.tag != "system-out"), "")
            cases.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                          "message": message.splitlines()[0][:200] if message else ""})
    result["cases"] = cases
    result["figures"] = [json.loads(line) for line in figures.read_text().splitlines()] if figures.is_file() else []
    return result


def trainings(out: Path, limit: float) -> list[dict[str, Any]]:
    """Short real runs through the CLIs on the generated demo data; images/s per epoch from metrics.csv."""
    from stage2.data.demo import make_demo_dataset

    runs = []
    deadline = time.perf_counter() + limit
    data = out / "data"
    train, val = make_demo_dataset(data, n_videos=700, frames_per_video=3)  # 1,500 train + 600 val, ~20 s
    workers = max(1, min(16, usable_cores() - 1))
    common = ["--train-manifest", str(train), "--val-manifest", str(val), "--device", "cuda", "--amp", "bf16",
              "--workers", str(workers), "--cache-dir", str(data / "cache"), "--epochs", "3", "--overwrite"]
    plans = [
        ("effnet EfficientNetV2-B3 256px b128", "train_stage2_effnet.py", ["--no-pretrained", "--batch-size", "128"]),
        ("effnet EfficientNetV2-B3 256px b128 --compile", "train_stage2_effnet.py",
         ["--no-pretrained", "--batch-size", "128", "--compile"]),
        ("genconvit ED+VAE convnext_tiny 224px b32", "train_stage2_genconvit.py",
         ["--init", "scratch", "--img-size", "224", "--batch-size", "32"]),
    ]
    for name, script, flags in plans:
        left = deadline - time.perf_counter()
        run_dir = out / "runs" / name.split()[0] / str(len(runs))
        if left < 20:
            runs.append({"name": name, "exit": "skipped: out of time"})
            continue
        result = _run([sys.executable, script, *common, *flags, "--output-dir", str(run_dir)], left,
                      out / f"train_{len(runs)}.log")
        result["name"] = name
        result["epochs"] = _epochs(run_dir)
        runs.append(result)
    return runs


def _epochs(run_dir: Path) -> dict[str, list[dict[str, float]]]:
    import pandas as pd

    found = {}
    for metrics in sorted(run_dir.rglob(METRICS)):
        frame = pd.read_csv(metrics)
        columns = [c for c in ("epoch", "images_per_s", "epoch_time", "train_loss", "auc") if c in frame]
        found[str(metrics.parent.relative_to(run_dir)) or "."] = frame[columns].round(4).to_dict("records")
    return found


def bench(out: Path, limit: float) -> dict[str, Any]:
    md = out / "bench.md"
    md.unlink(missing_ok=True)  # an earlier check's tables must not pass for this one's
    result = _run([sys.executable, "-m", "benchmarks.bench", "--sections", "gpu", "--quick", "--json",
                   str(out / "bench.json")], limit, out / "bench.log")
    result["markdown"] = md.read_text() if md.is_file() else ""
    return result


def real_set_command(folder: Path, out: Path) -> list[str] | None:
    """The learnability benchmark's real mode on `folder`'s train.csv / val.csv / cross_*.csv; None without them."""
    train, val = folder / "train.csv", folder / "val.csv"
    if not (train.is_file() and val.is_file()):
        return None
    crosses = [arg for p in sorted(folder.glob("cross_*.csv")) for arg in ("--cross", f"{p.stem[6:]}={p}")]
    return [sys.executable, "-m", "benchmarks.learn", "--train-manifest", str(train), "--val-manifest", str(val),
            *crosses, "--device", "cuda", "--seeds", "0", "--epochs", "10", "--json", str(out / "learn_real.json")]


def real_learn(command: list[str], out: Path, limit: float) -> dict[str, Any]:
    result = _run(command, limit, out / "learn_real.log")
    md = out / "learn_real.md"
    result["markdown"] = md.read_text() if md.is_file() else ""
    return result


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = ["# GPU check", "", f"`{report['command']}`: {report['seconds']:.0f} s", ""]
    if env["cuda"]:
        lines.append(f"{env['gpu']} ({env['gpu_memory_gib']} GiB, {env['gpu_count']} GPU(s)), torch {env['torch']}, "
                     f"CUDA {env['cuda_version']}, Python {env['python']}")
    else:
        lines.append(f"**No CUDA device**: torch {env.get('torch', 'missing')}; only the CPU-safe parts ran.")
    missing = [name for name, ok in env["packages"].items() if not ok]
    lines += ["", f"missing packages: {', '.join(missing) or 'none'}", ""]
    tests = report.get("tests")
    if tests:
        lines += [f"## CUDA tests (exit {tests['exit']}, {tests['seconds']} s)", "", "| test | outcome | s | note |",
                  "|---|---|---:|---|"]
        lines += [f"| {c['test']} | {c['outcome']} | {c['seconds']:.1f} | {c['message']} |" for c in tests["cases"]]
        lines += ["", *(f"- {json.dumps(f)}" for f in tests["figures"])]
    for run in report.get("trainings", []):
        lines += ["", f"## {run['name']} (exit {run['exit']}, {run.get('seconds', 0)} s)"]
        for folder, epochs in run.get("epochs", {}).items():
            per_epoch = ", ".join(f"{e.get('images_per_s', float('nan')):.0f}" for e in epochs)
            lines.append(f"- {folder}: images/s per epoch {per_epoch}; AUC {[e.get('auc') for e in epochs]}")
    if report.get("bench"):
        lines += ["", f"## Benchmark section 5 (exit {report['bench']['exit']}, {report['bench']['seconds']} s)", "",
                  report["bench"]["markdown"]]
    if report.get("real"):
        lines += ["", f"## Learnability on the real set (exit {report['real']['exit']}, {report['real']['seconds']} s)",
                  "", report["real"]["markdown"]]
    for note in report["notes"]:
        lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="output/gpu_check", help="folder for report.md and report.json")
    parser.add_argument("--real-set", type=Path, default=REAL_SET,
                        help="folder with train.csv, val.csv (and cross_NAME.csv) of a real set "
                             "(BENCHMARKS.md: Real faces)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict[str, Any] = {"command": " ".join(["python -m benchmarks.gpu_check", *(argv or sys.argv[1:])]),
                              "environment": environment(), "notes": []}
    env = report["environment"]
    print(f"environment: {json.dumps(env)}", flush=True)
    missing = [name for name, ok in env["packages"].items() if not ok]
    if missing:
        report["notes"].append(f"missing packages: {', '.join(missing)}; the parts that need them are skipped")
    if env["packages"]["pytest"] and env["packages"]["torch"]:
        print("CUDA tests ...", flush=True)
        report["tests"] = cuda_tests(out, LIMITS["tests"])
    if not env["cuda"]:
        report["notes"].append("no CUDA device: this check needs one; the CUDA tests were collected and skipped, "
                               "trainings and benchmark section 5 were not run")
        print("this check needs a CUDA device: only the CPU-safe parts ran", flush=True)
    elif not missing:
        print("trainings ...", flush=True)
        report["trainings"] = trainings(out, LIMITS["train"])
        print("benchmark section 5 ...", flush=True)
        report["bench"] = bench(out, LIMITS["bench"])
        command = real_set_command(args.real_set.resolve(), out)
        if command:
            print("learnability on the real set ...", flush=True)
            report["real"] = real_learn(command, out, LIMITS["real"])
        else:
            report["notes"].append(f"no real set in {args.real_set} (train.csv, val.csv): learnability on real data "
                                   "not run (BENCHMARKS.md: Real faces)")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(markdown(report))
    print(f"wrote {out / 'report.md'} and report.json ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()

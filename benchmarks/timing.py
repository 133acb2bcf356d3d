"""Timing rounds, result rows, and a description of the machine they were measured on."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL
import timm
import torch
import torchvision

from stage2.processes import usable_cores
from stage2.run.device import cpu_has_native_bf16


@dataclass
class Row:
    """One figure: the median images/s over timed runs, optionally compared with another row."""

    section: str
    case: str
    runs: list[float]  # images/s of each timed run (empty for derived figures)
    value: float
    baseline: str | None = None  # case name, in the same section, that `ratio` divides by
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # Rows of one group were measured turn by turn (see `interleaved`): their runs pair up one to one.
    group: str | None = None
    ratio: float | None = None


def interleaved(cases: dict[str, Callable[[], int]], *, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Images/s of each case over `repeats` timed runs, after `warmup` untimed ones.

    Each call of a case processes some images and returns how many. The cases take turns run by run, so a
    change of machine load (other processes on a shared box) hits all of them alike and the ratios between
    them stay fair even when the absolute figures move.
    """
    for _ in range(warmup):
        for run in cases.values():
            run()
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            start = time.perf_counter()
            n = run()
            rates[name].append(n / (time.perf_counter() - start))
    return rates


def row(section: str, case: str, runs: list[float], **kwargs: Any) -> Row:
    return Row(section, case, runs, statistics.median(runs), **kwargs)


def derived(section: str, case: str, *per_image_parts: float, **kwargs: Any) -> Row:
    """Throughput of doing several per-image stages one after the other on the same core."""
    return Row(section, case, [], 1.0 / sum(1.0 / rate for rate in per_image_parts), **kwargs)


def fill_ratios(rows: list[Row]) -> None:
    """Each row's ratio to its baseline: the median of run-by-run ratios where the runs pair up (a load spike
    then moves both runs of a pair, not the ratio), else the ratio of the medians."""
    by_key = {(r.section, r.case): r for r in rows}
    for r in rows:
        base = by_key.get((r.section, r.baseline))
        if base is None:
            continue
        paired = r.group is not None and r.group == base.group and len(r.runs) == len(base.runs)
        r.ratio = statistics.median(a / b for a, b in zip(r.runs, base.runs)) if paired else r.value / base.value


def machine() -> dict[str, Any]:
    """CPU, cores, memory, GPU and library versions, plus the load other processes put on the box."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_cpu_bf16": cpu_has_native_bf16(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return info


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]

"""`--amp auto` picks bf16 only where the hardware computes in bf16."""

import platform
from pathlib import Path

import pytest
import torch

from src.engine.precision import autocast_dtype, cpu_has_native_bf16


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(platform.machine() != "x86_64" or not Path("/proc/cpuinfo").exists(), reason="x86 Linux")
def test_native_bf16_follows_the_cpu_flags_not_avx512_alone():
    flags = _cpu_flags()
    assert cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_amp_auto_on_cpu_is_bf16_only_with_native_bf16_and_explicit_choices_win():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) == (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    assert autocast_dtype("fp16", cpu) == torch.float16
    assert autocast_dtype("off", cpu) is None
    assert autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16

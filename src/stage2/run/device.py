"""Device and precision set-up shared by training, evaluation and extraction: CPU threads, autocast and memory
format."""

from __future__ import annotations

import functools
import os

import torch

from stage2.errors import ConfigError
from stage2.processes import usable_cores


def busy_cpu_load() -> str | None:
    """"load L on N cores" when other processes already keep half the usable cores busy, else None.

    On such a machine torch's OpenMP threads spin-wait for each other while descheduled: a 2-thread EfficientNet
    step ran 4x slower than a 1-thread one on a shared 2-core box, and a demo epoch took 180-400 s at load 6
    against 17-20 s at load 2. One thread is then steadier and faster (the benchmarks measure with it too).
    """
    cores, load = usable_cores(), os.getloadavg()[0]
    return f"load {load:.1f} on {cores} cores" if load >= cores / 2 else None


@functools.cache
def cpu_threads(device_type: str) -> str:
    """On a CPU device, set torch to one thread when the machine is busy (`busy_cpu_load`); OMP_NUM_THREADS, when
    set, wins. Decided once per process: a second run in it (GenConViT's VAE after its ED) would see its own load.
    Returns what the settings line says ("" on other devices)."""
    if device_type != "cpu":
        return ""
    if "OMP_NUM_THREADS" in os.environ:
        return f"torch threads {torch.get_num_threads()} (OMP_NUM_THREADS)"
    busy = busy_cpu_load()
    if busy:
        torch.set_num_threads(1)
        return f"torch threads 1 (busy machine, {busy}: fewer threads than cores run faster; OMP_NUM_THREADS overrides)"
    return f"torch threads {torch.get_num_threads()}"


def pick_device(name: str | torch.device | None, rank_gpu: int | None = None) -> torch.device:
    """--device as a torch.device: cpu, cuda or cuda:N; None means cuda when available, else cpu. `rank_gpu` is
    the GPU of this torchrun rank (its LOCAL_RANK), used for cuda. ConfigError in one line for a device this
    machine does not have."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:  # not a device string at all
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: expected cpu, cuda or cuda:N")
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here (torch {torch.__version__}, built "
                          f"for CUDA {torch.version.cuda or 'none'}); use --device cpu")
    if device.index is not None and rank_gpu is not None:
        raise ConfigError(f"--device {name}: under torchrun each rank uses the GPU of its LOCAL_RANK; pass --device "
                          "cuda")
    index = device.index if device.index is not None else rank_gpu
    if index is None:
        index = torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 in hardware (AVX512-BF16 or AMX).

    Not `torch.ops.mkldnn._is_mkldnn_bf16_supported()`: it is True on any AVX-512 CPU, where oneDNN emulates
    bf16; on such a CPU (Ice Lake, no AVX512-BF16) a bf16 EfficientNetV2-B3 training step ran at 0.57x fp32.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch's own CPUID probes, x86 only
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """`--amp`: off, bf16, fp16, or auto = bf16 on CUDA and on CPUs with native bf16 (emulated bf16 is slower)."""
    if amp == "off":
        return None
    if amp == "auto":
        native_bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if native_bf16 else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def scoring_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The one precision of scoring (validation, val_predictions.csv, --evaluate, extraction; the export's check
    runs fp32 on the CPU): fp32 on a CPU whatever --amp says, bf16 autocast on CUDA unless `amp` is off.

    On a CPU with native bf16, --amp auto's bf16 moved P(fake) by up to 0.0125 from the extractor's fp32: the
    operating points of a run then described other scores than production gives. fp32 makes one checkpoint give
    one P(fake) on any CPU. A GPU's scores differ from a CPU's anyway (TF32 convolutions, other kernels), and bf16
    doubles its throughput, so CUDA keeps bf16 for every scoring alike.
    """
    return torch.bfloat16 if amp and device.type == "cuda" else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x

"""Autocast, and a warning where bf16 is emulated (slow) rather than native."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

#: x86 flags of native bf16 matrix instructions; without them PyTorch emulates bf16 on the CPU, about 20x
#: slower than fp32 (``benchmarks/bench_mae.py``, docs/results.md)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def autocast_context(device: torch.device, precision: str):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def read_cpu_flags() -> set[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (None where that file does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def slow_bf16_warning(device: torch.device, precision: str) -> str | None:
    """A warning for ``--precision bf16`` on a CPU without native bf16, else None."""
    if precision != "bf16" or device.type != "cpu":
        return None
    flags = read_cpu_flags()
    if flags is None or any(f in flags for f in NATIVE_BF16_FLAGS):
        return None  # unknown CPU (not Linux) or native bf16
    return ("warning: --precision bf16 on this CPU (no AVX512-BF16/AMX in /proc/cpuinfo) is emulated and runs "
            "about 20x slower than fp32 (measured 5.8 vs 117 img/s for MAE); use --precision fp32 here, and "
            "bf16 on a GPU or a CPU with AVX512-BF16/AMX")

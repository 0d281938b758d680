"""Which number format is fastest here: bf16 where the device has units for it and a short probe confirms it,
fp32 elsewhere. Never a fixed choice: CPUs of one project's machines differ (AVX2 only, AVX-512, AMX)."""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass

import torch

from segrank.runtime.devices import precision_dtype

# The instruction-set flags that decide how fast fp32 and bf16 matrix products run on a CPU.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
# bf16 is chosen by "auto" only when its matrix products measure at least this much faster than fp32's.
BF16_MIN_SPEEDUP = 1.3


@dataclass(frozen=True)
class PrecisionChoice:
    """A precision picked for a device: its name (fp32, bf16, fp16), dtype and why it was picked."""

    name: str
    dtype: torch.dtype
    reason: str


def cpu_flags() -> list[str]:
    """The flags of ``CPU_FLAGS`` this CPU reports in /proc/cpuinfo (Linux; empty elsewhere)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [flag for flag in CPU_FLAGS if flag in present]
    return []


def has_bf16_units(device: torch.device) -> bool:
    """Whether the device computes bf16 natively: a CUDA device that supports it, a CPU with AMX or AVX512-BF16
    (torch's own capability queries)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of ``torch.mm`` on ``size``-square matrices of ``dtype``: the median of ``reps`` after a warm-up."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = []
    for _ in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    times = sorted(times[1:])
    return 2 * size**3 / times[len(times) // 2] / 1e9


@functools.cache
def fastest_precision(device_type: str) -> PrecisionChoice:
    """bf16 where the device has bf16 units and a short probe (1024-square products) shows it at least
    ``BF16_MIN_SPEEDUP`` times faster than fp32, else fp32. Measured once per process and device type."""
    device = torch.device(device_type)
    if not has_bf16_units(device):
        what = "no bf16 units (AMX / AVX512-BF16)" if device_type == "cpu" else "no bf16 support"
        return PrecisionChoice("fp32", torch.float32, f"fp32: this {device_type} has {what}")
    fp32 = matmul_rate(device, torch.float32, size=1024, reps=3)
    bf16 = matmul_rate(device, torch.bfloat16, size=1024, reps=3)
    if bf16 >= BF16_MIN_SPEEDUP * fp32:
        return PrecisionChoice("bf16", torch.bfloat16, f"bf16: matrix products {bf16 / fp32:.1f}x faster than fp32 "
                                                       f"here ({bf16:.0f} vs {fp32:.0f} GFLOP/s)")
    return PrecisionChoice("fp32", torch.float32, f"fp32: bf16 products only {bf16 / fp32:.2f}x fp32's here")


def choose_precision(precision: str | None, device: torch.device) -> PrecisionChoice:
    """``auto`` (or None): ``fastest_precision`` of the device; a name (fp32, bf16, fp16): that one, as asked."""
    if precision in (None, "auto"):
        return fastest_precision(device.type)
    name = "fp32" if precision == "none" else str(precision)
    return PrecisionChoice(name, precision_dtype(precision), f"{name}: as asked")

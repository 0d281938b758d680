"""Which device and which number format a model runs with: the one device resolver and the one precision table of
every command, the Predictor, training and the benchmarks."""

from __future__ import annotations

import torch

from segrank.errors import SegrankError

# Name -> the dtype a model computes in. "none" is the config's and the benchmarks' historical spelling of fp32.
PRECISIONS: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "none": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``auto``: the GPU when there is one, else the CPU; a CUDA device that is not there is refused."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SegrankError(f"device {str(device)!r}: no CUDA device is available")
    return device


def precision_dtype(precision: str | torch.dtype | None) -> torch.dtype:
    """The dtype of a precision name (``fp32``, ``bf16``, ``fp16``; None and ``none`` are fp32) or a dtype of the
    table."""
    if precision is None:
        return torch.float32
    if isinstance(precision, torch.dtype) and precision in PRECISIONS.values():
        return precision
    if isinstance(precision, str) and precision in PRECISIONS:
        return PRECISIONS[precision]
    names = ", ".join(repr(n) for n in PRECISIONS if n != "none")
    raise SegrankError(f"precision {precision!r} is not one of {names}")

"""Adaptive average pooling that stays exact when exported with a symbolic input size.

``F.adaptive_avg_pool2d`` to a fixed grid exports to ONNX as a fixed-kernel pool derived from the example size,
which is wrong (or rejected by onnxruntime) at other sizes. The explicit form below computes the same bins as
PyTorch (bin i covers [floor(i*n/o), ceil((i+1)*n/o))) with 0/1 bin matrices, so it works for any size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bin_matrix(length: int, bins: int, device: torch.device) -> Tensor:
    """(bins, length) float 0/1 matrix: row i marks the inputs of PyTorch's adaptive-pooling bin i."""
    i = torch.arange(bins, device=device)
    start = (i * length) // bins
    end = ((i + 1) * length + bins - 1) // bins
    j = torch.arange(length, device=device)
    return ((j >= start[:, None]) & (j < end[:, None])).float()


def explicit_adaptive_avg_pool2d(x: Tensor, size: int) -> Tensor:
    """(B, C, H, W) -> (B, C, size, size) bin means, as ``F.adaptive_avg_pool2d`` up to float rounding order."""
    rows = bin_matrix(x.shape[2], size, x.device).to(x.dtype)
    cols = bin_matrix(x.shape[3], size, x.device).to(x.dtype)
    sums = rows @ x @ cols.transpose(0, 1)
    # Divide the bin sums by the bin areas, as PyTorch's kernel does (not multiply by 1/area per tap).
    return sums / (rows.sum(1)[:, None] * cols.sum(1)[None, :])


def adaptive_avg_pool2d(x: Tensor, size: int) -> Tensor:
    """PyTorch's kernel in eager mode (outputs unchanged); the explicit form when traced by torch.export."""
    if torch.compiler.is_exporting():
        return explicit_adaptive_avg_pool2d(x, size)
    return F.adaptive_avg_pool2d(x, size)

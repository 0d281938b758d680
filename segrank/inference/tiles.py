"""Bands of pixels, so that a large image's per-class tensors are made a band at a time.

``resize_rows(x, size, band)`` is rows ``band`` of ``F.interpolate(x, size, mode="bilinear", align_corners=False)``
without computing the rest: the columns are resized by ``F.interpolate`` itself (rows left as they are: the inner step
of its 2-D kernel), and the rows are combined here with the kernel's own source rows and weights (its float32 scale,
its source coordinate and its combination, each with the kernel's single rounding of a fused multiply-add). On the CPU
this reproduces ``F.interpolate`` bit for bit for images a few dozen pixels wide and more, except for a tensor of
exactly 3 channels, which PyTorch's kernel combines in the other order (and narrow images, whose rows it vectorises
over channels); there, and on GPUs, the two may differ in the last bit of a logit.

A band is a run of pixels in row-major order whose count is a multiple of ``BAND_ALIGN`` (but for the last), so that
PyTorch's reductions over the class dimension (softmax, sum), which vectorise over pixels and treat the last
``pixels % vector width`` of a tensor apart, compute every pixel of a band exactly as they would in the whole image;
its logits are cut from those of the rows that hold it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

Band = tuple[int, int]  # first, end (exclusive): of rows, or of pixels in row-major order

# Elements of one (1, C, pixels) tensor of a band: an image whose (1, C, H, W) tensors are larger (and larger than the
# model's own merged outputs, which the bands are made from) is segmented a band of pixels at a time. A band holds a
# few such tensors: 2**23 float32 elements are 32 MiB.
BAND_ELEMENTS = 2**23
BAND_ALIGN = 64  # pixels; a multiple of every CPU vector width of float32 (8 for AVX2, 16 for AVX-512)


def pixels_per_band(size: tuple[int, int], channels: int, merged: int) -> int | None:
    """Pixels per band for (1, ``channels``, *size) tensors (a multiple of BAND_ALIGN), or None to make them whole:
    bands are used when those tensors exceed both BAND_ELEMENTS and the ``merged`` elements the bands are made from
    (the augmentations' merged logits at their input sizes, bounded by the test scale), which then bound the memory
    instead."""
    pixels = size[0] * size[1]
    if channels * pixels <= max(BAND_ELEMENTS, merged):
        return None
    per_band = max(BAND_ALIGN, BAND_ELEMENTS // channels // BAND_ALIGN * BAND_ALIGN)
    return per_band if per_band < pixels else None


def bands(total: int, step: int) -> list[Band]:
    return [(start, min(start + step, total)) for start in range(0, total, step)]


def rows_of(band: Band, width: int) -> Band:
    """The rows that hold the pixels ``band`` of an image ``width`` pixels wide."""
    return band[0] // width, (band[1] - 1) // width + 1


def source_rows(in_size: int, out_size: int, band: Band, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For output rows ``band`` of a bilinear resize (align_corners=False) from ``in_size`` to ``out_size`` rows:
    the upper and lower source rows and their weights, as PyTorch's kernel computes them."""
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    out_index = torch.arange(*band, dtype=torch.float64, device=device)
    # scale * (i + 0.5) - 0.5 with one rounding (exact in float64, then rounded once to float32), clamped at 0
    source = (scale.item() * (out_index + 0.5) - 0.5).float().clamp_(min=0)
    upper = source.long().clamp_(max=in_size - 1)
    lower_weight = (source - upper.float()).clamp_(0, 1)
    lower = upper + (upper < in_size - 1).long()
    return upper, lower, 1 - lower_weight, lower_weight


def resize_rows(x: Tensor, size: tuple[int, int], band: Band) -> Tensor:
    """Rows ``band`` of ``x`` (B, C, h, w) bilinearly resized to ``size`` (align_corners=False): (B, C, rows, W)."""
    (height, width), (h, w) = size, x.shape[-2:]
    if h == height:
        rows = x[..., band[0]:band[1], :]
        return rows if w == width else F.interpolate(rows, size=(len(range(*band)), width), mode="bilinear",
                                                     align_corners=False)
    upper, lower, upper_weight, lower_weight = source_rows(h, height, band, x.device)
    first, end = int(upper[0]), int(lower[-1]) + 1
    rows = x[..., first:end, :]
    if w != width:  # the columns first, as the kernel does; rows stay as they are
        rows = F.interpolate(rows, size=(end - first, width), mode="bilinear", align_corners=False)
    top, bottom = rows[..., upper - first, :], rows[..., lower - first, :]
    # The kernel's fused multiply-add: top * w_top + round(bottom * w_bottom), rounded once (the product is exact
    # in float64).
    mixed = (bottom * lower_weight[:, None]).double().addcmul_(top.double(), upper_weight[:, None].double())
    return mixed.to(x.dtype)

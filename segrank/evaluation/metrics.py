"""Segmentation metrics from an int64 confusion matrix (mmseg 0.x ``mean_iou`` semantics, counted in int64
with ``bincount`` so that no count saturates).

``hist[label, pred]`` counts valid pixels (label != ignore and inside [0, N)). IoU_c = I_c / (pred_c + label_c - I_c),
Acc_c = I_c / label_c, both NaN where the denominator is 0; mIoU and mAcc are NaN-means over classes, so a class
absent from both labels and predictions does not count; aAcc = sum(I) / sum(label). Values are fractions in [0, 1]
(results JSON, log.jsonl); only the printed table shows percent, and says so (docs/metrics.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """(N, N) int64 counts of (label, prediction) pairs over the valid pixels of one or more images."""
    label, pred = label.reshape(-1).long(), pred.reshape(-1).long().to(label.device)
    valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
    index = label[valid] * num_classes + pred[valid]
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def all_reduce_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over processes in place when torch.distributed is initialised (gloo or NCCL)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        buffer = tensor.to(backend_device)
        dist.all_reduce(buffer)
        tensor.copy_(buffer.to(tensor.device))
    return tensor


def summarize(hist: Tensor) -> dict[str, Any]:
    """aAcc, mIoU, mAcc and per-class IoU/Acc (NaN where undefined) from a confusion matrix."""
    hist = hist.double().cpu()
    intersect, label_area, pred_area = hist.diag(), hist.sum(1), hist.sum(0)
    union = label_area + pred_area - intersect
    iou = intersect / union  # 0/0 -> NaN
    acc = intersect / label_area
    total = float(label_area.sum())
    return {
        "aAcc": float(intersect.sum()) / total if total else math.nan,
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "IoU": iou.tolist(),
        "Acc": acc.tolist(),
        "num_pixels": int(total),
    }


def _nanmean(x: Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else math.nan


def format_table(results: dict[str, Any], class_names: Sequence[str] | None = None) -> str:
    """Per-class IoU/Acc in percent (classes never seen in labels or predictions shown as ``-``), then the summary,
    every column and value labelled as percent."""
    iou, acc = results["IoU"], results["Acc"]
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]
    width = max([5, *(len(n) for n in names)])
    lines = [f"{'class':<{width}}  {'IoU (%)':>7}  {'Acc (%)':>7}", "-" * (width + 18)]
    lines += [f"{n:<{width}}  {_pct(i):>7}  {_pct(a):>7}" for n, i, a in zip(names, iou, acc, strict=True)]
    lines.append("-" * (width + 18))
    lines.append(_totals(results))
    return "\n".join(lines)


def most_confused(hist: Tensor, top: int) -> list[tuple[int, int, float, int]]:
    """The ``top`` (label, prediction) pairs of different classes with the largest share of the label class's pixels
    predicted as the other class: (label, prediction, share, pixels), largest share first, pairs of no pixel left out.
    A share of the row, not a pixel count, because mIoU weighs every class equally."""
    hist = hist.double().cpu()
    rate = hist / hist.sum(1, keepdim=True).clamp(min=1)
    rate.fill_diagonal_(0)
    rate[hist == 0] = 0
    count = min(top, int((rate > 0).sum()))
    values, flat = rate.flatten().topk(count)
    n = hist.shape[0]
    return [(i // n, i % n, float(v), int(hist[i // n, i % n])) for v, i in zip(values.tolist(), flat.tolist(),
                                                                               strict=True)]


def format_summary(results: dict[str, Any], hist: Tensor, class_names: Sequence[str] | None = None,
                   top: int = 5) -> str:
    """The totals, the ``top`` classes of lowest IoU and the ``top`` most confused pairs (with the share of the label
    class's pixels), in percent."""
    iou = results["IoU"]
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]
    seen = [(v, i) for i, v in enumerate(iou) if v is not None and not math.isnan(v)]
    lines = [_totals(results) + f"  ({len(seen)} of {len(iou)} classes present, {results['num_images']} images)"]
    if seen:
        lowest = sorted(seen)[:top]
        lines.append("lowest IoU (%): " + ", ".join(f"{names[i]} {100 * v:.2f}" for v, i in lowest))
    pairs = most_confused(hist, top)
    if pairs:
        lines.append("most confused: " + ", ".join(f"{names[a]} -> {names[b]} {100 * share:.1f}%"
                                                   for a, b, share, _ in pairs))
    return "\n".join(lines)


def _totals(results: dict[str, Any]) -> str:
    line = f"aAcc {_pct(results['aAcc'])} %  mIoU {_pct(results['mIoU'])} %  mAcc {_pct(results['mAcc'])} %"
    if "image_recall" in results:
        line += f"  image recall@k {_pct(results['image_recall'])} %"
    return line


def _pct(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{100 * v:.2f}"

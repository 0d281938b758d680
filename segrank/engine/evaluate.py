"""Dataset evaluation: inference per image, an int64 confusion matrix summed over processes, metrics
(mmseg 0.x ``mean_iou``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from segrank.config import EvalConfig
from segrank.engine.inference import predict_image
from segrank.engine.metrics import all_reduce_, confusion_matrix, summarize
from segrank.errors import SegrankError
from segrank.models.losses import class_histogram
from segrank.models.segmentor import Segmentor


def evaluate(model: Segmentor, dataset: Dataset, cfg: EvalConfig, *, class_names: Sequence[str] | None = None,
             **options: Any) -> dict[str, Any]:
    """aAcc, mIoU, mAcc, per-class ``IoU``/``Acc`` (fractions, NaN where undefined) and, for RankSeg models,
    ``image_recall``/``pixel_recall``; ``options`` are those of ``confusion`` (num_classes and ignore_index are
    required)."""
    hist, recall = confusion(model, dataset, cfg, **options)
    return results_of(hist, recall, len(dataset), class_names)


def results_of(hist: Tensor, recalls: dict[str, float], num_images: int,
               class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """The results record of a confusion matrix (``metrics.summarize``) with RankSeg's recalls and counts."""
    results = summarize(hist) | recalls
    results["num_images"] = num_images
    if class_names is not None:
        results["class_names"] = list(class_names)
    return results


def confusion(
    model: Segmentor,
    dataset: Dataset,
    cfg: EvalConfig,
    *,
    num_classes: int,
    ignore_index: int,
    oracle: bool = False,
    ms_flip: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    img_scale: tuple[int, int] | None = None,
    workers: int = 0,
) -> tuple[Tensor, dict[str, float]]:
    """The (N, N) int64 confusion matrix ``hist[label, prediction]`` over the dataset and, for RankSeg models, the
    recalls: ``image_recall``, the mean over images of the share of the label's classes selected in some
    window/augmentation, and ``pixel_recall``, the same for the share of labelled pixels whose class was selected.

    Items are dicts with ``image`` (3, H, W) normalised at test size and ``label`` (H0, W0) at the original size.
    Under torch.distributed each process takes every world-th image and the counts are summed over processes.
    oracle: assert GT-oracle evaluation (every window receives the image's label classes; GT-oracle models always
    do, other models cannot). img_scale: the dataset's
    (long, short) test scale, for the reference's exact multi-scale input sizes.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    # Strided sharding without padding: no image is counted twice.
    shard = Subset(dataset, range(rank, len(dataset), world))
    loader = DataLoader(shard, batch_size=None, num_workers=workers)
    hist = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    # sums of per-image recalls (classes, labelled pixels) and the number of images counted
    recall = torch.zeros(3, dtype=torch.float64, device=device)
    if oracle and not model.needs_present_classes:
        raise SegrankError("oracle evaluation needs a GT-oracle model (head type rankseg_gt)")
    was_training = model.training
    model.eval()
    try:
        for item in tqdm(loader, desc="eval", disable=not progress, dynamic_ncols=True):
            label = torch.as_tensor(item["label"]).to(device).long()
            counts = class_histogram(label[None], num_classes, ignore_index)[0]
            present = counts > 0
            pred = predict_image(model, item["image"].to(device), tuple(label.shape[-2:]), cfg, ms_flip=ms_flip,
                                 present=present if model.needs_present_classes else None, img_scale=img_scale)
            hist += confusion_matrix(pred.label, label, num_classes, ignore_index)
            if pred.selected is not None and bool(present.any()):
                recall[0] += present[pred.selected].sum().double() / present.sum()
                recall[1] += counts[pred.selected].sum().double() / counts.sum()
                recall[2] += 1
    finally:
        model.train(was_training)
    all_reduce_(hist)
    all_reduce_(recall)
    recalls = {"image_recall": float(recall[0] / recall[2]), "pixel_recall": float(recall[1] / recall[2])} \
        if recall[2] > 0 else {}
    return hist.cpu(), recalls

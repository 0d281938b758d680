"""Dataset evaluation: inference per image, an int64 confusion matrix summed over processes, metrics
(mmseg 0.x ``mean_iou``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from segrank.config import Config, EvalConfig
from segrank.data import build_dataset, dataset_info
from segrank.errors import SegrankError
from segrank.evaluation.metrics import all_reduce_, confusion_matrix, summarize
from segrank.inference.compiled import compile_for_inference
from segrank.inference.precision import inference_copy, precision_autocast, resolve_precision
from segrank.inference.windows import predict_image
from segrank.models.losses import class_histogram
from segrank.models.segmentor import Segmentor
from segrank.runtime.distributed import process_group, rank_and_world
from segrank.runtime.precision import PrecisionChoice, choose_precision


@dataclass
class EvaluationResult:
    """What ``run`` measured: the results record, the confusion matrix ``hist[label, prediction]`` and the class
    names; ``reports`` is True in the one process that reports (rank 0 under torchrun)."""

    results: dict[str, Any]
    hist: Tensor
    class_names: list[str]
    reports: bool


def run(cfg: Config, model: Segmentor, *, source: str, oracle: bool = False, ms_flip: bool = False,
        device: str | None = None, progress: bool = True, precision: str | None = "fp32", compile: bool = False,
        announce: Callable[[PrecisionChoice], None] | None = None) -> EvaluationResult:
    """Evaluate ``model`` (loaded from ``source``, named in errors) on the validation split of ``cfg``'s dataset with
    ``cfg.eval``'s test settings; under torchrun each process evaluates a share of the images. ``precision`` and
    ``compile`` as ``confusion``'s (``auto``: the fastest here, logged and given to ``announce`` once, by the
    process that reports); the record says which precision ran."""
    info = dataset_info(cfg.data.dataset, cfg.data.options, cfg.data.root)
    if model.num_classes != info.num_classes:
        raise SegrankError(f"{source}: model has {model.num_classes} classes, dataset {cfg.data.dataset!r} has "
                           f"{info.num_classes}")
    if oracle and not model.needs_present_classes:
        raise SegrankError(f"--oracle: {source} has a {model.cfg.head.type!r} head; GT-oracle evaluation needs a "
                           "model whose head type is 'rankseg_gt'")
    with process_group(device) as env:
        choice = resolve_precision(precision, env.device, "segrank eval") if env.main else \
            choose_precision(precision, env.device)
        if announce is not None and env.main:
            announce(choice)
        dataset = build_dataset(cfg.data, cfg.data.val_split, train=False)
        hist, recall = confusion(model.to(env.device), dataset, cfg.eval, num_classes=info.num_classes,
                                 ignore_index=info.ignore_index, ms_flip=ms_flip, device=env.device,
                                 progress=env.main and progress, img_scale=cfg.data.img_scale,
                                 workers=cfg.data.workers, precision=choice.name, compile=compile)
    results = results_of(hist, recall, len(dataset), info.classes) | {"precision": choice.name, "compile": compile}
    return EvaluationResult(results, hist, list(info.classes), env.main)


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
    ms_flip: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    img_scale: tuple[int, int] | None = None,
    workers: int = 0,
    precision: str | None = "fp32",
    compile: bool = False,
) -> tuple[Tensor, dict[str, float]]:
    """The (N, N) int64 confusion matrix ``hist[label, prediction]`` over the dataset and, for RankSeg models, the
    recalls: ``image_recall``, the mean over images of the share of the label's classes selected in some
    window/augmentation, and ``pixel_recall``, the same for the share of labelled pixels whose class was selected.

    Items are dicts with ``image`` (3, H, W) normalised at test size and ``label`` (H0, W0) at the original size.
    Under torch.distributed each process takes every world-th image and the counts are summed over processes.
    A GT-oracle model's windows receive each image's label classes. img_scale: the dataset's (long, short) test
    scale, for the reference's exact multi-scale input sizes. precision: ``fp32``, ``bf16``, ``fp16`` or ``auto``
    (inference/precision.py: a lower precision runs a converted copy of ``model``, which stays as it is).
    compile: run it through ``torch.compile`` (inference/compiled.py).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rank, world = rank_and_world()
    # Strided sharding without padding: no image is counted twice.
    shard = Subset(dataset, range(rank, len(dataset), world))
    loader = DataLoader(shard, batch_size=None, num_workers=workers)
    hist = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    # sums of per-image recalls (classes, labelled pixels) and the number of images counted
    recall = torch.zeros(3, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    choice = choose_precision(precision, device)
    runner = inference_copy(model, choice)
    runner = compile_for_inference(runner, device) if compile else runner
    try:
        for item in tqdm(loader, desc="eval", disable=not progress, dynamic_ncols=True):
            label = torch.as_tensor(item["label"]).to(device).long()
            counts = class_histogram(label[None], num_classes, ignore_index)[0]
            present = counts > 0
            with precision_autocast(choice, device):
                pred = predict_image(runner, item["image"].to(device), tuple(label.shape[-2:]), cfg,
                                     ms_flip=ms_flip, present=present if model.needs_present_classes else None,
                                     img_scale=img_scale)
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

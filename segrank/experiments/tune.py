"""``segrank benchmark learn --tune``: the same small search of every head's own settings (base learning rate x
decode-head learning-rate multiplier, ``recipe.TUNE_GRID``), each grid point a short fine-tuning evaluated on the
``tune`` split: scenes of their own (another split key of the synthetic scene generator), disjoint from the ``val``
scenes the results are reported on. The setting with the highest tune-split mIoU is selected per head."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segrank.experiments.recipe import HEADS, Setup, head_config
from segrank.experiments.runs import finetune

TUNE_SPLIT = "tune"


def tune_heads(num_classes: int, seed: int, backbone: str, iters: int, val_images: int, grid: dict[str, list[float]],
               setup: Setup, root: Path, device: str, threads: int,
               log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Every head at every point of ``grid`` for ``iters`` iterations from ``backbone``; returns the grid points
    (head, settings, tune-split mIoU) and the selected settings per head."""
    points: list[dict[str, Any]] = []
    selected: dict[str, dict[str, float]] = {}
    for head in HEADS:
        for lr, mult in itertools.product(grid["lr"], grid["decoder_lr_mult"]):
            settings = {"lr": lr, "decoder_lr_mult": mult}
            log(f"N={num_classes} tune {head} lr {lr:g} decode head x{mult:g} ({iters} iterations)")
            trial = Setup(setup.regime, {head: settings}, setup.image_prior_prob, setup.image_loss_weight,
                          setup.data_options, setup.precision)
            cfg = head_config(head, num_classes, seed, iters, val_images, backbone, 1, trial, TUNE_SPLIT)
            run = finetune(cfg, root / f"{head}_lr{lr:g}_x{mult:g}", device, threads)
            points.append({"num_classes": num_classes, "seed": seed, "head": head, **settings, "iters": iters,
                           "tune_mIoU": run["mIoU"], "tune_image_recall": run.get("image_recall")})
        best = max((p for p in points if p["head"] == head), key=lambda p: p["tune_mIoU"])
        selected[head] = {"lr": best["lr"], "decoder_lr_mult": best["decoder_lr_mult"]}
    return {"grid": points, "selected": selected, "split": TUNE_SPLIT, "iters": iters, "seed": seed}

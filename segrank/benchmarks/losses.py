"""Loss benchmark: does class weighting help the rare classes of an imbalanced dataset?

A tiny model (2-block ViT of width 64, linear decoder) trains twice on the same imbalanced synthetic scenes
(``rare_classes``: the last classes appear ``rare_ratio`` times less often), once with the reference cross-entropy
and once with a cross-entropy term whose ``class_weight`` is the median-frequency balancing of the training labels
(weight of class c = median class frequency / frequency of c); everything else (seed, samples, augmentation) is the
same. Each run prints one JSON object: the validation IoU per class, the mean over the rare and the frequent classes.

    python -m segrank.benchmarks.losses --json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from segrank.config import Config, from_dict
from segrank.data import build_dataset
from segrank.training.loop import train


def imbalanced_config(iters: int, seed: int, num_classes: int, rare_classes: int, rare_ratio: int,
                      images: tuple[int, int] = (400, 100)) -> Config:
    """The tiny model on imbalanced 64-pixel synthetic scenes (``images``: train, val), AdamW, one evaluation at the
    end."""
    return from_dict(Config, {
        "model": {"num_classes": num_classes, "head": {"type": "linear"},
                  "backbone": {"embed_dim": 64, "depth": 2, "num_heads": 2, "patch_size": 8, "pos_embed_grid": [8, 8],
                               "drop_path_rate": 0.0}},
        "data": {"dataset": "synthetic", "img_scale": [64, 64], "crop_size": [64, 64], "ratio_range": [0.75, 1.5],
                 "workers": 0, "options": {"num_classes": num_classes, "image_size": 64, "train_images": images[0],
                                           "val_images": images[1], "max_classes": 4, "rare_classes": rare_classes,
                                           "rare_ratio": rare_ratio}},
        "train": {"max_iters": iters, "batch_size": 8, "optimizer": "adamw", "lr": 1e-3, "min_lr": 1e-5,
                  "weight_decay": 0.01, "seed": seed, "eval_interval": iters, "checkpoint_interval": iters,
                  "log_interval": iters, "keep_checkpoints": 1},
        "eval": {"mode": "whole"},
    })


def median_frequency_weights(cfg: Config) -> list[float]:
    """Median class frequency / class frequency over the training labels (SegNet's median-frequency balancing)."""
    dataset = build_dataset(cfg.data, cfg.data.train_split, train=False)
    pixels = np.zeros(cfg.model.num_classes)
    for index in range(len(dataset)):
        label = dataset.load(index)[1]
        pixels += np.bincount(label[label != dataset.info.ignore_index].ravel(), minlength=len(pixels))
    frequency = pixels / pixels.sum()
    return [round(float(np.median(frequency) / f), 4) for f in frequency]


def train_and_evaluate(cfg: Config, label: str, rare_classes: int) -> dict[str, Any]:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="segrank-bench-losses-") as work_dir:
        result = train(cfg, work_dir, device="cpu", progress=False)
    iou = np.array(result.evaluation["IoU"], dtype=float)
    rare = cfg.model.num_classes - rare_classes
    return {"benchmark": "losses", "loss": label, "iters": cfg.train.max_iters, "seed": cfg.train.seed,
            "mIoU": round(float(np.nanmean(iou)), 4), "rare_IoU": round(float(np.nanmean(iou[rare:])), 4),
            "frequent_IoU": round(float(np.nanmean(iou[:rare])), 4), "IoU": [round(float(v), 4) for v in iou],
            "seconds": round(time.perf_counter() - start, 1)}


def bench_losses(iters: int = 300, seeds: tuple[int, ...] = (0,), num_classes: int = 8, rare_classes: int = 3,
                 rare_ratio: int = 10, images: tuple[int, int] = (400, 100)) -> Iterator[dict[str, Any]]:
    """One record per (seed, loss), then the gain of class weighting on the rare classes' IoU."""
    gains = []
    for seed in seeds:
        cfg = imbalanced_config(iters, seed, num_classes, rare_classes, rare_ratio, images)
        weights = median_frequency_weights(cfg)
        plain = train_and_evaluate(cfg, "cross_entropy", rare_classes)
        yield plain
        cfg.model.loss = from_dict(type(cfg.model.loss), {"pixel_terms": [{"class_weight": weights}]}, "model.loss")
        weighted = train_and_evaluate(cfg, "cross_entropy+class_weight", rare_classes) | {"class_weight": weights}
        yield weighted
        gains.append((weighted["rare_IoU"] - plain["rare_IoU"], weighted["frequent_IoU"] - plain["frequent_IoU"]))
    yield {"benchmark": "losses_summary", "seeds": list(seeds), "rare_IoU_gain": round(float(np.mean(gains, 0)[0]), 4),
           "frequent_IoU_change": round(float(np.mean(gains, 0)[1]), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segrank.benchmarks.losses", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line (default: a short table)")
    parser.add_argument("--iters", type=int, default=300, help="training steps of each run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one pair of runs per seed")
    parser.add_argument("--images", type=int, nargs=2, default=[400, 100], metavar=("TRAIN", "VAL"),
                        help="synthetic scenes in the train and the val split")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for record in bench_losses(args.iters, tuple(args.seeds), images=tuple(args.images)):
        if args.json:
            print(json.dumps(record), flush=True)
        elif record["benchmark"] == "losses":
            print(f"{record['loss']:28s} seed {record['seed']}: mIoU {record['mIoU']:.3f}, rare classes "
                  f"{record['rare_IoU']:.3f}, frequent {record['frequent_IoU']:.3f} ({record['seconds']} s)")
        else:
            print(f"class weighting: rare-class IoU {record['rare_IoU_gain']:+.3f}, frequent "
                  f"{record['frequent_IoU_change']:+.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

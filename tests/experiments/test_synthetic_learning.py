"""Tiny models trained from scratch for a few hundred steps on the built-in synthetic scenes (50 classes, 2-6 per
image) learn: Segmenter beats predicting the most frequent class, the ground-truth-class oracle beats Segmenter by
a wide margin, and RankSeg's image-level head ranks the present classes far above chance.

All three use the recipe of ``segrank.experiments.recipe`` (AdamW, warm-up, poly decay) with the same neutral
settings for every head (lr 1e-3, no decode-head multiplier), without its backbone multiplier: here the backbone
starts from scratch.
"""

from __future__ import annotations

import numpy as np
import pytest

import segrank.data
from segrank.config import Config, from_dict
from segrank.experiments.recipe import finetune_recipe
from segrank.reporting.plots import read_log
from segrank.training.loop import train

SIZE = 32
NUM_CLASSES = 50
TOPK = 10
ITERS = {"segmenter": 200, "rankseg_gt": 200, "rankseg": 300}
# Measured with these configs and seed (1 thread, twice, identical): Segmenter mIoU 0.219 after 200 steps, the oracle
# 0.581 after the same 200, RankSeg's validation recall@10 0.50 after 300 steps (10 classes drawn at random: 0.20),
# its training batches' recall rising from 0.23 (first 25 steps) to 0.55 (last 25); the RankSeg figures with its
# image-level branch at 3x the lr, the former recipe (without it, as now, the test passes; the values were not
# recorded again). The thresholds leave room for
# float differences across machines while still failing a model that learned nothing:
# - Segmenter >= 0.05: a quarter of the measurement, and over 50x predicting the most frequent class everywhere;
# - oracle >= Segmenter + 0.15: the measured gap is 0.36; selecting among the image's own 2-6 classes is that much
#   easier than among 50, which is what RankSeg's pixel side gets when its selection is right;
# - RankSeg recall@10 >= 0.35: 1.75x chance, 0.15 below the measurement.
# The three trainings took 34 s in all with 1 thread on the shared 2-core development machine.
MIN_SEGMENTER_MIOU = 0.05
MIN_ORACLE_GAIN = 0.15
MIN_RECALL = 0.35


def learning_config(head: str) -> Config:
    head_cfg = {"type": head, "n_layers": 1, "dropout": 0.0}
    train_cfg = finetune_recipe(ITERS[head]) | {"lr_mult": {}}
    if head == "rankseg":
        head_cfg |= {"n_layers": 2, "topk": TOPK, "downsample": None}
    iters = ITERS[head]
    return from_dict(Config, {
        "model": {"num_classes": NUM_CLASSES,
                  "backbone": {"patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2,
                               "pos_embed_grid": [SIZE // 4, SIZE // 4], "drop_path_rate": 0.0},
                  "head": head_cfg,
                  "loss": {"image_loss": "asl", "image_loss_weight": 1.0, "image_reduction": "sum_classes"}},
        "data": {"dataset": "synthetic", "workers": 0, "crop_size": [SIZE, SIZE], "img_scale": [SIZE, SIZE],
                 "ratio_range": [1.0, 1.0], "photometric": False,
                 "options": {"num_classes": NUM_CLASSES, "image_size": SIZE, "train_images": 2000,
                             "val_images": 50}},
        "train": train_cfg | {"max_iters": iters, "batch_size": 8, "log_interval": 25, "eval_interval": iters,
                              "checkpoint_interval": iters, "keep_checkpoints": 1},
        "eval": {"mode": "whole", "crop_size": [SIZE, SIZE], "stride": [SIZE, SIZE]},
    })


def majority_class_miou(cfg: Config) -> float:
    """mIoU of predicting the training set's most frequent class on every validation pixel (same definition as
    the evaluator: mean IoU over classes present in the labels or the prediction)."""
    train_set = segrank.data.build_dataset(cfg.data, "train", train=False)
    counts = sum(np.bincount(train_set[i]["label"].numpy().ravel(), minlength=NUM_CLASSES) for i in range(200))
    majority = int(np.argmax(counts))
    val = segrank.data.build_dataset(cfg.data, "val", train=False)
    labels = np.stack([val[i]["label"].numpy() for i in range(len(val))])
    present = set(np.unique(labels).tolist()) | {majority}
    iou_majority = float((labels == majority).mean())  # intersection = its pixels, union = every pixel
    return iou_majority / len(present)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for head in ITERS:
        work_dir = tmp_path_factory.mktemp(head) / "run"
        out[head] = (train(learning_config(head), work_dir, progress=False).evaluation, read_log(work_dir))
    return out


def test_adamw_trains_every_head(runs):
    """No collapse under the AdamW recipe (Adam at SGD's learning rate destroyed both heads, docs/learning.md): the
    loss falls, from its first logged value (mean of the first 25 steps) to the last. Measured: Segmenter 0.64x, the
    oracle 0.66x, RankSeg's image loss 0.73x (its pixel loss is not comparable over training: it covers more
    classes as the selection improves). A model stuck at a uniform or single-class prediction keeps its loss."""
    for head, key, ratio in (("segmenter", "loss", 0.8), ("rankseg_gt", "loss", 0.8), ("rankseg", "loss_img", 0.9)):
        losses = [r[key] for r in runs[head][1] if r["type"] == "train"]
        assert losses[-1] < ratio * losses[0], head


def test_segmenter_beats_majority_class(runs):
    assert runs["segmenter"][0]["mIoU"] >= MIN_SEGMENTER_MIOU
    assert majority_class_miou(learning_config("segmenter")) < MIN_SEGMENTER_MIOU / 20


def test_oracle_beats_segmenter(runs):
    assert runs["rankseg_gt"][0]["mIoU"] >= runs["segmenter"][0]["mIoU"] + MIN_ORACLE_GAIN


def test_image_level_recall_rises_far_above_chance(runs):
    result, log = runs["rankseg"]
    assert result["image_recall"] >= MIN_RECALL
    batches = [r["image_recall"] for r in log if r["type"] == "train"]
    assert batches[-1] > batches[0]  # the training batches' recall rose too

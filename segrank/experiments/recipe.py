"""The controlled learning experiment behind ``segrank demo`` and ``segrank benchmark learn``.

Stage 1 pre-trains a small ViT with a per-patch linear head on a synthetic vocabulary *disjoint* from the target
classes (``class_offset``): the backbone learns the colours, textures and shapes classes are made of, never a target
label, like ImageNet pre-training before fine-tuning on a segmentation dataset. Stage 2 fine-tunes that backbone
with each head under one recipe: same data, seed, optimiser, learning-rate rules and budget. The recipe is AdamW
rather than the reference's SGD because at a few hundred iterations SGD leaves RankSeg's image-level head near
chance (docs/learning.md has the measurements). Each head's learning rates come from the same search over the same
grid (``HEAD_SETTINGS``, ``TUNE_GRID``); RankSeg's regime sets only its own parts (k, image-loss weight).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from segrank.checkpoints import export_checkpoint, load_model
from segrank.config import Config, from_dict
from segrank.errors import SegrankError
from segrank.training.loop import TrainResult, train

HEADS = {"segmenter": "Segmenter", "rankseg": "Segmenter + RankSeg",
         "rankseg_gt": "RankSeg, ground-truth classes (oracle)"}
IMAGE_SIZE = 64
PATCH = 8  # the synthetic textures have an 8-pixel period: one patch sees a whole period
TOPK = 30
BATCH = 8
TRAIN_IMAGES = 4000
PRETRAIN_CLASSES = 150  # size of the disjoint stage-1 vocabulary
PRETRAIN_SEED_OFFSET = 1000  # stage 1 draws its scenes from another seed too


class StageInterrupted(SegrankError):
    """A signal stopped one of the experiment's trainings."""


# Every head's own fine-tuning settings: the base learning rate and a multiplier on the learning rate of its whole
# decode head (every parameter named ``decode_head.*``: RankSeg's image-level branch and mask transformer,
# Segmenter's and the oracle's mask transformers alike), searched over the same grid (TUNE_GRID) for every head.
# Selected by `segrank benchmark learn --classes 150 --seeds 0 --tune --tune-iters 300` (2026-12-03, bf16, 2 threads):
# per head the grid point with the highest mIoU on the tune split (other scenes than the reported val split);
# the grid and every point's result are in benchmarks/results/learn_tune_n150_seed0.jsonl and docs/learning.md.
# The same selection is used at every N (the search was not repeated at N = 847: about 18 x 6 minutes there).
HEAD_SETTINGS: dict[str, dict[str, float]] = {
    "segmenter": {"lr": 2e-3, "decoder_lr_mult": 1.0},
    "rankseg": {"lr": 2e-3, "decoder_lr_mult": 1.0},
    "rankseg_gt": {"lr": 1e-3, "decoder_lr_mult": 1.0},
}
HEAD_SETTINGS_SOURCE = ("selected per head by `segrank benchmark learn --tune` at N=150, seed 0, 300 iterations per "
                        "grid point (lr 5e-4/1e-3/2e-3 x decode head x1/x3, the same grid for every head), on the tune "
                        "split, disjoint from the val split reported (docs/learning.md)")
TUNE_GRID: dict[str, list[float]] = {"lr": [5e-4, 1e-3, 2e-3], "decoder_lr_mult": [1.0, 3.0]}
DECODER = "decode_head."


@dataclass(frozen=True)
class Regime:
    """RankSeg's many-class settings: ``topk`` classes kept, the image loss's weight and reduction; its image-level
    branch always sees every patch token (``head.downsample: null``)."""

    name: str
    topk: int
    image_loss_weight: float
    image_reduction: str


# Before the regimes: k = 30 with ASL summed over classes at weight 1 (= weight N under the reference's reduction).
SMALL = Regime("small", TOPK, 1.0, "sum_classes")
# The reference's many-class RankSeg configs: k = 100, every patch token, ASL divided by batch x N ("mean") at weight
# 100 (ADE20K-Full, 847 classes) or 300 (COCO+LVIS, 1284). In sum_classes terms: weight 100 / 847 = 0.118 and
# 300 / 1284 = 0.234.
REFERENCE_TOPK = 100
REFERENCE_IMAGE_LOSS_WEIGHT = {847: 100.0, 1284: 300.0}


def regime_for(name: str, num_classes: int, topk: int | None = None) -> Regime:
    """``reference`` (N must be one of the reference's many-class sizes), ``small``, or ``auto``: reference where
    the reference has settings for N, small elsewhere; ``topk`` replaces the regime's k."""
    if name == "auto":
        name = "reference" if num_classes in REFERENCE_IMAGE_LOSS_WEIGHT else "small"
    if name == "reference":
        if num_classes not in REFERENCE_IMAGE_LOSS_WEIGHT:
            raise SegrankError(f"--regime reference: the reference has many-class settings for N in "
                               f"{sorted(REFERENCE_IMAGE_LOSS_WEIGHT)}, not {num_classes}")
        regime = Regime("reference", REFERENCE_TOPK, REFERENCE_IMAGE_LOSS_WEIGHT[num_classes], "mean")
    else:
        regime = SMALL
    return replace(regime, topk=topk) if topk else regime


@dataclass(frozen=True)
class Setup:
    """What stage 2 varies besides the head: the regime, each head's settings (HEAD_SETTINGS layout), the options
    that probe what limits the image-level head (``image_prior_prob``, an image-loss weight replacing the regime's,
    synthetic data options such as ``max_classes`` or ``train_images``) and the compute precision."""

    regime: Regime = SMALL
    settings: dict[str, dict[str, float]] = field(default_factory=lambda: HEAD_SETTINGS)
    image_prior_prob: float | None = None
    image_loss_weight: float | None = None
    data_options: dict[str, int] = field(default_factory=dict)
    precision: str = "auto"


def finetune_recipe(iters: int, lr: float = 1e-3, decoder_lr_mult: float = 1.0) -> dict[str, Any]:
    """The ``train`` section every head gets: AdamW with the usual ViT groups (no decay on norms, biases, position
    table, class tokens and embeddings), the pretrained backbone at a tenth of ``lr``, the decode head at
    ``decoder_lr_mult`` x ``lr``, a linear warm-up over the first 5 %, then poly decay to 0."""
    lr_mult = {"backbone": 0.1} | ({DECODER: decoder_lr_mult} if decoder_lr_mult != 1.0 else {})
    return {"optimizer": "adamw", "lr": lr, "betas": [0.9, 0.999], "weight_decay": 0.01, "min_lr": 0.0,
            "norm_decay_mult": 0.0, "bias_decay_mult": 0.0,
            "decay_mult": {"pos_embed": 0.0, "cls_token": 0.0, "cls_emb": 0.0},
            "lr_mult": lr_mult, "warmup_iters": max(1, iters // 20)}


def _base(num_classes: int, head: dict[str, Any], options: dict[str, Any], train_cfg: dict[str, Any],
          iters: int, loss: dict[str, Any] | None = None) -> Config:
    grid = IMAGE_SIZE // PATCH
    return from_dict(Config, {
        "model": {
            "num_classes": num_classes,
            "backbone": {"patch_size": PATCH, "embed_dim": 128, "depth": 4, "num_heads": 4,
                         "pos_embed_grid": [grid, grid], "drop_path_rate": 0.0},
            "head": head,
            # sum_classes: the image loss of one class does not shrink as 1 / num_classes (docs/learning.md)
            "loss": loss or {"image_loss": "asl", "image_loss_weight": 1.0, "image_reduction": "sum_classes"},
        },
        # Scale and colour jitter off: classes are defined by colour and texture period.
        "data": {"dataset": "synthetic", "workers": 0, "crop_size": [IMAGE_SIZE, IMAGE_SIZE],
                 "img_scale": [IMAGE_SIZE, IMAGE_SIZE], "ratio_range": [1.0, 1.0], "photometric": False,
                 "options": {"num_classes": num_classes, "image_size": IMAGE_SIZE, "train_images": TRAIN_IMAGES}
                 | options},
        "train": {"max_iters": iters, "batch_size": BATCH, "log_interval": max(1, iters // 30),
                  "checkpoint_interval": iters, "keep_checkpoints": 1} | train_cfg,
        "eval": {"mode": "whole", "crop_size": [IMAGE_SIZE, IMAGE_SIZE], "stride": [IMAGE_SIZE, IMAGE_SIZE]},
    })


def pretrain_config(num_classes: int, seed: int, iters: int, precision: str = "auto") -> Config:
    """Stage 1: a linear head on ``PRETRAIN_CLASSES`` classes none of which is among the ``num_classes`` targets,
    SGD as in the first demo (its recipe does not matter to the comparison: every head starts from its result)."""
    options = {"num_classes": PRETRAIN_CLASSES, "class_offset": num_classes, "val_images": 10,
               "seed": seed + PRETRAIN_SEED_OFFSET}
    train_cfg = {"lr": 0.02, "min_lr": 1e-4, "momentum": 0.9, "weight_decay": 0.0, "warmup_iters": max(1, iters // 20),
                 "seed": seed, "eval_interval": -1, "precision": precision}
    return _base(PRETRAIN_CLASSES, {"type": "linear"}, options, train_cfg, iters)


def head_config(head: str, num_classes: int, seed: int, iters: int, val_images: int, pretrained: str | None,
                evals: int = 6, setup: Setup = Setup(), val_split: str = "val") -> Config:
    """Stage 2 for ``head`` (segmenter, rankseg, rankseg_gt): 2 mask-transformer blocks on every class (Segmenter),
    on the top-k (RankSeg, after its multi-label encoder layer) or on the classes present (oracle), with the head's
    own ``setup.settings``; evaluated on ``val_split`` (``tune``: the tuning split, other scenes than ``val``)."""
    head_cfg: dict[str, Any] = {"type": head, "n_layers": 2, "dropout": 0.0}
    own = setup.settings[head]
    train_cfg = finetune_recipe(iters, own["lr"], own["decoder_lr_mult"]) | {
        "seed": seed, "pretrained": pretrained, "eval_interval": max(1, iters // evals), "precision": setup.precision}
    regime = setup.regime
    loss = {"image_loss": "asl", "image_reduction": regime.image_reduction,
            "image_loss_weight": setup.image_loss_weight or regime.image_loss_weight}
    if head == "rankseg":
        head_cfg |= {"n_layers": 3, "topk": regime.topk, "downsample": None,
                     "image_prior_prob": setup.image_prior_prob}
    options = {"val_images": val_images, "seed": seed} | setup.data_options
    cfg = _base(num_classes, head_cfg, options, train_cfg, iters, loss)
    cfg.data.val_split = val_split
    return cfg


def run_stage(cfg: Config, work_dir: Path, device: str, progress: bool = True) -> TrainResult:
    """``train``; a signal that stops it aborts the whole experiment (its later stages need this one's result)."""
    result = train(cfg, work_dir, device=device, progress=progress)
    if result.stopped:
        raise StageInterrupted(f"interrupted while training {work_dir}; run again (with --force) to restart")
    return result


def pretrain_backbone(num_classes: int, seed: int, iters: int, work_dir: Path, device: str,
                      progress: bool = True, precision: str = "auto") -> Path:
    """Run stage 1 in ``work_dir``; returns the exported backbone (timm names, loadable as ``train.pretrained``)."""
    result = run_stage(pretrain_config(num_classes, seed, iters, precision), work_dir, device, progress)
    return export_checkpoint(load_model(result.checkpoint), work_dir / "backbone.safetensors", "timm")

"""``segrank demo``: Segmenter, Segmenter + RankSeg and RankSeg's ground-truth-class oracle on built-in synthetic
many-class scenes, on a CPU, in minutes.

As in the paper, every head fine-tunes the same pretrained backbone. Stage 1 trains the ViT with a linear head on a
synthetic vocabulary disjoint from the demo's classes (standing in for ImageNet pre-training, which a CPU demo cannot
download, and which has seen none of a segmentation dataset's labels); then each head fine-tunes it with the same
data, seed, optimiser and budget (``segrank.experiments.recipe``). The report (``report.md`` with charts) compares their
mIoU and follows RankSeg's image-level recall@k over training.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segrank import files
from segrank.checkpoints import load_model
from segrank.data import build_dataset, dataset_info
from segrank.errors import SegrankError
from segrank.experiments.recipe import (
    BATCH,
    DECODER,
    HEAD_SETTINGS_SOURCE,
    HEADS,
    IMAGE_SIZE,
    TOPK,
    Setup,
    head_config,
    pretrain_backbone,
    run_stage,
)
from segrank.inference.windows import predict_image
from segrank.models.losses import presence_targets
from segrank.reporting import plots as report
from segrank.runtime.precision import choose_precision

NUM_CLASSES = 150
PRETRAIN_ITERS = 300
# 400: RankSeg's validation recall@30 measured 89-91 % after 300 iterations (seeds 0, 1), 97 % after 400 (seed 1),
# with the former 3x learning rate on its image-level branch; with the selected HEAD_SETTINGS, 95 % after 300 at
# N = 150 (docs/learning.md, "Tuning").
ITERS = 400
EVALS = 4
VAL_IMAGES = 100
GRID_IMAGES = 6


def run_demo(out: Path, seed: int = 0, iters: int | None = None, val_images: int | None = None,
             device: str = "cpu", force: bool = False, precision: str = "auto") -> Path:
    """Pretrain the shared backbone, fine-tune the three heads, evaluate them, write ``out/report.md``; returns its
    path. ``iters`` (tests) replaces both stages' iteration counts; ``precision`` is every stage's
    ``train.precision``."""
    pretrain_iters, iters = (iters, iters) if iters else (PRETRAIN_ITERS, ITERS)
    val_images = val_images or VAL_IMAGES
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise SegrankError(f"{out}: exists and is not empty (remove it, pass --force, or choose another --out)")
        files.ensure_writable(out.parent, folder=True)  # before deleting the old report
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    files.ensure_writable(out, folder=True)
    start = clock = time.perf_counter()
    print(f"segrank demo: pretraining the shared backbone on a disjoint vocabulary ({pretrain_iters} iterations of "
          f"{BATCH} images)", flush=True)
    backbone = pretrain_backbone(NUM_CLASSES, seed, pretrain_iters, out / "backbone", device, precision=precision)
    budget = {"pretrain_iters": pretrain_iters, "iters": iters, "val_images": val_images, "seed": seed,
              "pretrain_seconds": time.perf_counter() - clock,
              "precision": choose_precision(precision, torch.device(device)).reason}
    runs: dict[str, dict[str, Any]] = {}
    for head, name in HEADS.items():
        cfg = head_config(head, NUM_CLASSES, seed, iters, val_images, str(backbone), EVALS,
                          Setup(precision=precision))
        print(f"segrank demo: fine-tuning {name} ({iters} iterations of {BATCH} images)", flush=True)
        clock = time.perf_counter()
        result = run_stage(cfg, out / head, device)
        runs[head] = {"name": name, "cfg": cfg, "dir": out / head, "result": result.evaluation,
                      "checkpoint": result.checkpoint, "seconds": time.perf_counter() - clock,
                      "s_per_iter": report.seconds_per_iteration(out / head)}
    budget["total_seconds"] = time.perf_counter() - start
    return write_report(out, runs, budget)


def _colorize(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    valid = (label >= 0) & (label < len(palette))
    out = np.zeros((*label.shape, 3), np.uint8)
    out[valid] = palette[label[valid]]
    return out


def _display(image: torch.Tensor) -> np.ndarray:
    """Normalised (3, H, W) -> uint8 RGB by per-image min-max (the view only, not the model's input)."""
    x = image.permute(1, 2, 0).numpy()
    return ((x - x.min()) / max(1e-6, float(x.max() - x.min())) * 255).astype(np.uint8)


def write_report(out: Path, runs: dict[str, dict[str, Any]], budget: dict[str, Any]) -> Path:
    first = runs["segmenter"]["cfg"]
    report.compare_curves({run["name"]: run["dir"] for run in runs.values()}, out)
    report.recall_curves({runs["rankseg"]["name"]: runs["rankseg"]["dir"]}, out / "recall_curves.png", TOPK,
                         NUM_CLASSES)
    info = dataset_info("synthetic", first.data.options)
    report.per_class_iou_chart({run["name"]: run["result"]["IoU"] for run in runs.values()},
                               out / "per_class_iou.png", info.classes)

    models = {run["name"]: load_model(run["checkpoint"]) for run in runs.values()}
    val = build_dataset(first.data, first.data.val_split, train=False)
    palette = np.array(info.palette, np.uint8)
    rows = []
    with torch.no_grad():
        for i in range(min(GRID_IMAGES, len(val))):
            item = val[i]
            label = item["label"]
            present = presence_targets(label[None], NUM_CLASSES, info.ignore_index)[0].bool()
            row = [_display(item["image"]), _colorize(label.numpy(), palette)]
            for model in models.values():
                pred = predict_image(model, item["image"], label.shape, first.eval, img_scale=first.data.img_scale,
                                     present=present if model.needs_present_classes else None)
                row.append(_colorize(pred.label.numpy(), palette))
            rows.append(row)
    report.prediction_grid(rows, ["image", "ground truth", *models], out / "predictions.png")

    lines = [
        "# segrank demo: Segmenter vs Segmenter + RankSeg",
        "",
        f"Built-in synthetic scenes: {NUM_CLASSES} classes (colour x texture x shape), 2-6 per image, "
        f"{IMAGE_SIZE}x{IMAGE_SIZE} pixels, seed {budget['seed']}; evaluated on {budget['val_images']} held-out "
        "images (whole-image inference).",
        "",
        "| model | parameters | mIoU | aAcc | mAcc | image recall@k | pixel recall | s / iter. | fine-tuning time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for head, run in runs.items():
        r, params = run["result"], sum(p.numel() for p in models[run["name"]].parameters())
        recall, pixels = "-", "-"
        if head == "rankseg":
            recall, pixels = f"{_pct(r['image_recall'])} % (k={TOPK})", f"{_pct(r['pixel_recall'])} %"
        elif head == "rankseg_gt":
            recall, pixels = "100 % (given)", "100 % (given)"
        label = f"{run['name']}, upper bound" if head == "rankseg_gt" else run["name"]
        lines.append(f"| {label} | {params / 1e6:.2f} M | {_pct(r['mIoU'])} | {_pct(r['aAcc'])} | {_pct(r['mAcc'])} "
                     f"| {recall} | {pixels} | {run['s_per_iter']:.3f} | {run['seconds']:.0f} s |")
    lines += ["", *verdict(runs, budget["iters"]), "",
              "mIoU, aAcc, mAcc in %. mIoU: mean IoU over the classes present in the validation labels or "
              "predictions. Image recall@k: the share of each image's classes that RankSeg keeps among its top-k, "
              "averaged over images; pixel recall: the same for the share of labelled pixels.",
              "", *budget_lines(runs, budget),
              "",
              "## Curves",
              "",
              "![recall](recall_curves.png)",
              "",
              "![loss](loss_curves.png)",
              "",
              "![mIoU](miou_curves.png)",
              "",
              "## Per-class IoU",
              "",
              "![per-class IoU](per_class_iou.png)",
              "",
              "## Predictions (validation images)",
              "",
              "![predictions](predictions.png)",
              "",
              f"Reproduce: `segrank demo --seed {budget['seed']}`. `backbone/` and each head's folder "
              f"({', '.join(f'`{h}/`' for h in runs)}) hold the run's resolved config, log, checkpoint and plots. "
              "docs/learning.md: the same experiment at more budgets, seeds and vocabulary sizes "
              "(`segrank benchmark learn`).",
              ""]
    path = out / "report.md"
    files.write_text(path, "\n".join(lines))
    return path


def verdict(runs: dict[str, dict[str, Any]], iters: int) -> list[str]:
    """Which head is ahead and why, in numbers."""
    seg, rank, gt = (runs[h]["result"] for h in ("segmenter", "rankseg", "rankseg_gt"))
    gap = 100 * (rank["mIoU"] - seg["mIoU"])
    leader, trailer = (("Segmenter + RankSeg", "Segmenter") if gap > 0 else ("Segmenter", "Segmenter + RankSeg"))
    lines = [f"**{leader} is ahead of {trailer} by {abs(gap):.1f} mIoU** after {iters} fine-tuning iterations "
             f"each. RankSeg's image-level head keeps {_pct(rank['image_recall'])} % of each validation image's "
             f"classes among its top-{TOPK} of {NUM_CLASSES} (at random: {100 * TOPK / NUM_CLASSES:.0f} %), "
             f"{_pct(rank['pixel_recall'])} % of the labelled pixels; a pixel whose class it drops cannot be "
             "labelled right."]
    if gap > 0:
        lines.append("Its pixel decoder chooses among those k classes instead of all of them, an easier decision, "
                     "and the selection is good enough that this gain outweighs what the missed classes cost.")
    else:
        lines.append("Its selection is not yet good enough: the missed classes cost more than choosing among k "
                     "classes instead of all of them gains.")
    lines.append(f"Given each image's true classes, the same decoder reaches {_pct(gt['mIoU'])} mIoU (the oracle row: "
                 "an upper bound, no model knows them): the distance from the oracle to RankSeg is what the "
                 "image-level head still loses, the distance from the oracle to Segmenter what restricting the "
                 "pixel classifier to the right few classes can gain.")
    ratio = runs["rankseg"]["s_per_iter"] / max(1e-9, runs["segmenter"]["s_per_iter"])
    lines.append(f"A RankSeg iteration took {ratio:.2f}x the time of a Segmenter iteration: its mask transformer "
                 f"and pixel classifier work on {TOPK} classes instead of {NUM_CLASSES}. The paper fine-tunes "
                 "ImageNet-pretrained ViTs for 40k-320k iterations on real images; this demo shows the mechanism at "
                 "CPU scale, not the paper's numbers.")
    return [" ".join(lines)]


def budget_lines(runs: dict[str, dict[str, Any]], budget: dict[str, Any]) -> list[str]:
    cfg = runs["segmenter"]["cfg"]
    b, t = cfg.model.backbone, cfg.train
    own = "; ".join(f"{run['name']}: lr {run['cfg'].train.lr:g}, decode head x"
                    f"{run['cfg'].train.lr_mult.get(DECODER, 1.0):g}" for run in runs.values())
    return [
        "## Budget",
        "",
        f"- Backbone: ViT, {b.depth} blocks, width {b.embed_dim}, {b.num_heads} heads, patch {b.patch_size} "
        f"({IMAGE_SIZE // b.patch_size}x{IMAGE_SIZE // b.patch_size} tokens).",
        f"- Stage 1, shared: the backbone with a linear head, trained from scratch for {budget['pretrain_iters']} "
        f"iterations ({budget['pretrain_seconds']:.0f} s) on {NUM_CLASSES} other synthetic classes (none of the "
        "demo's; the same colours, textures and shapes), standing in for ImageNet pre-training.",
        f"- Stage 2, the same budget for every head: {budget['iters']} iterations of batch {BATCH} from the stage-1 "
        f"backbone, AdamW (backbone at 0.1x the lr, weight decay {t.weight_decay:g} except on norms, biases, "
        f"position table and class tokens), {t.warmup_iters} warm-up iterations, poly decay; precision "
        f"{budget['precision']}; {torch.get_num_threads()} CPU threads; {budget['total_seconds']:.0f} s in all.",
        f"- Each head's own settings (base lr, lr multiplier of its whole decode head): {own}. How they were "
        f"chosen: {HEAD_SETTINGS_SOURCE}; the same grid is searched for every head.",
        f"- Heads: Segmenter's mask transformer (2 blocks, all {NUM_CLASSES} class tokens); RankSeg's multi-label "
        f"encoder layer + the same 2 blocks on the top-{TOPK} classes of each image (image loss: ASL summed over "
        "classes); the oracle's 2 blocks on the classes present in the label.",
    ]


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"

"""``segrank demo``: Segmenter vs Segmenter + RankSeg on built-in synthetic many-class scenes, on a CPU, in minutes.

As in the paper, both heads fine-tune the same pretrained backbone: a shared first stage trains the ViT with a linear
head (standing in for ImageNet pretraining, which a CPU demo cannot download), then each head fine-tunes it with the
same data, seed and budget. The report (``report.md`` with charts) compares their mIoU and RankSeg's image-level
recall@k.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segrank import files
from segrank.checkpoints import export_checkpoint, load_model
from segrank.config import Config, from_dict
from segrank.data import build_dataset, dataset_info
from segrank.engine import report
from segrank.engine.inference import predict_image
from segrank.engine.train import train
from segrank.errors import SegrankError

NUM_CLASSES = 150
IMAGE_SIZE = 64
PATCH = 8  # the synthetic textures have an 8-pixel period: one patch sees a whole period
TOPK = 30
PRETRAIN_ITERS = 300
ITERS = 200
BATCH = 8
TRAIN_IMAGES = 4000
VAL_IMAGES = 100
GRID_IMAGES = 6
HEADS = {"segmenter": "Segmenter", "rankseg": "Segmenter + RankSeg"}


def demo_config(head: str, seed: int, iters: int, val_images: int, pretrained: str | None = None) -> Config:
    """A 4-block 128-d ViT with 8-pixel patches on 64x64 scenes of 150 classes (2-6 per image)."""
    head_cfg: dict[str, Any] = {"type": head, "n_layers": 2, "dropout": 0.0}
    if head == "rankseg":
        # n_layers 3 = the multi-label encoder layer + the same 2 mask-transformer blocks as the Segmenter head.
        head_cfg |= {"n_layers": 3, "topk": TOPK, "downsample": None}
    grid = IMAGE_SIZE // PATCH
    return from_dict(Config, {
        "model": {
            "num_classes": NUM_CLASSES,
            "backbone": {"patch_size": PATCH, "embed_dim": 128, "depth": 4, "num_heads": 4,
                         "pos_embed_grid": [grid, grid], "drop_path_rate": 0.0},
            "head": head_cfg,
            "loss": {"image_loss": "asl", "image_loss_weight": 10.0},
        },
        # Scale and colour jitter off: classes are defined by colour and texture period.
        "data": {"dataset": "synthetic", "workers": 0, "crop_size": [IMAGE_SIZE, IMAGE_SIZE],
                 "img_scale": [IMAGE_SIZE, IMAGE_SIZE], "ratio_range": [1.0, 1.0], "photometric": False,
                 "options": {"num_classes": NUM_CLASSES, "image_size": IMAGE_SIZE, "train_images": TRAIN_IMAGES,
                             "val_images": val_images, "seed": seed}},
        "train": {"max_iters": iters, "batch_size": BATCH, "lr": 0.02, "min_lr": 1e-4, "momentum": 0.9,
                  "weight_decay": 0.0, "warmup_iters": max(1, iters // 20), "seed": seed, "pretrained": pretrained,
                  "log_interval": max(1, iters // 40), "eval_interval": max(1, iters // 4) if head != "linear" else -1,
                  "checkpoint_interval": iters, "keep_checkpoints": 1},
        "eval": {"mode": "whole", "crop_size": [IMAGE_SIZE, IMAGE_SIZE], "stride": [IMAGE_SIZE, IMAGE_SIZE]},
    })


def run_demo(out: Path, seed: int = 0, iters: int | None = None, val_images: int | None = None,
             device: str = "cpu", force: bool = False) -> Path:
    """Pretrain the shared backbone, fine-tune both heads, evaluate them, write ``out/report.md``; returns its path.
    ``iters`` (tests) replaces both stages' iteration counts."""
    pretrain_iters, iters = (iters, iters) if iters else (PRETRAIN_ITERS, ITERS)
    val_images = val_images or VAL_IMAGES
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise SegrankError(f"{out}: exists and is not empty (remove it, pass --force, or choose another --out)")
        files.ensure_writable(out.parent, folder=True)  # before deleting the old report
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    files.ensure_writable(out, folder=True)
    clock = time.perf_counter()
    print(f"segrank demo: pretraining the shared backbone ({pretrain_iters} iterations of {BATCH} images)", flush=True)
    stage0 = _train_stage(demo_config("linear", seed, pretrain_iters, val_images), out / "backbone", device)
    backbone = export_checkpoint(load_model(stage0["checkpoint"]), out / "backbone" / "backbone.safetensors", "timm")
    budget = {"pretrain_iters": pretrain_iters, "iters": iters, "val_images": val_images, "seed": seed,
              "pretrain_seconds": time.perf_counter() - clock}
    runs: dict[str, dict[str, Any]] = {}
    for head, name in HEADS.items():
        cfg = demo_config(head, seed, iters, val_images, pretrained=str(backbone))
        print(f"segrank demo: fine-tuning {name} ({iters} iterations of {BATCH} images)", flush=True)
        clock = time.perf_counter()
        result = _train_stage(cfg, out / head, device)
        runs[name] = {"cfg": cfg, "dir": out / head, "result": result["eval"], "checkpoint": result["checkpoint"],
                      "seconds": time.perf_counter() - clock}
    return write_report(out, runs, budget)


class DemoInterrupted(SegrankError):
    """A signal stopped one of the demo's trainings."""


def _train_stage(cfg: Config, work_dir: Path, device: str) -> dict[str, Any]:
    result = train(cfg, work_dir, device=device)
    if result["stopped"]:
        raise DemoInterrupted(f"interrupted while training {work_dir}; run the demo again (with --force) to restart")
    return result


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
    first = next(iter(runs.values()))["cfg"]
    report.compare_curves({name: run["dir"] for name, run in runs.items()}, out)
    ious = {name: run["result"]["IoU"] for name, run in runs.items()}
    info = dataset_info("synthetic", first.data.options)
    report.per_class_iou_chart(ious, out / "per_class_iou.png", info.classes)

    models = {name: load_model(run["checkpoint"]) for name, run in runs.items()}
    val = build_dataset(first.data, first.data.val_split, train=False)
    palette = np.array(info.palette, np.uint8)
    rows = []
    with torch.no_grad():
        for i in range(min(GRID_IMAGES, len(val))):
            item = val[i]
            label = item["label"].numpy()
            row = [_display(item["image"]), _colorize(label, palette)]
            for model in models.values():
                pred = predict_image(model, item["image"], label.shape, first.eval, img_scale=first.data.img_scale)
                row.append(_colorize(pred.label.numpy(), palette))
            rows.append(row)
    report.prediction_grid(rows, ["image", "ground truth", *models], out / "predictions.png")

    b, t = first.model.backbone, first.train
    lines = [
        "# segrank demo: Segmenter vs Segmenter + RankSeg",
        "",
        f"Built-in synthetic scenes: {NUM_CLASSES} classes (colour x texture x shape), 2-6 per image, "
        f"{IMAGE_SIZE}x{IMAGE_SIZE} pixels, seed {budget['seed']}; evaluated on {budget['val_images']} held-out "
        "images (whole-image inference).",
        "",
        "| model | parameters | mIoU | aAcc | mAcc | image recall@k | fine-tuning time |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        r, params = run["result"], sum(p.numel() for p in models[name].parameters())
        recall = f"{100 * r['image_recall']:.1f} % (k={TOPK})" if "image_recall" in r else "-"
        lines.append(f"| {name} | {params / 1e6:.2f} M | {_pct(r['mIoU'])} | {_pct(r['aAcc'])} | {_pct(r['mAcc'])} "
                     f"| {recall} | {run['seconds']:.0f} s |")
    (seg_name, seg), (rank_name, rank) = runs.items()
    recall = rank["result"].get("image_recall", float("nan"))
    ahead = rank_name if rank["result"]["mIoU"] > seg["result"]["mIoU"] else seg_name
    lines += [
        "",
        f"{ahead} is ahead at this budget. RankSeg keeps {100 * recall:.0f} % of each image's classes among its "
        f"top-{TOPK} of {NUM_CLASSES} (chance: {100 * TOPK / NUM_CLASSES:.0f} %); the pixels of the classes it drops "
        "cannot be labelled, so its image-level head bounds its mIoU. The paper fine-tunes ImageNet-pretrained ViTs "
        f"for 40k-320k iterations; here each head gets {budget['iters']}. Each RankSeg iteration took "
        f"{rank['seconds'] / seg['seconds']:.2f}x the time of a Segmenter iteration: its mask transformer and "
        f"pixel classifier work on {TOPK} classes instead of {NUM_CLASSES}.",
        "",
        "mIoU, aAcc, mAcc in %. mIoU: mean IoU over the classes present in the validation labels or predictions. "
        "Image recall@k: the share of each image's classes that RankSeg keeps among its top-k, averaged over "
        "images.",
        "",
        "## Budget",
        "",
        f"- Backbone: ViT, {b.depth} blocks, width {b.embed_dim}, {b.num_heads} heads, patch {b.patch_size} "
        f"({IMAGE_SIZE // b.patch_size}x{IMAGE_SIZE // b.patch_size} tokens).",
        f"- Stage 1, shared: the backbone with a linear head, trained from scratch for {budget['pretrain_iters']} "
        f"iterations ({budget['pretrain_seconds']:.0f} s), stands in for ImageNet pretraining.",
        f"- Stage 2, per head, identical budgets: {budget['iters']} iterations of batch {BATCH} from the stage-1 "
        f"backbone, SGD (lr {t.lr}, momentum {t.momentum}), {t.warmup_iters} warmup iterations, poly decay; "
        f"{torch.get_num_threads()} CPU threads.",
        f"- Heads: Segmenter's mask transformer (2 blocks, all {NUM_CLASSES} class tokens); RankSeg's multi-label "
        f"encoder layer + the same 2 blocks on the top-{TOPK} classes of each image.",
        "",
        "## Curves",
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
        f"Reproduce: `segrank demo --seed {budget['seed']}`. `backbone/`, `segmenter/` and `rankseg/` hold each "
        "run's resolved config, log, checkpoint and plots.",
        "",
    ]
    path = out / "report.md"
    files.write_text(path, "\n".join(lines))
    return path


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"

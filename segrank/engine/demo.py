"""``segrank demo``: Segmenter vs Segmenter + RankSeg on built-in synthetic many-class scenes, on a CPU, in minutes.

Both models share the backbone architecture, the data, the seed and the training budget; they differ only in the
decode head. The report (``report.md`` with charts) compares their mIoU and RankSeg's image-level recall@k.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segrank.checkpoints import _atomic_write, load_model
from segrank.config import Config, from_dict
from segrank.engine import report
from segrank.engine.train import train
from segrank.errors import SegrankError

NUM_CLASSES = 150
IMAGE_SIZE = 64
TOPK = 10
ITERS = 300
BATCH = 16
VAL_IMAGES = 100
GRID_IMAGES = 6


def demo_config(head: str, seed: int, iters: int, val_images: int) -> Config:
    """A 4-block 128-d ViT with 8-pixel patches on 64x64 scenes of 150 classes (2-6 per image)."""
    head_cfg: dict[str, Any] = {"type": head, "n_layers": 2, "dropout": 0.0}
    if head == "rankseg":
        # n_layers 3 = the multi-label encoder layer + the same 2 mask-transformer blocks as the Segmenter head.
        head_cfg |= {"n_layers": 3, "topk": TOPK, "downsample": None}
    return from_dict(Config, {
        "model": {
            "num_classes": NUM_CLASSES,
            "backbone": {"patch_size": 8, "embed_dim": 128, "depth": 4, "num_heads": 4,
                         "pos_embed_grid": [IMAGE_SIZE // 8, IMAGE_SIZE // 8], "drop_path_rate": 0.0},
            "head": head_cfg,
            "loss": {"image_loss": "asl", "image_loss_weight": 1.0},
        },
        "data": {"dataset": "synthetic", "workers": 0,
                 "options": {"num_classes": NUM_CLASSES, "image_size": IMAGE_SIZE, "val_images": val_images,
                             "seed": seed},
                 "crop_size": [IMAGE_SIZE, IMAGE_SIZE], "img_scale": [IMAGE_SIZE, IMAGE_SIZE]},
        "train": {"max_iters": iters, "batch_size": BATCH, "lr": 0.05, "min_lr": 1e-4, "momentum": 0.9,
                  "weight_decay": 0.0, "warmup_iters": max(1, iters // 20), "seed": seed,
                  "log_interval": max(1, iters // 30), "eval_interval": max(1, iters // 4),
                  "checkpoint_interval": iters, "keep_checkpoints": 1},
        "eval": {"mode": "whole", "crop_size": [IMAGE_SIZE, IMAGE_SIZE], "stride": [IMAGE_SIZE, IMAGE_SIZE]},
    })


def run_demo(out: Path, seed: int = 0, iters: int | None = None, val_images: int | None = None,
             device: str = "cpu", force: bool = False) -> Path:
    """Train both models, evaluate them and write ``out/report.md``; returns its path."""
    iters, val_images = iters or ITERS, val_images or VAL_IMAGES
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise SegrankError(f"{out}: exists and is not empty (remove it, pass --force, or choose another --out)")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    runs: dict[str, dict[str, Any]] = {}
    for name, head in (("Segmenter", "segmenter"), ("Segmenter + RankSeg", "rankseg")):
        cfg = demo_config(head, seed, iters, val_images)
        print(f"segrank demo: training {name} ({iters} iterations of {BATCH} images)", flush=True)
        start = time.perf_counter()
        result = train(cfg, out / head, device=device)
        runs[name] = {"cfg": cfg, "dir": out / head, "result": result["eval"], "seconds": time.perf_counter() - start,
                      "checkpoint": result["checkpoint"]}
    return write_report(out, runs, seed, iters, val_images)


def _palette(num_classes: int) -> np.ndarray:
    """Distinct-enough fixed colours per class (golden-angle hues), black for ignored pixels."""
    import colorsys

    colors = [colorsys.hsv_to_rgb((i * 0.618033988749895) % 1, 0.65 + 0.35 * (i % 2), 0.6 + 0.4 * (i % 3) / 2)
              for i in range(num_classes)]
    return (np.array(colors) * 255).astype(np.uint8)


def _colorize(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    valid = (label >= 0) & (label < len(palette))
    out = np.zeros((*label.shape, 3), np.uint8)
    out[valid] = palette[label[valid]]
    return out


def _display(image: torch.Tensor) -> np.ndarray:
    """Normalised (3, H, W) -> uint8 RGB by per-image min-max (the view only, not the model's input)."""
    x = image.permute(1, 2, 0).numpy()
    return ((x - x.min()) / max(1e-6, float(x.max() - x.min())) * 255).astype(np.uint8)


def write_report(out: Path, runs: dict[str, dict[str, Any]], seed: int, iters: int, val_images: int) -> Path:
    from segrank.data import build_dataset

    first = next(iter(runs.values()))["cfg"]
    report.compare_curves({name: run["dir"] for name, run in runs.items()}, out)
    ious = {name: run["result"]["IoU"] for name, run in runs.items()}
    report.per_class_iou_chart(ious, out / "per_class_iou.png", first.model.class_names)

    models = {name: load_model(run["checkpoint"]) for name, run in runs.items()}
    val = build_dataset(first.data, first.data.val_split, train=False)
    palette = _palette(NUM_CLASSES)
    rows = []
    with torch.no_grad():
        for i in range(min(GRID_IMAGES, len(val))):
            item = val[i]
            image, label = item["image"][None], item["label"].numpy()
            row = [_display(item["image"]), _colorize(label, palette)]
            for model in models.values():
                pred = model.dense_logits(image, label.shape).argmax(1)[0].numpy()
                row.append(_colorize(pred, palette))
            rows.append(row)
    report.prediction_grid(rows, ["image", "ground truth", *models], out / "predictions.png")

    lines = [
        "# segrank demo: Segmenter vs Segmenter + RankSeg",
        "",
        f"Synthetic scenes: {NUM_CLASSES} classes, 2-6 per image, {IMAGE_SIZE}x{IMAGE_SIZE} pixels, built in "
        f"(seed {seed}); evaluated on {val_images} held-out images.",
        "",
        "| model | parameters | mIoU | aAcc | mAcc | image recall@k | training time |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        r, params = run["result"], sum(p.numel() for p in models[name].parameters())
        recall = f"{100 * r['image_recall']:.1f} % (k={TOPK})" if "image_recall" in r else "-"
        lines.append(f"| {name} | {params / 1e6:.2f} M | {_pct(r['mIoU'])} | {_pct(r['aAcc'])} | {_pct(r['mAcc'])} "
                     f"| {recall} | {run['seconds']:.0f} s |")
    b = first.model.backbone
    lines += [
        "",
        "## Budget (identical for both models)",
        "",
        f"- Backbone: ViT, {b.depth} blocks, width {b.embed_dim}, {b.num_heads} heads, patch {b.patch_size}, "
        "trained from scratch (no pretrained weights).",
        f"- Heads: Segmenter mask transformer with 2 blocks; RankSeg with its multi-label encoder layer, the same 2 "
        f"blocks and top-{TOPK} class selection.",
        f"- Training: {iters} iterations, batch {BATCH}, SGD (lr {first.train.lr}, momentum {first.train.momentum}) "
        f"with {first.train.warmup_iters} warmup iterations and poly decay; {torch.get_num_threads()} CPU threads.",
        f"- mIoU: mean over classes present in the {val_images} validation images' labels or predictions.",
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
        f"Reproduce: `segrank demo --seed {seed}`. Runs: `{runs[next(iter(runs))]['dir'].name}/` and "
        f"`{list(runs.values())[1]['dir'].name}/` hold each run's config, log, checkpoint and plots.",
        "",
    ]
    path = out / "report.md"
    _atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines)))
    return path


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"

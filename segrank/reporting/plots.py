"""PNG plots of a run (loss, lr, mIoU curves from ``log.jsonl``) and the demo's charts.

Figures are ``matplotlib.figure.Figure`` objects rendered by their own canvas: no pyplot, so importing segrank never
changes a notebook's matplotlib backend."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from segrank import files


def read_log(work_dir: Path) -> list[dict[str, Any]]:
    path = Path(work_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def seconds_per_iteration(work_dir: Path) -> float:
    """Mean training time per iteration of a run, from its log (evaluations excluded)."""
    records = [r for r in read_log(work_dir) if r.get("type") == "train"]
    steps = [0] + [r["step"] for r in records]
    return sum((b - a) * r["time_s"] for a, b, r in zip(steps, steps[1:], records, strict=False)) / max(1, steps[-1])


def _save(fig: Figure, path: Path) -> None:
    files.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))


def _curve(runs: dict[str, list[dict[str, Any]]], key: str, kind: str, title: str, path: Path,
           log_y: bool = False) -> bool:
    """One line per run of ``key`` over steps; returns False (and writes nothing) when no run has it."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    drawn = False
    for label, records in runs.items():
        points = [(r["step"], r[key]) for r in records if r.get("type") == kind and key in r]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if kind == "eval" else None, markersize=3, label=label)
            drawn = True
    if not drawn:
        return False
    ax.set(xlabel="iteration", title=title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax.legend()
    _save(fig, path)
    return True


def plot_training_curves(work_dir: str | Path) -> list[Path]:
    """loss.png (total and every term), lr.png, miou.png (when evaluated) in ``work_dir``; returns what was written."""
    work_dir = Path(work_dir)
    records = read_log(work_dir)
    written = []
    loss_keys = sorted({k for r in records if r.get("type") == "train" for k in r if k.startswith("loss")})
    if loss_keys:
        fig = Figure(figsize=(6, 3.5))
        ax = fig.subplots()
        for key in loss_keys:
            points = [(r["step"], r[key]) for r in records if r.get("type") == "train" and key in r]
            ax.plot(*zip(*points, strict=True), label=key)
        ax.set(xlabel="iteration", title="training loss")
        ax.grid(alpha=0.3)
        ax.legend()
        _save(fig, work_dir / "loss.png")
        written.append(work_dir / "loss.png")
    for key, kind, title, name in (("lr", "train", "learning rate", "lr.png"),
                                   ("mIoU", "eval", "val mIoU (fraction)", "miou.png")):
        if _curve({"run": records}, key, kind, title, work_dir / name):
            written.append(work_dir / name)
    return written


def compare_curves(runs: dict[str, Path], out_dir: Path) -> list[Path]:
    """Curves of several runs on shared axes: loss_curves.png, miou_curves.png."""
    logs = {label: read_log(path) for label, path in runs.items()}
    written = []
    for key, kind, title, name in (("loss", "train", "training loss (total of each model's terms)", "loss_curves.png"),
                                   ("mIoU", "eval", "val mIoU (fraction)", "miou_curves.png")):
        if _curve(logs, key, kind, title, out_dir / name):
            written.append(out_dir / name)
    return written


def recall_curves(runs: dict[str, Path], path: Path, k: int, num_classes: int) -> Path | None:
    """RankSeg's image-level recall@k over training: on the training batches (``image_recall`` of the train records)
    and on the validation images (that of the eval records), with the recall of k classes drawn at random."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    drawn = False
    for label, work_dir in runs.items():
        records = read_log(work_dir)
        for key, kind, style, what in (("image_recall", "train", "-", "training batches"),
                                       ("image_recall", "eval", "o-", "validation")):
            points = [(r["step"], 100 * r[key]) for r in records if r.get("type") == kind and key in r]
            if points:
                ax.plot(*zip(*points, strict=True), style, markersize=4, label=f"{label}, {what}")
                drawn = True
    if not drawn:
        return None
    ax.axhline(100 * k / num_classes, color="grey", linestyle=":", label=f"chance ({k} of {num_classes} at random)")
    ax.set(xlabel="iteration", ylabel="%", ylim=(0, 100), title=f"image-level recall@{k}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return path


def per_class_iou_chart(ious: dict[str, Sequence[float]], path: Path, class_names: Sequence[str] | None = None,
                        top: int = 40) -> Path:
    """Grouped bars of per-class IoU (NaN = class absent) for the ``top`` classes with the largest IoU in any run."""
    table = np.array([np.asarray(v, dtype=float) for v in ious.values()])
    best = np.nan_to_num(table, nan=-1.0).max(axis=0)
    shown = np.argsort(-best, kind="stable")[:top]
    fig = Figure(figsize=(max(6.0, 0.28 * len(shown)), 3.8))
    ax = fig.subplots()
    width = 0.8 / len(ious)
    for j, label in enumerate(ious):
        ax.bar(np.arange(len(shown)) + j * width, np.nan_to_num(table[j, shown]), width, label=label)
    names = [class_names[i] if class_names else str(i) for i in shown]
    ax.set_xticks(np.arange(len(shown)) + 0.4 - width / 2, names, rotation=90, fontsize=7)
    ax.set(ylabel="IoU (fraction)", title=f"per-class IoU ({len(shown)} best classes)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)
    return path


def prediction_grid(rows: list[list[np.ndarray]], titles: Sequence[str], path: Path) -> Path:
    """A grid of RGB images (uint8 HxWx3): one row per sample, one column per title."""
    fig = Figure(figsize=(2.0 * len(titles), 2.0 * len(rows)))
    axes = fig.subplots(len(rows), len(titles), squeeze=False)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            axes[i, j].imshow(image, interpolation="nearest")
            axes[i, j].axis("off")
            if i == 0:
                axes[i, j].set_title(titles[j], fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return path


def confused_pairs_chart(pairs: Sequence[tuple[int, int, float, int]], class_names: Sequence[str], path: Path
                         ) -> Path:
    """Horizontal bars of the most confused (label, prediction, share, pixels) pairs, largest share on top."""
    fig = Figure(figsize=(7.0, 1.0 + 0.3 * max(1, len(pairs))))
    ax = fig.subplots()
    if pairs:
        y = np.arange(len(pairs))[::-1]
        ax.barh(y, [100 * share for _, _, share, _ in pairs], color="tab:red")
        ax.set_yticks(y, [f"{class_names[a]} -> {class_names[b]}" for a, b, _, _ in pairs], fontsize=8)
        for yi, (_, _, share, pixels) in zip(y, pairs, strict=True):
            ax.text(100 * share, yi, f" {pixels} px", va="center", fontsize=7)
        ax.grid(alpha=0.3, axis="x")
    else:
        ax.text(0.5, 0.5, "no pixel of any class was predicted as another class", ha="center", va="center")
        ax.set_yticks([])
    ax.set(xlabel="% of the label class's pixels predicted as the other class",
           title=f"most confused classes (label -> prediction), {len(pairs)} pairs")
    _save(fig, path)
    return path


def learning_curves(case: dict[str, Any], path: Path, k: int, x: str = "step") -> Path:
    """``segrank benchmark learn``, one vocabulary size and seed: validation mIoU of every head over training (left),
    RankSeg's image-level recall@k and pixel recall on the validation scenes and training batches (right); against
    iterations (``x`` "step") or training wall-clock (``x`` "train_seconds")."""
    xlabel = "iteration" if x == "step" else "training seconds"
    fig = Figure(figsize=(11, 3.8))
    left, right = fig.subplots(1, 2)
    for head, run in case["heads"].items():
        points = [(r[x], 100 * r["mIoU"]) for r in run["eval_curve"]]
        left.plot(*zip(*points, strict=True), "o-", markersize=3, label=head)
    left.set(xlabel=xlabel, ylabel="val mIoU (%)", title=f"N = {case['num_classes']}, seed {case['seed']}")
    rank = case["heads"].get("rankseg", {})  # absent when only other heads were trained
    for key, curve, style, label in (("image_recall", "eval_curve", "o-", f"val recall@{k}"),
                                     ("pixel_recall", "eval_curve", "s--", "val pixel recall"),
                                     ("image_recall", "train_curve", "-", f"training-batch recall@{k}")):
        points = [(r[x], 100 * r[key]) for r in rank.get(curve, []) if key in r]
        if points:
            right.plot(*zip(*points, strict=True), style, markersize=3, label=label)
    right.axhline(100 * k / case["num_classes"], color="grey", linestyle=":", label="chance")
    right.set(xlabel=xlabel, ylabel="%", ylim=(0, 100), title="RankSeg's image-level selection")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)
    return path


def attention_grid(image: np.ndarray, rows: Sequence[tuple[str, Sequence[tuple[str, np.ndarray]]]],
                   extent: tuple[float, float], path: Path) -> Path:
    """One row per attention layer: the RGB ``image`` (uint8 HxWx3) titled with the layer's name, then each titled map.
    A map is a patch-grid array drawn over ``extent`` (width, height) in the image's pixels, cut at the image's border
    (NaN cells are left blank); each map has its own colour scale."""
    height, width = image.shape[:2]
    columns = 1 + max(len(maps) for _, maps in rows)
    panel = 2.0
    fig = Figure(figsize=(panel * columns, (panel * height / width + 0.35) * len(rows)))
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for r, (layer, maps) in enumerate(rows):
        axes[r, 0].imshow(image)
        axes[r, 0].set_title(layer, fontsize=9, fontweight="bold")
        for ax, (title, grid) in zip(axes[r, 1:], maps, strict=False):
            ax.imshow(grid, extent=(0, extent[0], extent[1], 0), interpolation="nearest", cmap="viridis")
            ax.set(xlim=(0, width), ylim=(height, 0))
            ax.set_title(title, fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return path

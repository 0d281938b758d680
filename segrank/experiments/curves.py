"""Learning curves of one fine-tuning read from its log: evaluations against iterations and against training
wall-clock, and the time it took to reach given mIoU thresholds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from segrank.reporting import plots as report

# Time-to-accuracy is reported for these validation mIoU thresholds.
MIOU_THRESHOLDS = (0.05, 0.10, 0.20)
EVAL_KEYS = ("step", "mIoU", "aAcc", "image_recall", "pixel_recall")


def training_seconds_at(train: list[dict[str, Any]], step: int) -> float:
    """Training seconds (evaluations excluded) spent up to ``step``, from the log's per-interval ``time_s`` (seconds
    per iteration over the steps since the previous record); a step inside an interval is interpolated."""
    seconds, previous = 0.0, 0
    for record in train:
        upto = min(step, record["step"])
        seconds += max(0, upto - previous) * record["time_s"]
        previous = record["step"]
        if previous >= step:
            break
    return seconds


def eval_curve(work_dir: Path) -> list[dict[str, Any]]:
    """Every evaluation of the run: its step, training seconds so far (``train_seconds``) and metrics."""
    records = report.read_log(work_dir)
    train = [r for r in records if r["type"] == "train"]
    return [{k: r[k] for k in EVAL_KEYS if k in r} | {"train_seconds": training_seconds_at(train, r["step"])}
            for r in records if r["type"] == "eval"]


def train_curve(work_dir: Path) -> list[dict[str, Any]]:
    train = [r for r in report.read_log(work_dir) if r["type"] == "train"]
    return [{"step": r["step"], "loss": r["loss"], "train_seconds": training_seconds_at(train, r["step"]),
             **{k: r[k] for k in ("image_recall", "pixel_recall") if k in r}} for r in train]


def time_to_miou(curve: list[dict[str, Any]], thresholds: tuple[float, ...] = MIOU_THRESHOLDS
                 ) -> dict[str, dict[str, float] | None]:
    """Per threshold (key: its percentage, "5"): the first evaluation at or above it, its step and training seconds;
    None when no evaluation reached it."""
    out: dict[str, dict[str, float] | None] = {}
    for threshold in thresholds:
        hit = next((r for r in curve if r["mIoU"] >= threshold), None)
        out[f"{100 * threshold:g}"] = None if hit is None else {"step": hit["step"], "seconds": hit["train_seconds"]}
    return out

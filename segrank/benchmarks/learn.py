"""``segrank benchmark learn``: does RankSeg learn, against Segmenter, at equal budgets? (docs/learning.md)

For each vocabulary size N and seed: stage 1 pre-trains a backbone on a synthetic vocabulary disjoint from the N
target classes; then Segmenter, Segmenter + RankSeg and the RankSeg ground-truth-class oracle fine-tune it with
identical data, seed, optimiser and iterations (``segrank.engine.experiment``). Equal wall-clock: a second run of
one head (``--equal-time``: Segmenter by default) gets the iterations that take as long as the other head's run did,
from their measured seconds per iteration, with its own full learning-rate schedule. Each fine-tuning runs in a
freshly spawned process, so its peak resident memory is its own. Records per head: final mIoU/aAcc/mAcc, image
recall@k and pixel recall on the validation scenes over training, the same recalls on the training batches, seconds
per iteration, peak memory.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from segrank.benchmarks.measure import in_fresh_process, machine_info, vm_hwm_mb
from segrank.config import Config, from_dict, to_dict
from segrank.engine import report
from segrank.engine.experiment import (
    HEADS,
    IMAGE_BRANCH_LR_MULT,
    TOPK,
    finetune_recipe,
    head_config,
    pretrain_backbone,
    run_stage,
)

PRETRAIN_ITERS = 300
VAL_IMAGES = 100
EVALS = 6


def finetune_in_process(cfg: dict[str, Any], work_dir: str, device: str, threads: int) -> dict[str, Any]:
    """Train one head (run in a fresh process); its curves, timing and peak memory."""
    torch.set_num_threads(threads)
    before = vm_hwm_mb()
    clock = time.perf_counter()
    result = run_stage(from_dict(Config, cfg), Path(work_dir), device, progress=False)
    seconds = time.perf_counter() - clock
    records = report.read_log(Path(work_dir))
    train = [r for r in records if r["type"] == "train"]
    final = result["eval"]
    return {
        "iters": result["step"],
        **{k: final[k] for k in ("mIoU", "aAcc", "mAcc", "image_recall", "pixel_recall") if k in final},
        "s_per_iter": report.seconds_per_iteration(Path(work_dir)), "seconds": seconds,
        "peak_memory_mb": vm_hwm_mb(), "memory_before_training_mb": before,
        "eval_curve": [{k: r[k] for k in ("step", "mIoU", "aAcc", "image_recall", "pixel_recall") if k in r}
                       for r in records if r["type"] == "eval"],
        "train_curve": [{"step": r["step"], "loss": r["loss"],
                         **{k: r[k] for k in ("image_recall", "pixel_recall") if k in r}} for r in train],
    }


def finetune(cfg: Config, work_dir: Path, device: str, threads: int) -> dict[str, Any]:
    return in_fresh_process(finetune_in_process, to_dict(cfg), str(work_dir), device, threads)


def log(message: str) -> None:
    print(f"segrank benchmark learn: {message}", file=sys.stderr, flush=True)


def run_case(num_classes: int, seed: int, iters: int, pretrain_iters: int, val_images: int, device: str,
             threads: int, root: Path, equal_time: str = "segmenter") -> dict[str, Any]:
    """Stage 1, the three heads, and ``equal_time`` (segmenter or rankseg) retrained for as long as the other head's
    run took, for one N and seed."""
    log(f"N={num_classes} seed={seed}: stage 1 ({pretrain_iters} iterations, disjoint vocabulary)")
    clock = time.perf_counter()
    backbone = str(pretrain_backbone(num_classes, seed, pretrain_iters, root / "backbone", device, progress=False))
    case: dict[str, Any] = {"num_classes": num_classes, "seed": seed, "pretrain_seconds": time.perf_counter() - clock,
                            "heads": {}}
    for head in HEADS:
        log(f"N={num_classes} seed={seed}: {head} ({iters} iterations)")
        cfg = head_config(head, num_classes, seed, iters, val_images, backbone, EVALS)
        case["heads"][head] = finetune(cfg, root / head, device, threads)
    heads = case["heads"]
    other = "rankseg" if equal_time == "segmenter" else "segmenter"
    steps = max(1, round(iters * heads[other]["s_per_iter"] / heads[equal_time]["s_per_iter"]))
    log(f"N={num_classes} seed={seed}: {equal_time} for {other}'s wall-clock time ({steps} iterations)")
    cfg = head_config(equal_time, num_classes, seed, steps, val_images, backbone, EVALS)
    heads[f"{equal_time}_equal_time"] = finetune(cfg, root / f"{equal_time}_equal_time", device, threads)
    return case


def summarize(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Per N: mean (and per-seed) mIoU of every head, RankSeg - Segmenter at equal iterations and equal time."""
    out: dict[str, Any] = {}
    for n in sorted({c["num_classes"] for c in cases}):
        mine = [c for c in cases if c["num_classes"] == n]
        per_head = {h: [c["heads"][h]["mIoU"] for c in mine] for h in mine[0]["heads"]}
        mean = {h: statistics.fmean(v) for h, v in per_head.items()}
        # Equal wall-clock: whichever head was retrained for the other's time, against the other's run.
        rank_time, seg_time = mean.get("rankseg_equal_time", mean["rankseg"]), mean.get("segmenter_equal_time",
                                                                                       mean["segmenter"])
        out[str(n)] = {
            "seeds": [c["seed"] for c in mine],
            "mIoU": mean, "mIoU_per_seed": per_head,
            "rankseg_image_recall": statistics.fmean(c["heads"]["rankseg"]["image_recall"] for c in mine),
            "rankseg_pixel_recall": statistics.fmean(c["heads"]["rankseg"]["pixel_recall"] for c in mine),
            "rankseg_minus_segmenter_equal_iterations": mean["rankseg"] - mean["segmenter"],
            "rankseg_minus_segmenter_equal_wall_clock": rank_time - seg_time,
            "oracle_minus_segmenter": mean["rankseg_gt"] - mean["segmenter"],
            "rankseg_s_per_iter_vs_segmenter": statistics.fmean(
                c["heads"]["rankseg"]["s_per_iter"] / c["heads"]["segmenter"]["s_per_iter"] for c in mine),
        }
    return out


def run_learn(classes: list[int], seeds: list[int], iters: int, pretrain_iters: int = PRETRAIN_ITERS,
              val_images: int = VAL_IMAGES, device: str = "cpu", threads: int = 0, work_dir: Path | None = None,
              equal_time: str = "segmenter") -> dict[str, Any]:
    """The whole experiment; trainings go to ``work_dir`` (default: a temporary folder, removed afterwards)."""
    threads = threads or torch.get_num_threads()
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="segrank-learn-") as tmp:
        root = Path(work_dir) if work_dir else Path(tmp)
        cases = [run_case(n, seed, iters, pretrain_iters, val_images, device, threads, root / f"n{n}_seed{seed}",
                          equal_time) for n in classes for seed in seeds]
    return {
        "benchmark": "learn", "machine": machine_info(torch.device(device)),
        "settings": {"classes": classes, "seeds": seeds, "iters": iters, "pretrain_iters": pretrain_iters,
                     "val_images": val_images, "topk": TOPK, "threads": threads, "device": device,
                     "equal_time": equal_time, "recipe": finetune_recipe(iters),
                     "rankseg_lr_mult": IMAGE_BRANCH_LR_MULT},
        "summary": summarize(cases), "cases": cases, "total_seconds": time.perf_counter() - clock,
    }


def text_summary(result: dict[str, Any]) -> str:
    """A few lines for a terminal: mIoU per head and N, recalls, speed ratio."""
    lines = []
    for n, s in result["summary"].items():
        m = s["mIoU"]
        timed = ", ".join(f"{h.removesuffix('_equal_time')} at the other's wall-clock {100 * v:.1f}"
                          for h, v in m.items() if h.endswith("_equal_time"))
        lines.append(f"N={n} seeds={s['seeds']}: mIoU segmenter {100 * m['segmenter']:.1f}, rankseg "
                     f"{100 * m['rankseg']:.1f} (recall@{TOPK} {100 * s['rankseg_image_recall']:.1f} %, pixel recall "
                     f"{100 * s['rankseg_pixel_recall']:.1f} %), oracle {100 * m['rankseg_gt']:.1f}, {timed}; "
                     f"rankseg s/iter = {s['rankseg_s_per_iter_vs_segmenter']:.2f}x segmenter")
    lines.append(f"total {result['total_seconds']:.0f} s")
    return "\n".join(lines)


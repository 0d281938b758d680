"""One fine-tuning of ``segrank benchmark learn``, in a freshly spawned process so that its peak resident memory
is its own: final metrics, curves against iterations and training wall-clock, time-to-accuracy, timing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from segrank.benchmarks.measure import in_fresh_process, vm_hwm_mb
from segrank.config import Config, from_dict, to_dict
from segrank.experiments.curves import eval_curve, time_to_miou, train_curve
from segrank.experiments.recipe import run_stage
from segrank.reporting import plots as report


def finetune_in_process(cfg: dict[str, Any], work_dir: str, device: str, threads: int) -> dict[str, Any]:
    """Train one head (run in a fresh process); its curves, timing and peak memory."""
    torch.set_num_threads(threads)
    before = vm_hwm_mb()
    clock = time.perf_counter()
    result = run_stage(from_dict(Config, cfg), Path(work_dir), device, progress=False)
    seconds = time.perf_counter() - clock
    final = result.evaluation
    curve = eval_curve(Path(work_dir))
    return {
        "iters": result.step,
        **{k: final[k] for k in ("mIoU", "aAcc", "mAcc", "image_recall", "pixel_recall") if k in final},
        "s_per_iter": report.seconds_per_iteration(Path(work_dir)), "seconds": seconds,
        "peak_memory_mb": vm_hwm_mb(), "memory_before_training_mb": before,
        "time_to_miou": time_to_miou(curve), "eval_curve": curve, "train_curve": train_curve(Path(work_dir)),
    }


def finetune(cfg: Config, work_dir: Path, device: str, threads: int) -> dict[str, Any]:
    return in_fresh_process(finetune_in_process, to_dict(cfg), str(work_dir), device, threads)

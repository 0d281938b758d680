"""``segrank benchmark learn``: does RankSeg learn, against Segmenter, at equal budgets? (docs/learning.md)

For each vocabulary size N and seed: stage 1 pre-trains a backbone on a synthetic vocabulary disjoint from the N
target classes; then Segmenter, Segmenter + RankSeg and the RankSeg ground-truth-class oracle fine-tune it with
identical data, seed, optimiser and iterations, each with its own settings from the same search
(``segrank.experiments.recipe``; ``--tune`` runs the search first). Equal wall-clock: a second run of one head
(``--equal-time``: Segmenter by default) gets the iterations that take as long as the other head's run did, from
their measured seconds per iteration, with its own full learning-rate schedule. Each fine-tuning runs in a freshly
spawned process (``runs.py``). Records per head: final mIoU/aAcc/mAcc, image recall@k and pixel recall on the
validation scenes over training (against iterations and training seconds), the same recalls on the training batches,
time to reach given mIoUs, seconds per iteration, peak memory; per N the spread over seeds. ``--probe`` instead fits
a linear probe on the frozen stage-1 features (``probe.py``).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from segrank.benchmarks.measure import machine_info
from segrank.experiments.probe import linear_probe
from segrank.experiments.recipe import (
    HEAD_SETTINGS,
    HEAD_SETTINGS_SOURCE,
    HEADS,
    TUNE_GRID,
    Setup,
    finetune_recipe,
    head_config,
    pretrain_backbone,
    regime_for,
)
from segrank.experiments.runs import finetune
from segrank.experiments.tune import tune_heads

PRETRAIN_ITERS = 300
ITERS = 300
LONG_ITERS = 2000  # N = 847: both heads past their knee (docs/learning.md)
TUNE_ITERS = 100
VAL_IMAGES = 100
EVALS = 6
LONG_EVALS = 20


@dataclass
class LearnPlan:
    """What one ``segrank benchmark learn`` runs. ``regime``: auto, reference or small (``recipe.regime_for``);
    ``topk`` replaces the regime's k; ``tune``: search every head's settings first (``tune_grid``, ``tune_iters``);
    ``probe``: the frozen-feature linear probe instead of the heads; ``image_prior_prob``, ``image_loss_weight``,
    ``data_options``: the options that probe what limits the image-level head; ``heads``: the heads trained (the
    equal wall-clock run needs segmenter and rankseg)."""

    classes: list[int]
    seeds: list[int]
    heads: list[str] = field(default_factory=lambda: list(HEADS))
    iters: int = ITERS
    pretrain_iters: int = PRETRAIN_ITERS
    val_images: int = VAL_IMAGES
    evals: int = EVALS
    device: str = "cpu"
    threads: int = 0
    equal_time: str = "segmenter"
    regime: str = "auto"
    topk: int | None = None
    tune: bool = False
    tune_iters: int = TUNE_ITERS
    tune_grid: dict[str, list[float]] = field(default_factory=lambda: TUNE_GRID)
    probe: bool = False
    image_prior_prob: float | None = None
    image_loss_weight: float | None = None
    data_options: dict[str, int] = field(default_factory=dict)
    precision: str = "auto"

    def setup(self, num_classes: int, settings: dict[str, dict[str, float]] = HEAD_SETTINGS) -> Setup:
        return Setup(regime_for(self.regime, num_classes, self.topk), settings, self.image_prior_prob,
                     self.image_loss_weight, self.data_options, self.precision)


def log(message: str) -> None:
    print(f"segrank benchmark learn: {message}", file=sys.stderr, flush=True)


def backbone_for(plan: LearnPlan, num_classes: int, seed: int, root: Path) -> str:
    """Stage 1 for N and seed, once: the tuning search and the reported runs share it."""
    path = root / f"n{num_classes}_seed{seed}" / "backbone"
    if (path / "backbone.safetensors").is_file():
        return str(path / "backbone.safetensors")
    log(f"N={num_classes} seed={seed}: stage 1 ({plan.pretrain_iters} iterations, disjoint vocabulary)")
    return str(pretrain_backbone(num_classes, seed, plan.pretrain_iters, path, plan.device, progress=False,
                                 precision=plan.precision))


def run_case(plan: LearnPlan, num_classes: int, seed: int, root: Path, settings: dict[str, dict[str, float]]
             ) -> dict[str, Any]:
    """The three heads with ``settings``, and ``equal_time`` (segmenter or rankseg) retrained for as long as the
    other head's run took, for one N and seed."""
    clock = time.perf_counter()
    backbone = backbone_for(plan, num_classes, seed, root)
    setup = plan.setup(num_classes, settings)
    case: dict[str, Any] = {"num_classes": num_classes, "seed": seed, "pretrain_seconds": time.perf_counter() - clock,
                            "regime": asdict(setup.regime), "heads": {}}
    if plan.probe:
        log(f"N={num_classes} seed={seed}: linear probe on the frozen stage-1 features")
        cfg = head_config("rankseg", num_classes, seed, 1, plan.val_images, backbone, 1, setup)
        case["probe"] = linear_probe(cfg, min(cfg.data.options["train_images"], 2000), plan.val_images,
                                     setup.regime.topk, seed=seed)
        return case
    run_dir = root / f"n{num_classes}_seed{seed}"
    for head in plan.heads:
        log(f"N={num_classes} seed={seed}: {head} ({plan.iters} iterations)")
        cfg = head_config(head, num_classes, seed, plan.iters, plan.val_images, backbone, plan.evals, setup)
        case["heads"][head] = finetune(cfg, run_dir / head, plan.device, plan.threads)
    heads, timed = case["heads"], plan.equal_time
    if not {"segmenter", "rankseg"} <= heads.keys():
        return case
    other = "rankseg" if timed == "segmenter" else "segmenter"
    steps = max(1, round(plan.iters * heads[other]["s_per_iter"] / heads[timed]["s_per_iter"]))
    log(f"N={num_classes} seed={seed}: {timed} for {other}'s wall-clock time ({steps} iterations)")
    cfg = head_config(timed, num_classes, seed, steps, plan.val_images, backbone, plan.evals, setup)
    heads[f"{timed}_equal_time"] = finetune(cfg, run_dir / f"{timed}_equal_time", plan.device, plan.threads)
    return case


def spread(values: list[float]) -> dict[str, float]:
    """Mean, min, max and sample standard deviation (0 for one value) over seeds."""
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Per N: mean and spread over seeds of every head's mIoU, RankSeg - Segmenter at equal iterations and equal
    time; with ``--probe``, the probe's recall."""
    out: dict[str, Any] = {}
    for n in sorted({c["num_classes"] for c in cases}):
        mine = [c for c in cases if c["num_classes"] == n]
        row: dict[str, Any] = {"seeds": [c["seed"] for c in mine], "regime": mine[0]["regime"]}
        if "probe" in mine[0]:
            row["probe_image_recall"] = spread([c["probe"]["image_recall"] for c in mine])
        if mine[0]["heads"]:
            row |= summarize_heads(mine)
        out[str(n)] = row
    return out


def summarize_heads(mine: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread of every trained head's mIoU; RankSeg's recalls; the differences whose heads were trained."""
    per_head = {h: [c["heads"][h]["mIoU"] for c in mine] for h in mine[0]["heads"]}
    mean = {h: statistics.fmean(v) for h, v in per_head.items()}
    row: dict[str, Any] = {"mIoU": mean, "mIoU_per_seed": per_head,
                           "mIoU_spread": {h: spread(v) for h, v in per_head.items()}}
    if "rankseg" in mean:
        row |= {f"rankseg_{kind}_recall": spread([c["heads"]["rankseg"][f"{kind}_recall"] for c in mine])
                for kind in ("image", "pixel")}
    if {"rankseg", "segmenter"} <= mean.keys():
        # Equal wall-clock: whichever head was retrained for the other's time, against the other's run.
        rank_time = mean.get("rankseg_equal_time", mean["rankseg"])
        seg_time = mean.get("segmenter_equal_time", mean["segmenter"])
        row |= {"rankseg_minus_segmenter_equal_iterations": mean["rankseg"] - mean["segmenter"],
                "rankseg_minus_segmenter_equal_wall_clock": rank_time - seg_time,
                "rankseg_s_per_iter_vs_segmenter": statistics.fmean(
                    c["heads"]["rankseg"]["s_per_iter"] / c["heads"]["segmenter"]["s_per_iter"] for c in mine)}
    if {"rankseg_gt", "segmenter"} <= mean.keys():
        row["oracle_minus_segmenter"] = mean["rankseg_gt"] - mean["segmenter"]
    return row


def run_learn(plan: LearnPlan, work_dir: Path | None = None) -> dict[str, Any]:
    """The whole experiment; trainings go to ``work_dir`` (default: a temporary folder, removed afterwards)."""
    plan.threads = plan.threads or torch.get_num_threads()
    clock = time.perf_counter()
    tuning: dict[str, Any] = {}
    cases = []
    with tempfile.TemporaryDirectory(prefix="segrank-learn-") as tmp:
        root = Path(work_dir) if work_dir else Path(tmp)
        for n in plan.classes:
            settings = HEAD_SETTINGS
            if plan.tune and not plan.probe:  # on the first seed's backbone; the scenes of the tune split
                backbone = backbone_for(plan, n, plan.seeds[0], root)
                tuning[str(n)] = tune_heads(n, plan.seeds[0], backbone, plan.tune_iters, plan.val_images,
                                            plan.tune_grid, plan.setup(n), root / f"tune_n{n}", plan.device,
                                            plan.threads, log)
                settings = tuning[str(n)]["selected"]
            cases += [run_case(plan, n, seed, root, settings) for seed in plan.seeds]
    source = "selected by this run's --tune (see tuning)" if tuning else HEAD_SETTINGS_SOURCE
    return {
        "benchmark": "learn", "machine": machine_info(torch.device(plan.device)),
        "settings": {**asdict(plan), "recipe": finetune_recipe(plan.iters),
                     "head_settings": {n: t["selected"] for n, t in tuning.items()} or HEAD_SETTINGS,
                     "head_settings_source": source},
        "tuning": tuning, "summary": summarize(cases), "cases": cases, "total_seconds": time.perf_counter() - clock,
    }


def json_lines(result: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``--json``: one object per tuning grid point, per head of every case (or per probe), then the summary."""
    for tuning in result["tuning"].values():
        for point in tuning["grid"]:
            yield {"type": "grid_point", **point}
    for case in result["cases"]:
        where = {"num_classes": case["num_classes"], "seed": case["seed"]}
        if "probe" in case:
            yield {"type": "probe", **where, **case["probe"]}
        for head, run in case["heads"].items():
            yield {"type": "head", **where, "head": head, "pretrain_seconds": case["pretrain_seconds"], **run}
    yield {"type": "summary", **{k: result[k] for k in ("benchmark", "machine", "settings", "summary",
                                                         "total_seconds")},
           "selected": {n: t["selected"] for n, t in result["tuning"].items()}}


def text_summary(result: dict[str, Any]) -> str:
    """A few lines for a terminal: selected settings, mIoU per head and N with its spread over seeds, recalls,
    speed ratio, time to accuracy (or the probe's recall)."""
    lines = [f"N={n}: selected {head} lr {s['lr']:g}, decode head x{s['decoder_lr_mult']:g}"
             for n, t in result["tuning"].items() for head, s in t["selected"].items()]
    for n, s in result["summary"].items():
        k = s["regime"]["topk"]
        if "probe_image_recall" in s:
            p = s["probe_image_recall"]
            lines.append(f"N={n} seeds={s['seeds']}: linear probe recall@{k} {100 * p['mean']:.1f} % "
                         f"(min {100 * p['min']:.1f}, max {100 * p['max']:.1f})")
        if "mIoU" not in s:
            continue
        m, sp = s["mIoU"], s["mIoU_spread"]
        heads = ", ".join(f"{h} {100 * m[h]:.1f} (std {100 * sp[h]['std']:.1f}, {100 * sp[h]['min']:.1f}-"
                          f"{100 * sp[h]['max']:.1f})" for h in m)
        line = f"N={n} seeds={s['seeds']} regime {s['regime']['name']} (k={k}): mIoU {heads}"
        if "rankseg_image_recall" in s:
            line += (f"; rankseg recall@{k} {100 * s['rankseg_image_recall']['mean']:.1f} %, pixel recall "
                     f"{100 * s['rankseg_pixel_recall']['mean']:.1f} %")
        if "rankseg_s_per_iter_vs_segmenter" in s:
            line += f"; rankseg s/iter = {s['rankseg_s_per_iter_vs_segmenter']:.2f}x segmenter"
        lines.append(line)
    for case in result["cases"]:
        for head, run in case["heads"].items():
            reached = ", ".join(f"{t} % in {'-' if hit is None else format(hit['seconds'], '.0f') + ' s'}"
                                for t, hit in run["time_to_miou"].items())
            lines.append(f"N={case['num_classes']} seed={case['seed']} {head}: time to mIoU {reached}")
    lines.append(f"total {result['total_seconds']:.0f} s")
    return "\n".join(lines)

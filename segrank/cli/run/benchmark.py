"""``segrank benchmark forward | deploy | train-step | eval-memory | learn | data``: speed, memory and learning
records."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from segrank import files
from segrank.benchmarks.data import bench_data
from segrank.benchmarks.deploy import RUNTIMES, bench_deploy
from segrank.benchmarks.eval_memory import bench_eval_memory
from segrank.benchmarks.forward import bench_forward
from segrank.benchmarks.measure import BACKBONES, machine_info
from segrank.benchmarks.train_step import bench_train_step
from segrank.checkpoints import load_model
from segrank.cli.flags import (
    SubParsers,
    announce_precision,
    comma_separated,
    command_group,
    non_negative_int,
    number,
    positive_float,
    positive_int,
    positive_ints,
)
from segrank.errors import SegrankError
from segrank.experiments.learn import (
    EVALS,
    ITERS,
    LONG_EVALS,
    LONG_ITERS,
    PRETRAIN_ITERS,
    TUNE_ITERS,
    VAL_IMAGES,
    LearnPlan,
    json_lines,
    run_learn,
    text_summary,
)
from segrank.experiments.recipe import HEADS, TUNE_GRID, regime_for
from segrank.inference.precision import PRECISION_CHOICES
from segrank.reporting.plots import learning_curves
from segrank.runtime.devices import resolve_device
from segrank.runtime.precision import choose_precision


def backbone(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--backbone", default=default, choices=BACKBONES)


def models(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=["segmenter", "rankseg"], choices=["segmenter", "rankseg"])


def reps(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reps", type=positive_int, default=5, help="timed repetitions (median reported)")


def add_parser(sub: SubParsers) -> None:
    benches = command_group(sub, "benchmark", "speed and memory benchmarks (JSON records)", "BENCHMARK")

    def bench(name: str, help: str, func: Callable[[argparse.Namespace], int], device: bool = True
              ) -> argparse.ArgumentParser:
        p = benches.add_parser(name, help=help)
        p.add_argument("--json", action="store_true", help="one JSON object per line")
        p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: torch's default)")
        if device:
            p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        p.set_defaults(func=func, device="cpu")
        return p

    p = bench("forward", "latency of the decode head + class map and end to end, with FLOPs", run_forward)
    backbone(p, "vit_b16")
    p.add_argument("--size", type=positive_int, default=512, help="square input side")
    p.add_argument("--classes", type=positive_ints(), default=[150, 1284], help="comma-separated N")
    models(p)
    reps(p)
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="fp32",
                   help="number format of the model (default: fp32; auto: the fastest here)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], help="deprecated: --precision (none: fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile (inductor, frozen weights) what is timed")

    p = bench("deploy", "segrank eager/compiled, ONNX Runtime fp32/int8 and OpenVINO fp32/bf16 on one model and "
                        "input: latency, fraction of the fp32 and bf16 matmul rates, label agreement with PyTorch fp32",
              run_deploy, device=False)
    backbone(p, "vit_t16")
    p.add_argument("--size", type=positive_int, default=512, help="square input side")
    p.add_argument("--classes", type=positive_int, default=150, help="number of classes N")
    p.add_argument("--model", default="rankseg", choices=["segmenter", "rankseg"], help="decode head")
    p.add_argument("--checkpoint", help="a trained model instead of a seeded random one (--backbone, --classes and "
                                        "--model are then the checkpoint's)")
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES), metavar="RUNTIME",
                   help=f"runtimes to compare (default: all; torch-fp32, the reference, always runs): "
                        f"{', '.join(RUNTIMES)}")
    reps(p)

    p = bench("train-step", "time and peak memory of one SGD step per batch size and precision", run_train_step)
    backbone(p, "vit_t16")
    p.add_argument("--size", type=positive_int, default=512, help="square crop side")
    p.add_argument("--classes", type=positive_int, default=150, help="number of classes N")
    p.add_argument("--batch", type=positive_ints(), default=[1, 2, 8], help="comma-separated batch sizes")
    p.add_argument("--precision", nargs="+", choices=PRECISION_CHOICES, default=["fp32"], metavar="PRECISION",
                   help=f"one or more of {', '.join(PRECISION_CHOICES)}, timed interleaved (fp32 master weights, "
                        "autocast forward and loss, as training does); step_vs_fp32 when fp32 is among them")
    models(p)
    reps(p)

    p = bench("eval-memory", "peak memory and time of one image's slide ms+flip test, sparse vs dense RankSeg",
              run_eval_memory)
    backbone(p, "vit_t16")
    p.add_argument("--classes", type=positive_ints(), default=[150, 847, 1284], help="comma-separated N")
    p.add_argument("--image-size", type=positive_ints(2), default=[512, 683], help="test image H,W")
    reps(p)

    p = bench("learn", "Segmenter vs RankSeg vs RankSeg's oracle at equal budgets on synthetic scenes "
                       "(docs/learning.md)", run_learn_benchmark)
    add_learn_options(p)

    p = bench("data", "images/s of the reference train pipeline, in process and through a DataLoader", run_data,
              device=False)
    p.add_argument("--size", type=positive_int, default=512, help="crop side")
    p.add_argument("--images", type=positive_int, default=64, help="images to push through the pipeline")
    p.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader workers")
    p.add_argument("--batch-size", type=positive_int, default=8, help="DataLoader batch size")


def print_records(args: argparse.Namespace, device: torch.device, records: Iterator[dict[str, Any]]) -> int:
    machine = machine_info(device)
    for record in records:
        record["machine"] = machine
        print(json.dumps(record) if args.json else " ".join(f"{k}={v}" for k, v in record.items() if k != "machine"))
        sys.stdout.flush()
    return 0


def benchmark_device(args: argparse.Namespace) -> torch.device:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    return device


def run_forward(args: argparse.Namespace) -> int:
    device = benchmark_device(args)
    precision = args.precision
    if args.amp is not None:
        precision = "fp32" if args.amp == "none" else args.amp
        print(f"segrank benchmark forward: --amp is deprecated, use --precision {precision}", file=sys.stderr)
    choice = choose_precision(precision, device)
    if not args.json:  # with --json every line is a record; each names its precision
        announce_precision("benchmark forward", precision, choice)
    return print_records(args, device, bench_forward(device, args.backbone, args.size, args.classes, args.models,
                                                     args.reps, choice, compile=args.compile))


def run_deploy(args: argparse.Namespace) -> int:
    device = benchmark_device(args)
    model = load_model(args.checkpoint) if args.checkpoint else None
    return print_records(args, device, bench_deploy(args.backbone, args.size, args.classes, args.model,
                                                    args.runtimes, args.reps, model=model))


def run_train_step(args: argparse.Namespace) -> int:
    device = benchmark_device(args)
    asked = {p: choose_precision(p, device) for p in args.precision}
    if not args.json:
        for name, choice in asked.items():
            announce_precision("benchmark train-step", name, choice)
    choices = list({c.name: c for c in asked.values()}.values())  # auto may be one of the others
    return print_records(args, device, bench_train_step(device, args.backbone, args.size, args.classes, args.batch,
                                                        args.models, args.reps, choices))


def run_eval_memory(args: argparse.Namespace) -> int:
    device = benchmark_device(args)
    return print_records(args, device, bench_eval_memory(device, args.backbone, args.classes,
                                                         tuple(args.image_size), args.reps))


def run_data(args: argparse.Namespace) -> int:
    device = benchmark_device(args)
    return print_records(args, device, bench_data(crop=args.size, images=args.images, workers=args.workers,
                                                  batch_size=args.batch_size))


def positive_floats(text: str) -> list[float]:
    """An argparse type: comma-separated numbers > 0, e.g. ``5e-4,1e-3``."""
    values = [positive_float(v) for v in comma_separated(text)]
    if not values:
        raise argparse.ArgumentTypeError(f"expected one or more comma-separated numbers, got {text!r}")
    return values


def head_names(text: str) -> list[str]:
    names = comma_separated(text)
    unknown = [n for n in names if n not in HEADS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated heads among {', '.join(HEADS)}, got {text!r}")
    return [h for h in HEADS if h in names]


def add_learn_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", type=positive_ints(), default=[150, 847], help="comma-separated vocabulary sizes N")
    p.add_argument("--seeds", type=positive_ints(minimum=0), default=[0],
                   help="comma-separated seeds (the summary gives mean, min, max and std over them)")
    p.add_argument("--heads", type=head_names, default=list(HEADS),
                   help=f"comma-separated heads to train (default: all of {', '.join(HEADS)}; the equal wall-clock "
                        "run needs segmenter and rankseg)")
    p.add_argument("--iters", type=positive_int, default=None,
                   help=f"fine-tuning iterations per head (default {ITERS}; --long: {LONG_ITERS})")
    p.add_argument("--long", action="store_true",
                   help=f"{LONG_ITERS} iterations and {LONG_EVALS} evaluations per head: past both heads' knee at "
                        "N=847 (hours on a CPU)")
    p.add_argument("--regime", default="auto", choices=["auto", "reference", "small"],
                   help="RankSeg's settings: reference (N=847/1284: k=100, image-loss weight 100/300 with the "
                        "reference's reduction), small (k=30, weight 1 summed over classes); auto: reference where "
                        "the reference has settings for N")
    p.add_argument("--topk", type=positive_int, default=None, help="classes RankSeg keeps (replaces the regime's k)")
    p.add_argument("--equal-time", default="segmenter", choices=["segmenter", "rankseg"],
                   help="the head retrained for as long as the other's run took (default: segmenter, the cheaper "
                        "comparison while RankSeg iterates faster)")
    p.add_argument("--tune", action="store_true",
                   help="first search every head's lr x decode-head lr multiplier (the same grid for all) on the "
                        "tune split, then train each head with its selection")
    p.add_argument("--tune-iters", type=positive_int, default=TUNE_ITERS, help="iterations per grid point")
    p.add_argument("--tune-lrs", type=positive_floats, default=TUNE_GRID["lr"], help="comma-separated base lrs")
    p.add_argument("--tune-decoder-mults", type=positive_floats, default=TUNE_GRID["decoder_lr_mult"],
                   help="comma-separated decode-head lr multipliers")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                   help="train.precision of every run (default: auto, bf16 where this device computes it faster)")
    p.add_argument("--probe", action="store_true",
                   help="instead of the heads: a linear multi-label probe on the frozen stage-1 features")
    p.add_argument("--image-prior-prob", type=number(float, 0, above=True, maximum=0.999), default=None,
                   help="RankSeg: initial class probability of its image-level classifier (RetinaNet prior init)")
    p.add_argument("--image-loss-weight", type=positive_float, default=None, help="replaces the regime's weight")
    p.add_argument("--max-classes-per-image", type=number(int, 2, maximum=6), default=None,
                   help="synthetic scenes hold 2..this many classes (default 6): examples per class")
    p.add_argument("--train-images", type=positive_int, default=None, help="synthetic training scenes (default 4000)")
    # Reduced budgets for tests.
    p.add_argument("--pretrain-iters", type=positive_int, default=PRETRAIN_ITERS, help=argparse.SUPPRESS)
    p.add_argument("--val-images", type=positive_int, default=VAL_IMAGES, help=argparse.SUPPRESS)
    p.add_argument("--plots", metavar="DIR",
                   help="write learn_n<N>_seed<S>.png (against iterations) and learn_n<N>_seed<S>_time.png (against "
                        "training seconds) to DIR")


def learn_plan(args: argparse.Namespace) -> LearnPlan:
    """The plan of the command line; bad combinations are refused here, before any training."""
    data_options = {k: v for k, v in (("max_classes", args.max_classes_per_image),
                                      ("train_images", args.train_images)) if v is not None}
    plan = LearnPlan(args.classes, args.seeds, heads=args.heads,
                     iters=args.iters or (LONG_ITERS if args.long else ITERS),
                     pretrain_iters=args.pretrain_iters, val_images=args.val_images,
                     evals=LONG_EVALS if args.long else EVALS, equal_time=args.equal_time, regime=args.regime,
                     topk=args.topk, tune=args.tune, tune_iters=args.tune_iters,
                     tune_grid={"lr": args.tune_lrs, "decoder_lr_mult": args.tune_decoder_mults}, probe=args.probe,
                     image_prior_prob=args.image_prior_prob, image_loss_weight=args.image_loss_weight,
                     data_options=data_options, precision=args.precision)
    for n in plan.classes:
        k = regime_for(plan.regime, n, plan.topk).topk  # refuses --regime reference for other N
        if n < k:
            raise SegrankError(f"--classes: every N must be >= {k} (RankSeg keeps {k} classes per image)")
    return plan


def run_learn_benchmark(args: argparse.Namespace) -> int:
    plan = learn_plan(args)
    if args.plots:
        try:  # refused before the quarter of an hour of training, not after
            Path(args.plots).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SegrankError(f"{args.plots}: cannot create the plots folder ({err.strerror})") from None
    device = benchmark_device(args)
    plan.device, plan.threads = device.type, torch.get_num_threads()
    result = run_learn(plan)
    if args.plots:
        for case in (c for c in result["cases"] if c["heads"]):
            stem = Path(args.plots) / f"learn_n{case['num_classes']}_seed{case['seed']}"
            learning_curves(case, stem.with_suffix(".png"), case["regime"]["topk"])
            learning_curves(case, Path(f"{stem}_time.png"), case["regime"]["topk"], x="train_seconds")
    if args.json:
        for line in json_lines(result):
            print(json.dumps(files.json_safe(line)))
    else:
        print(text_summary(result))
    return 0

"""``segrank demo``: Segmenter, Segmenter + RankSeg and the ground-truth-class oracle on built-in synthetic data."""

from __future__ import annotations

import argparse
from pathlib import Path

from segrank.cli.flags import SubParsers, add_device_option, non_negative_int, positive_int
from segrank.experiments.demo import run_demo
from segrank.inference.precision import PRECISION_CHOICES


def add_parser(sub: SubParsers) -> None:
    p = sub.add_parser("demo", help="train and compare a small Segmenter, Segmenter + RankSeg and RankSeg's "
                                    "ground-truth-class oracle on built-in synthetic data (CPU, a few minutes), "
                                    "then write a report")
    p.add_argument("--out", default="demo_output", help="report folder (default: demo_output); must be new or empty")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of data, initialisation and order (default: 0)")
    add_device_option(p, default="cpu")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                   help="train.precision of every stage (default: auto, bf16 where this device computes it faster)")
    # Reduced budgets for tests.
    p.add_argument("--iters", type=positive_int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--val-images", type=positive_int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = run_demo(Path(args.out), seed=args.seed, iters=args.iters, val_images=args.val_images,
                      device=args.device, force=args.force, precision=args.precision)
    print(f"segrank demo: report written to {report}")
    return 0

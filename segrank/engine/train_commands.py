"""CLI: ``segrank train`` and ``segrank demo``."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from segrank.config import load_config


def _train(args: argparse.Namespace) -> int:
    from segrank.engine.train import train

    cfg = load_config(args.config, args.set)
    work_dir = Path(args.work_dir) if args.work_dir else Path("work_dirs") / Path(args.config).stem
    try:
        result = train(cfg, work_dir, resume=args.resume, device=args.device, progress=not args.no_progress)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if not result["stopped"]:
        print(f"segrank train: finished {result['step']} iterations; weights: {result['checkpoint']}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from segrank.engine.demo import run_demo

    report = run_demo(Path(args.out), seed=args.seed, iters=args.iters, val_images=args.val_images,
                      device=args.device, force=args.force)
    print(f"segrank demo: report written to {report}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train a model from a YAML config (single process or torchrun)")
    train.add_argument("config", help="YAML config file (configs/<dataset>/<row>.yaml)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.max_iters=1000 (repeatable)")
    train.add_argument("--work-dir", help="run folder (default: work_dirs/<config name>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --work-dir from its last checkpoint")
    train.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)

    demo = subparsers.add_parser("demo", help="train and compare a small Segmenter and Segmenter + RankSeg on "
                                              "built-in synthetic data (CPU, a few minutes), then write a report")
    demo.add_argument("--out", default="demo_output", help="report folder (default: demo_output); must be new or "
                                                            "empty")
    demo.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and order (default: 0)")
    demo.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default: cpu")
    demo.add_argument("--force", action="store_true", help="replace an existing --out folder")
    # Reduced budgets for tests.
    demo.add_argument("--iters", type=int, default=None, help=argparse.SUPPRESS)
    demo.add_argument("--val-images", type=int, default=None, help=argparse.SUPPRESS)
    demo.set_defaults(func=_demo)

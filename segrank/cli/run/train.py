"""``segrank train CONFIG``: train a model, in one process or under torchrun."""

from __future__ import annotations

import argparse
from pathlib import Path

from segrank.cli.flags import SubParsers, add_device_option, add_set_option
from segrank.config import load_config
from segrank.training.loop import train


def add_parser(sub: SubParsers) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config (single process or torchrun)")
    p.add_argument("config", help="YAML config file (configs/<dataset>/<row>.yaml)")
    add_set_option(p, "train.max_iters=1000")
    p.add_argument("--work-dir", help="run folder (default: work_dirs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --work-dir from its last checkpoint")
    add_device_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    work_dir = Path(args.work_dir) if args.work_dir else Path("work_dirs") / Path(args.config).stem
    result = train(cfg, work_dir, resume=args.resume, device=args.device, progress=not args.no_progress)
    if not result.stopped and result.rank == 0:  # under torchrun, one report
        print(f"segrank train: finished {result.step} iterations; weights: {result.checkpoint}")
    return 0

"""``segrank datasets list | check NAME ROOT | prepare NAME SRC DST``."""

from __future__ import annotations

import argparse
from pathlib import Path

from segrank.data.info import DATASETS, dataset_info


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("datasets", help="list, check and prepare datasets")
    sub = parser.add_subparsers(dest="datasets_command", metavar="ACTION", required=True)

    p = sub.add_parser("list", help="the known datasets with their classes, ignore value and normalisation")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("check", help="verify a dataset on disk; exit 2 when any problem is found")
    p.add_argument("name", choices=[n for n in DATASETS if n != "synthetic"])
    p.add_argument("root", type=Path)
    p.add_argument("--split", action="append", help="check only this split (repeatable)")
    p.add_argument("--top", type=int, default=20, help="classes shown in the histogram")
    p.set_defaults(func=cmd_check)

    from segrank.data.convert import CONVERTERS

    p = sub.add_parser("prepare", help="convert an official release into the layout segrank reads")
    p.add_argument("name", choices=list(CONVERTERS))
    p.add_argument("src", type=Path, help="the unpacked official release")
    p.add_argument("dst", type=Path, help="output root (use it as data.root)")
    p.add_argument("--categories", type=Path,
                   help="ade20k_full only: JSON list of {id, trainId} (MaskFormer's categories) instead of names")
    p.set_defaults(func=cmd_prepare)


def cmd_list(args: argparse.Namespace) -> int:
    for name, spec in DATASETS.items():
        if name == "folder":
            print(f"{name:17s} {'-':>5s} {'-':>6s} {'per classes.yaml':10s} {spec.description}")
            continue
        info = dataset_info(name)
        print(f"{name:17s} {info.num_classes:5d} {info.ignore_index:6d} {spec.normalization:10s} "
              f"{spec.description}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from segrank.data.check import check_dataset, format_report

    report = check_dataset(args.name, args.root, args.split)
    print(format_report(report, args.top))
    return 2 if report.problems else 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from segrank.data.convert import CONVERTERS
    from segrank.errors import SegrankError

    if not args.src.is_dir():
        raise SegrankError(f"{args.src}: source directory not found")
    if args.categories is not None and args.name != "ade20k_full":
        raise SegrankError("--categories: only for ade20k_full")
    extra = {"categories": args.categories} if args.name == "ade20k_full" else {}
    count = CONVERTERS[args.name](args.src, args.dst, **extra)
    print(f"segrank datasets prepare: {args.name}: {count} images in {args.dst}")
    return 0

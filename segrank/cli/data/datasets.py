"""``segrank datasets list | check | prepare``: the known datasets, a dataset on disk checked, a release converted."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Any

import yaml

from segrank import files
from segrank.cli.flags import SubParsers, command_group, positive_int
from segrank.data import DATASETS, dataset_info
from segrank.data.check import check_dataset, format_report
from segrank.data.convert import CONVERTERS, prepare
from segrank.data.parallel import default_workers
from segrank.errors import SegrankError


def add_workers_option(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument("--workers", type=positive_int, default=default_workers(),
                   help=f"processes that {verb} images in parallel (default: min(4, CPUs) = %(default)s)")


def dataset_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of --option, the value parsed as YAML (as --set does)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip(), value


def add_parser(sub: SubParsers) -> None:
    actions = command_group(sub, "datasets", "list, check and prepare datasets")

    p = actions.add_parser("list", help="the known datasets with their classes, ignore value and normalisation")
    p.set_defaults(func=run_list)

    p = actions.add_parser("check", help="verify a dataset on disk; exit 2 when any problem is found")
    p.add_argument("name", choices=[n for n in DATASETS if n != "synthetic"])
    p.add_argument("root", type=Path)
    p.add_argument("--split", action="append", help="check only this split (repeatable)")
    p.add_argument("--top", type=positive_int, default=20, help="classes shown in the histogram")
    p.add_argument("--option", type=dataset_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a data.options value of the dataset (value parsed as YAML), e.g. --option classes=ade20k "
                        "(huggingface; repeatable)")
    add_workers_option(p, "read")
    p.set_defaults(func=run_check)

    p = actions.add_parser("prepare", help="convert an official release into the layout segrank reads",
                           description="Convert an official dataset release (SRC) into the layout segrank reads "
                                       "(DST). `segrank datasets prepare NAME --help` describes the files NAME "
                                       "expects and writes. ADE20K needs no conversion: unzip "
                                       "ADEChallengeData2016.zip and use that folder as data.root.")
    converters = p.add_subparsers(dest="name", metavar="NAME", required=True)
    for name, converter in CONVERTERS.items():  # the converter's docstring says what it reads and writes
        doc = inspect.cleandoc(converter.__doc__ or name)
        c = converters.add_parser(name, help=doc.splitlines()[0], description=doc,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        c.add_argument("src", metavar="SRC", type=Path, help="the unpacked official release (described above)")
        c.add_argument("dst", metavar="DST", type=Path, help="output root (use it as data.root)")
        if name == "ade20k_full":
            c.add_argument("--categories", metavar="FILE", type=Path, help="JSON list of {id, trainId} (MaskFormer's "
                                                           "ADE20K_SEM_SEG_FULL_CATEGORIES) instead of name matching")
        add_workers_option(c, "convert")
        c.add_argument("--no-progress", action="store_true", help="no progress bar")
        c.set_defaults(func=run_prepare, categories=None)


def run_list(args: argparse.Namespace) -> int:
    for name, spec in DATASETS.items():
        if spec.classes_from is not None:  # classes read from the dataset's root
            print(f"{name:17s} {'-':>5s} {'-':>6s} {'per ' + spec.classes_from:10s} {spec.description}")
            continue
        info = dataset_info(name)
        print(f"{name:17s} {info.num_classes:5d} {info.ignore_index:6d} {spec.normalization:10s} "
              f"{spec.description}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    report = check_dataset(args.name, args.root, args.split, workers=args.workers, options=dict(args.option))
    print(format_report(report, args.top))
    return 2 if report.problems else 0


def run_prepare(args: argparse.Namespace) -> int:
    if not args.src.is_dir():
        raise SegrankError(f"{args.src}: source directory not found")
    files.ensure_writable(args.dst, folder=True)
    extra = {"categories": args.categories} if args.name == "ade20k_full" else {}
    done = prepare(args.name, args.src, args.dst, workers=args.workers, progress=not args.no_progress, **extra)
    speed = f", {done.images_per_s:.1f} images/s" if done.converted else ""
    print(f"segrank datasets prepare: {args.name}: {done.images} images in {args.dst} ({done.converted} converted, "
          f"{done.images - done.converted} already there; {args.workers} workers{speed})")
    return 0

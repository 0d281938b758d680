"""``segrank`` command line. Each command is one module, grouped by concern (checkpoint/, run/, use/, data/): its
flags (``add_parser``) beside a short handler that calls the library. Bad input exits 2 with one clear line."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence

from segrank import __version__
from segrank.cli.checkpoint import convert, export, info
from segrank.cli.data import config, datasets
from segrank.cli.flags import Parser, UsageError
from segrank.cli.run import benchmark, demo, evaluate, train
from segrank.cli.use import predict, serve
from segrank.errors import SegrankError

# In the order ``segrank --help`` lists them.
COMMANDS = (convert, info, export, train, demo, evaluate, predict, serve, datasets, config, benchmark)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="segrank", description="Segmenter and RankSeg semantic segmentation")
    parser.add_argument("--version", action="version", version=f"segrank {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def error_line(err: SegrankError) -> str:
    """The error's message. A DataLoader worker re-raises it with the worker's traceback around it: keep the last
    line, the original ``module.Class: message``, without its class name."""
    text = str(err).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        return text.splitlines()[-1].split(": ", 1)[-1]
    return text


def one_line_warnings(name: str) -> Callable[..., None]:
    """``warnings.showwarning`` for a command: a warning (a damaged EXIF block, ...) is one line, like an error."""

    def show(message: Warning | str, *args: object, **kwargs: object) -> None:
        print(f"segrank {name}: warning: {message}", file=sys.stderr)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
    except UsageError as err:
        print(err, file=sys.stderr)
        return 2
    # "segrank datasets check", as argparse names a sub-command in its own errors
    name = " ".join(n for n in (args.command, getattr(args, f"{args.command}_action", None)) if n)
    if unknown:  # named after the sub-command whose flags they are not
        print(f"segrank {name}: error: unrecognized arguments: {' '.join(unknown)}", file=sys.stderr)
        return 2
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line_warnings(name)
            return int(func(args) or 0)
    except SegrankError as err:
        print(f"segrank {name}: error: {error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"segrank {name}: interrupted", file=sys.stderr)
        return 130

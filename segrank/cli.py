"""``segrank`` command line: one sub-command per job. Bad input exits 2 with one clear line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from segrank.errors import SegrankError

# Modules that add sub-commands: each has ``register(subparsers)`` and sets ``func`` on its parsers.
COMMAND_MODULES: list[str] = ["segrank.checkpoints", "segrank.benchmark", "segrank.engine.train_commands",
                              "segrank.data.commands", "segrank.engine.eval_commands"]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="segrank", description="Segmenter and RankSeg semantic segmentation")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def error_line(err: SegrankError) -> str:
    """The error's message. A DataLoader worker re-raises it with the worker's traceback around it: keep the last
    line, the original ``module.Class: message``, without its class name."""
    text = str(err).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        return text.splitlines()[-1].split(": ", 1)[-1]
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        return int(func(args) or 0)
    except SegrankError as err:
        print(f"segrank {args.command}: error: {error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"segrank {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

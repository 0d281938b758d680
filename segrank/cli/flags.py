"""What every command's flags share: the parser that reports bad input as one line, the number types, and the
option blocks several commands take."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any, NoReturn

from segrank.inference.precision import PRECISION_CHOICES
from segrank.runtime.precision import PrecisionChoice

SubParsers = argparse._SubParsersAction  # argparse's own (private) class of ``add_subparsers()``'s result


class UsageError(Exception):
    """A flag argparse refuses; ``main`` prints it as one line, like every other bad input."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(f"{prog}: error: {message}")


class Parser(argparse.ArgumentParser):
    """argparse prints its usage block before a refused flag; segrank's bad input is one line (``--help`` shows the
    usage), so the error is raised for ``main`` to print. Sub-command parsers inherit this class."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, message)


def number(kind: type, minimum: float | None = None, above: bool = False, maximum: float | None = None
           ) -> Callable[[str], Any]:
    """An argparse type: an int or a finite float, at least ``minimum`` (greater than it when ``above``), at most
    ``maximum``."""
    bound = None if minimum is None else (f"> {minimum}" if above else f">= {minimum}")

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if minimum is not None and (value <= minimum if above else value < minimum):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {text}")
        return value

    return parse


positive_int = number(int, 1)
non_negative_int = number(int, 0)
positive_float = number(float, 0, above=True)
finite_float = number(float)
port_number = number(int, 0, maximum=65535)


def comma_separated(text: str) -> list[str]:
    """The non-empty items of a comma-separated flag value, stripped: ``"150, 847,"`` -> ``["150", "847"]``."""
    return [v.strip() for v in text.split(",") if v.strip()]


def positive_ints(length: int | None = None, minimum: int = 1) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated integers >= ``minimum`` (``length`` of them when given), e.g. ``150,1284``."""
    element = number(int, minimum)

    def parse(text: str) -> list[int]:
        values = [element(v) for v in comma_separated(text)]
        if not values or (length is not None and len(values) != length):
            count = f"{length}" if length is not None else "one or more"
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated integers, got {text!r}")
        return values

    return parse


def command_group(sub: SubParsers, name: str, help: str, metavar: str = "ACTION") -> SubParsers:
    """A command whose sub-commands (``segrank NAME ACTION``) are added to the returned action."""
    parser = sub.add_parser(name, help=help)
    return parser.add_subparsers(dest=f"{name}_action", metavar=metavar, required=True)


def add_set_option(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. --set {example} (repeatable)")


def add_device_option(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default,
                        help=f"default: {default}" if default else "default: cuda when available")


def add_precision_options(p: argparse.ArgumentParser) -> None:
    """predict, eval, serve: the number format and torch.compile."""
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                   help="number format of the model's matrix products (default: auto, bf16 where the device computes "
                        "it natively and faster, else fp32; said on stderr)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (inductor, frozen weights): a compile per input shape, then faster "
                        "where the compiled kernels beat eager ones (needs a C++ compiler on CPU)")


def precision_notes(command: str, asked: str, choice: PrecisionChoice) -> list[str]:
    """The one line saying what ``--precision auto`` chose and why (none for a precision asked for)."""
    return [f"segrank {command}: --precision auto: {choice.reason}"] if asked == "auto" else []


def announce_precision(command: str, asked: str, choice: PrecisionChoice) -> None:
    """``precision_notes`` printed on stdout, with the command's other reports: stderr holds only errors (bad input
    is exactly one line there)."""
    for note in precision_notes(command, asked, choice):
        print(note, flush=True)


def add_test_settings_options(p: argparse.ArgumentParser) -> None:
    """predict and serve: the test settings a checkpoint carries, overridden."""
    p.add_argument("--config", help="YAML config giving normalisation, test scale and windows (default: those stored "
                                    "in the checkpoint)")
    p.add_argument("--ms-flip", action="store_true", help="multi-scale + flip test")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--slide", dest="mode", action="store_const", const="slide", help="sliding-window inference")
    mode.add_argument("--whole", dest="mode", action="store_const", const="whole", help="whole-image inference")
    p.add_argument("--mean", type=finite_float, nargs=3, metavar=("R", "G", "B"), help="normalisation mean (0-255)")
    p.add_argument("--std", type=positive_float, nargs=3, metavar=("R", "G", "B"), help="normalisation std (0-255)")
    p.add_argument("--img-scale", type=positive_int, nargs=2, metavar=("LONG", "SHORT"), help="keep-ratio test scale")
    add_device_option(p)
    add_precision_options(p)
    p.set_defaults(mode=None)

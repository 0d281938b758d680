"""``segrank`` command line: every command and its flags, in one place; the handlers live in commands.py.
Bad input exits 2 with one clear line."""

from __future__ import annotations

import argparse
import inspect
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from segrank import __version__, commands
from segrank.benchmarks.measure import AMP_DTYPES, BACKBONES
from segrank.checkpoints import FORMATS
from segrank.data import DATASETS
from segrank.data.convert import CONVERTERS
from segrank.data.parallel import default_workers
from segrank.engine.onnx_export import DEFAULT_OPSET
from segrank.errors import SegrankError


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


def positive_ints(length: int | None = None, minimum: int = 1) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated integers >= ``minimum`` (``length`` of them when given), e.g. ``150,1284``."""
    element = number(int, minimum)

    def parse(text: str) -> list[int]:
        values = [element(v.strip()) for v in text.split(",") if v.strip()]
        if not values or (length is not None and len(values) != length):
            count = f"{length}" if length is not None else "one or more"
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated integers, got {text!r}")
        return values

    return parse


def command_group(sub: argparse._SubParsersAction, name: str, help: str, metavar: str = "ACTION"
                  ) -> argparse._SubParsersAction:
    """A command whose sub-commands (``segrank NAME ACTION``) are added to the returned action."""
    parser = sub.add_parser(name, help=help)
    return parser.add_subparsers(dest=f"{name}_action", metavar=metavar, required=True)


def _set_option(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. --set {example} (repeatable)")


def _test_settings_options(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")


def add_checkpoint_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a reference checkpoint to segrank's .safetensors")
    p.add_argument("--from", dest="format", choices=["auto", *FORMATS[1:]], default="auto",
                   help="layout of SRC (default: detect)")
    p.add_argument("src", help="checkpoint: a file, a save_pretrained folder, a training run's work dir (its latest "
                               "checkpoint) or an official Segmenter run folder")
    p.add_argument("--config", help="YAML config giving the architecture (needed for npz/timm) and, when it has a "
                                    "data section, the test settings and class names the checkpoint will carry")
    p.add_argument("--out", required=True, help="destination: a .safetensors file, or a folder for the Hugging Face "
                                                "layout (config.json + model.safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.set_defaults(func=commands.convert)

    p = sub.add_parser("info", help="describe a checkpoint: architecture, classes, parameters, GFLOPs at the test "
                                    "size")
    p.add_argument("ckpt")
    p.add_argument("--format", choices=["auto", *FORMATS], default="auto")
    p.add_argument("--config", help="YAML config for formats that do not carry their architecture; its test settings "
                                    "give the size of the FLOPs count")
    p.add_argument("--size", type=positive_int, nargs=2, metavar=("H", "W"),
                   help="count FLOPs for an H x W input (default: the test window, or a square image at the test "
                        "scale)")
    p.set_defaults(func=commands.info)


def add_export_commands(sub: argparse._SubParsersAction) -> None:
    formats = command_group(sub, "export", "export a model for deployment", "FORMAT")
    p = formats.add_parser("onnx", help="ONNX graph (needs the onnx extra: pip install 'segrank[onnx]'); see "
                                        "docs/deployment.md")
    p.add_argument("ckpt", help="model checkpoint (native .safetensors, mmseg .pth, official Segmenter)")
    p.add_argument("--out", required=True, help="destination .onnx file")
    p.add_argument("--size", type=positive_int, nargs=2, metavar=("H", "W"),
                   help="input size of the graph (with --dynamic: the tracing example; default: the training crop)")
    p.add_argument("--dynamic", action="store_true", help="dynamic height and width (the batch is always dynamic)")
    p.add_argument("--opset", type=positive_int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    p.add_argument("--labels", action="store_true",
                   help="output the class-id map (argmax and RankSeg's slot-to-class mapping in the graph)")
    p.add_argument("--check", action="store_true",
                   help="compare onnxruntime with PyTorch on random inputs (the export size, and two more sizes with "
                        "--dynamic); on a mismatch exit 2 and write nothing")
    p.add_argument("--tol", type=positive_float, default=1e-4, help="largest |Δlogit| --check accepts (default: 1e-4)")
    p.add_argument("--format", choices=["auto", *FORMATS], default="auto", help="checkpoint layout")
    p.add_argument("--config", help="YAML config for formats that do not carry their architecture")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.set_defaults(func=commands.export_onnx_command)


def add_run_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config (single process or torchrun)")
    p.add_argument("config", help="YAML config file (configs/<dataset>/<row>.yaml)")
    _set_option(p, "train.max_iters=1000")
    p.add_argument("--work-dir", help="run folder (default: work_dirs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --work-dir from its last checkpoint")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=commands.train_command)

    p = sub.add_parser("demo", help="train and compare a small Segmenter, Segmenter + RankSeg and RankSeg's "
                                    "ground-truth-class oracle on built-in synthetic data (CPU, a few minutes), "
                                    "then write a report")
    p.add_argument("--out", default="demo_output", help="report folder (default: demo_output); must be new or empty")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of data, initialisation and order (default: 0)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default: cpu")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    # Reduced budgets for tests.
    p.add_argument("--iters", type=positive_int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--val-images", type=positive_int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=commands.demo)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a config's validation set (mIoU, aAcc, mAcc); under "
                                    "torchrun the images are shared among the processes")
    p.add_argument("config", help="YAML config naming the dataset and the test settings")
    p.add_argument("checkpoint", help="model checkpoint (native .safetensors, mmseg .pth, official Segmenter)")
    p.add_argument("--ms-flip", action="store_true", help="multi-scale (eval.ms_scales) + flip test")
    p.add_argument("--oracle", action="store_true", help="GT-oracle model: every window receives the label's classes "
                                                         "(implied for such models)")
    _set_option(p, "eval.mode=whole")
    p.add_argument("--use-config-model", action="store_true",
                   help="build the model from the config's model section instead of the checkpoint's")
    p.add_argument("--out", help="results JSON (default: <checkpoint>.eval.json); the per-class table "
                                 "(.per_class.csv), the confusion matrix (.confusion.npy) and a chart of the most "
                                 "confused classes (.confusion.png) are written beside it")
    p.add_argument("--per-class", action="store_true", help="print the per-class IoU/Acc table (default: a summary)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--batch-size", type=positive_int, help="windows per forward pass (default: eval.batch_size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=commands.eval_command)

    p = sub.add_parser("predict", help="segment image files: label, colour and overlay PNGs (+ RankSeg class "
                                       "ranking JSON)")
    p.add_argument("checkpoint", help="model checkpoint (file, save_pretrained folder or training run's work dir)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument("--out", required=True, help="output folder")
    _test_settings_options(p)
    p.add_argument("--batch-size", type=positive_int, help="windows per forward pass")
    p.add_argument("--no-progress", action="store_true", help="no per-image progress lines")
    p.set_defaults(func=commands.predict, mode=None)

    p = sub.add_parser("serve", help="a local web page: drop an image, see its segmentation, legend and (RankSeg) "
                                     "class ranking")
    p.add_argument("checkpoint", help="model checkpoint (file, save_pretrained folder or training run's work dir)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="port (default: 8000; 0: any free port)")
    p.add_argument("--max-upload-mb", type=positive_float, default=20.0, help="largest upload accepted (default: 20)")
    _test_settings_options(p)
    p.set_defaults(func=commands.serve_command, mode=None)


def add_dataset_commands(sub: argparse._SubParsersAction) -> None:
    def workers(p: argparse.ArgumentParser, verb: str) -> None:
        p.add_argument("--workers", type=positive_int, default=default_workers(),
                       help=f"processes that {verb} images in parallel (default: min(4, CPUs) = %(default)s)")

    actions = command_group(sub, "datasets", "list, check and prepare datasets")

    p = actions.add_parser("list", help="the known datasets with their classes, ignore value and normalisation")
    p.set_defaults(func=commands.datasets_list)

    p = actions.add_parser("check", help="verify a dataset on disk; exit 2 when any problem is found")
    p.add_argument("name", choices=[n for n in DATASETS if n != "synthetic"])
    p.add_argument("root", type=Path)
    p.add_argument("--split", action="append", help="check only this split (repeatable)")
    p.add_argument("--top", type=positive_int, default=20, help="classes shown in the histogram")
    workers(p, "read")
    p.set_defaults(func=commands.datasets_check)

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
        workers(c, "convert")
        c.add_argument("--no-progress", action="store_true", help="no progress bar")
        c.set_defaults(func=commands.datasets_prepare, categories=None)


def add_benchmark_commands(sub: argparse._SubParsersAction) -> None:
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

    def backbone(p: argparse.ArgumentParser, default: str) -> None:
        p.add_argument("--backbone", default=default, choices=BACKBONES)

    def models(p: argparse.ArgumentParser) -> None:
        p.add_argument("--models", nargs="+", default=["segmenter", "rankseg"], choices=["segmenter", "rankseg"])

    def reps(p: argparse.ArgumentParser) -> None:
        p.add_argument("--reps", type=positive_int, default=5, help="timed repetitions (median reported)")

    p = bench("forward", "latency of the decode head + class map and end to end, with FLOPs",
              commands.benchmark_forward)
    backbone(p, "vit_b16")
    p.add_argument("--size", type=positive_int, default=512, help="square input side")
    p.add_argument("--classes", type=positive_ints(), default=[150, 1284], help="comma-separated N")
    models(p)
    reps(p)
    p.add_argument("--amp", default="none", choices=list(AMP_DTYPES), help="autocast dtype")

    p = bench("train-step", "time and peak memory of one SGD step per batch size", commands.benchmark_train_step)
    backbone(p, "vit_t16")
    p.add_argument("--size", type=positive_int, default=512, help="square crop side")
    p.add_argument("--classes", type=positive_int, default=150, help="number of classes N")
    p.add_argument("--batch", type=positive_ints(), default=[1, 2, 8], help="comma-separated batch sizes")
    models(p)
    reps(p)

    p = bench("eval-memory", "peak memory and time of one image's slide ms+flip test, sparse vs dense RankSeg",
              commands.benchmark_eval_memory)
    backbone(p, "vit_t16")
    p.add_argument("--classes", type=positive_ints(), default=[150, 847, 1284], help="comma-separated N")
    p.add_argument("--image-size", type=positive_ints(2), default=[512, 683], help="test image H,W")
    reps(p)

    p = bench("learn", "Segmenter vs RankSeg vs RankSeg's oracle at equal budgets on synthetic scenes "
                       "(docs/learning.md)", commands.benchmark_learn)
    p.add_argument("--classes", type=positive_ints(), default=[150, 847], help="comma-separated vocabulary sizes N")
    p.add_argument("--seeds", type=positive_ints(minimum=0), default=[0], help="comma-separated seeds")
    p.add_argument("--iters", type=positive_int, default=300, help="fine-tuning iterations per head")
    p.add_argument("--equal-time", default="segmenter", choices=["segmenter", "rankseg"],
                   help="the head retrained for as long as the other's run took (default: segmenter, the cheaper "
                        "comparison while RankSeg iterates faster)")
    p.add_argument("--plots", metavar="DIR", help="write learn_n<N>_seed<S>.png curves to DIR")

    p = bench("data", "images/s of the reference train pipeline, in process and through a DataLoader",
              commands.benchmark_data, device=False)
    p.add_argument("--size", type=positive_int, default=512, help="crop side")
    p.add_argument("--images", type=positive_int, default=64, help="images to push through the pipeline")
    p.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader workers")
    p.add_argument("--batch-size", type=positive_int, default=8, help="DataLoader batch size")


def add_config_commands(sub: argparse._SubParsersAction) -> None:
    actions = command_group(sub, "config", "inspect configs (every key and its allowed values: docs/config.md)")
    p = actions.add_parser("show", help="print the resolved config (bases merged, overrides applied, values checked) "
                                        "as YAML; it loads again as a config file")
    p.add_argument("config", help="YAML config file")
    _set_option(p, "train.max_iters=1000")
    p.set_defaults(func=commands.config_show)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="segrank", description="Segmenter and RankSeg semantic segmentation")
    parser.add_argument("--version", action="version", version=f"segrank {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_checkpoint_commands(sub)  # convert, info
    add_export_commands(sub)  # export onnx
    add_run_commands(sub)  # train, demo, eval, predict, serve
    add_dataset_commands(sub)  # datasets list | check | prepare
    add_config_commands(sub)  # config show
    add_benchmark_commands(sub)  # benchmark forward | train-step | eval-memory | learn | data
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
        return int(func(args) or 0)
    except SegrankError as err:
        print(f"segrank {name}: error: {error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"segrank {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

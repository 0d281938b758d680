"""``segrank eval CONFIG CKPT``: mIoU, aAcc, mAcc on a config's validation set, with per-class and confusion files."""

from __future__ import annotations

import argparse
import dataclasses
from functools import partial
from pathlib import Path
from typing import Any

from segrank import files
from segrank.checkpoints import load_model, resolve_checkpoint
from segrank.cli.flags import (
    SubParsers,
    add_device_option,
    add_precision_options,
    add_set_option,
    announce_precision,
    positive_int,
)
from segrank.config import ModelConfig, load_config, to_dict
from segrank.errors import SegrankError
from segrank.evaluation import evaluate
from segrank.evaluation.metrics import format_summary, format_table
from segrank.evaluation.outputs import check_outputs, ensure_outputs_writable, write_eval_outputs


def add_parser(sub: SubParsers) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on a config's validation set (mIoU, aAcc, mAcc); under "
                                    "torchrun the images are shared among the processes")
    p.add_argument("config", help="YAML config naming the dataset and the test settings")
    p.add_argument("checkpoint", help="model checkpoint (native .safetensors, mmseg .pth, official Segmenter)")
    p.add_argument("--ms-flip", action="store_true", help="multi-scale (eval.ms_scales) + flip test")
    p.add_argument("--oracle", action="store_true", help="GT-oracle model: every window receives the label's classes "
                                                         "(implied for such models)")
    add_set_option(p, "eval.mode=whole")
    p.add_argument("--use-config-model", action="store_true",
                   help="build the model from the config's model section instead of the checkpoint's")
    p.add_argument("--out", help="results JSON (default: <checkpoint>.eval.json); the per-class table "
                                 "(.per_class.csv), the confusion matrix (.confusion.npy) and a chart of the most "
                                 "confused classes (.confusion.png) are written beside it")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs (never the checkpoint, the config "
                                                        "or the dataset)")
    p.add_argument("--per-class", action="store_true", help="print the per-class IoU/Acc table (default: a summary)")
    add_device_option(p)
    add_precision_options(p)
    p.add_argument("--batch-size", type=positive_int, help="windows per forward pass (default: eval.batch_size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    checkpoint = resolve_checkpoint(Path(args.checkpoint))
    out = Path(args.out) if args.out else checkpoint.with_suffix(".eval.json")
    check_outputs(out, [checkpoint, args.config, cfg.data.root], args.force)
    ensure_outputs_writable(out)  # before hours of evaluation, not after
    model = load_model(args.checkpoint, config=cfg.model if args.use_config_model else None)
    if not args.use_config_model:
        check_model_overrides(args.set, cfg.model, model.cfg)
    if args.batch_size is not None:
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, batch_size=args.batch_size))
    done = evaluate.run(cfg, model, source=args.checkpoint, oracle=args.oracle, ms_flip=args.ms_flip,
                        device=args.device, progress=not args.no_progress, precision=args.precision,
                        compile=args.compile, announce=partial(announce_precision, "eval", args.precision))
    if done.reports:
        results = done.results | {"checkpoint": str(args.checkpoint), "config": str(args.config),
                                  "ms_flip": args.ms_flip, "oracle": args.oracle}
        names = done.class_names
        print(format_table(results, names) if args.per_class else format_summary(results, done.hist, names))
        if removed := files.remove_stale_temps(out.parent):
            print(f"segrank eval: removed {removed} temp files that killed runs left in {out.parent}")
        written = write_eval_outputs(out, results, done.hist, names)
        print(f"segrank eval: results written to {out} (with {', '.join(p.name for p in written[1:])})")
    return 0


def check_model_overrides(overrides: list[str], config_model: ModelConfig, checkpoint_model: ModelConfig) -> None:
    """Refuse a ``--set model.KEY=VALUE`` that the checkpoint's model contradicts: eval would silently ignore it.
    Values the checkpoint already has are accepted (the same --set list as for training)."""

    def at(tree: Any, path: list[str]) -> Any:
        for part in path:
            tree = tree.get(part) if isinstance(tree, dict) else None
        if isinstance(tree, dict):  # a preset stands for the sizes it fills in; class names come from the dataset
            return {k: at(v, []) for k, v in tree.items() if k not in ("preset", "class_names")}
        return tree

    given, stored = to_dict(config_model), to_dict(checkpoint_model)
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        path = key.split(".")[1:]
        if key.split(".")[0] != "model" or path[-1:] == ["class_names"]:
            continue
        path = path[:-1] if path[-1:] == ["preset"] else path
        if at(given, path) != at(stored, path):
            raise SegrankError(f"--set {item}: the checkpoint's model has {'.'.join(['model', *path])} = "
                               f"{at(stored, path)!r} and eval takes the model from the checkpoint; add "
                               "--use-config-model to build it from the config")

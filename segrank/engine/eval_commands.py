"""CLI: ``segrank eval`` and ``segrank predict``."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from segrank.errors import SegrankError


def _eval(args: argparse.Namespace) -> int:
    from segrank.checkpoints import _atomic_write, load_model
    from segrank.config import load_config
    from segrank.data import build_dataset, dataset_info
    from segrank.engine.evaluate import evaluate
    from segrank.engine.metrics import format_table, json_safe
    from segrank.engine.train import setup_distributed

    cfg = load_config(args.config, args.set)
    info = dataset_info(cfg.data.dataset, cfg.data.options, cfg.data.root)
    model = load_model(args.checkpoint, config=cfg.model if args.use_config_model else None)
    if model.num_classes != info.num_classes:
        raise SegrankError(f"{args.checkpoint}: model has {model.num_classes} classes, dataset "
                           f"{cfg.data.dataset!r} has {info.num_classes}")
    if args.oracle and not model.needs_present_classes:
        raise SegrankError(f"--oracle: {args.checkpoint} is not a GT-oracle model (head type rankseg_gt)")
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".eval.json")
    if out.is_dir():
        raise SegrankError(f"--out {out}: is a folder, expected a file name")
    env = setup_distributed(args.device)  # torchrun: each process evaluates a share of the images
    try:
        dataset = build_dataset(cfg.data, cfg.data.val_split, train=False)
        eval_cfg = cfg.eval if args.batch_size is None else dataclasses.replace(cfg.eval, batch_size=args.batch_size)
        results = evaluate(model.to(env.device), dataset, eval_cfg, num_classes=info.num_classes,
                           ignore_index=info.ignore_index, class_names=info.classes, oracle=args.oracle,
                           ms_flip=args.ms_flip, device=env.device, progress=env.main and not args.no_progress,
                           img_scale=cfg.data.img_scale, workers=cfg.data.workers)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if env.main:
        results |= {"checkpoint": str(args.checkpoint), "config": str(args.config), "ms_flip": args.ms_flip,
                    "oracle": args.oracle}
        print(format_table(results, info.classes))
        _atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(json_safe(results), indent=1)))
        print(f"segrank eval: results written to {out}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from segrank.checkpoints import load_model
    from segrank.engine.predict import collect_inputs, predict_files, resolve_settings

    paths = collect_inputs(args.inputs)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SegrankError(f"--out {out}: exists and is not a folder")
    checkpoint = Path(args.checkpoint)
    model = load_model(checkpoint)
    if model.needs_present_classes:
        raise SegrankError(f"{checkpoint}: a GT-oracle model needs label maps; use segrank eval --oracle")
    settings = resolve_settings(model, checkpoint, args.config, args.mean, args.std, args.img_scale)
    if args.mode is not None:
        settings.eval = dataclasses.replace(settings.eval, mode=args.mode)
    if args.batch_size is not None:
        settings.eval = dataclasses.replace(settings.eval, batch_size=args.batch_size)
    for note in settings.notes:
        print(f"segrank predict: no setting stored with the checkpoint, using {note}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SegrankError("--device cuda: no CUDA device available")
    written = predict_files(model, paths, out, settings, ms_flip=args.ms_flip, device=device,
                            progress=not args.no_progress)
    print(f"segrank predict: {len(paths)} images, {len(written)} files written to {out}")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser("eval", help="evaluate a checkpoint on a config's validation set (mIoU, aAcc, mAcc); "
                                             "under torchrun the images are shared among the processes")
    ev.add_argument("config", help="YAML config naming the dataset and the test settings")
    ev.add_argument("checkpoint", help="model checkpoint (native .safetensors, mmseg .pth, official Segmenter)")
    ev.add_argument("--ms-flip", action="store_true", help="multi-scale (eval.ms_scales) + flip test")
    ev.add_argument("--oracle", action="store_true", help="GT-oracle model: every window receives the label's classes "
                                                           "(implied for such models)")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set eval.mode=whole (repeatable)")
    ev.add_argument("--use-config-model", action="store_true",
                    help="build the model from the config's model section instead of the checkpoint's")
    ev.add_argument("--out", help="results JSON (default: <checkpoint>.eval.json)")
    ev.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    ev.add_argument("--batch-size", type=_positive, help="windows per forward pass (default: eval.batch_size)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=_eval)

    pr = subparsers.add_parser("predict", help="segment image files: label, colour and overlay PNGs (+ RankSeg "
                                               "class ranking JSON)")
    pr.add_argument("checkpoint", help="model checkpoint")
    pr.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    pr.add_argument("--out", required=True, help="output folder")
    pr.add_argument("--config", help="YAML config giving normalisation, test scale and windows (default: the "
                                     "training run's config.yaml beside the checkpoint, if any)")
    pr.add_argument("--ms-flip", action="store_true", help="multi-scale + flip test")
    mode = pr.add_mutually_exclusive_group()
    mode.add_argument("--slide", dest="mode", action="store_const", const="slide", help="sliding-window inference")
    mode.add_argument("--whole", dest="mode", action="store_const", const="whole", help="whole-image inference")
    pr.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="normalisation mean (0-255)")
    pr.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="normalisation std (0-255)")
    pr.add_argument("--img-scale", type=int, nargs=2, metavar=("LONG", "SHORT"), help="keep-ratio test scale")
    pr.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    pr.add_argument("--batch-size", type=_positive, help="windows per forward pass")
    pr.add_argument("--no-progress", action="store_true", help="no per-image progress lines")
    pr.set_defaults(func=_predict, mode=None)
